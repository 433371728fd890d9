#!/usr/bin/env bash
# C-MOVE benchmark: a 500-instance CT study moved from huren (and Orthanc) to
# dcmtk's storescp, against storescu sending the same files to the same
# storescp. Not a test. Method and figures: docs/benchmarks.md, "Query and retrieve".
#
#   benches/move.sh [--runs N] [--servers storescu,huren,orthanc]
#                   [--instances 500] [--work-dir DIR] [--out FILE]
#
# Environment: HUREN_BIN (default <repo>/target/release/huren), DCMTK_BIN
# (/usr/bin), ORTHANC_BIN (/usr/sbin/Orthanc), PYTHON (python3),
# HUREN_BENCH_CORPUS (/tmp/huren-bench-corpus: the study is generated there
# by benches/make-corpus.py's CT writer, as `move-ct<instances>`).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

runs=3
servers_sel="storescu,huren,orthanc"
instances=500
work_dir="${HUREN_BENCH_WORK:-/tmp/huren-move-bench}"
corpus_dir="${HUREN_BENCH_CORPUS:-/tmp/huren-bench-corpus}"
out_file=""

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) runs="$2"; shift ;;
        --servers) servers_sel="$2"; shift ;;
        --instances) instances="$2"; shift ;;
        --work-dir) work_dir="$2"; shift ;;
        --out) out_file="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
IFS=, read -r -a servers <<<"$servers_sel"
for s in "${servers[@]}"; do
    case "$s" in storescu|huren|orthanc) ;; *) echo "unknown sender: $s" >&2; exit 2 ;; esac
done

PYTHON="${PYTHON:-python3}"
DCMTK_BIN="${DCMTK_BIN:-/usr/bin}"
STORESCP="$DCMTK_BIN/storescp"
STORESCU="$DCMTK_BIN/storescu"
MOVESCU="$DCMTK_BIN/movescu"
ECHOSCU="$DCMTK_BIN/echoscu"
ORTHANC_BIN="${ORTHANC_BIN:-/usr/sbin/Orthanc}"
HUREN_BIN="${HUREN_BIN:-$repo/target/release/huren}"
# Debian's dcmtk (storescp, storescu, movescu, and Orthanc, which links it)
# leaves Nagle on: without this every message waits ~40 ms.
export TCP_NODELAY=1
for t in "$STORESCP" "$STORESCU" "$MOVESCU" "$ECHOSCU"; do
    [[ -x "$t" ]] || { echo "missing $t (apt-get install dcmtk)" >&2; exit 1; }
done
if [[ " ${servers[*]} " == *" huren "* && ! -x "$HUREN_BIN" ]]; then
    echo "move: HUREN_BIN=$HUREN_BIN does not exist (cargo build --release)" >&2; exit 1
fi

log() { echo "move: $*" >&2; }
stamp=$(date +%Y%m%d-%H%M%S)
run="$work_dir/run-$stamp"
logs="$run/logs"
mkdir -p "$logs"
raw="$run/raw.tsv"
printf 'run\tsender\tstatus\tinstances\tbytes\tseconds\n' >"$raw"

# ------------------------------------------------------------ the study
corpus="move-ct$instances"
study_dir="$corpus_dir/$corpus"
read -r study_uid nfiles nbytes < <("$PYTHON" - "$here/make-corpus.py" "$corpus_dir" "$corpus" "$instances" <<'EOF'
import importlib.util, json, shutil, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("make_corpus", sys.argv[1])
mc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mc)
root, name, count = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
stamp = root / f"{name}.json"
want = {"name": name, "count": count, "studies": 1, "format_version": mc.FORMAT_VERSION}
st = json.loads(stamp.read_text()) if stamp.exists() else {}
if not (all(st.get(k) == v for k, v in want.items()) and (root / name).is_dir()):
    print(f"move: generating {count} CT instances (one study) in {root / name} ...", file=sys.stderr, flush=True)
    t0 = time.time()
    tmp = root / f"{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(root / name, ignore_errors=True)
    for k in range(mc.PARTS):
        (tmp / f"part{k}").mkdir(parents=True)
    mc.write_ct(tmp, name, count, 1, mc.ct_base_image())
    files = sorted(tmp.rglob("*.dcm"))
    size = sum(f.stat().st_size for f in files)
    tmp.rename(root / name)
    st = dict(want, files=len(files), bytes=size, seconds=round(time.time() - t0, 1))
    stamp.write_text(json.dumps(st) + "\n")
print(mc.new_uid(name, 0, "study"), st["files"], st["bytes"])
EOF
)
log "study $study_uid: $nfiles files, $((nbytes / 1000000)) MB in $study_dir"
cat "$study_dir"/part*/*.dcm >/dev/null  # page cache

# ------------------------------------------------------------ processes
scp_pid=""
server_pid=""
huren_pid=""
orthanc_pid=""
cleanup() {
    local p
    for p in "$scp_pid" "$server_pid" "$huren_pid" "$orthanc_pid"; do
        [[ -n "$p" ]] && { kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; }
    done
    rm -rf "$run/data"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_echo() { # pid port aec timeout_s
    local deadline=$(( $(date +%s) + $4 ))
    while (( $(date +%s) < deadline )); do
        kill -0 "$1" 2>/dev/null || return 1
        "$ECHOSCU" -to 1 -aec "$3" 127.0.0.1 "$2" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}
wait_log() { # pid file pattern timeout_s
    local deadline=$(( $(date +%s) + $4 ))
    while (( $(date +%s) < deadline )); do
        kill -0 "$1" 2>/dev/null || return 1
        grep -qF "$3" "$2" 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}
stop() { # pid
    [[ -n "$1" ]] || return 0
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$1" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# The destination: one storescp for everything, restarted per measurement
# with an empty output directory (single process: one association at a time,
# no fsync, default options).
scp_port=$(free_port)
start_scp() { # outdir
    mkdir -p "$1"
    "$STORESCP" -aet STORESCP -od "$1" "$scp_port" >>"$logs/storescp.log" 2>&1 &
    scp_pid=$!
    wait_echo "$scp_pid" "$scp_port" STORESCP 30 || { log "storescp did not start"; exit 1; }
}

# The sources, loaded once with the study.
huren_port=""; orthanc_port=""
for s in "${servers[@]}"; do
    case "$s" in
    huren)
        huren_port=$(free_port); http=$(free_port)
        mkdir -p "$run/data/huren"
        cat >"$run/huren.toml" <<EOF
[[remote_ae]]
ae_title = "STORESCP"
host = "127.0.0.1"
port = $scp_port
EOF
        "$HUREN_BIN" node --config "$run/huren.toml" --data-dir "$run/data/huren" \
            --dicom-listen "127.0.0.1:$huren_port" --http-listen "127.0.0.1:$http" \
            >"$logs/huren.log" 2>&1 &
        server_pid=$!
        wait_log "$server_pid" "$logs/huren.log" "DICOM listening on 127.0.0.1:$huren_port" 60 ||
            { log "huren did not start (see $logs/huren.log)"; exit 1; }
        huren_pid=$server_pid
        "$STORESCU" -aec HUREN +sd +r +sp '*.dcm' 127.0.0.1 "$huren_port" "$study_dir" >"$logs/huren-load.log" 2>&1
        server_pid=""
        ;;
    orthanc)
        orthanc_port=$(free_port); ohttp=$(free_port)
        d="$run/data/orthanc"
        mkdir -p "$d/storage" "$d/index" "$d/tmp"
        cat >"$run/orthanc.json" <<EOF
{
  "Name": "huren-move-bench",
  "StorageDirectory": "$d/storage", "IndexDirectory": "$d/index", "TemporaryDirectory": "$d/tmp",
  "DicomServerEnabled": true, "DicomAet": "ORTHANC", "DicomPort": $orthanc_port,
  "DicomCheckCalledAet": false, "DicomAlwaysAllowEcho": true, "DicomAlwaysAllowStore": true,
  "DicomAlwaysAllowFind": true, "DicomAlwaysAllowMove": true, "DicomCheckModalityHost": false,
  "DicomModalities": { "storescp": [ "STORESCP", "127.0.0.1", $scp_port ] },
  "HttpServerEnabled": true, "HttpPort": $ohttp, "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false, "SslEnabled": false, "Plugins": [], "LuaScripts": []
}
EOF
        "$ORTHANC_BIN" "$run/orthanc.json" >"$logs/orthanc.log" 2>&1 &
        orthanc_pid=$!
        wait_echo "$orthanc_pid" "$orthanc_port" ORTHANC 60 || { log "orthanc did not start"; exit 1; }
        "$STORESCU" -aec ORTHANC +sd +r +sp '*.dcm' 127.0.0.1 "$orthanc_port" "$study_dir" >"$logs/orthanc-load.log" 2>&1
        ;;
    esac
done

measure() { # run sender
    local r=$1 s=$2 out="$run/data/out-$1-$2" t0 t1 status=ok rc=0
    start_scp "$out"
    t0=$(now)
    case "$s" in
        storescu) "$STORESCU" -aet STORESCU -aec STORESCP +sd +r +sp '*.dcm' 127.0.0.1 "$scp_port" "$study_dir" \
                      >"$logs/$r-$s.log" 2>&1 || rc=$? ;;
        huren)    "$MOVESCU" -v -S -aet MOVESCU -aec HUREN -aem STORESCP -k QueryRetrieveLevel=STUDY \
                      -k "StudyInstanceUID=$study_uid" 127.0.0.1 "$huren_port" >"$logs/$r-$s.log" 2>&1 || rc=$? ;;
        orthanc)  "$MOVESCU" -v -S -aet MOVESCU -aec ORTHANC -aem STORESCP -k QueryRetrieveLevel=STUDY \
                      -k "StudyInstanceUID=$study_uid" 127.0.0.1 "$orthanc_port" >"$logs/$r-$s.log" 2>&1 || rc=$? ;;
    esac
    t1=$(now)
    # storescp may still be writing the last file when the mover reports
    # completion; the count is read after stopping it.
    stop "$scp_pid"; scp_pid=""
    local got
    got=$(find "$out" -type f | wc -l)
    [[ $rc == 0 ]] || status="exit-$rc"
    [[ $status == ok && $got != "$nfiles" ]] && status="received-$got-of-$nfiles"
    # movescu exits 0 even when the C-MOVE failed: check the final status.
    if [[ $s != storescu && $status == ok ]] && ! grep -q 'Final Move Response (Success)' "$logs/$r-$s.log"; then
        status="move-not-successful"
    fi
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$s" "$status" "$nfiles" "$nbytes" "$secs" >>"$raw"
    log "run $r $s: $status ${secs}s ($(awk -v n="$nfiles" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')/s)"
    sync
}

for r in $(seq 1 "$runs"); do
    for s in "${servers[@]}"; do
        measure "$r" "$s"
    done
done
stop "$huren_pid"; huren_pid=""; stop "$orthanc_pid"; orthanc_pid=""

# ------------------------------------------------------------ report
if [[ -z "$out_file" ]]; then
    out_file="$here/results/results-query-move-$(date +%Y-%m-%d).md"
    [[ -e "$out_file" ]] && out_file="$here/results/results-query-move-$(date +%Y-%m-%d-%H%M%S).md"
fi
{
    echo "# C-MOVE benchmark $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "- command: \`benches/move.sh --runs $runs --servers $servers_sel --instances $instances\`"
    echo "- machine: $(nproc) cores, $(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r)"
    echo "- study: $nfiles CT instances, $((nbytes / 1000000)) MB, one series; destination: \`storescp -od DIR\` (dcmtk $("$STORESCP" --version 2>&1 | head -1 | awk "{print \$3}"), default options)"
    [[ -x "$HUREN_BIN" ]] && echo "- huren: $HUREN_BIN ($(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?'))"
    echo
    "$PYTHON" - "$raw" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
by = {}
for r in rows:
    by.setdefault(r["sender"], []).append(r)
desc = {"storescu": "storescu → storescp (the files, directly)",
        "huren": "huren C-MOVE → storescp (movescu)",
        "orthanc": "Orthanc C-MOVE → storescp (movescu)"}
med = {}
for s, rs in by.items():
    ok = [float(r["seconds"]) for r in rs if r["status"] == "ok"]
    med[s] = statistics.median(ok) if ok else None
print("| sender | ok runs | median s | instances/s | MB/s | vs storescu |")
print("|---|---|---|---|---|---|")
for s, rs in by.items():
    n, b = int(rs[0]["instances"]), int(rs[0]["bytes"])
    ok = sum(r["status"] == "ok" for r in rs)
    bad = sorted({r["status"] for r in rs if r["status"] != "ok"})
    okcol = f"{ok}/{len(rs)}" + (f" ({', '.join(bad)})" if bad else "")
    if med[s] is None:
        print(f"| {desc[s]} | {okcol} | – | – | – | – |")
        continue
    ratio = f"{med['storescu'] / med[s]:.2f}×" if med.get("storescu") else "–"
    print(f"| {desc[s]} | {okcol} | {med[s]:.2f} | {n / med[s]:.0f} | {b / 1e6 / med[s]:.0f} | {ratio} |")
EOF
    echo
    echo "Wall time from starting the sender (storescu, or movescu asking the node) until it"
    echo "exits, i.e. the final C-MOVE-RSP; \"vs storescu\" > 1 means faster than storescu."
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
log "report written to $out_file (logs: $logs)"
