#!/usr/bin/env bash
# Ingest benchmark: huren vs dcmtk's storescp vs Orthanc, C-STORE over loopback.
# Not a test. See benches/README.md.
#
#   benches/ingest.sh [--quick] [--corpus ct|tiny|big|all] [--runs N]
#                     [--servers storescp,orthanc,huren-relaxed,huren-full]
#                     [--senders 1,4] [--corpus-dir DIR] [--work-dir DIR] [--out FILE]
#
# Environment: HUREN_BIN (default: <repo>/target/release/huren), DCMTK_BIN
# (default /usr/bin), ORTHANC_BIN (default /usr/sbin/Orthanc), PYTHON (python3),
# SQLITE3 (default sqlite3; counts what huren stored).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

quick=0
corpus_sel=all
runs=3
servers_sel="storescp,orthanc,huren-relaxed,huren-full"
senders_sel="1,4"
corpus_dir="${HUREN_BENCH_CORPUS:-/tmp/huren-bench-corpus}"
work_dir="${HUREN_BENCH_WORK:-/tmp/huren-bench-work}"
out_file=""

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=1 ;;
        --corpus) corpus_sel="$2"; shift ;;
        --runs) runs="$2"; shift ;;
        --servers) servers_sel="$2"; shift ;;
        --senders) senders_sel="$2"; shift ;;
        --corpus-dir) corpus_dir="$2"; shift ;;
        --work-dir) work_dir="$2"; shift ;;
        --out) out_file="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

case "$corpus_sel" in
    ct|tiny|big) corpora=("$corpus_sel") ;;
    all) corpora=(ct tiny big) ;;
    *) echo "--corpus must be ct, tiny, big or all" >&2; exit 2 ;;
esac
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "--runs must be a positive integer" >&2; exit 2; }
IFS=, read -r -a servers <<<"$servers_sel"
IFS=, read -r -a sender_counts <<<"$senders_sel"
for s in "${servers[@]}"; do
    case "$s" in storescp|orthanc|huren-relaxed|huren-full) ;;
        *) echo "unknown server: $s" >&2; exit 2 ;; esac
done
for n in "${sender_counts[@]}"; do
    case "$n" in 1|4) ;; *) echo "--senders takes 1 and/or 4" >&2; exit 2 ;; esac
done

PYTHON="${PYTHON:-python3}"
DCMTK_BIN="${DCMTK_BIN:-/usr/bin}"
STORESCP="$DCMTK_BIN/storescp"
STORESCU="$DCMTK_BIN/storescu"
ECHOSCU="$DCMTK_BIN/echoscu"
ORTHANC_BIN="${ORTHANC_BIN:-/usr/sbin/Orthanc}"
HUREN_BIN="${HUREN_BIN:-$repo/target/release/huren}"
SQLITE3="${SQLITE3:-sqlite3}"
# Debian's dcmtk leaves Nagle on: without this every C-STORE waits ~40 ms.
export TCP_NODELAY=1

for t in "$STORESCP" "$STORESCU" "$ECHOSCU"; do
    [[ -x "$t" ]] || { echo "missing $t (apt-get install dcmtk)" >&2; exit 1; }
done

# Drop servers that cannot run here, with a reason.
active=()
for s in "${servers[@]}"; do
    case "$s" in
        orthanc)
            if [[ -x "$ORTHANC_BIN" ]]; then active+=("$s")
            else echo "ingest: skipping orthanc: $ORTHANC_BIN not found (apt-get install orthanc)" >&2; fi ;;
        huren-*)
            if [[ -x "$HUREN_BIN" ]]; then active+=("$s")
            else echo "ingest: skipping $s: HUREN_BIN=$HUREN_BIN does not exist (cargo build --release, or set HUREN_BIN)" >&2; fi ;;
        *) active+=("$s") ;;
    esac
done
[[ ${#active[@]} -gt 0 ]] || { echo "no server to measure" >&2; exit 1; }
# huren's stored count is read from its SQLite index.
if [[ " ${active[*]} " == *" huren-"* ]]; then
    command -v "$SQLITE3" >/dev/null || { echo "missing $SQLITE3 (apt-get install sqlite3)" >&2; exit 1; }
fi

suffix=""; [[ $quick == 1 ]] && suffix="-quick"
mkdir -p "$corpus_dir" "$work_dir"
"$PYTHON" "$here/make-corpus.py" --dir "$corpus_dir" --corpus "$corpus_sel" \
    ${suffix:+--quick} >/dev/null

stamp=$(date +%Y%m%d-%H%M%S)
raw="$work_dir/raw-$stamp.tsv"
logs="$work_dir/logs-$stamp"
mkdir -p "$logs"
printf 'run\tcorpus\tsenders\tserver\tstatus\tinstances\tbytes\tseconds\tpeak_rss_kb\n' >"$raw"

server_pid=""
sender_pids=()
cleanup() {
    local p
    for p in "${sender_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    if [[ -n "$server_pid" ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work_dir/run-$stamp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }

# Two distinct free loopback ports.
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
        sleep 0.05
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
    for _ in $(seq 1 200); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}

# start_server NAME CORPUS DATADIR LOG SENDERS -> sets server_pid, dicom_port, http_port
start_server() {
    local name=$1 corpus=$2 data=$3 log=$4 nsend=$5
    read -r dicom_port http_port < <(free_ports)
    case "$name" in
        storescp)
            local extra=()
            [[ "$corpus" == big* ]] && extra+=(--bit-preserving)
            # With several senders, one process per association (how dcmtk
            # serves concurrent senders); a single process would serve them
            # one after the other and understate dcmtk.
            [[ "$nsend" -gt 1 ]] && extra+=(--fork)
            "$STORESCP" -od "$data" "${extra[@]}" "$dicom_port" >"$log" 2>&1 &
            server_pid=$!
            wait_echo "$dicom_port" 30 ;;
        orthanc)
            local cfg="$data/../orthanc.json"
            mkdir -p "$data/storage" "$data/index" "$data/tmp"
            cat >"$cfg" <<EOF
{
  "Name": "huren-bench",
  "StorageDirectory": "$data/storage",
  "IndexDirectory": "$data/index",
  "TemporaryDirectory": "$data/tmp",
  "DicomServerEnabled": true,
  "DicomAet": "ORTHANC",
  "DicomPort": $dicom_port,
  "DicomCheckCalledAet": false,
  "DicomAlwaysAllowEcho": true,
  "DicomAlwaysAllowStore": true,
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
            "$ORTHANC_BIN" "$cfg" >"$log" 2>&1 &
            server_pid=$!
            wait_echo "$dicom_port" 60 ;;
        huren-relaxed|huren-full)
            "$HUREN_BIN" node --data-dir "$data" \
                --dicom-listen "127.0.0.1:$dicom_port" --http-listen "127.0.0.1:$http_port" \
                --durability "${name#huren-}" >"$log" 2>&1 &
            server_pid=$!
            wait_log "$log" "DICOM listening on 127.0.0.1:$dicom_port" 60 ;;
    esac
}

# Instances the server says it holds, or "" when it cannot tell.
stored_count() {
    local name=$1 data=$2
    case "$name" in
        storescp) find "$data" -type f | wc -l ;;
        orthanc) curl -sf "http://127.0.0.1:$http_port/statistics" \
                    | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["CountInstances"])' \
                    2>/dev/null || echo "" ;;
        # default SQLite index at <data-dir>/index.sqlite; "?" (a failed run)
        # when it cannot be read
        huren-*) "$SQLITE3" "$data/index.sqlite" \
                    'select count(*) from instance where is_current = 1' 2>/dev/null || echo "?" ;;
        *) echo "" ;;
    esac
}

# measure RUN CORPUS SENDERS SERVER
measure() {
    local run=$1 corpus=$2 nsend=$3 name=$4
    local cdir="$corpus_dir/$corpus"
    local files bytes
    files=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["files"])' "$corpus_dir/$corpus.json")
    bytes=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["bytes"])' "$corpus_dir/$corpus.json")
    local tag="$run-$corpus-$nsend-$name"
    # Every measurement gets its own directory, and none is deleted until the
    # whole benchmark ends: ext4 skips inodes deleted in the last ~30 s when
    # it allocates new ones (recently_deleted), so deleting a run's files
    # would slow whichever server creates files next.
    local rundir="$work_dir/run-$stamp/$tag"
    mkdir -p "$rundir/data"
    local status=ok secs=0 rss=0
    local started=0 attempt
    # A port found free can be taken by another process before the server
    # binds it (other work on the machine): try again on fresh ports.
    for attempt in 1 2 3; do
        if start_server "$name" "$corpus" "$rundir/data" "$logs/$tag.server.log" "$nsend"; then
            started=1
            break
        fi
        stop_server
        grep -q "Address already in use" "$logs/$tag.server.log" 2>/dev/null || break
    done
    if [[ $started == 0 ]]; then
        status=start-failed
    else
        local t0 t1 k fail=0
        sender_pids=()
        t0=$(now)
        if [[ $nsend == 1 ]]; then
            "$STORESCU" -ta 600 +sd +r +sp '*.dcm' 127.0.0.1 "$dicom_port" "$cdir" \
                >"$logs/$tag.sender0.log" 2>&1 &
            sender_pids+=($!)
        else
            for k in 0 1 2 3; do
                "$STORESCU" -ta 600 +sd +r +sp '*.dcm' 127.0.0.1 "$dicom_port" "$cdir/part$k" \
                    >"$logs/$tag.sender$k.log" 2>&1 &
                sender_pids+=($!)
            done
        fi
        for k in "${sender_pids[@]}"; do wait "$k" || fail=1; done
        t1=$(now)
        sender_pids=()
        secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
        if kill -0 "$server_pid" 2>/dev/null; then
            rss=$(awk '/^VmHWM:/ { print $2 }' "/proc/$server_pid/status" 2>/dev/null || echo 0)
        else
            status=server-died
        fi
        [[ $fail == 1 && $status == ok ]] && status=store-failed
        if [[ $status == ok ]]; then
            local got
            got=$(stored_count "$name" "$rundir/data")
            if [[ -n "$got" && "$got" != "$files" ]]; then status="stored-$got-of-$files"; fi
        fi
        stop_server
    fi
    stop_server
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$run" "$corpus" "$nsend" "$name" "$status" "$files" "$bytes" "$secs" "$rss" >>"$raw"
    printf 'ingest: run %s %-10s senders=%s %-14s %-12s %6ss  %s instances  peak RSS %s MB\n' \
        "$run" "$corpus" "$nsend" "$name" "$status" "$secs" "$files" "$(( rss / 1024 ))" >&2
    sync
}

# Warm the page cache so that no server pays for reading the corpus from disk.
for c in "${corpora[@]}"; do cat "$corpus_dir/$c$suffix"/part*/*.dcm >/dev/null; done

for run in $(seq 1 "$runs"); do
    for c in "${corpora[@]}"; do
        for n in "${sender_counts[@]}"; do
            # a single instance cannot be split across four senders
            [[ $c == big && $n != 1 ]] && continue
            for s in "${active[@]}"; do
                measure "$run" "$c$suffix" "$n" "$s"
            done
        done
    done
done

# ---------------------------------------------------------------- report
if [[ -z "$out_file" ]]; then
    out_file="$here/results/results-$(date +%Y-%m-%d).md"
    [[ -e "$out_file" ]] && out_file="$here/results/results-$(date +%Y-%m-%d-%H%M%S).md"
fi

versions() {
    echo "- storescp: $("$STORESCP" --version 2>&1 | head -1)"
    [[ -x "$ORTHANC_BIN" ]] && echo "- Orthanc: $("$ORTHANC_BIN" --version 2>&1 | head -1)"
    if [[ -x "$HUREN_BIN" ]]; then
        echo "- huren: $HUREN_BIN ($("$HUREN_BIN" --version 2>&1 | head -1 || true))"
    else
        echo "- huren: not measured ($HUREN_BIN missing)"
    fi
}

{
    echo "# Ingest benchmark $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "- command: \`benches/ingest.sh --corpus $corpus_sel --runs $runs --servers $servers_sel --senders $senders_sel$([[ $quick == 1 ]] && echo ' --quick')\`"
    echo "- machine: $(nproc) cores, $(awk '/^model name/ { sub(/^[^:]*: /, ""); print; exit }' /proc/cpuinfo), $(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r)"
    echo "- work dir: $work_dir ($(df -T "$work_dir" | awk 'NR == 2 { print $2 " on " $1 }'))"
    versions
    echo
    "$PYTHON" - "$raw" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
groups = {}
for r in rows:
    groups.setdefault((r["corpus"], int(r["senders"])), {}).setdefault(r["server"], []).append(r)

def num(x):
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"

def med(xs):
    return statistics.median(xs) if xs else float("nan")

print("| corpus | senders | server | ok runs | instances | MB | median s | instances/s "
      "| MB/s | peak RSS MB | vs storescp | vs Orthanc |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for (corpus, senders), by_server in groups.items():
    stats = {}
    for server, rs in by_server.items():
        ok = [r for r in rs if r["status"] == "ok"]
        secs = [float(r["seconds"]) for r in ok]
        n, b = int(rs[0]["instances"]), int(rs[0]["bytes"])
        stats[server] = dict(
            ok=len(ok), total=len(rs), n=n, mb=b / 1e6,
            secs=med(secs),
            ips=med([n / s for s in secs]),
            mbs=med([b / 1e6 / s for s in secs]),
            rss=med([int(r["peak_rss_kb"]) / 1024 for r in ok]),
            bad=sorted({r["status"] for r in rs if r["status"] != "ok"}))
    for server, s in stats.items():
        def ratio(ref):
            if ref not in stats or not stats[ref]["ok"] or not s["ok"]:
                return "–"
            return f"{s['ips'] / stats[ref]['ips']:.2f}×"
        okcol = f"{s['ok']}/{s['total']}" + (f" ({', '.join(s['bad'])})" if s["bad"] else "")
        if s["ok"]:
            print(f"| {corpus} | {senders} | {server} | {okcol} | {s['n']} | {num(s['mb'])} "
                  f"| {s['secs']:.2f} | {num(s['ips'])} | {num(s['mbs'])} | {s['rss']:.0f} "
                  f"| {ratio('storescp')} | {ratio('orthanc')} |")
        else:
            print(f"| {corpus} | {senders} | {server} | {okcol} | {s['n']} | {num(s['mb'])} "
                  "| – | – | – | – | – | – |")
EOF
    echo
    echo "Medians over the successful runs; MB = 10^6 bytes of DICOM files sent; peak RSS ="
    echo "VmHWM of the server process at the end of the run; ratios compare instances/s."
    echo
    echo "<details><summary>raw measurements</summary>"
    echo
    echo '```'
    cat "$raw"
    echo '```'
    echo
    echo "</details>"
} >"$out_file.tmp"
mv "$out_file.tmp" "$out_file"
cat "$out_file"
echo >&2
echo "ingest: report written to $out_file (raw: $raw, logs: $logs)" >&2
