#!/usr/bin/env bash
# The viewer benchmark (issue 19, "What must show" 3): a doctor at hospital
# A opens a CT prior held at hospital B (N instances, one series) from the
# page; measured in the browser, from the click on 查看影像 to the first
# image drawn by the viewer at A, against the time A's fetch of the whole
# study takes (from the same click to the `fetched` record of A's peer
# audit). Target: the first image before a tenth of the study has arrived.
# Not a test. Figures: benches/results/viewer-*.md, docs/benchmarks.md.
#
#   benches/viewer.sh [--instances N] [--runs R] [--peer-bandwidth B] [--warm [--warm-visits V]] [--probe P] [--viewer-rendering R] [--work-dir DIR] [--out FILE] [--keep]
#
#   --instances N  CT instances of the study (default 500, ~525 kB each)
#   --runs R       rounds (default 3), each with a fresh node A
#   --peer-bandwidth B  A's cap on what its peer fetches take, bytes/s
#                  (node option --peer-bandwidth; default 0: none, loopback
#                  speed). 12500000 stands for a 100 Mbit/s link between
#                  the hospitals.
#   --warm         the browser opens the viewer once before the click (a
#                  doctor's browser with OHIF's files in its cache)
#   --warm-visits V  with --warm: V openings before the click (default 1).
#                  Chromium keeps a script's compiled code only once it has
#                  seen the script on two loads, so from the third opening
#                  OHIF's bundle is not compiled again: a workstation that
#                  has opened the viewer a few times today
#   --probe P      how the first image is seen: canvas (default; a probe in
#                  the viewer's page reads the viewport each time Cornerstone
#                  has rendered an image in it) or screenshot (element screenshots polled from
#                  outside, the method before 2026-12-07's last round);
#                  a comma list (canvas,screenshot) alternates by round
#   --viewer-rendering R  node A's --viewer-rendering: auto (default: the
#                  browser finds its WebGL software here and draws on the
#                  CPU), cpu (always the CPU), webgl (always WebGL, here
#                  software); a comma list (auto,webgl) alternates by round
#   --work-dir     default /tmp/huren-viewer-bench (DIR/run-<stamp>)
#   --out FILE     default benches/results/viewer-<date>-<time>.md
#
# Setup as benches/peer.sh: a registry with the example list, hospitals A
# and B (B's DICOMweb URL in the directory), node B (SQLite, local files,
# --durability full), the corpus (benches/peer-corpus.py) stored at B with
# storescu and published, the patient's consent for A. Each round: node A
# with a fresh data dir, DICOMweb closed (tokens only, as a hospital runs
# it), the viewer installed by deploy/install-viewer.sh, a doctor's
# account (`huren user add`); then benches/viewer-browser.py (Debian's
# chromium through Playwright, software WebGL) signs in, finds the patient
# and clicks.
#
# Environment: HUREN_BIN (default <repo>/target/release/huren), CORPUS_PYTHON
# and BROWSER_PYTHON (default $HOME/.cache/huren-ci/venv/bin/python: pydicom,
# numpy, playwright, PIL), PYTHON (python3), STORESCU (/usr/bin/storescu),
# HUREN_VIEWER_DIR (default $HOME/.cache/huren-ci/viewer, installed if missing),
# HUREN_SCREENSHOTS (a directory: the progress page as viewer-progress.png).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
command_line="benches/viewer.sh"
(( $# == 0 )) || command_line+="$(printf ' %q' "$@")"

instances=500
runs=3
peer_bandwidth=0
warm=()
warm_visits=1
probe=canvas
rendering=auto
work_dir="${HUREN_BENCH_WORK:-/tmp/huren-viewer-bench}"
out_file=""
keep=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --instances) instances="$2"; shift ;;
        --runs) runs="$2"; shift ;;
        --peer-bandwidth) peer_bandwidth="$2"; shift ;;
        --warm) warm=(--warm) ;;
        --warm-visits) warm_visits="$2"; shift ;;
        --probe) probe="$2"; shift ;;
        --viewer-rendering) rendering="$2"; shift ;;
        --work-dir) work_dir="$2"; shift ;;
        --out) out_file="$2"; shift ;;
        --keep) keep=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done

PYTHON="${PYTHON:-python3}"
CORPUS_PYTHON="${CORPUS_PYTHON:-$HOME/.cache/huren-ci/venv/bin/python}"
BROWSER_PYTHON="${BROWSER_PYTHON:-$HOME/.cache/huren-ci/venv/bin/python}"
HUREN_BIN="${HUREN_BIN:-$repo/target/release/huren}"
STORESCU="${STORESCU:-/usr/bin/storescu}"
VIEWER_DIR="${HUREN_VIEWER_DIR:-$HOME/.cache/huren-ci/viewer}"
HOSP_A=91320100466000001A
HOSP_B=91320100466000002B
RID=11010519491231002X
DOCTOR=dr.bench
export HUREN_PAGE_PASSWORD="bench-password-$$"

[[ -x "$HUREN_BIN" ]] || { echo "viewer: HUREN_BIN=$HUREN_BIN does not exist (cargo build --release)" >&2; exit 1; }
bash "$repo/deploy/install-viewer.sh" "$VIEWER_DIR"

stamp=$(date +%Y%m%d-%H%M%S)
run="$work_dir/run-$stamp"
logs="$run/logs"
mkdir -p "$logs"
out_file="${out_file:-$repo/benches/results/viewer-$stamp.md}"
log() { echo "viewer: $*" >&2; }
json() { "$PYTHON" -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1], {"d": d}))' "$1"; }

pids=()
a_pid=""
stop_pid() {
    [[ -n "$1" ]] || return 0
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    stop_pid "$a_pid"
    for p in "${pids[@]}"; do stop_pid "$p"; done
    [[ $keep == 1 ]] || rm -rf "$run/corpus" "$run/registry" "$run/b" "$run"/a-*
    (( rc == 0 )) || log "failed (exit $rc); logs in $logs"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

. "$repo/benches/lib.sh"
bench_token

log "generating $instances CT instances"
corpus_json=$("$CORPUS_PYTHON" "$here/peer-corpus.py" --instances "$instances" --out "$run/corpus" --resident-id "$RID")
UID_STUDY=$(json 'd["study_instance_uid"]' <<<"$corpus_json")

reg_port=$(free_port)
REG="http://127.0.0.1:$reg_port"
"$HUREN_BIN" registry --listen "127.0.0.1:$reg_port" --data-dir "$run/registry" \
    --recognition-list "$repo/deploy/recognition/jiangsu-example.toml" >"$logs/registry.log" 2>&1 &
pids+=($!)
wait_http "${pids[-1]}" "$REG/health" 60 || { log "registry did not start"; exit 1; }
b_http=$(free_port); b_dicom=$(free_port)
B="http://127.0.0.1:$b_http"
"$HUREN_BIN" registry hospital add --data-dir "$run/registry" --id "$HOSP_A" --name "医院A" --level 三级甲等 \
    --token-file "$run/a.token" >>"$logs/cli.log" 2>&1
"$HUREN_BIN" registry hospital add --data-dir "$run/registry" --id "$HOSP_B" --name "医院B" --level 二级甲等 \
    --token-file "$run/b.token" --dicomweb-base-url "$B/dicom-web" >>"$logs/cli.log" 2>&1
"$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$run/region.secret"
chmod 600 "$run/region.secret"

node_args() { # DATA_DIR HOSPITAL TOKEN HTTP DICOM AE
    printf '%s\n' node --data-dir "$1" --ae-title "$6" \
        --http-listen "127.0.0.1:$4" --dicom-listen "127.0.0.1:$5" --operator-token-file "$BENCH_TOKEN_FILE" \
        --registry-url "$REG" --hospital-id "$2" --registry-token-file "$3" \
        --region-secret-file "$run/region.secret" --identifier-issuers RESIDENT_ID=RID \
        --study-quiet-secs 1
}

mapfile -t args < <(node_args "$run/b" "$HOSP_B" "$run/b.token" "$b_http" "$b_dicom" HOSPB)
"$HUREN_BIN" "${args[@]}" >"$logs/b.log" 2>&1 &
pids+=($!)
wait_http "${pids[-1]}" "$B/health" 60 || { log "node B did not start"; exit 1; }
TCP_NODELAY=1 "$STORESCU" -aet MODALITY -aec HOSPB +sd +r 127.0.0.1 "$b_dicom" "$run/corpus" \
    >"$logs/storescu.log" 2>&1 || { log "storescu failed"; exit 1; }
for _ in $(seq 1 1200); do
    status=$(api "$B/api/v1/publication")
    [[ "$(json 'd["published_studies"] >= 1 and d["backlog"] == 0' <<<"$status")" == True ]] && break
    sleep 0.1
done
[[ "$(json 'd["published_studies"] >= 1' <<<"$status")" == True ]] || { log "B did not publish: $status"; exit 1; }
log "B holds and published $instances instances"

start_a() { # DATA_DIR RENDERING
    local http dicom
    http=$(free_port); dicom=$(free_port)
    A="http://127.0.0.1:$http"
    printf '%s\n' "$HUREN_PAGE_PASSWORD" >"$run/password"
    "$HUREN_BIN" user add --data-dir "$1" "$DOCTOR" --name 测试医生 --password-file "$run/password" \
        >>"$logs/cli.log" 2>&1
    mapfile -t args < <(node_args "$1" "$HOSP_A" "$run/a.token" "$http" "$dicom" HOSPA)
    "$HUREN_BIN" "${args[@]}" --viewer-dir "$VIEWER_DIR" --peer-bandwidth "$peer_bandwidth" \
        --viewer-rendering "$2" >>"$logs/a.log" 2>&1 &
    a_pid=$!
    wait_http "$a_pid" "$A/health" 60 || { log "node A did not start"; exit 1; }
    for _ in $(seq 1 600); do
        [[ "$(api "$A/api/v1/publication" | json 'd["hospitals_in_directory"]')" -ge 2 ]] && return 0
        sleep 0.05
    done
    log "node A did not pull the directory"; exit 1
}

results="$run/results.jsonl"
: >"$results"
IFS=, read -ra renderings <<<"$rendering"
for (( r = 1; r <= runs; r++ )); do
    round_rendering=${renderings[$(( (r - 1) % ${#renderings[@]} ))]}
    start_a "$run/a-r$r" "$round_rendering"
    if (( r == 1 )); then
        expires=$("$PYTHON" -c 'import datetime as d; print((d.datetime.now(d.timezone.utc) + d.timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ"))')
        api -X POST "$A/api/v1/consents" -H 'content-type: application/json' -d "{
            \"patient\": {\"identifier_type\": \"RID\", \"identifier\": \"$RID\"},
            \"method\": \"doctor_assisted\", \"recorded_by\": \"bench\", \"state\": \"granted\",
            \"expires_at\": \"$expires\"}" >/dev/null
    fi
    sync
    IFS=, read -ra probes <<<"$probe"
    round_probe=${probes[$(( (r - 1) % ${#probes[@]} ))]}
    line=$(HUREN_BENCH_TOKEN="$BENCH_TOKEN" HUREN_SCREENSHOTS="${HUREN_SCREENSHOTS:-}" \
        "$BROWSER_PYTHON" "$here/viewer-browser.py" \
        --base "$A" --user "$DOCTOR" --rid "$RID" --study "$UID_STUDY" --probe "$round_probe" "${warm[@]}" ${warm:+--warm-visits "$warm_visits"})
    line="${line%\}}, \"rendering\": \"$round_rendering\"}"
    echo "$line" >>"$results"
    log "round $r: $line"
    stop_pid "$a_pid"; a_pid=""
    rm -rf "$run/a-r$r"
done

mkdir -p "$(dirname "$out_file")"
"$PYTHON" - "$results" "$instances" "$command_line" "$(git -C "$repo" rev-parse --short HEAD)" "$HUREN_BIN" \
    "$(/usr/bin/chromium --version 2>/dev/null || echo chromium)" "$peer_bandwidth" "$(cut -d' ' -f1-3 /proc/loadavg)" "${warm:+$warm_visits}" "$probe" \
    >"$out_file" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
n = int(sys.argv[2])
bw = int(sys.argv[7])
cache = (("warm browser cache (viewer opened once before)" if sys.argv[9] == "1" else
          f"warm browser cache (viewer opened {sys.argv[9]} times before)") if sys.argv[9] else "cold browser")
link = f"A's peer fetches capped at {bw} bytes/s ({bw * 8 / 1e6:.0f} Mbit/s)" if bw else "loopback, no cap"
methods = {"canvas": "a probe in the viewer's page reading the viewport's canvas each time Cornerstone reports an image rendered in it (`canvas`; column \"seen by\")",
           "screenshot": "element screenshots polled from outside (`screenshot`)"}
print(f"# Viewer: click to first image, {n}-instance CT prior held at B ({link}; {cache})\n")
print("The first image seen by " + ", or ".join(methods[p] for p in sys.argv[10].split(",")) + ".\n")
print(f"`{sys.argv[3]}` at {sys.argv[4]}, binary `{sys.argv[5]}`; {sys.argv[6]} headless,"
      f" software WebGL; machine: {open('/proc/cpuinfo').read().count('processor')} CPUs;"
      f" load average at the end {sys.argv[8]}.\n")
print("| round | probe | seen by | viewer rendering | first image (s) | instances at A then | whole fetch (s) | first image / fetch | page hands over to the viewer (s) |")
print("|---|---|---|---|---|---|---|---|---|")
for i, r in enumerate(rows, 1):
    ratio = r["first_image_s"] / r["fetch_s"] if r["fetch_s"] else float("nan")
    print(f"| {i} | {r.get('probe', 'screenshot')} | {r.get('seen_by') or '–'} | {r.get('rendering', 'auto')}{' (drew on ' + r['drawn_on'] + (', WebGL found ' + r['webgl_found'] if r.get('webgl_found') else '') + ')' if r.get('drawn_on') else ''} | {r['first_image_s']:.2f} | {r['instances_at_first_image']} of {n} | {r['fetch_s']:.2f} | {ratio:.2f} | {r['viewer_opened_s']:.2f} |")
for probe in sys.argv[10].split(","):
    for rendering in sorted({r.get("rendering", "auto") for r in rows}):
        group = [r for r in rows if r.get("probe", "screenshot") == probe and r.get("rendering", "auto") == rendering]
        if not group:
            continue
        med = lambda k: statistics.median(r[k] for r in group)
        print(f"\nMedian ({probe}, viewer rendering {rendering}, {len(group)} rounds): first image {med('first_image_s'):.2f} s, "
              f"whole fetch {med('fetch_s'):.2f} s, "
              f"instances held at the first image {med('instances_at_first_image'):.0f} of {n} "
              f"(target: before {n // 10}).")
PY
cat "$out_file"
log "report: $out_file"
