#!/usr/bin/env bash
# Registry benchmark: `huren registry` on PostgreSQL with N study records.
# Not a test. Method and figures: docs/benchmarks.md, "Registry".
#
#   benches/registry.sh [--records N] [--queries Q] [--publish N] [--backlog N]
#                       [--runs R] [--gen-jobs J] [--work-dir DIR] [--out FILE]
#                       [--no-docs] [--keep] [--quiet-wait S] [--pg-stats]
#
#   --records N   study records generated in SQL before the measurements
#                 (default 10,000,000; ~N/3 patients, 1-5 studies each)
#   --queries Q   priors queries per run (default 1,000)
#   --publish N   records published through the API per run, batches of 500
#                 (default 100,000)
#   --backlog N   publication_outbox rows a node drains (default 100,000)
#   --runs R      runs of the priors and publish measurements (default 3);
#                 the report gives every run and the median
#   --gen-jobs J  parallel psql sessions generating records (default nproc)
#   --work-dir    default /tmp/huren-registry-bench; the run's PostgreSQL
#                 cluster and node data live in DIR/run-<stamp> and are
#                 removed at the end unless --keep (which keeps them)
#   --out FILE    the report (default benches/results/registry-<date>-<time>.md)
#   --no-docs     do not write the "## Registry" section of docs/benchmarks.md
#   --quiet-wait S  before each measurement (priors, publish, drain), wait up
#                 to S seconds for the 1-minute load average to fall below 0.7
#                 (a shared machine; default 0: do not wait); the report
#                 gives the load averages before and after each
#   --pg-stats    diagnostic: load pg_stat_statements and report, per phase,
#                 the statements' calls and execution time inside PostgreSQL
#                 (adds a little overhead; the report says so)
#
# Steps: a throwaway PostgreSQL cluster (fsync, synchronous_commit and
# full_page_writes ON: every publication and every audited query is a
# durable commit, and that is part of what is measured); two hospitals
# through `huren registry hospital add`; N records and consents for half of
# the patients written in SQL (benches/registry-gen.sql), indexes built
# after the load, VACUUM ANALYZE, CHECKPOINT; `huren registry` started on it;
# priors query latency, publish throughput (benches/registry-client.py);
# a `huren node` (SQLite) draining a backlog of its outbox into the
# registry; `huren registry audit verify`, which must say "intact".
#
# Environment: HUREN_BIN (default <repo>/target/release/huren), PG_BIN
# (newest /usr/lib/postgresql/*/bin), PYTHON (python3; standard library
# only), HUREN_BENCH_DOCS (the file whose "## Registry" section is written,
# default docs/benchmarks.md).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
command_line="benches/registry.sh$(printf ' %q' "$@")"
[[ -z "${HUREN_BIN:-}" ]] || command_line="HUREN_BIN=$HUREN_BIN $command_line"

records=10000000
queries=1000
publish=100000
backlog=100000
runs=3
gen_jobs=$(nproc)
work_dir="${HUREN_BENCH_WORK:-/tmp/huren-registry-bench}"
out_file=""
write_docs=1
keep=0
pg_stats=0
quiet_wait=0

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --records) records="$2"; shift ;;
        --queries) queries="$2"; shift ;;
        --publish) publish="$2"; shift ;;
        --backlog) backlog="$2"; shift ;;
        --runs) runs="$2"; shift ;;
        --gen-jobs) gen_jobs="$2"; shift ;;
        --work-dir) work_dir="$2"; shift ;;
        --out) out_file="$2"; shift ;;
        --no-docs) write_docs=0 ;;
        --pg-stats) pg_stats=1 ;;
        --quiet-wait) quiet_wait="$2"; shift ;;
        --keep) keep=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
for v in records queries publish backlog runs gen_jobs quiet_wait; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "--${v/_/-} must be a number" >&2; exit 2; }
done
(( records >= 15 && queries >= 1 && runs >= 1 && gen_jobs >= 1 )) ||
    { echo "need --records >= 15, --queries >= 1, --runs >= 1" >&2; exit 2; }

PYTHON="${PYTHON:-python3}"
HUREN_BIN="${HUREN_BIN:-$repo/target/release/huren}"
PG_BIN="${PG_BIN:-$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n1)}"
GEN_SQL="$here/registry-gen.sql"
CLIENT="$here/registry-client.py"
HOSP_A=HOSPA0000000000001
HOSP_B=HOSPB0000000000002

[[ -x "$HUREN_BIN" ]] || { echo "registry: HUREN_BIN=$HUREN_BIN does not exist (cargo build --release)" >&2; exit 1; }
[[ -x "$PG_BIN/initdb" ]] || { echo "registry: no PostgreSQL under $PG_BIN" >&2; exit 1; }
command -v curl >/dev/null || { echo "registry: needs curl" >&2; exit 1; }

exec 3>&2
# the repository as the run starts (the binary may have been built from it)
rev=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')
dirty=$(git -C "$repo" status --porcelain -- src tests migrations proto Cargo.toml Cargo.lock 2>/dev/null | wc -l)
stamp=$(date +%Y%m%d-%H%M%S)
run="$work_dir/run-$stamp"
logs="$run/logs"
mkdir -p "$logs"
log() { echo "registry: $*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

reg_pid=""
node_pid=""
pg_data=""
stop_pid() { # PID: TERM, then KILL after 30 s
    local pid=$1
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
# run_child CMD...: runs CMD as a child and waits for it, so that a signal to this
# script is handled at once (bash defers traps while a foreground command
# runs); returns CMD's status.
run_child() { "$@" & wait $!; }
cleanup() {
    local rc=$? j
    for j in $(jobs -p); do kill -TERM "$j" 2>/dev/null || true; done
    stop_pid "$node_pid"; node_pid=""
    stop_pid "$reg_pid"; reg_pid=""
    if [[ -n "$pg_data" ]]; then
        as_pg "$PG_BIN/pg_ctl" -D "$pg_data" -m fast -t 120 stop >/dev/null 2>&1 ||
            as_pg "$PG_BIN/pg_ctl" -D "$pg_data" -m immediate stop >/dev/null 2>&1 || true
    fi
    if [[ $keep == 0 ]]; then rm -rf "$run/pg" "$run/node"; fi
    # fd 3: the script's stderr (a trap can run inside a redirected command)
    (( rc == 0 )) || echo "registry: failed (exit $rc); logs in $logs" >&3
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_log() { # PID FILE PATTERN TIMEOUT_S
    local deadline=$(( $(date +%s) + $4 ))
    while (( $(date +%s) < deadline )); do
        kill -0 "$1" 2>/dev/null || return 1
        grep -qF "$3" "$2" 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

# ------------------------------------------------------------ PostgreSQL
. "$repo/benches/lib.sh"
bench_token
extra=""
(( pg_stats == 0 )) || extra="-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.max=1000\
 -c track_wal_io_timing=on -c log_min_duration_statement=5 -c log_parameter_max_length=0"
start_postgres "$extra"
psql -d postgres -c 'CREATE DATABASE registry'
db_url="postgres://postgres@127.0.0.1:$pg_port/registry"
q() { psql -d registry -Atc "$1"; }
(( pg_stats == 0 )) || q 'CREATE EXTENSION pg_stat_statements' >/dev/null
# pgsnap: WAL full-page images, WAL bytes, blocks the registry database read
# from outside shared_buffers (page cache or disk). Backends report their
# counters when idle, within 10 s: a snapshot is taken 11 s after a phase.
pgsnap() { q "SELECT wal_fpi, wal_bytes, (SELECT blks_read FROM pg_stat_database WHERE datname = 'registry') FROM pg_stat_wal"; }
pgdelta() { # SNAP_BEFORE SNAP_AFTER -> JSON
    "$PYTHON" -c 'import json, sys
a, b = ([float(x) for x in s.split("|")] for s in sys.argv[1:3])
print(json.dumps({"wal_fpi": int(b[0] - a[0]), "wal_mb": round((b[1] - a[1]) / 1e6, 1), "blks_read": int(b[2] - a[2])}))' "$1" "$2"
}
page_cache() { awk '/^(Cached|Shmem):/ { v[$1] = $2 } END { printf "%.1f", (v["Cached:"] - v["Shmem:"]) / 1048576 }' /proc/meminfo; }
# stats_reset / stats_dump PHASE (--pg-stats): statement times inside
# PostgreSQL, WAL syncs and their time, and the slices of the PostgreSQL log
# (statements of 5 ms or more) and of the registry's log (every request's
# latency) written during the phase.
stats_reset() {
    (( pg_stats == 0 )) && return 0
    q 'SELECT pg_stat_statements_reset()' >/dev/null
    wal_sync0=$(q 'SELECT wal_sync, wal_sync_time FROM pg_stat_wal')
    pglog_off=$(stat -c %s "$run/pg/log"); reglog_off=$(stat -c %s "$logs/registry.log")
}
stats_dump() {
    (( pg_stats == 0 )) && return 0
    q "SELECT calls, round(total_exec_time::numeric, 1), round(mean_exec_time::numeric, 4),
              round(max_exec_time::numeric, 2), left(regexp_replace(query, '\s+', ' ', 'g'), 110)
       FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'registry')
         AND query NOT LIKE '%pg_stat%'
       ORDER BY total_exec_time DESC LIMIT 10" >"$run/pgstats-$1.txt"
    echo "$wal_sync0|$(q 'SELECT wal_sync, wal_sync_time FROM pg_stat_wal')" >"$run/walsync-$1.txt"
    tail -c +$(( pglog_off + 1 )) "$run/pg/log" >"$run/slow-pg-$1.log"
    tail -c +$(( reglog_off + 1 )) "$logs/registry.log" >"$run/reg-$1.log"
}
pg_version=$("$PG_BIN/postgres" --version)

log "PostgreSQL on 127.0.0.1:$pg_port"
# A VM may reclaim cold page-cache pages by itself (DAMON "pageout"): say so.
damon=$(for d in /sys/kernel/mm/damon/admin/kdamonds/[0-9]*; do
            [[ -r "$d/state" ]] || continue
            echo "kdamond $(basename "$d") $(cat "$d/state") (schemes: $(cat "$d"/contexts/*/schemes/*/action 2>/dev/null | sort -u | xargs))"
        done 2>/dev/null | tr '\n' ';' || true)

# ------------------------------------------------------------ hospitals
"$HUREN_BIN" registry hospital add --database-url "$db_url" --id "$HOSP_A" --name 医院A --level 3A \
    --token-file "$run/token-a" >>"$logs/cli.log" 2>&1
"$HUREN_BIN" registry hospital add --database-url "$db_url" --id "$HOSP_B" --name 医院B --level 2A \
    --token-file "$run/token-b" >>"$logs/cli.log" 2>&1

# ------------------------------------------------------------ generation
patients=$(( records / 3 ))
log "generating ~$records records for $patients patients in $gen_jobs sessions"
t_gen0=$(now)
# Constraints and indexes of study_record are dropped for the load and
# rebuilt from their saved definitions afterwards.
restore_sql=$(q "SELECT string_agg(stmt, E'\n' ORDER BY ord) FROM (
    SELECT CASE contype WHEN 'p' THEN 1 WHEN 'u' THEN 2 ELSE 3 END AS ord,
           format('ALTER TABLE study_record ADD CONSTRAINT %I %s;', conname, pg_get_constraintdef(oid)) AS stmt
    FROM pg_constraint WHERE conrelid = 'study_record'::regclass AND contype IN ('p', 'u', 'f')
    UNION ALL
    SELECT 4, indexdef || ';' FROM pg_indexes
    WHERE schemaname = 'public' AND tablename = 'study_record'
      AND indexname NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = 'study_record'::regclass)) s")
q "DO \$\$ DECLARE r record; BEGIN
    FOR r IN SELECT conname FROM pg_constraint WHERE conrelid = 'study_record'::regclass AND contype IN ('f', 'u', 'p')
             ORDER BY contype = 'p' LOOP
        EXECUTE format('ALTER TABLE study_record DROP CONSTRAINT %I', r.conname);
    END LOOP;
    FOR r IN SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'study_record' LOOP
        EXECUTE format('DROP INDEX %I', r.indexname);
    END LOOP; END \$\$" >/dev/null
pids=()
for (( j = 0; j < gen_jobs; j++ )); do
    lo=$(( patients * j / gen_jobs + 1 )); hi=$(( patients * (j + 1) / gen_jobs ))
    psql -d registry -v what=records -v lo="$lo" -v hi="$hi" -v hosp_a="$HOSP_A" -v hosp_b="$HOSP_B" \
        -f "$GEN_SQL" >"$logs/gen-$j.log" 2>&1 &
    pids+=($!)
done
fail=0
for pid in "${pids[@]}"; do wait "$pid" || fail=1; done
(( fail == 0 )) || { cat "$logs"/gen-*.log >&2; exit 1; }
t_gen1=$(now)
printf '%s\n' "$restore_sql" >"$logs/restore.sql"
run_child psql -d registry -f "$logs/restore.sql"
t_gen2=$(now)
run_child psql -d registry -v what=consents -v lo=1 -v hi="$patients" -v hosp_a="$HOSP_A" -v hosp_b="$HOSP_B" -f "$GEN_SQL"
t_gen3=$(now)
run_child psql -d registry -c 'VACUUM (ANALYZE) study_record' -c 'VACUUM (ANALYZE) consent' -c 'CHECKPOINT'
t_gen4=$(now)
n_records=$(q "SELECT count(*) FROM study_record")
n_consents=$(q "SELECT count(*) FROM consent")
gen_rows_s=$(elapsed "$t_gen0" "$t_gen1"); gen_index_s=$(elapsed "$t_gen1" "$t_gen2")
gen_consent_s=$(elapsed "$t_gen2" "$t_gen3"); gen_vacuum_s=$(elapsed "$t_gen3" "$t_gen4")
gen_total_s=$(elapsed "$t_gen0" "$t_gen4")
log "generated $n_records records, $n_consents consents in $gen_total_s s (rows $gen_rows_s, indexes $gen_index_s, consents $gen_consent_s, vacuum+checkpoint $gen_vacuum_s)"
sizes_after_gen=$(q "SELECT pg_size_pretty(pg_total_relation_size('study_record')) || ' (heap ' ||
    pg_size_pretty(pg_relation_size('study_record')) || ')', pg_size_pretty(pg_database_size('registry'))" | tr '|' ';')
plan=$(q "EXPLAIN SELECT hospital_id, published_at, retracted, record FROM study_record
    WHERE patient_key = '$(printf 'huren-bench-patient:%s' 7 | sha256sum | cut -d' ' -f1)' AND retracted = 0
    ORDER BY (study_date IS NULL), study_date DESC, hospital_id, study_instance_uid" | tr '\n' ' ' | sed 's/  */ /g')

# ------------------------------------------------------------ registry
reg_port=$(free_port)
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$run/admin-token"
reg_log_filter=info
(( pg_stats == 0 )) || reg_log_filter="info,tower_http=debug"  # every request's latency
HUREN_LOG=$reg_log_filter "$HUREN_BIN" registry --listen "127.0.0.1:$reg_port" --database-url "$db_url" \
    --admin-token-file "$run/admin-token" --data-dir "$run/registry-data" >"$logs/registry.log" 2>&1 &
reg_pid=$!
for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$reg_port/health" >/dev/null 2>&1 && break
    kill -0 "$reg_pid" 2>/dev/null || { log "registry exited"; cat "$logs/registry.log" >&2; exit 1; }
    sleep 0.1
done
curl -sf "http://127.0.0.1:$reg_port/health" >/dev/null || { log "registry did not start"; exit 1; }
log "registry on 127.0.0.1:$reg_port"

# ------------------------------------------------------------ priors
wait_quiet() { # before each measurement (--quiet-wait)
    (( quiet_wait > 0 )) || return 0
    local deadline=$(( $(date +%s) + quiet_wait )) t0
    t0=$(date +%s)
    until awk '{ exit !($1 < 0.7) }' /proc/loadavg || (( $(date +%s) >= deadline )); do sleep 5; done
    log "load average $(cut -d' ' -f1-3 /proc/loadavg) after waiting $(( $(date +%s) - t0 )) s (up to $quiet_wait s for < 0.7)"
}
wait_quiet
# WAL-like flush latency of this disk (8 kB write + fdatasync, PostgreSQL's
# default wal_sync_method on Linux): the floor under every durable commit.
disk_json=$("$PYTHON" "$CLIENT" disk --dir "$run")
log "disk: 8 kB write + fdatasync: $disk_json"
loads="before priors: $(cut -d' ' -f1-3 /proc/loadavg)"
cache_before_priors=$(page_cache)
snap=$(pgsnap)
stats_reset
log "priors: $runs × $queries queries"
run_child "$PYTHON" "$CLIENT" priors --port "$reg_port" --token-file "$run/token-a" --patients "$patients" \
    --queries "$queries" --runs "$runs" >"$run/priors.json" 2>"$logs/priors.log" ||
    { cat "$logs/priors.log" >&2; log "priors failed (or answers wrong: $run/priors.json)"; exit 1; }
cat "$logs/priors.log" >&2
loads+="; after priors: $(cut -d' ' -f1-3 /proc/loadavg)"
sleep 11; snap2=$(pgsnap); pg_priors=$(pgdelta "$snap" "$snap2")
stats_dump priors

# ------------------------------------------------------------ publish
publish_runs=0
pg_drain='{}'
if (( publish > 0 )); then
    wait_quiet
    loads+="; before publish: $(cut -d' ' -f1-3 /proc/loadavg)"
    log "publish: $runs × $publish records"
    stats_reset
    # one client per run, so that each run's WAL and read counters are its own
    : >"$run/publish-runs.jsonl"
    snap=$(pgsnap)
    for (( r = 1; r <= runs; r++ )); do
        run_child "$PYTHON" "$CLIENT" publish --port "$reg_port" --token-file "$run/token-a" --hospital "$HOSP_A" \
            --patients "$patients" --records "$publish" --runs 1 --run-base "$r" --seed "$(( 100 + r ))" \
            >"$run/publish-$r.json" 2>>"$logs/publish.log" || { cat "$logs/publish.log" >&2; exit 1; }
        tail -n 1 "$logs/publish.log" >&2
        sleep 11; snap2=$(pgsnap)
        "$PYTHON" -c 'import json, sys
o = json.load(open(sys.argv[1])); o["runs"][0]["pg"] = json.loads(sys.argv[2]); print(json.dumps(o))' \
            "$run/publish-$r.json" "$(pgdelta "$snap" "$snap2")" >>"$run/publish-runs.jsonl"
        snap=$snap2
    done
    "$PYTHON" -c 'import json, statistics, sys
parts = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
runs = [p["runs"][0] for p in parts]
print(json.dumps({"client": parts[0]["client"], "batch": parts[0]["batch"], "runs": runs,
                  "median_records_per_s": round(statistics.median(r["records_per_s"] for r in runs)),
                  "connections_opened": sum(p["connections_opened"] for p in parts)}))' \
        "$run/publish-runs.jsonl" >"$run/publish.json"
    publish_runs=$runs
    loads+="; after publish: $(cut -d' ' -f1-3 /proc/loadavg)"
    stats_dump publish
    got=$(q "SELECT count(*) FROM study_record WHERE hospital_id = '$HOSP_A' AND study_instance_uid LIKE '1.2.826.0.1.3680043.10.543.2.%'")
    (( got == publish * runs )) || { log "registry holds $got published records, expected $(( publish * runs ))"; exit 1; }
else
    echo '{}' >"$run/publish.json"
fi

# ------------------------------------------------------------ node outbox
if (( backlog > 0 )); then
    node_dir="$run/node"
    mkdir -p "$node_dir"
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$run/region-secret"
    node_start() { # extra args
        local dp hp
        dp=$(free_port); hp=$(free_port)
        node_http=$hp
        "$HUREN_BIN" node --data-dir "$node_dir" --dicom-listen "127.0.0.1:$dp" \
            --http-listen "127.0.0.1:$hp" --dicomweb-open true --operator-token-file "$BENCH_TOKEN_FILE" "$@" >>"$logs/node.log" 2>&1 &
        node_pid=$!
    }
    node_start
    wait_log "$node_pid" "$logs/node.log" "HTTP listening on 127.0.0.1:$node_http" 120 ||
        { log "node did not start"; tail -n 20 "$logs/node.log" >&2; exit 1; }
    stop_pid "$node_pid"; node_pid=""
    run_child "$PYTHON" "$CLIENT" outbox --db "$node_dir/index.sqlite" --records "$backlog" --patients "$patients" \
        >"$run/outbox-fill.json"
    sync
    wait_quiet
    loads+="; before the drain: $(cut -d' ' -f1-3 /proc/loadavg)"
    log "node: draining $backlog outbox rows"
    stats_reset
    snap=$(pgsnap)
    t_node0=$(now)
    node_start --registry-url "http://127.0.0.1:$reg_port" --hospital-id "$HOSP_B" \
        --registry-token-file "$run/token-b" --region-secret-file "$run/region-secret"
    run_child "$PYTHON" "$CLIENT" drain --port "$node_http" --t0 "$t_node0" >"$run/drain.json" 2>"$logs/drain.log" ||
        { cat "$logs/drain.log" "$run/drain.json" >&2; tail -n 20 "$logs/node.log" >&2; exit 1; }
    stop_pid "$node_pid"; node_pid=""
    loads+="; after the drain: $(cut -d' ' -f1-3 /proc/loadavg)"
    sleep 11; snap2=$(pgsnap); pg_drain=$(pgdelta "$snap" "$snap2")
    stats_dump drain
    got=$(q "SELECT count(*) FROM study_record WHERE hospital_id = '$HOSP_B' AND study_instance_uid LIKE '1.2.826.0.1.3680043.10.543.3.%'")
    (( got == backlog )) || { log "registry holds $got of the node's $backlog records"; exit 1; }
    log "node: $(cat "$run/drain.json")"
else
    echo '{}' >"$run/drain.json"
fi

reg_rss_mb=$(awk '/^VmHWM/ { printf "%d", $2 / 1024 }' "/proc/$reg_pid/status" 2>/dev/null || echo "?")
stop_pid "$reg_pid"; reg_pid=""

# ------------------------------------------------------------ audit
t_a0=$(now)
verify_out=$("$HUREN_BIN" registry audit verify --database-url "$db_url" 2>>"$logs/cli.log") || true
t_a1=$(now)
verify_s=$(elapsed "$t_a0" "$t_a1")
log "audit verify ($verify_s s): $verify_out"
audit_entries=$(sed -n 's/.*intact: \([0-9]*\) entries.*/\1/p' <<<"$verify_out")
audited_priors=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["audited_requests"])' "$run/priors.json")
expected_entries=$(( 2 + audited_priors + publish * publish_runs + backlog ))
sizes_end=$(q "SELECT pg_size_pretty(pg_total_relation_size('study_record')), pg_size_pretty(pg_total_relation_size('audit')),
    pg_size_pretty(pg_database_size('registry'))" | tr '|' ';')

# ------------------------------------------------------------ report
bin_time=$(date -u -r "$HUREN_BIN" +%Y-%m-%dT%H:%MZ)
mkdir -p "$repo/benches/results"
[[ -n "$out_file" ]] || out_file="$repo/benches/results/registry-$stamp.md"
export R_CMD="$command_line" R_REV="$rev" R_DIRTY="$dirty" R_BIN="$HUREN_BIN" R_BIN_TIME="$bin_time" R_BIN_SHA="$(sha256sum "$HUREN_BIN" | cut -d' ' -f1)" \
    R_PG="$pg_version" R_PG_SETTINGS="$pg_settings" R_DISK="$disk_json" \
    R_RECORDS="$records" R_N="$n_records" R_PATIENTS="$patients" R_CONSENTS="$n_consents" R_JOBS="$gen_jobs" \
    R_GEN_ROWS="$gen_rows_s" R_GEN_INDEX="$gen_index_s" R_GEN_CONSENT="$gen_consent_s" \
    R_GEN_VACUUM="$gen_vacuum_s" R_GEN_TOTAL="$gen_total_s" R_SIZES_GEN="$sizes_after_gen" \
    R_SIZES_END="$sizes_end" R_PLAN="$plan" R_QUERIES="$queries" R_PUBLISH="$publish" R_BACKLOG="$backlog" \
    R_RUNS="$runs" R_VERIFY="$verify_out" R_VERIFY_S="$verify_s" R_ENTRIES="${audit_entries:-}" \
    R_EXPECTED="$expected_entries" R_RSS="$reg_rss_mb" R_RUN="$run" R_OUT="$out_file" \
    R_DOCS="$write_docs" R_REPO="$repo" R_LOAD="$loads" R_PG_STATS="$pg_stats" \
    R_PG_PRIORS="$pg_priors" R_PG_DRAIN="$pg_drain" R_CACHE="$cache_before_priors" R_DAMON="$damon"
    R_DOCS_FILE="${HUREN_BENCH_DOCS:-$repo/docs/benchmarks.md}"
export R_DOCS_FILE
"$PYTHON" - <<'EOF'
import json, os, platform, re, subprocess
E = os.environ
disk = json.loads(E["R_DISK"])
flush = f"p50 {disk['p50_ms']} ms, p99 {disk['p99_ms']} ms, max {disk['max_ms']} ms"
run = E["R_RUN"]
pri = json.load(open(f"{run}/priors.json"))
pub = json.load(open(f"{run}/publish.json"))
dr = json.load(open(f"{run}/drain.json"))
fill = json.load(open(f"{run}/outbox-fill.json")) if os.path.exists(f"{run}/outbox-fill.json") else {}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) / 1048576
ncpu = os.cpu_count()
n = int(E["R_N"]); backlog = int(E["R_BACKLOG"])
med = pri["median_of_runs"]
p99_ok = med["p99_ms"] < 10
pub_rate = pub.get("median_records_per_s")
pub_ok = pub_rate is not None and pub_rate >= 5000
drain_rate = drain_rate_net = None
if dr:
    drain_rate = round(backlog / dr["drained_s"])
    drain_rate_net = round(backlog / (dr["drained_s"] - dr["api_up_s"])) if dr["drained_s"] > dr["api_up_s"] else None
intact = "intact" in E["R_VERIFY"]
entries = int(E["R_ENTRIES"]) if E["R_ENTRIES"] else None
expected = int(E["R_EXPECTED"])
dirty = int(E["R_DIRTY"])
commit = E["R_REV"] + (f" (when the run started the working tree had {dirty} uncommitted paths under src/ tests/ migrations/ proto/ "
                        f"Cargo.*; a binary built from the working tree includes them)" if dirty else "")
date_utc = subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip()
yes = lambda ok: "**met**" if ok else "**not met**"

L = []
w = L.append
w(f"# Registry benchmark {date_utc}")
w("")
w(f"- command: `{E['R_CMD']}`")
w(f"- machine: {ncpu} cores ({cpu}), {mem:.0f} GiB, kernel {platform.release()}; 8 kB write + fdatasync on the "
  f"PostgreSQL data disk (a WAL flush; {disk['n']:,} times, just before the priors runs): {flush}")
w(f"- huren: `{E['R_BIN']}` (file modified {E['R_BIN_TIME']}, sha256 {E['R_BIN_SHA'][:16]}…); HEAD {commit}")
pg_set = " ".join(x.strip() for x in E["R_PG_SETTINGS"].split(" -c ")[1:]
                  if not x.startswith(("listen_addresses", "unix_socket")))
w(f"- {E['R_PG']}, throwaway cluster on loopback; settings: `{pg_set}` "
  f"(fsync, synchronous_commit and full_page_writes on: every publication batch and every audited query is a "
  f"durable commit)")
damon = E["R_DAMON"].strip("; ") or "none"
w(f"- memory: page cache (file pages, shared_buffers not counted) {E['R_CACHE']} GiB just before the priors "
  f"runs; DAMON on this kernel: {damon}")
w(f"- client: {pri['client']}")
w(f"- load average (1/5/15 min) {E['R_LOAD']}; other processes were not stopped"
  + (f" (with --quiet-wait each measurement first waited, for at most the time given, for a 1-minute load average below 0.7)" if "--quiet-wait" in E["R_CMD"] else ""))
w("")
w("## Data")
w("")
w(f"- {n:,} study records (asked for {int(E['R_RECORDS']):,}) of {int(E['R_PATIENTS']):,} patients (1-5 studies "
  f"each, 3 on average) at two hospitals; {int(E['R_CONSENTS']):,} granted consents (every other patient, for "
  f"hospital A); written in SQL by benches/registry-gen.sql in {E['R_JOBS']} parallel sessions, without audit "
  f"entries")
w(f"- generation: **{float(E['R_GEN_TOTAL']):,.0f} s** in all: rows {float(E['R_GEN_ROWS']):,.1f} s "
  f"(primary key, foreign key and patient index dropped), rebuilding them {float(E['R_GEN_INDEX']):,.1f} s, "
  f"consents {float(E['R_GEN_CONSENT']):,.1f} s, VACUUM ANALYZE + CHECKPOINT {float(E['R_GEN_VACUUM']):,.1f} s")
w(f"- sizes after generation: study_record {E['R_SIZES_GEN'].split(';')[0]}, database {E['R_SIZES_GEN'].split(';')[1]}; "
  f"at the end: study_record {E['R_SIZES_END'].split(';')[0]}, audit {E['R_SIZES_END'].split(';')[1]}, "
  f"database {E['R_SIZES_END'].split(';')[2]}")
w(f"- plan of the priors SELECT: `{E['R_PLAN'].strip()}`")
w("")
w(f"## Priors query (POST /v1/priors/query), {int(E['R_QUERIES']):,} queries per run")
w("")
w("Random patients; 9 of 10 with purpose `treatment`, 1 of 10 `emergency`; asked by hospital A. Each "
  "query: token check, records SELECT, consent SELECT, audit append (UPDATE of the chain head, INSERT, "
  "UPDATE, COMMIT with WAL flush). Time from sending the request until its whole body is read.")
w("")
w("| run | p50 ms | p90 ms | p99 ms | max ms | mean ms | records shown (mean) | withheld (mean) | access | answer bytes (mean) |")
w("|---|---|---|---|---|---|---|---|---|---|")
for r in pri["runs"]:
    acc = ", ".join(f"{k} {v}" for k, v in sorted(r["access"].items()))
    w(f"| {r['run']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['mean_ms']} | "
      f"{r['records_shown_mean']} | {r['withheld_mean']} | {acc} | {r['response_bytes_mean']:,} |")
w(f"| **median** | **{med['p50_ms']}** | **{med['p90_ms']}** | **{med['p99_ms']}** | {med['max_ms']} | {med['mean_ms']} | | | | |")
h = pri["health_floor"]
w("")
pgp = json.loads(E["R_PG_PRIORS"])
w(f"During the priors phase (warm-up, /ready and all runs): {pgp['blks_read']:,} blocks read from outside "
  f"shared_buffers, {pgp['wal_mb']} MB of WAL with {pgp['wal_fpi']:,} full-page images.")
w("")
w(f"Floor: GET /ready (the server's `SELECT 1`, no audit) on the same connection: p50 {h['p50_ms']} ms, "
  f"p99 {h['p99_ms']} ms ({h['n']} requests). {pri['warmup']} unmeasured warm-up queries before run 1. "
  f"Answers checked against the generated layout: {pri['check_errors']} wrong.")
w("")
if pub:
    w(f"## Publish (POST /v1/hospitals/{{id}}/records), {int(E['R_PUBLISH']):,} new records per run, batches of {pub['batch']}")
    w("")
    w("One batch = one transaction: 500 records upserted and 500 audit entries appended, one commit. Bodies built before the "
      "clock starts; the client parses each answer and checks that every record is `applied`.")
    w("")
    w("| run | seconds | records/s | batch p50 ms | batch p99 ms | batch max ms | body KB (mean) | WAL MB | full-page images | blocks read |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for r in pub["runs"]:
        b = r["batch_latency"]
        g = r.get("pg", {})
        w(f"| {r['run']} | {r['seconds']} | {r['records_per_s']:,} | {b['p50_ms']} | {b['p99_ms']} | {b['max_ms']} | "
          f"{r['batch_bytes_mean'] / 1000:.0f} | {g.get('wal_mb', '–')} | {g.get('wal_fpi', 0):,} | {g.get('blks_read', 0):,} |")
    w(f"| **median** | | **{pub_rate:,}** | | | | | | | |")
    w("")
    w("WAL MB, full-page images (the first change of a page after a checkpoint writes the whole 8 kB page "
      "to the WAL) and blocks read from outside shared_buffers: PostgreSQL's counters (pg_stat_wal, "
      "pg_stat_database) over the run, read 11 s after it.")
    w("")
if dr:
    w(f"## Node outbox drain, {backlog:,} rows")
    w("")
    w(f"`huren node` (SQLite index, fresh data dir) started once to create its tables and stopped; "
      f"{fill.get('rows', backlog):,} publication_outbox rows (bodies ~{fill.get('body_bytes_mean', '?')} bytes) "
      f"inserted with Python's sqlite3; the node started again with --registry-url, hospital B's token and a "
      f"region secret; GET /api/v1/publication polled every 0.1 s.")
    w("")
    w("| from the node's start until | seconds |")
    w("|---|---|")
    w(f"| its API answered | {dr['api_up_s']} |")
    w(f"| the backlog first fell | {dr['first_progress_s']} |")
    w(f"| backlog 0 | **{dr['drained_s']}** |")
    w("")
    w("Backlog over time (s since the node's start, rows left): "
      + ", ".join(f"{t} s {b:,}" for t, b in dr.get("timeline", [])))
    w("")
    pgd = json.loads(E["R_PG_DRAIN"])
    if pgd:
        w(f"PostgreSQL during the drain: {pgd['wal_mb']} MB of WAL with {pgd['wal_fpi']:,} full-page images, "
          f"{pgd['blks_read']:,} blocks read from outside shared_buffers.")
        w("")
    net = (f"{drain_rate_net:,} records/s from its API answering" if drain_rate_net
           else "the backlog was empty when its API first answered")
    w(f"**{drain_rate:,} records/s** from the node's start ({net}); "
      f"dead rows: {dr['dead']}; the registry holds all {backlog:,}.")
    w("")
w("## Audit")
w("")
w(f"`huren registry audit verify` after the run ({E['R_VERIFY_S']} s): `{E['R_VERIFY']}`; expected "
  f"{expected:,} entries (2 hospitals + {pri['audited_requests']:,} priors queries incl. warm-up + published "
  f"records + outbox records): {'matches' if entries == expected else 'DOES NOT MATCH'}.")
w("")
w(f"Registry peak RSS: {E['R_RSS']} MB.")
w("")
if E["R_PG_STATS"] == "1":
    w("## Inside PostgreSQL (--pg-stats)")
    w("")
    w("This run loaded pg_stat_statements, timed WAL syncs (track_wal_io_timing), logged statements of 5 ms "
      "or more (log_min_duration_statement) and had the registry log every request's latency "
      "(tower_http=debug, whole milliseconds): a little overhead everywhere, so its figures are not the "
      "headline ones. Per phase, the statements with the most execution time inside PostgreSQL. "
      "COMMIT's WAL flush is not in these statement figures (it happens after the statement is counted): "
      "the WAL sync line gives it.")
    for phase in ("priors", "publish", "drain"):
        f = f"{run}/pgstats-{phase}.txt"
        if not os.path.exists(f):
            continue
        rows = [l.split("|", 4) for l in open(f).read().splitlines() if l.strip()]
        total = sum(float(r[1]) for r in rows)
        w("")
        w(f"{phase} (top {len(rows)} statements, {total:,.0f} ms in all):")
        w("")
        w("| calls | total ms | mean ms | max ms | statement |")
        w("|---|---|---|---|---|")
        for c, t, m, mx, qy in rows:
            w(f"| {int(c):,} | {float(t):,.0f} | {m} | {mx} | `{qy.replace('|', '/')}` |")
        ws = [float(x) for x in open(f"{run}/walsync-{phase}.txt").read().strip().split("|")]
        syncs, sync_ms = ws[2] - ws[0], ws[3] - ws[1]
        if syncs:
            w("")
            w(f"WAL syncs: {syncs:,.0f}, {sync_ms:,.0f} ms in all, {sync_ms / syncs:.3f} ms each on average.")
        slow = {}
        for line in open(f"{run}/slow-pg-{phase}.log", errors="replace"):
            m = re.search(r"duration: ([0-9.]+) ms\s+(?:execute|statement|bind|parse)[^:]*:\s*(.*)", line)
            if m and "pg_stat" not in m.group(2):
                k = re.sub(r"\s+", " ", m.group(2))[:70]
                slow.setdefault(k, []).append(float(m.group(1)))
        if slow:
            w("")
            w("Statements of 5 ms or more (PostgreSQL log): " + "; ".join(
                f"`{k}` ×{len(v)} (max {max(v):.0f} ms)" for k, v in sorted(slow.items(), key=lambda kv: -len(kv[1]))))
        lat = {}
        for line in open(f"{run}/reg-{phase}.log", errors="replace"):
            m = re.search(r"uri=(\S+).*finished processing request.*latency=(\d+) ms", line)
            if m:
                lat.setdefault(m.group(1), []).append(int(m.group(2)))
        for uri, v in sorted(lat.items()):
            if len(v) < 10:
                continue
            v.sort()
            over5 = sum(1 for x in v if x >= 5)
            w("")
            w(f"Registry-side latency of {uri} ({len(v):,} requests, whole ms): p50 {v[len(v) // 2]}, "
              f"p99 {v[int(len(v) * 0.99) - 1]}, max {v[-1]}; {over5:,} of 5 ms or more.")
    w("")
w("## Targets")
w("")
w("| target | measured | |")
w("|---|---|---|")
w(f"| priors p99 < 10 ms | {med['p99_ms']} ms (median of {len(pri['runs'])} runs) | {yes(p99_ok)} |")
if pub:
    w(f"| publish ≥ 5,000 records/s | {pub_rate:,} records/s (median of {len(pub['runs'])} runs) | {yes(pub_ok)} |")
w(f"| audit chain intact | {E['R_VERIFY']} | {yes(intact and entries == expected)} |")
report = "\n".join(L) + "\n"
open(E["R_OUT"], "w").write(report)
print(report)

summary = {"n": n, "gen_s": float(E["R_GEN_TOTAL"]), "p50": med["p50_ms"], "p99": med["p99_ms"],
           "p99_ok": p99_ok, "pub": pub_rate, "pub_ok": pub_ok, "drain": drain_rate, "drain_net": drain_rate_net,
           "entries": entries, "intact": intact}
json.dump(summary, open(f"{run}/summary.json", "w"))

# ---- docs/benchmarks.md: the "## Registry" section, last in the file
if E["R_DOCS"] == "1":
    docs = E["R_DOCS_FILE"]
    rel = os.path.relpath(E["R_OUT"], os.path.dirname(docs))
    D = []
    d = D.append
    d(f"`huren registry` on PostgreSQL with {n:,} study records: priors query latency, publish throughput, "
      f"a node draining its outbox, and the audit chain afterwards. Measured {date_utc}, HEAD {commit}; "
      f"the script's report with every run is [`{os.path.basename(E['R_OUT'])}`]({rel}).")
    d("")
    d("```sh")
    d("cargo build --release")
    d(E["R_CMD"])
    d("```")
    d("")
    d(f"Machine: {ncpu} cores, {mem:.0f} GiB; 8 kB write + fdatasync on the data disk (a WAL flush) "
      f"{flush}. {E['R_PG']}, throwaway cluster on loopback with fsync, synchronous_commit "
      "and full_page_writes **on**: every publication batch and every audited priors query is a durable "
      "commit, and that is part of what is measured (shared_buffers 1/6 of RAM, max_wal_size 16 GB, "
      "checkpoint_timeout 30 min; the rest in the report).")
    d("")
    d(f"Data: {n:,} records of {int(E['R_PATIENTS']):,} patients (1-5 studies each, 3 on average, at two "
      f"hospitals), {int(E['R_CONSENTS']):,} granted consents (every other patient, for the asking hospital), "
      f"written in SQL by `benches/registry-gen.sql` in {float(E['R_GEN_TOTAL']) / 60:.1f} min "
      f"({float(E['R_GEN_ROWS']) / 60:.1f} min rows with the table's keys and index dropped, "
      f"{float(E['R_GEN_INDEX']) / 60:.1f} min rebuilding them, the rest consents, VACUUM ANALYZE and "
      f"CHECKPOINT); study_record is then {E['R_SIZES_GEN'].split(';')[0]}.")
    d("")
    d("| target | measured (median of runs) | |")
    d("|---|---|---|")
    d(f"| priors query p99 < 10 ms | p50 {med['p50_ms']} ms, p90 {med['p90_ms']} ms, **p99 {med['p99_ms']} ms**, "
      f"max {med['max_ms']} ms ({int(E['R_QUERIES']):,} queries × {len(pri['runs'])} runs) | {yes(p99_ok)} |")
    if pub:
        d(f"| publish ≥ 5,000 records/s | **{pub_rate:,} records/s** (batches of 500, "
          f"{int(E['R_PUBLISH']):,} records × {len(pub['runs'])} runs) | {yes(pub_ok)} |")
    if dr:
        d(f"| node outbox drain (no target) | **{drain_rate:,} records/s**: {backlog:,} rows in "
          f"{dr['drained_s']} s from the node's start | |")
    d(f"| audit chain intact | `{E['R_VERIFY']}` ({E['R_VERIFY_S']} s), the expected count | "
      f"{yes(intact and entries == expected)} |")
    d("")
    d("Notes:")
    d("")
    d(f"- The client is Python's `http.client` on one keep-alive connection, one request at a time, timed "
      f"from sending the request to reading the last byte of the answer (JSON parsing and the checks of "
      f"every answer come after). GET /ready on the same connection (the server's `SELECT 1`, no audit "
      f"write) takes p50 {h['p50_ms']} ms: that is client, HTTP and one database round trip, so the rest of a "
      f"priors query's {med['p50_ms']} ms is the server's work: token lookup, records and consent SELECTs, and "
      f"the audit append (UPDATE of the chain head, INSERT, UPDATE, COMMIT with a WAL flush, "
      f"p50 {disk['p50_ms']} ms and p99 {disk['p99_ms']} ms on this disk), one round trip each.")
    d("- Publishing: bodies are serialised before the clock starts, so the figure is the registry's (parse, "
      "validate, upsert 500 records and append 500 audit entries in one transaction) plus the transfer over loopback.")
    if dr:
        d(f"- The outbox drain figure includes the node's start ({dr['api_up_s']} s until its API "
          f"answered); it is one node, batches of 500, each leased, sent, and deleted from its SQLite "
          f"outbox, one batch in flight.")
    d("- Not measured: several clients or nodes at once (every audited request updates the one audit_head "
      "row and holds its lock until COMMIT, so audited writes are serialised by design and several "
      "clients would queue behind one another's commits), a real network or TLS, several registry "
      "processes on one database, the SQLite registry, priors with `items`/`since` filters or paging, "
      f"a deliberately cold cache (the database, {E['R_SIZES_END'].split(';')[2]} at the end, is smaller than "
      f"the machine's {mem:.0f} GiB and was written and vacuumed just before the measurements, but the page "
      f"cache held {E['R_CACHE']} GiB of file pages before the priors runs; DAMON: {damon}), and long-running "
      "load with autovacuum and checkpoints (a CHECKPOINT ended the generation, so the first writes to each "
      "page afterwards carry full-page images; the report counts them). The generated "
      "records have no audit entries; patient keys are SHA-256 stand-ins of the nodes' keyed BLAKE3 "
      "(same 64-hex shape).")
    # Only the part between the markers is the script's: anything else in
    # the section (subsections, notes) and every other section stay as
    # they are. Without markers: the text from the "## Registry" heading to
    # the next heading; without the heading: a new section at the end.
    begin = "<!-- benches/registry.sh writes from here to the end marker; edits in between are overwritten -->"
    end = "<!-- end of what benches/registry.sh writes -->"
    block = begin + "\n" + "\n".join(D) + "\n" + end + "\n"
    text = open(docs).read()
    i = text.find(begin)
    j = text.find(end, i + 1) if i >= 0 else -1
    if i >= 0 and j >= 0:
        rest = text[j + len(end):].lstrip("\n")
        text = text[:i] + block + ("\n" + rest if rest else "")
    else:
        m = re.search(r"(?m)^## Registry[ \t]*\n", text)
        if m:
            # the next heading outside a fenced code block ends the old text
            pos, cut, fence = m.end(), len(text), False
            for line in text[m.end():].splitlines(keepends=True):
                if line.startswith("```"):
                    fence = not fence
                elif not fence and re.match(r"#{1,6} \S", line):
                    cut = pos
                    break
                pos += len(line)
            rest = text[cut:]
            text = text[:m.end()] + "\n" + block + ("\n" + rest if rest else "")
        else:
            text = text.rstrip("\n") + "\n\n## Registry\n\n" + block
    open(docs, "w").write(text)
    print(f"wrote the Registry section of {docs}")
EOF
log "report: $out_file"
[[ "$verify_out" == *intact* && "${audit_entries:-}" == "$expected_entries" ]] ||
    { log "audit verify did not report an intact chain of $expected_entries entries"; exit 1; }
