#!/usr/bin/env bash
# Federation benchmark (issue 18): the registry's priors query, which the
# node's order-time check waits on, with the fan-out to M member registries
# against the same query without federation. Not a test. Method and
# figures: docs/benchmarks.md, "Federation".
#
#   benches/federation.sh [--records N] [--members M] [--queries Q] [--runs R]
#                         [--work-dir DIR] [--out FILE] [--keep] [--data DIR]
#
#   --records N   study records in each registry's database (default
#                 1,000,000; ~N/3 patients, benches/registry-gen.sql)
#   --members M   member registries the home registry asks (default 3)
#   --queries Q   priors queries per run and mode (default 1,000)
#   --runs R      runs (default 3); the report gives each and the median
#   --work-dir    default /tmp/huren-federation-bench
#   --out FILE    the report (default benches/results/federation-<stamp>.md)
#   --keep        keep the run's PostgreSQL cluster (without --data)
#   --data DIR    keep the generated cluster in DIR and reuse it on the next
#                 run with the same --records and --members (generating 4M
#                 records takes ~6 minutes on 2 cores). Before each run the
#                 tables the registries write (nonces, remembered priors,
#                 the home registry's pseudonyms) are emptied, so every run
#                 starts from the generated state; the audit chains grow
#                 from run to run and are verified each time.
#
# One throwaway PostgreSQL cluster (fsync, synchronous_commit and
# full_page_writes on) holds M + 1 databases: `home` and `m1`..`mM`, each
# with N records of the same generated patients (registry-gen.sql) and the
# same two hospitals. Home has the regional consents of registry-gen.sql;
# every member knows each patient's federation pseudonym (a stand-in:
# sha256("huren-bench-pseudonym:" || p), as the patient key is a stand-in)
# and holds the federation consent of every even patient for member
# `home`. M member registries run with a federation configuration naming
# `home`; on the home database run two registries: `plain` (no federation)
# and `fed` (naming the M members, deadline 1 s). The client
# (benches/federation-client.py) sends every query to both, alternating
# the order, and checks every answer. Then `huren registry audit verify`
# on every database.
#
# Environment: HUREN_BIN (default <repo>/target/release/huren), PG_BIN,
# PYTHON; HUREN_BENCH_LOG, the registries' HUREN_LOG (default warn; with
# huren::registry=debug each federated query logs where its time went).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
command_line="benches/federation.sh$(printf ' %q' "$@")"
[[ -z "${HUREN_BIN:-}" ]] || command_line="HUREN_BIN=$HUREN_BIN $command_line"

records=1000000
members=3
queries=1000
runs=3
work_dir="${HUREN_BENCH_WORK:-/tmp/huren-federation-bench}"
out_file=""
keep=0
data_dir=""
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --records) records="$2"; shift ;;
        --members) members="$2"; shift ;;
        --queries) queries="$2"; shift ;;
        --runs) runs="$2"; shift ;;
        --work-dir) work_dir="$2"; shift ;;
        --out) out_file="$2"; shift ;;
        --keep) keep=1 ;;
        --data) data_dir="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
for v in records members queries runs; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "--$v must be a number" >&2; exit 2; }
done
(( records >= 15 && members >= 1 && queries >= 1 && runs >= 1 )) || { echo "bad sizes" >&2; exit 2; }

PYTHON="${PYTHON:-python3}"
HUREN_BIN="${HUREN_BIN:-$repo/target/release/huren}"
PG_BIN="${PG_BIN:-$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n1)}"
HOSP_A=HOSPA0000000000001
HOSP_B=HOSPB0000000000002
[[ -x "$HUREN_BIN" ]] || { echo "federation: HUREN_BIN=$HUREN_BIN does not exist (cargo build --release)" >&2; exit 1; }
[[ -x "$PG_BIN/initdb" ]] || { echo "federation: no PostgreSQL under $PG_BIN" >&2; exit 1; }

rev=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')
dirty=$(git -C "$repo" status --porcelain -- src migrations Cargo.toml Cargo.lock 2>/dev/null | wc -l)
stamp=$(date +%Y%m%d-%H%M%S)
run="$work_dir/run-$stamp"
logs="$run/logs"
mkdir -p "$logs"
log() { echo "federation: $*" >&2; }
pids=()
pg_data=""
cleanup() {
    local rc=$?
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ -n "$pg_data" ]]; then
        as_pg "$PG_BIN/pg_ctl" -D "$pg_data" -m fast -t 120 stop >/dev/null 2>&1 || true
    fi
    [[ $keep == 1 || -n "$data_dir" ]] || rm -rf "$run/pg"
    (( rc == 0 )) || echo "federation: failed (exit $rc); logs in $logs" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

. "$repo/benches/lib.sh"
# What the generated data depends on: a cluster in --data made by another
# version of it is made anew.
data_version="records=$records members=$members gen=$(cat "$here/registry-gen.sql" | sha256sum | cut -c1-16) v1"
reused=0
if [[ -n "$data_dir" ]]; then
    mkdir -p "$data_dir"
    data_dir="$(cd "$data_dir" && pwd)"
    [[ "$(id -u)" -ne 0 ]] || chmod 711 "$data_dir"
    if [[ -f "$data_dir/generated" && "$(cat "$data_dir/generated")" == "$data_version" ]]; then
        reused=1
    else
        rm -rf "$data_dir/pg" "$data_dir/generated" "$data_dir"/*.token
    fi
    pg_root="$data_dir/pg"
    tokens="$data_dir"
else
    tokens="$run"
fi
start_postgres ""
patients=$(( records / 3 ))
dbs=(home)
for i in $(seq 1 "$members"); do dbs+=("m$i"); done
url() { echo "postgres://postgres@127.0.0.1:$pg_port/$1"; }

t0=$(date +%s)
if (( reused )); then
    log "reusing the databases in $data_dir ($data_version)"
    for db in "${dbs[@]}"; do
        # Back to the generated state: what a run's registries wrote,
        # except the audit chain (append-only; it is verified after).
        psql -d "$db" -c "TRUNCATE federation_nonce, federation_prior" >/dev/null
        [[ "$db" != home ]] || psql -d "$db" -c "TRUNCATE federation_identity" >/dev/null
        psql -d "$db" -c "VACUUM ANALYZE" >/dev/null
    done
    psql -d postgres -c CHECKPOINT >/dev/null
    gen_secs=0
else
for db in "${dbs[@]}"; do
    psql -d postgres -c "CREATE DATABASE $db"
    # The schema (migrations) and the two hospitals, through the CLI.
    for h in "$HOSP_A" "$HOSP_B"; do
        "$HUREN_BIN" registry hospital add --database-url "$(url "$db")" --id "$h" \
            --name "bench $h" --level 三级甲等 --token-file "$tokens/$db-$h.token" >/dev/null
    done
done
log "generating $records records in each of ${#dbs[@]} databases"
gen() { # DB
    psql -d "$1" -v what=records -v lo=1 -v hi="$patients" -v hosp_a="$HOSP_A" -v hosp_b="$HOSP_B" \
        -f "$here/registry-gen.sql" >/dev/null
    if [[ "$1" == home ]]; then
        psql -d "$1" -v what=consents -v lo=1 -v hi="$patients" -v hosp_a="$HOSP_A" -v hosp_b="$HOSP_B" \
            -f "$here/registry-gen.sql" >/dev/null
    else
        psql -d "$1" -c "INSERT INTO federation_identity (patient_key, pseudonym, updated_at)
            SELECT encode(sha256(convert_to('huren-bench-patient:' || p, 'UTF8')), 'hex'),
                   encode(sha256(convert_to('huren-bench-pseudonym:' || p, 'UTF8')), 'hex'),
                   '2026-01-01T00:00:00.000000Z'
            FROM generate_series(1, $patients) AS p" >/dev/null
        psql -d "$1" -c "INSERT INTO federation_consent (consent_id, patient_key, member_id, method,
                recorded_by, state, expires_at, created_at)
            SELECT md5('huren-bench-fed-consent:' || p),
                   encode(sha256(convert_to('huren-bench-patient:' || p, 'UTF8')), 'hex'),
                   'home', 'qr_code', 'bench', 'granted', '2030-01-01T00:00:00.000000Z',
                   '2026-01-01T00:00:00.000000Z'
            FROM generate_series(1, $patients) AS p WHERE p % 2 = 0" >/dev/null
    fi
    psql -d "$1" -c "VACUUM ANALYZE" >/dev/null
}
jobs_running=0
for db in "${dbs[@]}"; do
    gen "$db" &
    jobs_running=$(( jobs_running + 1 ))
    if (( jobs_running >= $(nproc) )); then wait -n; jobs_running=$(( jobs_running - 1 )); fi
done
wait
psql -d postgres -c CHECKPOINT >/dev/null
gen_secs=$(( $(date +%s) - t0 ))
[[ -z "$data_dir" ]] || echo "$data_version" >"$data_dir/generated"
fi
counts=""
for db in "${dbs[@]}"; do counts+="$db $(psql -d "$db" -Atc 'SELECT count(*) FROM study_record'); "; done
log "generated in ${gen_secs}s: $counts"

# Keys and configurations.
cp "$repo/deploy/recognition/jiangsu-example.toml" "$run/list.toml"
declare -A pub port
for db in "${dbs[@]}"; do
    pub[$db]="$("$HUREN_BIN" registry federation keygen --key-file "$run/$db.key")"
    port[$db]="$(free_port)"
done
conf() { # ME MEMBERS...
    local me=$1; shift
    {
        printf '[federation]\nname = "bench"\nmember_id = "%s"\nprovince = "%s"\n' "$me" "$me"
        printf 'signing_key_file = "%s.key"\nrecognition_list = "list.toml"\ndeadline_ms = 1000\n' "$me"
        for m in "$@"; do
            printf '\n[[member]]\nid = "%s"\nprovince = "%s"\nurl = "http://127.0.0.1:%s"\npublic_key = "%s"\n' \
                "$m" "$m" "${port[$m]}" "${pub[$m]}"
        done
    } >"$run/federation-$me.toml"
    "$HUREN_BIN" registry federation check "$run/federation-$me.toml" >&2
}
start_registry() { # NAME DB PORT [FEDERATION-CONFIG]
    local extra=()
    [[ -n "${4:-}" ]] && extra=(--federation-config "$4")
    printf 'admin-token-of-the-federation-bench\n' >"$run/admin.token"
    HUREN_LOG="${HUREN_BENCH_LOG:-warn}" "$HUREN_BIN" registry --listen "127.0.0.1:$3" --data-dir "$run/$1-data" \
        --database-url "$(url "$2")" --admin-token-file "$run/admin.token" "${extra[@]}" \
        >"$logs/$1.log" 2>&1 &
    pids+=($!)
    wait_http "$!" "http://127.0.0.1:$3/health" 60 || { log "registry $1 did not start"; cat "$logs/$1.log" >&2; exit 1; }
}
member_ids=()
for db in "${dbs[@]:1}"; do
    conf "$db" home
    start_registry "$db" "$db" "${port[$db]}" "$run/federation-$db.toml"
    member_ids+=("$db")
done
conf home "${member_ids[@]}"
plain_port=$(free_port)
start_registry fed home "${port[home]}" "$run/federation-home.toml"
start_registry plain home "$plain_port"

log "measuring: $runs runs of $queries queries to each of plain and fed"
result="$("$PYTHON" "$here/federation-client.py" --plain-port "$plain_port" --fed-port "${port[home]}" \
    --token-file "$tokens/home-$HOSP_A.token" --patients "$patients" --queries "$queries" \
    --runs "$runs" --members "$members")"
echo "$result" >"$run/result.json"

verify=""
for db in "${dbs[@]}"; do
    v="$("$HUREN_BIN" registry audit verify --database-url "$(url "$db")")"
    [[ "$v" == *intact* ]] || { log "audit chain of $db: $v"; exit 1; }
    verify+="$db: $v; "
done

out_file="${out_file:-$repo/benches/results/federation-$stamp.md}"
"$PYTHON" - "$result" >"$out_file" <<PY
import json, sys
r = json.loads(sys.argv[1])
m = r["median"]
print("# Federation benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')")
print()
print("\`$command_line\` at $rev (${dirty} changed files under src/, migrations/, Cargo.*); $(nproc) cores; $("$PG_BIN/postgres" --version).")
print()
print("Data: $records records per database (${#dbs[@]} databases: home and $members members; $patients patients each), $( ((reused)) && echo "reused from an earlier run (--data), reset to the generated state" || echo "generated in ${gen_secs} s"): $counts")
print()
print("| mode | p50 ms | p90 ms | p99 ms | max ms |")
print("|---|---|---|---|---|")
for mode in ("plain", "fed"):
    x = m[mode]
    print(f"| {mode} (median of runs) | {x['p50']} | {x['p90']} | {x['p99']} | {x['max']} |")
x = m["slowest_member"]
print(f"| fed: the slowest member's elapsed_ms (whole ms, timed by fed) | {x['p50']} | {x['p90']} | {x['p99']} | {x['max']} |")
print()
print(f"Fan-out to $members members adds **{m['added_p99']} ms at p99** (the difference of the two modes' median p99; target < 10 ms).")
print()
print("| run | plain p50 / p99 / max | fed p50 / p99 / max | added p99 |")
print("|---|---|---|---|")
for i, run in enumerate(r["runs"], 1):
    p, f = run["plain"], run["fed"]
    print(f"| {i} | {p['p50']} / {p['p99']} / {p['max']} | {f['p50']} / {f['p99']} / {f['max']} | {run['added_p99']} |")
print()
print("Audit chains after the runs: $verify")
PY
cat "$out_file"
