#!/usr/bin/env bash
# Flame graph of the node while one storescu sends a corpus: where an
# instance's time goes, per durability mode.
#
#   benches/profile.sh --bin target/release/huren --mode full --corpus ct --out docs/flamegraphs/full-after.svg
#
# Needs perf (Debian linux-perf) and inferno (cargo install inferno). The
# release binary has no debug info; perf unwinds through .eh_frame
# (--call-graph dwarf) and names functions from the symbol table.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="" mode="full" corpus="ct" out="" corpus_dir="/tmp/huren-bench-corpus"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) bin="$2"; shift ;;
        --mode) mode="$2"; shift ;;
        --corpus) corpus="$2"; shift ;;
        --corpus-dir) corpus_dir="$2"; shift ;;
        --out) out="$2"; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
[[ -x "$bin" && -n "$out" ]] || { echo "usage: $0 --bin HUREN --mode full|relaxed --corpus ct|tiny --out FILE.svg" >&2; exit 2; }
python3 "$here/make-corpus.py" --dir "$corpus_dir" --corpus "$corpus" >/dev/null
work="$(mktemp -d)"
trap 'kill "$node" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" node --data-dir "$work/data" --dicom-listen "127.0.0.1:$port" --http-listen 127.0.0.1:0 \
    --durability "$mode" >"$work/node.log" 2>&1 &
node=$!
until grep -q "DICOM listening" "$work/node.log"; do kill -0 "$node"; sleep 0.05; done
cat "$corpus_dir/$corpus"/part*/*.dcm >/dev/null
perf record -F 1999 --call-graph dwarf,16384 -o "$work/perf.data" -p "$node" 2>"$work/perf.log" &
perf_pid=$!
sleep 0.5
t0=$(date +%s.%N)
TCP_NODELAY=1 storescu -ta 600 +sd +r +sp '*.dcm' 127.0.0.1 "$port" "$corpus_dir/$corpus"
t1=$(date +%s.%N)
kill -INT "$perf_pid"; wait "$perf_pid" || true
n=$(find "$corpus_dir/$corpus" -name '*.dcm' | wc -l)
echo "profile: $n instances in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}') s under perf ($mode)" >&2
perf script -i "$work/perf.data" 2>/dev/null | inferno-collapse-perf > "$work/folded"
cp "$work/folded" /tmp/huren-profile.folded
inferno-flamegraph --title "huren $mode, $corpus, 1 sender ($(basename "$bin"))" < "$work/folded" > "$out"
# The top frames by inclusive share, for the text of docs/benchmarks.md.
python3 - "$work/folded" <<'PY'
import sys, collections
total = 0; incl = collections.Counter()
for line in open(sys.argv[1]):
    stack, n = line.rsplit(" ", 1); n = int(n); total += n
    for f in set(stack.split(";")): incl[f] += n
for f, n in incl.most_common(40):
    print(f"{100*n/total:5.1f}%  {f[:140]}")
PY
