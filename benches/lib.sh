# Shared by the benches that start real servers (sourced, not run). Expects
# $PYTHON, $PG_BIN, $run, $logs, $work_dir and a `log` function.

if [[ "$(id -u)" -eq 0 ]]; then
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_pg() { "$@"; }
fi

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_http() { # PID URL TIMEOUT_S: polls until URL answers 2xx (with the operator's token)
    local deadline=$(( $(date +%s) + $3 ))
    while (( $(date +%s) < deadline )); do
        kill -0 "$1" 2>/dev/null || return 1
        curl -fsS -o /dev/null ${BENCH_TOKEN:+-H "authorization: Bearer $BENCH_TOKEN"} "$2" 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

# The operator's bearer token of the nodes a bench starts (their JSON API
# is never open): a file for --operator-token-file, and `api` = curl with it.
bench_token() {
    BENCH_TOKEN_FILE="$run/operator.token"
    "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$BENCH_TOKEN_FILE"
    chmod 600 "$BENCH_TOKEN_FILE"
    BENCH_TOKEN="$(cat "$BENCH_TOKEN_FILE")"
    export BENCH_TOKEN_FILE BENCH_TOKEN
}
api() { curl -fsS -H "authorization: Bearer $BENCH_TOKEN" "$@"; }

# A throwaway PostgreSQL cluster under $run/pg on a free loopback port,
# durable (fsync, synchronous_commit and full_page_writes stay on, the
# defaults) and tuned for a dedicated machine; EXTRA_SETTINGS are appended
# to its -o options. Sets pg_port, pg_data and pg_settings (for the
# report); `psql` below reaches it. With $pg_root set, the cluster lives
# there instead, and one already there is started, not created (a bench
# that keeps its generated databases between runs).
start_postgres() { # [EXTRA_SETTINGS]
    pg_port=$(free_port)
    pg_root="${pg_root:-$run/pg}"
    pg_data="$pg_root/data"
    mkdir -p "$pg_root"
    if [[ "$(id -u)" -eq 0 ]]; then
        chmod 711 "$work_dir" "$run" "$pg_root"
        chown postgres: "$pg_root"
    fi
    if [[ ! -f "$pg_data/PG_VERSION" ]]; then
        as_pg "$PG_BIN/initdb" -D "$pg_data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
            >"$logs/pg-initdb.log" 2>&1 || { cat "$logs/pg-initdb.log" >&2; exit 1; }
    fi
    local mem_mb shared_mb cache_mb
    mem_mb=$(awk '/^MemTotal/ { printf "%d", $2 / 1024 }' /proc/meminfo)
    shared_mb=$(( mem_mb / 6 )); (( shared_mb > 8192 )) && shared_mb=8192
    cache_mb=$(( mem_mb * 2 / 3 ))
    pg_settings="-c listen_addresses=127.0.0.1 -p $pg_port -c unix_socket_directories=$pg_root\
 -c fsync=on -c synchronous_commit=on -c full_page_writes=on\
 -c shared_buffers=${shared_mb}MB -c effective_cache_size=${cache_mb}MB\
 -c maintenance_work_mem=1GB -c work_mem=32MB -c wal_buffers=64MB\
 -c max_wal_size=16GB -c min_wal_size=2GB -c checkpoint_timeout=30min\
 -c checkpoint_completion_target=0.9 -c random_page_cost=1.1 -c effective_io_concurrency=100\
 -c max_parallel_maintenance_workers=$(nproc) -c max_connections=100 ${1:-}"
    as_pg "$PG_BIN/pg_ctl" -D "$pg_data" -l "$pg_root/log" -W -t 120 start -o "$pg_settings" >/dev/null
    for _ in $(seq 1 200); do "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break; sleep 0.1; done
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$pg_port" || { log "PostgreSQL did not start"; cat "$pg_root/log" >&2; exit 1; }
}
psql() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres "$@"; }
