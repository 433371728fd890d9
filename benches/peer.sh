#!/usr/bin/env bash
# Peer retrieval benchmark: hospital A's node fetches a CT study held at
# hospital B's node (POST /api/v1/peer/fetch: registry grant, manifest
# checked against the published content root, the instances fetched by
# WADO-RS (one request each up to 9ba512f; since 69a2d63 a study with
# nothing held comes in one response) and ingested through the one ingest
# path with their expected hashes),
# against two anchors measured in the same run, interleaved: a plain
# WADO-RS download of the same study from B with curl (bytes discarded),
# and a `cp -r` of B's blob files + `sync`; for diagnosis also the
# study's instances downloaded one request each, 4 at once, by one curl
# (what the fetch's one-request-per-instance costs without A). Not a test. Method and figures:
# docs/benchmarks.md, "Peer retrieval".
#
#   benches/peer.sh [--instances N] [--runs R] [--parallel 4,8]
#                   [--durability full[,relaxed]] [--work-dir DIR]
#                   [--out FILE] [--keep]
#
#   --instances N  CT instances of the study (default 500, ~525 kB each)
#   --runs R       rounds of measurements (default 3); the report gives
#                  every run and the median
#   --parallel L   --peer-parallel settings of node A, comma separated
#                  (default 4,8); each is one fetch per round
#   --durability L node A's --durability, comma separated (default full,
#                  the node's default and the figure the target is judged
#                  on; relaxed only as a second, labelled figure)
#   --work-dir     default /tmp/huren-peer-bench; this run's corpus, data
#                  dirs and logs go to DIR/run-<stamp>, removed at the end
#                  unless --keep (logs are kept)
#   --out FILE     the report (default benches/results/peer-<date>-<time>.md)
#
# Setup: a registry (SQLite, local files) started with the example
# recognition list; hospitals A (三级甲等) and B (二级甲等, DICOMweb base URL
# of B's node) added with `huren registry hospital add --token-file`; a
# region secret; node B started (defaults: SQLite index, local blob store,
# --durability full). The corpus (benches/peer-corpus.py: one study, one
# series, fresh UIDs, OtherPatientIDsSequence with IssuerOfPatientID
# RESIDENT_ID) is stored at B with dcmtk's storescu; the script waits until
# B has published it (GET /api/v1/publication: published, backlog 0); the
# patient's consent for A is recorded through a node A (POST
# /api/v1/consents).
#
# Each round, in this order: for every --parallel P, a node A with a fresh
# data dir (nothing present) and --peer-parallel P, started and its
# directory pulled before the clock starts, then the timed POST
# /api/v1/peer/fetch (curl's time_total: request sent until the answer is
# read; the answer comes when every instance is stored and the fetch
# audited); then the curl anchor; the per-instance curl; the cp anchor. `sync` before each
# measurement. Node A runs with the default --durability full: every blob
# is fsynced and every instance is a SQLite commit before the answer.
# Bytes for MB/s (10^6 bytes) = the sum of `size` in B's manifest
# (GET /api/v1/studies/UID/manifest on B).
#
# Environment: HUREN_BIN (default <repo>/target/release/huren),
# HUREN_BIN_COMMIT (optional: the commit the binary was built from, for
# the report),
# CORPUS_PYTHON (a Python with pydicom and numpy, default
# $HOME/.cache/huren-ci/venv/bin/python), PYTHON (python3, standard library
# only), STORESCU (/usr/bin/storescu), HUREN_BENCH_PERF (a path prefix: node
# A is profiled during each fetch, `perf record` + inferno-collapse-perf,
# into PREFIX-r<round>-p<parallel>-<durability>.folded; the profiler's cost
# is in that round's figure).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
command_line="benches/peer.sh"
(( $# == 0 )) || command_line+="$(printf ' %q' "$@")"
[[ -z "${HUREN_BIN:-}" ]] || command_line="HUREN_BIN=$HUREN_BIN $command_line"

instances=500
runs=3
parallel_list=4,8
durability_list=full
work_dir="${HUREN_BENCH_WORK:-/tmp/huren-peer-bench}"
out_file=""
keep=0

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --instances) instances="$2"; shift ;;
        --runs) runs="$2"; shift ;;
        --parallel) parallel_list="$2"; shift ;;
        --durability) durability_list="$2"; shift ;;
        --work-dir) work_dir="$2"; shift ;;
        --out) out_file="$2"; shift ;;
        --keep) keep=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
[[ "$instances" =~ ^[0-9]+$ && "$runs" =~ ^[0-9]+$ ]] || { echo "--instances and --runs are numbers" >&2; exit 2; }
(( instances >= 1 && runs >= 1 )) || { echo "need --instances >= 1 and --runs >= 1" >&2; exit 2; }
IFS=, read -r -a parallels <<<"$parallel_list"
for p in "${parallels[@]}"; do
    [[ "$p" =~ ^[0-9]+$ ]] && (( p >= 1 && p <= 64 )) || { echo "--parallel: numbers 1..64, comma separated" >&2; exit 2; }
done
IFS=, read -r -a durabilities <<<"$durability_list"
for m in "${durabilities[@]}"; do
    [[ "$m" == full || "$m" == relaxed ]] || { echo "--durability: full and/or relaxed, comma separated" >&2; exit 2; }
done

PYTHON="${PYTHON:-python3}"
CORPUS_PYTHON="${CORPUS_PYTHON:-$HOME/.cache/huren-ci/venv/bin/python}"
HUREN_BIN="${HUREN_BIN:-$repo/target/release/huren}"
STORESCU="${STORESCU:-/usr/bin/storescu}"
HOSP_A=91320100466000001A
HOSP_B=91320100466000002B
RID=11010519491231002X

[[ -x "$HUREN_BIN" ]] || { echo "peer: HUREN_BIN=$HUREN_BIN does not exist (cargo build --release)" >&2; exit 1; }
[[ -x "$STORESCU" ]] || { echo "peer: $STORESCU missing (Debian package dcmtk)" >&2; exit 1; }
"$CORPUS_PYTHON" -c 'import pydicom, numpy' 2>/dev/null ||
    { echo "peer: $CORPUS_PYTHON has no pydicom/numpy (set CORPUS_PYTHON)" >&2; exit 1; }
command -v curl >/dev/null || { echo "peer: needs curl" >&2; exit 1; }

stamp=$(date +%Y%m%d-%H%M%S)
run="$work_dir/run-$stamp"
logs="$run/logs"
mkdir -p "$logs"
log() { echo "peer: $*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
clk_tck=$(getconf CLK_TCK)
cpu_s() { # PID: CPU seconds (user + system) the process has used so far
    awk -v t="$clk_tck" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / t }' "/proc/$1/stat"
}
json() { "$PYTHON" -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1], {"d": d}))' "$1"; }

reg_pid=""
b_pid=""
a_pid=""
stop_pid() { # PID: TERM, then KILL after 30 s
    local pid=$1
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    stop_pid "$a_pid"; a_pid=""
    stop_pid "$b_pid"; b_pid=""
    stop_pid "$reg_pid"; reg_pid=""
    if [[ $keep == 0 ]]; then rm -rf "$run/corpus" "$run/registry" "$run/b" "$run"/a-* "$run"/cp-*; fi
    (( rc == 0 )) || log "failed (exit $rc); logs in $logs"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

. "$repo/benches/lib.sh"
bench_token

# ------------------------------------------------------------ corpus
log "generating $instances CT instances"
t0=$(now)
corpus_json=$("$CORPUS_PYTHON" "$here/peer-corpus.py" --instances "$instances" --out "$run/corpus" --resident-id "$RID")
corpus_s=$(elapsed "$t0" "$(now)")
UID_STUDY=$(json 'd["study_instance_uid"]' <<<"$corpus_json")
corpus_bytes=$(json 'd["bytes"]' <<<"$corpus_json")
log "corpus: $corpus_json ($corpus_s s)"

# ------------------------------------------------------------ registry
reg_port=$(free_port)
REG="http://127.0.0.1:$reg_port"
"$HUREN_BIN" registry --listen "127.0.0.1:$reg_port" --data-dir "$run/registry" \
    --recognition-list "$repo/deploy/recognition/jiangsu-example.toml" >"$logs/registry.log" 2>&1 &
reg_pid=$!
wait_http "$reg_pid" "$REG/health" 60 || { log "registry did not start"; tail -n 20 "$logs/registry.log" >&2; exit 1; }

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
        --http-listen "127.0.0.1:$4" --dicom-listen "127.0.0.1:$5" --dicomweb-open true --operator-token-file "$BENCH_TOKEN_FILE" \
        --registry-url "$REG" --hospital-id "$2" --registry-token-file "$3" \
        --region-secret-file "$run/region.secret" --identifier-issuers RESIDENT_ID=RID \
        --study-quiet-secs 1
}

# ------------------------------------------------------------ node B
mapfile -t args < <(node_args "$run/b" "$HOSP_B" "$run/b.token" "$b_http" "$b_dicom" HOSPB)
"$HUREN_BIN" "${args[@]}" >"$logs/b.log" 2>&1 &
b_pid=$!
wait_http "$b_pid" "$B/health" 60 || { log "node B did not start"; tail -n 20 "$logs/b.log" >&2; exit 1; }
log "registry $REG, node B $B (DICOM $b_dicom)"

log "storescu: $instances instances to B"
t0=$(now)
TCP_NODELAY=1 "$STORESCU" -aet MODALITY -aec HOSPB +sd +r 127.0.0.1 "$b_dicom" "$run/corpus" \
    >"$logs/storescu.log" 2>&1 || { tail -n 20 "$logs/storescu.log" >&2; log "storescu failed"; exit 1; }
store_s=$(elapsed "$t0" "$(now)")
log "stored at B in $store_s s"

published=0
t0=$(now)
for _ in $(seq 1 1200); do
    status=$(api "$B/api/v1/publication")
    if [[ "$(json 'd["published_studies"] >= 1 and d["backlog"] == 0' <<<"$status")" == True ]]; then
        published=1; break
    fi
    sleep 0.1
done
(( published )) || { log "B did not publish: $status"; exit 1; }
publish_s=$(elapsed "$t0" "$(now)")
log "B published ($publish_s s after storescu): $status"

api "$B/api/v1/studies/$UID_STUDY/manifest" >"$run/manifest-b.json"
read -r man_n man_bytes content_root < <("$PYTHON" -c '
import json, sys
m = json.load(open(sys.argv[1]))
print(len(m["instances"]), sum(i["size"] for i in m["instances"]), m["content_root"])' "$run/manifest-b.json")
(( man_n == instances )) || { log "B's manifest has $man_n instances, expected $instances"; exit 1; }
blob_files=$(find "$run/b/blobs" -type f -not -path '*/.staging/*' | wc -l)
blob_bytes=$(find "$run/b/blobs" -type f -not -path '*/.staging/*' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
# The per-instance anchor: one curl, the study's instance URLs (as the
# fetch asks them), 4 at once.
"$PYTHON" -c '
import json, sys
m = json.load(open(sys.argv[1]))
base = sys.argv[2] + "/dicom-web/studies/" + m["study_instance_uid"]
for i in m["instances"]:
    print("url = \"%s/series/%s/instances/%s\"" % (base, i["series_instance_uid"], i["sop_instance_uid"]))
    print("output = \"/dev/null\"")' "$run/manifest-b.json" "$B" >"$run/instances.curl"
log "B's manifest: $man_n instances, $man_bytes bytes (corpus files $corpus_bytes); blobs: $blob_files files, $blob_bytes bytes"

# ------------------------------------------------------------ node A
start_a() { # DATA_DIR PARALLEL DURABILITY: starts node A and waits until it knows B's URL
    local http dicom
    http=$(free_port); dicom=$(free_port)
    A="http://127.0.0.1:$http"
    mapfile -t args < <(node_args "$1" "$HOSP_A" "$run/a.token" "$http" "$dicom" HOSPA)
    "$HUREN_BIN" "${args[@]}" --peer-parallel "$2" --durability "$3" >>"$logs/a.log" 2>&1 &
    a_pid=$!
    wait_http "$a_pid" "$A/health" 60 || { log "node A did not start"; tail -n 20 "$logs/a.log" >&2; exit 1; }
    for _ in $(seq 1 600); do
        [[ "$(api "$A/api/v1/publication" | json 'd["hospitals_in_directory"]')" -ge 2 ]] && return 0
        sleep 0.05
    done
    log "node A did not pull the hospital directory"; exit 1
}

start_a "$run/a-setup" 4 full
consent_expires=$("$PYTHON" -c 'import datetime as d; print((d.datetime.now(d.timezone.utc) + d.timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ"))')
api -X POST "$A/api/v1/consents" -H 'content-type: application/json' -d "{
    \"patient\": {\"identifier_type\": \"RID\", \"identifier\": \"$RID\"},
    \"method\": \"doctor_assisted\", \"recorded_by\": \"bench\", \"state\": \"granted\",
    \"expires_at\": \"$consent_expires\"}" >"$run/consent.json"
log "consent recorded at the registry through A: $(cat "$run/consent.json")"
stop_pid "$a_pid"; a_pid=""
rm -rf "$run/a-setup"

WADO_ACCEPT='Accept: multipart/related; type="application/dicom"; transfer-syntax=*'
# Unmeasured: one download, so that every measurement reads B's blobs from
# the page cache.
warm=$(curl -sS -o /dev/null -H "$WADO_ACCEPT" -w '%{http_code} %{size_download}' "$B/dicom-web/studies/$UID_STUDY")
log "warm-up WADO-RS download: $warm"

# ------------------------------------------------------------ disk
# Context for the figures: sequential write + fdatasync on the work dir's disk.
head -c $(( 64 << 20 )) /dev/urandom >"$run/dd.in"
sync
t0=$(now)
dd if="$run/dd.in" of="$run/dd.out" bs=1M conv=fdatasync status=none
disk_write_mbs=$(awk -v s="$(elapsed "$t0" "$(now)")" 'BEGIN { printf "%.0f", 64 * 1048576 / 1e6 / s }')
rm -f "$run/dd.in" "$run/dd.out"
sync
log "disk: 64 MiB write + fdatasync: $disk_write_mbs MB/s"

# ------------------------------------------------------------ rounds
results="$run/results.tsv"
printf 'round\tkind\tparallel\tdurability\tseconds\tbytes\tdetail\n' >"$results"
loads="before: $(cut -d' ' -f1-3 /proc/loadavg)"
for (( r = 1; r <= runs; r++ )); do
    for m in "${durabilities[@]}"; do
    for p in "${parallels[@]}"; do
        dir="$run/a-r$r-p$p-$m"
        start_a "$dir" "$p" "$m"
        sync
        a_cpu0=$(cpu_s "$a_pid"); b_cpu0=$(cpu_s "$b_pid")
        perf_pid=""
        if [[ -n "${HUREN_BENCH_PERF:-}" ]]; then
            perf record -F 1999 --call-graph dwarf,16384 -o "$run/perf-r$r-p$p-$m.data" -p "$a_pid" 2>/dev/null &
            perf_pid=$!
            sleep 0.5
        fi
        out=$(curl -sS -o "$run/fetch-r$r-p$p-$m.json" -w '%{http_code} %{time_total}' -H "authorization: Bearer $BENCH_TOKEN" -X POST "$A/api/v1/peer/fetch" \
            -H 'content-type: application/json' \
            -d "{\"hospital_id\": \"$HOSP_B\", \"study_instance_uid\": \"$UID_STUDY\", \"purpose\": \"treatment\", \"user_id\": \"bench\"}")
        read -r code secs <<<"$out"
        if [[ -n "$perf_pid" ]]; then
            kill -INT "$perf_pid"; wait "$perf_pid" || true
            perf script -i "$run/perf-r$r-p$p-$m.data" 2>/dev/null | inferno-collapse-perf >"$HUREN_BENCH_PERF-r$r-p$p-$m.folded"
            rm -f "$run/perf-r$r-p$p-$m.data"
        fi
        cpu_note="CPU during the fetch: A $(awk -v a="$a_cpu0" -v b="$(cpu_s "$a_pid")" 'BEGIN { printf "%.2f", b - a }') s, B $(awk -v a="$b_cpu0" -v b="$(cpu_s "$b_pid")" 'BEGIN { printf "%.2f", b - a }') s"
        [[ "$code" == 200 ]] || { log "fetch: HTTP $code: $(cat "$run/fetch-r$r-p$p-$m.json")"; exit 1; }
        report=$(cat "$run/fetch-r$r-p$p-$m.json")
        [[ "$(json "d['fetched'] == $instances and d['already_present'] == 0 and d['bytes_fetched'] == $man_bytes" <<<"$report")" == True ]] ||
            { log "fetch report does not match B's manifest: $report"; exit 1; }
        root_a=$(api "$A/api/v1/studies/$UID_STUDY/manifest" | json 'd["content_root"]')
        [[ "$root_a" == "$content_root" ]] || { log "A's copy has content root $root_a, B published $content_root"; exit 1; }
        stop_pid "$a_pid"; a_pid=""
        a_bytes=$(du -sb "$dir" | cut -f1)
        rm -rf "$dir"
        printf '%s\tfetch\t%s\t%s\t%s\t%s\t%s\n' "$r" "$p" "$m" "$secs" "$man_bytes" "$(json "f\"fetched {d['fetched']}, already present {d['already_present']}, {d['bytes_fetched']} bytes, grant {d['grant_id'][:8]}…\"" <<<"$report"); $cpu_note; A's content root matches B's; A's data dir $a_bytes bytes" >>"$results"
        log "round $r: fetch (--peer-parallel $p, --durability $m) $secs s; $cpu_note"
        sync
    done
    done

    out=$(curl -sS -o /dev/null -H "$WADO_ACCEPT" -w '%{http_code} %{size_download} %{time_total}' \
        "$B/dicom-web/studies/$UID_STUDY")
    read -r code size secs <<<"$out"
    [[ "$code" == 200 ]] && (( size >= man_bytes )) || { log "curl: HTTP $code, $size bytes"; exit 1; }
    printf '%s\tcurl\t\t\t%s\t%s\t%s\n' "$r" "$secs" "$man_bytes" "body $size bytes (multipart)" >>"$results"
    log "round $r: curl $secs s ($size bytes)"
    sync

    t0=$(now)
    curl -sS -K "$run/instances.curl" --parallel --parallel-max 4 -H "$WADO_ACCEPT" \
        -w '%{http_code} %{size_download}\n' >"$run/instances.out"
    secs=$(elapsed "$t0" "$(now)")
    read -r ok size < <(awk '$1 == 200 { n++; s += $2 } END { print n + 0, s + 0 }' "$run/instances.out")
    (( ok == instances && size >= man_bytes )) || { log "curl per instance: $ok answers 200, $size bytes"; exit 1; }
    printf '%s\tcurl-instances\t4\t\t%s\t%s\t%s\n' "$r" "$secs" "$man_bytes" "$ok requests, bodies $size bytes" >>"$results"
    log "round $r: curl per instance (4 at once) $secs s"
    sync

    dest="$run/cp-r$r"
    t0=$(now)
    cp -r "$run/b/blobs" "$dest"
    sync
    secs=$(elapsed "$t0" "$(now)")
    copied=$(find "$dest" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
    rm -rf "$dest"
    printf '%s\tcp\t\t\t%s\t%s\t%s\n' "$r" "$secs" "$man_bytes" "copied $copied bytes" >>"$results"
    log "round $r: cp + sync $secs s ($copied bytes)"
    sync
done
loads+="; after: $(cut -d' ' -f1-3 /proc/loadavg)"

# ------------------------------------------------------------ report
rev=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')
dirty=$(git -C "$repo" status --porcelain -- src tests migrations proto Cargo.toml Cargo.lock 2>/dev/null | wc -l)
mkdir -p "$repo/benches/results"
[[ -n "$out_file" ]] || out_file="$repo/benches/results/peer-$stamp.md"
fs_type=$(df -T "$run" | awk 'NR == 2 { print $2 }')
export R_CMD="$command_line" R_REV="$rev" R_DIRTY="$dirty" R_BIN="$HUREN_BIN" \
    R_BIN_TIME="$(date -u -r "$HUREN_BIN" +%Y-%m-%dT%H:%MZ)" R_BIN_SHA="$(sha256sum "$HUREN_BIN" | cut -d' ' -f1)" \
    R_RESULTS="$results" R_N="$instances" R_BYTES="$man_bytes" R_CORPUS_BYTES="$corpus_bytes" \
    R_BLOB_FILES="$blob_files" R_BLOB_BYTES="$blob_bytes" R_STORE_S="$store_s" R_PUBLISH_S="$publish_s" \
    R_CORPUS_S="$corpus_s" R_DISK="$disk_write_mbs" R_FS="$fs_type" R_LOAD="$loads" R_OUT="$out_file" \
    R_BIN_COMMIT="${HUREN_BIN_COMMIT:-}" R_UID="$UID_STUDY" R_DATE="$(date -u '+%Y-%m-%d %H:%M UTC')"
"$PYTHON" - <<'EOF'
import csv, os, platform, statistics
E = os.environ
rows = list(csv.DictReader(open(E["R_RESULTS"]), delimiter="\t"))
total = int(E["R_BYTES"])
mbs = lambda s: total / 1e6 / float(s)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) / 1048576
dirty = int(E["R_DIRTY"])
commit = f"HEAD at the run {E['R_REV']}"
if E["R_BIN_COMMIT"]:
    commit = f"binary built from {E['R_BIN_COMMIT']}; " + commit
elif dirty:
    commit += (f" (the working tree had {dirty} uncommitted paths under src/ tests/ migrations/ proto/ Cargo.*; "
               f"the binary may have been built from another tree)")
key = lambda r: (r["kind"], r["parallel"], r["durability"])
kinds = []
for r in rows:
    if key(r) not in kinds:
        kinds.append(key(r))
def label(k):
    if k[0] == "fetch":
        return f"peer fetch, --peer-parallel {k[1]}, --durability {k[2]}"
    return {"curl": "curl WADO-RS study (B → /dev/null)", "cp": "cp -r of B's blobs + sync",
            "curl-instances": "curl WADO-RS per instance, 4 at once (→ /dev/null)"}[k[0]]
by = {k: [r for r in rows if key(r) == k] for k in kinds}
med = {k: statistics.median(float(r["seconds"]) for r in v) for k, v in by.items()}
curl_mbs = mbs(med[("curl", "", "")])

L = []
w = L.append
w(f"# Peer retrieval benchmark {E['R_DATE']}")
w("")
w(f"- command: `{E['R_CMD']}`")
w(f"- machine: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, kernel {platform.release()}, work dir on {E['R_FS']}; "
  f"64 MiB sequential write + fdatasync: {E['R_DISK']} MB/s")
w(f"- huren: `{E['R_BIN']}` (built {E['R_BIN_TIME']}, sha256 {E['R_BIN_SHA'][:16]}…); {commit}")
w(f"- load average (1/5/15 min) {E['R_LOAD']}; other processes were not stopped")
w("")
w("## Data")
w("")
w(f"- one CT study, one series, {int(E['R_N']):,} instances (benches/peer-corpus.py: CT Image Storage, Explicit VR "
  f"Little Endian, 512×512 signed 16-bit, distinct noise in every slice, fresh UIDs; generated in "
  f"{float(E['R_CORPUS_S']):.0f} s), study `{E['R_UID']}`")
w(f"- {total:,} bytes ({total / 1e6:.1f} MB) = sum of the sizes in B's manifest (the corpus files: "
  f"{int(E['R_CORPUS_BYTES']):,} bytes; B's blob store: {int(E['R_BLOB_FILES']):,} files, "
  f"{int(E['R_BLOB_BYTES']):,} bytes); all MB/s below are this figure / seconds, MB = 10^6 bytes")
w(f"- stored at B with storescu in {float(E['R_STORE_S']):.1f} s; published "
  f"{float(E['R_PUBLISH_S']):.1f} s later (quiet time 1 s)")
w("")
w("## Runs")
w("")
w("Seconds (MB/s) per measurement.")
w("")
w("| round | " + " | ".join(label(k) for k in kinds) + " |")
w("|---" * (len(kinds) + 1) + "|")
for n in sorted({int(r["round"]) for r in rows}):
    cells = []
    for k in kinds:
        r = next(x for x in by[k] if int(x["round"]) == n)
        cells.append(f"{float(r['seconds']):.2f} ({mbs(r['seconds']):.0f})")
    w(f"| {n} | " + " | ".join(cells) + " |")
w("| **median** | " + " | ".join(f"**{med[k]:.2f} ({mbs(med[k]):.0f})**" for k in kinds) + " |")
w("")
w("MB/s of the median time. Order within a round: the fetches (one per --durability and --peer-parallel, each by "
  "a node A with a fresh data dir, started and with the hospital directory pulled before the clock starts), "
  "curl (the study), curl (per instance), cp; `sync` before every measurement.")
w("")
w("## Targets")
w("")
w("| target | measured | |")
w("|---|---|---|")
for k in kinds:
    if k[0] != "fetch":
        continue
    ratio = mbs(med[k]) / curl_mbs
    verdict = ("**met**" if ratio >= 0.8 else "**not met**") if k[2] == "full" else \
        "(relaxed: not the target's figure)"
    w(f"| peer fetch ≥ 80% of curl (--peer-parallel {k[1]}, --durability {k[2]}) | {mbs(med[k]):.0f} MB/s = "
      f"{ratio:.0%} of curl's {curl_mbs:.0f} MB/s | {verdict} |")
w("")
w("## What differs")
w("")
w("- The fetch is end to end at node A: a grant from the registry (consent checked, audited, a durable commit), "
  "B confirming the grant with the registry, the manifest checked against the content root B published, then "
  "the instances by WADO-RS (up to 9ba512f one request per instance, --peer-parallel at once; since 69a2d63 a "
  "study with nothing held in one response, parts verified as they complete), each streamed through A's "
  "ingest path: the "
  "Part-10 parsed and indexed, the blob staged, its BLAKE3 checked against the manifest's hash before it is "
  "renamed into the store, and one SQLite commit per instance (synchronous=NORMAL). With --durability full "
  "(the default) on local files, up to 5be4702 each instance waited for the blob store's group sync (one "
  "syncfs of the file system, shared by the instances in flight, covering blobs and WAL); since 87c25de one "
  "syncfs covers each series once its last instance is in. Relaxed flushes nothing. The answer comes when "
  "every instance is stored and flushed and the fetch is audited.")
w("- curl is one WADO-RS request for the whole study from B; it writes nothing (-o /dev/null), verifies nothing. "
  "The per-instance curl (one process, `--parallel --parallel-max 4`, the instance URLs the fetch asks for) "
  "is not a target anchor: it shows what one request per instance costs at B and over loopback, without A.")
w("- cp copies B's blob files (already in the page cache, like B's reads during the fetch) and `sync` writes them "
  "to disk once, with no per-file sync and no index.")
w("- Everything is on one machine: B's reads, A's writes, the registry and curl share its cores and its disk; "
  "syncfs flushes whatever else is dirty on that file system too.")
w("")
w("## Raw")
w("")
w("| round | kind | parallel | durability | seconds | detail |")
w("|---|---|---|---|---|---|")
for r in rows:
    w(f"| {r['round']} | {r['kind']} | {r['parallel']} | {r['durability']} | {r['seconds']} | "
      f"{r['detail'].replace('|', '/')} |")
report = "\n".join(L) + "\n"
open(E["R_OUT"], "w").write(report)
print(report)
EOF
log "report: $out_file"
