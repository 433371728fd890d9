#!/usr/bin/env bash
# DICOMweb benchmark: WADO-RS study retrieve throughput and QIDO-RS study
# search latency against C-FIND on the same node. Not a test. See
# docs/benchmarks.md ("DICOMweb").
#
#   benches/dicomweb.sh [--mode wado,qido] [--runs R] [--studies N]
#                       [--queries Q] [--work-dir DIR]
#
# wado: one study of 500 CT instances (~0.5 MB each) is stored by storescu
#   into a fresh node (local file system, relaxed durability); then R times:
#   the same files read from disk (page cache warm, and O_DIRECT, i.e. the
#   disk itself), and the study retrieved by WADO-RS with curl
#   (multipart/related; type="application/dicom", body discarded).
# qido: N studies (default 10,000, one tiny instance each) stored by storescu
#   (4 associations); then Q queries of each kind, each run once as QIDO-RS
#   and once as C-FIND (benches/dicomweb-client.py), p50/p99.
#
# Environment: HUREN_BIN (default <repo>/target/release/huren), PYTHON
# (default the test venv, which has pydicom, pynetdicom and requests).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
modes="wado,qido"
runs=5
studies=10000
queries=200
work="${HUREN_BENCH_WORK:-/tmp/huren-dicomweb-bench}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --mode) modes="$2"; shift ;;
        --runs) runs="$2"; shift ;;
        --studies) studies="$2"; shift ;;
        --queries) queries="$2"; shift ;;
        --work-dir) work="$2"; shift ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done
HUREN_BIN="${HUREN_BIN:-$repo/target/release/huren}"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x /root/.cache/huren-ci/venv/bin/python ]] && PYTHON=/root/.cache/huren-ci/venv/bin/python
fi
CLIENT="$here/dicomweb-client.py"
export TCP_NODELAY=1
[[ -x "$HUREN_BIN" ]] || { echo "HUREN_BIN=$HUREN_BIN missing (cargo build --release)" >&2; exit 1; }
mkdir -p "$work"

server_pid=""
stop_node() {
    [[ -n "$server_pid" ]] || return 0
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}
trap stop_node EXIT

# start_node DATADIR -> server_pid, dicom_addr, http_addr
start_node() {
    local data=$1 log=$1.log
    rm -rf "$data"
    "$HUREN_BIN" node --data-dir "$data" --dicom-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
        --durability relaxed --dicomweb-open true >"$log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 600); do
        if grep -q "HTTP listening on" "$log"; then break; fi
        sleep 0.05
    done
    dicom_addr=$(grep -o 'DICOM listening on [0-9.:]*' "$log" | awk '{print $4}')
    http_addr=$(grep -o 'HTTP listening on [0-9.:]*' "$log" | awk '{print $4}')
    [[ -n "$http_addr" ]] || { cat "$log" >&2; exit 1; }
}

store_parts() {
    local dir=$1 pids=()
    for part in "$dir"/part*; do
        /usr/bin/storescu -aec HUREN +sd "${dicom_addr%:*}" "${dicom_addr#*:}" "$part" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "# DICOMweb benchmark $(date -u +%FT%TZ), commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo ?)"
echo "huren: $HUREN_BIN; $(nproc) cores"

if [[ ",$modes," == *",wado,"* ]]; then
    corpus="$work/wado500"
    [[ -f "$corpus.done" ]] || { rm -rf "$corpus"; "$PYTHON" "$CLIENT" corpus wado "$corpus"; touch "$corpus.done"; }
    bytes=$(cat "$corpus"/part*/*.dcm | wc -c)
    start_node "$work/wado-node"
    store_parts "$corpus"
    study=$(curl -s -H 'Accept: application/dicom+json' "http://$http_addr/dicom-web/studies" |
        "$PYTHON" -c 'import json,sys; r=json.load(sys.stdin); assert len(r)==1; print(r[0]["0020000D"]["Value"][0])')
    count=$(curl -s -H 'Accept: application/dicom+json' "http://$http_addr/dicom-web/studies/$study/instances" |
        "$PYTHON" -c 'import json,sys; print(len(json.load(sys.stdin)))')
    [[ "$count" == 500 ]] || { echo "stored $count of 500" >&2; exit 1; }
    cat "$corpus"/part*/*.dcm >/dev/null   # warm
    disk_warm=(); disk_direct=(); wado=()
    for _ in $(seq 1 "$runs"); do
        t0=$(date +%s.%N); cat "$corpus"/part*/*.dcm >/dev/null; t1=$(date +%s.%N)
        disk_warm+=("$(echo "$bytes / ($t1 - $t0) / 1000000" | bc -l)")
        disk_direct+=("$("$PYTHON" - "$corpus" <<'PY'
import mmap, os, sys, time, glob
buf = mmap.mmap(-1, 1 << 20)
files = sorted(glob.glob(sys.argv[1] + "/part*/*.dcm"))
total = 0
t0 = time.perf_counter()
for f in files:
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    while True:
        n = os.readv(fd, [buf])
        total += n
        if n < len(buf):
            break
    os.close(fd)
print(total / (time.perf_counter() - t0) / 1e6)
PY
)")
        read -r size secs < <(curl -s -o /dev/null -w '%{size_download} %{time_total}\n' \
            -H 'Accept: multipart/related; type="application/dicom"' \
            "http://$http_addr/dicom-web/studies/$study")
        (( size > bytes )) || { echo "WADO-RS returned $size bytes, files are $bytes" >&2; exit 1; }
        wado+=("$(echo "$size / $secs / 1000000" | bc -l)")
    done
    rss=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$server_pid/status")
    stop_node
    dw=$(printf '%s\n' "${disk_warm[@]}" | median)
    dd_=$(printf '%s\n' "${disk_direct[@]}" | median)
    wd=$(printf '%s\n' "${wado[@]}" | median)
    echo
    echo "## WADO-RS study retrieve, 500 CT instances, $((bytes / 1000000)) MB, medians of $runs"
    echo
    echo "| read | MB/s | WADO-RS / it |"
    echo "|---|---|---|"
    printf '| files from disk, page cache warm (cat) | %.0f | %.2f |\n' "$dw" "$(echo "$wd / $dw" | bc -l)"
    printf '| files from disk, O_DIRECT (the disk) | %.0f | %.2f |\n' "$dd_" "$(echo "$wd / $dd_" | bc -l)"
    printf '| WADO-RS (curl, body discarded) | %.0f | |\n' "$wd"
    echo
    fmt() { for x in "$@"; do printf '%.0f ' "$x"; done; }
    echo "node peak RSS: ${rss} MB; runs (MB/s): warm $(fmt "${disk_warm[@]}"); direct $(fmt "${disk_direct[@]}"); WADO-RS $(fmt "${wado[@]}")"
fi

if [[ ",$modes," == *",qido,"* ]]; then
    corpus="$work/qido-$studies"
    [[ -f "$corpus.done" ]] || { rm -rf "$corpus"; "$PYTHON" "$CLIENT" corpus qido "$corpus" "$studies"; touch "$corpus.done"; }
    start_node "$work/qido-node"
    store_parts "$corpus"
    result=$("$PYTHON" "$CLIENT" qido "http://$http_addr/dicom-web" "${dicom_addr%:*}" "${dicom_addr#*:}" "$studies" "$queries")
    stop_node
    echo
    echo "## QIDO-RS vs C-FIND, study level, $studies studies (SQLite), $queries queries per kind"
    echo
    echo "| query | matches (mean) | C-FIND p50 ms | QIDO-RS p50 ms | difference | C-FIND p99 ms | QIDO-RS p99 ms |"
    echo "|---|---|---|---|---|---|---|"
    echo "$result" | "$PYTHON" -c '
import json, sys
for kind, r in json.load(sys.stdin).items():
    d = r["qido_p50"] - r["cfind_p50"]
    print("| %s | %.1f | %s | %s | %+.2f | %s | %s |" % (kind, r["mean_matches"], r["cfind_p50"], r["qido_p50"], d, r["cfind_p99"], r["qido_p99"]))'
    echo
    echo "raw: $result"
fi
