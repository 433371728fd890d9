#!/usr/bin/env bash
# Query benchmark: study-level C-FIND latency on huren (SQLite, PostgreSQL)
# and Orthanc. Not a test. Method and figures: docs/benchmarks.md, "Query and retrieve".
#
#   benches/query.sh [--studies N] [--real-studies M] [--queries Q]
#                    [--servers orthanc,huren-sqlite,huren-postgres]
#                    [--sizes real,full] [--client raw|pynetdicom]
#                    [--max-query-matches K] [--work-dir DIR] [--out FILE] [--keep]
#                    [--report-from RUNDIR]
#
# M real studies (default 10,000; one instance per series, ~2.4 per study) are
# written as DICOM files and stored through C-STORE in every server: that is
# the equal-size comparison ("real"). huren is then grown to N studies
# (default 100,000, ~1,000,000 instances) by writing index rows directly
# (benches/query-gen.py rows) and measured again ("full").
#
# --max-query-matches sets huren's cap on matches per C-FIND (its default,
# 10,000, ends the unselective ModalitiesInStudy queries with A700 at 100k
# studies; Orthanc has no cap by default). --report-from re-renders the report
# of an earlier run (its RUNDIR/results.jsonl; give the same size options).
#
# Environment: HUREN_BIN (default <repo>/target/release/huren), DCMTK_BIN
# (/usr/bin), ORTHANC_BIN (/usr/sbin/Orthanc), PYTHON (default the test venv
# /root/.cache/huren-ci/venv/bin/python if present, else python3; needs
# pydicom, and psycopg for PostgreSQL), PG_BIN (newest /usr/lib/postgresql/*/bin).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

studies=100000
real=10000
queries=200
servers_sel="orthanc,huren-sqlite,huren-postgres"
sizes_sel="real,full"
client=raw
work_dir="${HUREN_BENCH_WORK:-/tmp/huren-query-bench}"
out_file=""
keep=0
report_from=""

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --studies) studies="$2"; shift ;;
        --real-studies) real="$2"; shift ;;
        --queries) queries="$2"; shift ;;
        --servers) servers_sel="$2"; shift ;;
        --sizes) sizes_sel="$2"; shift ;;
        --client) client="$2"; shift ;;
        --work-dir) work_dir="$2"; shift ;;
        --out) out_file="$2"; shift ;;
        --keep) keep=1 ;;
        --report-from) report_from="$2"; shift ;;
        --max-query-matches) export HUREN_MAX_QUERY_MATCHES="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
(( real <= studies )) || { echo "--real-studies must not exceed --studies" >&2; exit 2; }
IFS=, read -r -a servers <<<"$servers_sel"
for s in "${servers[@]}"; do
    case "$s" in orthanc|huren-sqlite|huren-postgres) ;; *) echo "unknown server: $s" >&2; exit 2 ;; esac
done
want_size() { [[ ",$sizes_sel," == *",$1,"* ]]; }

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x /root/.cache/huren-ci/venv/bin/python ]] && PYTHON=/root/.cache/huren-ci/venv/bin/python
fi
DCMTK_BIN="${DCMTK_BIN:-/usr/bin}"
STORESCU="$DCMTK_BIN/storescu"
ECHOSCU="$DCMTK_BIN/echoscu"
ORTHANC_BIN="${ORTHANC_BIN:-/usr/sbin/Orthanc}"
HUREN_BIN="${HUREN_BIN:-$repo/target/release/huren}"
PG_BIN="${PG_BIN:-$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n1)}"
GEN="$here/query-gen.py"
CLIENT="$here/query-client.py"
# Debian's dcmtk (storescu, and Orthanc, which links it) leaves Nagle on.
export TCP_NODELAY=1

"$PYTHON" -c 'import pydicom' || { echo "query: $PYTHON cannot import pydicom" >&2; exit 1; }
[[ -x "$STORESCU" ]] || { echo "missing $STORESCU (apt-get install dcmtk)" >&2; exit 1; }
if [[ " ${servers[*]} " == *" huren-"* && ! -x "$HUREN_BIN" ]]; then
    echo "query: HUREN_BIN=$HUREN_BIN does not exist (cargo build --release)" >&2; exit 1
fi
if [[ " ${servers[*]} " == *" huren-postgres "* ]]; then
    [[ -x "$PG_BIN/initdb" ]] || { echo "query: no PostgreSQL under $PG_BIN" >&2; exit 1; }
    "$PYTHON" -c 'import psycopg' || { echo "query: $PYTHON -m pip install 'psycopg[binary]'" >&2; exit 1; }
fi

stamp=$(date +%Y%m%d-%H%M%S)
run="${report_from:-$work_dir/run-$stamp}"
logs="$run/logs"
cache="$work_dir/cache"
mkdir -p "$logs" "$cache"
results="$run/results.jsonl"
[[ -n "$report_from" ]] || : >"$results"
log() { echo "query: $*" >&2; }

server_pid=""
pg_data=""
cleanup() {
    if [[ -n "$server_pid" ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if [[ -n "$pg_data" ]]; then as_pg "$PG_BIN/pg_ctl" -D "$pg_data" -m immediate stop >/dev/null 2>&1 || true; fi
    [[ $keep == 1 ]] || rm -rf "$run/data"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
free_ports() {
    "$PYTHON" - <<'EOF'
import socket
ss = [socket.socket() for _ in range(2)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))
EOF
}
wait_echo() { # port timeout_s
    local deadline=$(( $(date +%s) + $2 ))
    while (( $(date +%s) < deadline )); do
        kill -0 "$server_pid" 2>/dev/null || return 1
        "$ECHOSCU" -to 1 127.0.0.1 "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}
wait_log() { # file pattern timeout_s
    local deadline=$(( $(date +%s) + $3 ))
    while (( $(date +%s) < deadline )); do
        kill -0 "$server_pid" 2>/dev/null || return 1
        grep -qF "$2" "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}
stop_server() {
    [[ -n "$server_pid" ]] || return 0
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}

# ------------------------------------------------------------ inputs
files="$cache/files-$real"
if [[ -n "$report_from" ]]; then
    nfiles=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["files"])' "$files.json")
    instances_full=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["instances_full"])' "$cache/manifest-$studies-$queries.json")
else
log "DICOM files for $real real studies in $files"
"$PYTHON" "$GEN" files --studies "$real" --out "$files" >"$logs/files.json"
nfiles=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["files"])' "$logs/files.json")
find "$files" -name '*.dcm' -exec cat {} + >/dev/null  # page cache
for n in "$real" "$studies"; do
    [[ -s "$cache/manifest-$n-$queries.json" ]] ||
        "$PYTHON" "$GEN" manifest --studies "$n" --queries "$queries" --out "$cache/manifest-$n-$queries.json"
done

# load NAME PORT AEC: C-STORE the real files with four storescu in parallel
load() {
    local name=$1 port=$2 aec=$3 k fail=0 pids=() t0 t1
    t0=$(now)
    for k in 0 1 2 3; do
        "$STORESCU" -aec "$aec" -ta 600 +sd +r +sp '*.dcm' 127.0.0.1 "$port" "$files/part$k" \
            >"$logs/$name.load$k.log" 2>&1 &
        pids+=($!)
    done
    for k in "${pids[@]}"; do wait "$k" || fail=1; done
    t1=$(now)
    load_secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    log "$name: stored $nfiles files in ${load_secs} s ($(awk -v n="$nfiles" -v s="$load_secs" 'BEGIN { printf "%.0f", n / s }')/s)"
    [[ $fail == 0 ]] || { log "$name: a storescu failed (see $logs/$name.load*.log)"; return 1; }
}

# measure NAME PORT AEC STUDIES INSTANCES LOADINFO
measure() {
    local name=$1 port=$2 aec=$3 n=$4 instances=$5 loadinfo=$6
    log "$name: C-FIND, $n studies, $instances instances"
    local out
    if out=$("$PYTHON" "$CLIENT" --port "$port" --aec "$aec" --client "$client" \
            --manifest "$cache/manifest-$n-$queries.json" --queries "$queries" --label "$name" \
            --dump "$logs/$name-$n.queries.jsonl" \
            2>>"$logs/$name.client.log"); then
        "$PYTHON" - "$out" "$instances" "$loadinfo" "$server_pid" "$logs/$name-$n.queries.jsonl" >>"$results" <<'EOF'
import json, statistics, sys
o = json.loads(sys.argv[1])
o["instances"] = int(sys.argv[2])
o["load"] = sys.argv[3]
o["loadavg"] = " ".join(open("/proc/loadavg").read().split()[:3])  # the machine, after the queries
# PatientName prefixes with and without non-ASCII letters (García^K*), apart
split = {}
for line in open(sys.argv[5]):
    d = json.loads(line)
    if d["kind"] == "patient_name":
        split.setdefault("ascii" if d["query"]["PatientName"].isascii() else "non_ascii", []).append(d["ms"])
for k, ms in split.items():
    ms.sort()
    p99 = statistics.quantiles(ms, n=100, method="inclusive")[98] if len(ms) > 1 else ms[0]
    o.setdefault("patient_name_split", {})[k] = {"n": len(ms), "p50_ms": round(statistics.median(ms), 3),
                                                 "p99_ms": round(p99, 3)}
try:
    o["rss_mb"] = round(int([l for l in open(f"/proc/{sys.argv[4]}/status") if l.startswith("VmHWM")][0].split()[1]) / 1024)
except Exception:
    pass
print(json.dumps(o, ensure_ascii=False))
EOF
        tail -n 5 "$logs/$name.client.log" >&2
    else
        log "$name: client failed: $(tail -n 1 "$logs/$name.client.log")"
        printf '{"label": "%s", "studies": %s, "instances": %s, "failed": true, "error": %s}\n' "$name" "$n" "$instances" \
            "$("$PYTHON" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$(tail -n 1 "$logs/$name.client.log")")" >>"$results"
    fi
}

start_huren() { # NAME DATADIR DBURL
    local name=$1 data=$2 url=$3
    read -r dicom_port http_port < <(free_ports)
    "$HUREN_BIN" node --data-dir "$data" --database-url "$url" \
        --dicom-listen "127.0.0.1:$dicom_port" --http-listen "127.0.0.1:$http_port" \
        >>"$logs/$name.server.log" 2>&1 &
    server_pid=$!
    wait_log "$logs/$name.server.log" "DICOM listening on 127.0.0.1:$dicom_port" 120 ||
        { log "$name: node did not start (see $logs/$name.server.log)"; return 1; }
}

instances_real=$(( nfiles ))
instances_full=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["instances_full"])' "$cache/manifest-$studies-$queries.json")

# huren_run NAME URL_REAL URL_FULL: real slice via C-STORE, then grown to N
huren_run() {
    local name=$1 url_real=$2 url_full=$3 data="$run/data/$1"
    mkdir -p "$data/real"
    start_huren "$name-real" "$data/real" "$url_real"
    load "$name-real" "$dicom_port" HUREN
    local loadinfo="C-STORE $nfiles files, ${load_secs} s"
    "$PYTHON" "$GEN" check --studies "$real" --db "$url_real" 2>&1 | tail -n 3 >&2
    want_size real && measure "$name" "$dicom_port" HUREN "$real" "$instances_real" "$loadinfo"
    stop_server
    want_size full || return 0
    # grow a copy to N studies / full instance counts: blobs hard-linked
    # (nothing writes them), the SQLite index copied
    cp -al "$data/real" "$data/full"
    rm -f "$data/full"/index.sqlite*
    for f in "$data/real"/index.sqlite*; do [[ -e "$f" ]] && cp "$f" "$data/full/"; done
    if [[ "$url_full" != same ]]; then
        "$PYTHON" - "$url_real" "$url_full" <<'EOF'
import sys, psycopg
src, dst = sys.argv[1].rsplit("/", 1)[1], sys.argv[2].rsplit("/", 1)
with psycopg.connect(dst[0] + "/postgres", autocommit=True) as c:
    c.execute(f'CREATE DATABASE "{dst[1]}" TEMPLATE "{src}"')
EOF
    else
        url_full="sqlite://$data/full/index.sqlite"
    fi
    local t0 t1 analyze=()
    [[ "$url_full" == postgres* ]] && analyze=(--analyze)
    t0=$(now)
    "$PYTHON" "$GEN" rows --studies "$studies" --from "$real" --db "$url_full" "${analyze[@]}" \
        >"$logs/$name.rows.json" 2>"$logs/$name.rows.log"
    t1=$(now)
    tail -n 1 "$logs/$name.rows.log" >&2
    start_huren "$name-full" "$data/full" "$url_full"
    measure "$name" "$dicom_port" HUREN "$studies" "$instances_full" \
        "C-STORE $nfiles files + rows written directly ($(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", b - a }') s)"
    stop_server
}

# ------------------------------------------------------------ servers
for s in "${servers[@]}"; do
    case "$s" in
    orthanc)
        want_size real || continue
        data="$run/data/orthanc"
        mkdir -p "$data/storage" "$data/index" "$data/tmp"
        read -r dicom_port http_port < <(free_ports)
        cat >"$run/orthanc.json" <<EOF
{
  "Name": "huren-query-bench",
  "StorageDirectory": "$data/storage",
  "IndexDirectory": "$data/index",
  "TemporaryDirectory": "$data/tmp",
  "DicomServerEnabled": true,
  "DicomAet": "ORTHANC",
  "DicomPort": $dicom_port,
  "DicomCheckCalledAet": false,
  "DicomAlwaysAllowEcho": true,
  "DicomAlwaysAllowStore": true,
  "DicomAlwaysAllowFind": true,
  "DicomCheckModalityHost": false,
  "DicomModalities": {},
  "HttpServerEnabled": true,
  "HttpPort": $http_port,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "SslEnabled": false,
  "Plugins": [],
  "LuaScripts": []
}
EOF
        "$ORTHANC_BIN" "$run/orthanc.json" >"$logs/orthanc.server.log" 2>&1 &
        server_pid=$!
        wait_echo "$dicom_port" 60 || { log "orthanc did not start"; exit 1; }
        load orthanc "$dicom_port" ORTHANC
        got=$(curl -sf "http://127.0.0.1:$http_port/statistics" | "$PYTHON" -c 'import json,sys; d=json.load(sys.stdin); print(d["CountStudies"], d["CountInstances"])')
        log "orthanc: holds $got (studies, instances)"
        measure orthanc "$dicom_port" ORTHANC "$real" "$instances_real" "C-STORE $nfiles files, ${load_secs} s"
        stop_server
        ;;
    huren-sqlite)
        huren_run huren-sqlite "sqlite://$run/data/huren-sqlite/real/index.sqlite" same
        ;;
    huren-postgres)
        # A throwaway cluster of our own, like scripts/test.sh's.
        pg_port=$(free_ports | cut -d' ' -f1)
        pg_data="$run/pg/data"
        if [[ "$(id -u)" -eq 0 ]]; then
            as_pg() { runuser -u postgres -- "$@"; }
            chmod 711 "$work_dir" "$run"; mkdir -p "$run/pg"; chown postgres: "$run/pg"
        else
            as_pg() { "$@"; }; mkdir -p "$run/pg"
        fi
        as_pg "$PG_BIN/initdb" -D "$pg_data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
            >"$logs/pg-initdb.log" 2>&1 || { cat "$logs/pg-initdb.log" >&2; exit 1; }
        # Durability off for loading speed: queries do not write.
        as_pg "$PG_BIN/pg_ctl" -D "$pg_data" -l "$run/pg/log" -W start -o "\
 -c listen_addresses=127.0.0.1 -p $pg_port -c unix_socket_directories=$run/pg\
 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=512MB" >/dev/null
        for _ in $(seq 1 100); do "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break; sleep 0.1; done
        "$PYTHON" - "$pg_port" <<'EOF'
import sys, psycopg
with psycopg.connect(f"postgres://postgres@127.0.0.1:{sys.argv[1]}/postgres", autocommit=True) as c:
    c.execute('CREATE DATABASE huren_real')
EOF
        base="postgres://postgres@127.0.0.1:$pg_port"
        huren_run huren-postgres "$base/huren_real" "$base/huren_full"
        as_pg "$PG_BIN/pg_ctl" -D "$pg_data" -m fast stop >/dev/null
        pg_data=""
        ;;
    esac
done

fi  # not --report-from

# ------------------------------------------------------------ report
if [[ -z "$out_file" ]]; then
    out_file="$here/results/results-query-$(date +%Y-%m-%d).md"
    [[ -e "$out_file" ]] && out_file="$here/results/results-query-$(date +%Y-%m-%d-%H%M%S).md"
fi
{
    echo "# Query benchmark $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "- command: \`benches/query.sh --studies $studies --real-studies $real --queries $queries --servers $servers_sel --sizes $sizes_sel --client $client${HUREN_MAX_QUERY_MATCHES:+ --max-query-matches $HUREN_MAX_QUERY_MATCHES}\`"
    echo "- machine: $(nproc) cores, $(awk '/^model name/ { sub(/^[^:]*: /, ""); print; exit }' /proc/cpuinfo), $(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r)"
    echo "- huren: $HUREN_BIN (${HUREN_REV:-$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')})"
    echo "- Orthanc: $("$ORTHANC_BIN" --version 2>&1 | head -1); PostgreSQL: $("$PG_BIN/postgres" --version 2>/dev/null || echo '-')"
    echo "- real slice: $real studies, $nfiles instances (one per series) stored through C-STORE; full: $studies studies, $instances_full instances"
    echo
    "$PYTHON" - "$results" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
kinds = ["patient_id", "patient_name", "study_date", "modality_date", "modality"]
label = {"patient_id": "PatientID", "patient_name": "PatientName prefix*", "study_date": "StudyDate 3-day range",
         "modality_date": "ModalitiesInStudy + StudyDate", "modality": "ModalitiesInStudy alone"}
print("| server | studies | instances | query | n | p50 ms | p99 ms | max ms | matches (mean) | wrong counts |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r.get("failed"):
        print(f"| {r['label']} | {r['studies']:,} | {r['instances']:,} | failed: {r.get('error','')} | | | | | | |")
        continue
    for k in kinds:
        v = r["kinds"].get(k)
        if not v:
            continue
        capped = f" ({v['capped']} capped)" if v.get("capped") else ""
        print(f"| {r['label']} | {r['studies']:,} | {r['instances']:,} | {label[k]} | {v['n']} | {v.get('p50_ms', '–')} "
              f"| {v.get('p99_ms', '–')} | {v.get('max_ms', '–')} | {v['matches_mean']:,}{capped} | {v['wrong_count']} |")
        if k == "patient_name":
            for part, what in (("ascii", "ASCII prefix"), ("non_ascii", "prefix with non-ASCII letters")):
                sp = r.get("patient_name_split", {}).get(part)
                if sp and len(r.get("patient_name_split", {})) > 1:
                    print(f"| {r['label']} | | | … {what} | {sp['n']} | {sp['p50_ms']} | {sp['p99_ms']} | | | |")
print()
print("| server | studies | instances | loaded by | C-ECHO p50 / p99 ms (client floor) | peak RSS MB | load average after |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    if r.get("failed"):
        continue
    e = r.get("echo", {})
    print(f"| {r['label']} | {r['studies']:,} | {r['instances']:,} | {r.get('load','')} | {e.get('p50_ms','–')} / {e.get('p99_ms','–')} "
          f"| {r.get('rss_mb','–')} | {r.get('loadavg', '–')} |")
# ratios at equal size
# equal size: the same studies and instances (the real slice)
by = {(r["label"], r["studies"], r["instances"]): r for r in rows if not r.get("failed")}
orth = [r for r in rows if r["label"] == "orthanc" and not r.get("failed")]
if orth and any((l, orth[0]["studies"], orth[0]["instances"]) in by for l in ("huren-sqlite", "huren-postgres")):
    o = orth[0]
    size = (o["studies"], o["instances"])
    print()
    print(f"How many times faster than Orthanc at equal size ({o['studies']:,} studies, {o['instances']:,} instances), p50 / p99:")
    print()
    print("| query | " + " | ".join(l for l in ("huren-sqlite", "huren-postgres") if (l, *size) in by) + " |")
    print("|---|" + "---|" * sum(1 for l in ("huren-sqlite", "huren-postgres") if (l, *size) in by))
    for k in kinds:
        cells = []
        for l in ("huren-sqlite", "huren-postgres"):
            h = by.get((l, *size))
            if h is None:
                continue
            try:
                x50 = o['kinds'][k]['p50_ms'] / h['kinds'][k]['p50_ms']
                x99 = o['kinds'][k]['p99_ms'] / h['kinds'][k]['p99_ms']
                cells.append(" / ".join(f"{x:.0f}×" if x >= 10 else f"{x:.1f}×" for x in (x50, x99)))
            except (KeyError, ZeroDivisionError):
                cells.append("–")
        print(f"| {label[k]} | " + " | ".join(cells) + " |")
EOF
    echo
    echo "Latency: from sending the C-FIND-RQ until the final C-FIND-RSP, all matches received,"
    echo "one association per server, queries one after the other (warm cache: 5 untimed queries"
    echo "of each kind first). \"wrong counts\": queries whose number of matches differs from the"
    echo "generator's expectation."
    echo
    echo "<details><summary>raw results</summary>"
    echo
    echo '```'
    cat "$results"
    echo '```'
    echo
    echo "</details>"
} >"$out_file.tmp"
mv "$out_file.tmp" "$out_file"
cat "$out_file"
log "report written to $out_file (run dir $run)"
