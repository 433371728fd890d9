#!/usr/bin/env bash
# The project's one test command (CI runs it through .ci/run).
#
# Usage:
#   scripts/test.sh [ARGS...]
#       Installs what is missing (dcmtk, PostgreSQL, a Python venv with pydicom and
#       pynetdicom, a Garage binary built with cargo), starts a throwaway PostgreSQL
#       cluster and a single-node Garage on loopback, then runs, stopping at the first
#       failure:
#           cargo fmt --all -- --check
#           cargo clippy --all-targets --features jpeg-ls -- -D warnings
#           cargo test --all-targets --features jpeg-ls [ARGS...]
#       ARGS go to `cargo test`, e.g. `scripts/test.sh ingest::` to filter.
#       Services and their temp dir are removed on exit.
#
#   scripts/test.sh --services
#       Same setup, then prints `export NAME=...` lines for the variables below on
#       stdout (everything else goes to stderr) and waits in the foreground until it
#       is killed (Ctrl-C / SIGTERM), then stops the services and cleans up:
#           scripts/test.sh --services > /tmp/huren-env &    # or in another terminal
#           . /tmp/huren-env && cargo test ingest::
#
# Variables given to the tests:
#   HUREN_TEST_PG_URL                 postgres://postgres:postgres@127.0.0.1:PORT/postgres
#                                     (superuser, may CREATE DATABASE)
#   HUREN_TEST_S3_ENDPOINT            http://127.0.0.1:PORT (Garage S3 API)
#   HUREN_TEST_S3_REGION              garage
#   HUREN_TEST_S3_BUCKET              huren-test
#   HUREN_TEST_S3_ACCESS_KEY_ID       key with read/write/owner on the bucket
#   HUREN_TEST_S3_SECRET_ACCESS_KEY
#   HUREN_TEST_PYTHON                 venv python with pydicom + pynetdicom
#   HUREN_TEST_VIEWER_DIR             OHIF Viewer installed by deploy/install-viewer.sh
#   TCP_NODELAY=1                     Debian's dcmtk keeps Nagle on without it
#
# Cache (venv, Garage binary, OHIF Viewer): ${HUREN_CACHE:-$HOME/.cache/huren-ci}. The first Garage
# build takes ~10 minutes on 2 cores. CARGO_TARGET_DIR is honoured if set.
set -euo pipefail

GARAGE_VERSION=2.5.0
PYDICOM_VERSION=3.0.2
PYNETDICOM_VERSION=3.0.4
DICOMWEB_CLIENT_VERSION=0.61.2
# Decoders for pydicom, so tests can compare the pixels of instances the
# node decompressed with those of the JPEG originals.
PYLIBJPEG_VERSION=2.1.0
PYLIBJPEG_LIBJPEG_VERSION=2.5.0
# The doctor's page is tested in Debian's chromium, driven by Playwright
# (its own browser download is never used: no `playwright install`).
PLAYWRIGHT_VERSION=1.49.1
# tests/metrics.rs: prometheus_client's parser reads /metrics; PyYAML reads
# the alert rules.
PROMETHEUS_CLIENT_VERSION=0.26.0
PYYAML_VERSION=6.0.3

MODE="test"
if [[ "${1:-}" == "--services" ]]; then
    MODE="services"
    shift
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HUREN_CACHE="${HUREN_CACHE:-$HOME/.cache/huren-ci}"
mkdir -p "$HUREN_CACHE"

log() { echo "[test.sh] $*" >&2; }
die() { echo "[test.sh] ERROR: $*" >&2; exit 1; }

if [[ "$(id -u)" -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi

# ---------------------------------------------------------------- installs
# One setup at a time per cache dir (a --services run and a test run may race).
exec 9>"$HUREN_CACHE/.setup.lock"
flock 9

pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

missing=()
# dpkg, not `command -v`: PATH may hold same-named shims for dcmtk tools.
pkg_installed dcmtk || missing+=(dcmtk)
# The suite builds with the `jpeg-ls` feature: CharLS is compiled from
# source (Cargo.toml).
pkg_installed cmake || missing+=(cmake)
pkg_installed g++ || missing+=(g++)
# tests/lifecycle.rs drives QIDO-RS, WADO-RS and the JSON API with curl.
pkg_installed curl || missing+=(curl)
# tests/durability.rs: full vs relaxed told apart by the node's system calls.
pkg_installed strace || missing+=(strace)
pkg_installed chromium || missing+=(chromium)
pkg_installed fonts-noto-cjk || missing+=(fonts-noto-cjk)
# tests/audit.rs validates audit messages against PS3.15's RELAX NG Compact schema.
pkg_installed jing || missing+=(jing)
# promtool lints /metrics and checks deploy/prometheus/ (tests/metrics.rs).
# Debian's package also holds the server, which the install does not start
# where policy-rc.d forbids it (containers); nothing here runs it.
pkg_installed prometheus || missing+=(prometheus)
# tests/tls.rs: a test PKI, HTTPS and TLS-version probes.
pkg_installed openssl || missing+=(openssl)
# tests/interop.rs: Orthanc as a C-MOVE destination, run as a plain process on
# loopback ports with its own configuration (never the system service).
pkg_installed orthanc || missing+=(orthanc)
pkg_installed curl || missing+=(curl)
if ! pkg_installed postgresql || ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    missing+=(postgresql)
fi
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -q >&2
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
PG_BIN="$(printf "%s\n" /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
[[ -x "$PG_BIN/initdb" ]] || die "no PostgreSQL server binaries under /usr/lib/postgresql"

# rustfmt / clippy may be absent from a minimal toolchain.
if [[ "$MODE" == "test" ]]; then
    for comp in rustfmt clippy; do
        sub=${comp/rustfmt/fmt}
        if ! cargo "$sub" --version >/dev/null 2>&1; then
            log "rustup component add $comp"
            rustup component add "$comp" >&2
        fi
    done
fi

# Python venv with pydicom + pynetdicom.
VENV="$HUREN_CACHE/venv"
PY="$VENV/bin/python"
if ! "$PY" -c 'import pydicom, pynetdicom, dicomweb_client, pylibjpeg, libjpeg, playwright' >/dev/null 2>&1; then
    log "creating Python venv at $VENV"
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" >&2; then
        # Debian's own python3 needs python3-venv for ensurepip.
        rm -rf "$VENV"
        export DEBIAN_FRONTEND=noninteractive
        "${SUDO[@]}" apt-get update -q >&2
        "${SUDO[@]}" apt-get install -y -q python3-venv >&2
        python3 -m venv "$VENV" >&2
    fi
    "$PY" -m pip install -q "pydicom==$PYDICOM_VERSION" "pynetdicom==$PYNETDICOM_VERSION" \
        "dicomweb-client==$DICOMWEB_CLIENT_VERSION" "pylibjpeg==$PYLIBJPEG_VERSION" \
        "pylibjpeg-libjpeg==$PYLIBJPEG_LIBJPEG_VERSION" "playwright==$PLAYWRIGHT_VERSION" >&2
    "$PY" -c 'import pydicom, pynetdicom, dicomweb_client, pylibjpeg, libjpeg, playwright' || die "pydicom/pynetdicom/dicomweb-client/pylibjpeg/playwright not importable in $VENV"
fi
if ! "$PY" -c 'import prometheus_client, yaml' >/dev/null 2>&1; then
    "$PY" -m pip install -q "prometheus-client==$PROMETHEUS_CLIENT_VERSION" "pyyaml==$PYYAML_VERSION" >&2
fi

# Garage, built from crates.io.
GARAGE="$HUREN_CACHE/garage/bin/garage"
if [[ ! -x "$GARAGE" ]]; then
    log "building Garage $GARAGE_VERSION with cargo install (takes ~10 minutes on 2 cores; cached afterwards in $HUREN_CACHE/garage)"
    # Own temp target dir (not the project's CARGO_TARGET_DIR), outside the repo.
    if ! (cd "$HUREN_CACHE" && env -u CARGO_TARGET_DIR \
        cargo install garage --version "$GARAGE_VERSION" --locked --root "$HUREN_CACHE/garage" >&2); then
        die "cargo install garage $GARAGE_VERSION failed"
    fi
    [[ -x "$GARAGE" ]] || die "cargo install garage succeeded but $GARAGE is missing"
fi

# OHIF Viewer, which the node serves under /viewer (tests/viewer.rs opens it
# in chromium): the project's own install step, pinned and integrity-checked,
# its tarball and installed files cached here.
VIEWER_DIR="$HUREN_CACHE/viewer"
HUREN_CACHE="$HUREN_CACHE" bash "$REPO_ROOT/deploy/install-viewer.sh" "$VIEWER_DIR" ||
    die "deploy/install-viewer.sh failed"

flock -u 9
exec 9>&-

# ---------------------------------------------------------------- services
# As root the postgres user must reach the data dir: use /tmp, not a private TMPDIR.
if [[ "$(id -u)" -eq 0 ]]; then TMP_BASE=/tmp; else TMP_BASE="${TMPDIR:-/tmp}"; fi
WORK="$(mktemp -d "$TMP_BASE/huren-test.XXXXXX")"
PG_DATA="$WORK/pg/data"
PG_STARTED=0
GARAGE_PID=""
WAIT_PID=""

cleanup() {
    local rc=$?
    set +e
    [[ -n "$WAIT_PID" ]] && kill "$WAIT_PID" 2>/dev/null
    if [[ -n "$GARAGE_PID" ]]; then
        kill "$GARAGE_PID" 2>/dev/null
        # SIGKILL if it has not exited (or become a zombie) after 10 s.
        local state
        for _ in $(seq 100); do
            state=Z
            read -r _ _ state _ 2>/dev/null <"/proc/$GARAGE_PID/stat"
            [[ "$state" == Z ]] && break
            sleep 0.1
        done
        kill -9 "$GARAGE_PID" 2>/dev/null
        wait "$GARAGE_PID" 2>/dev/null
    fi
    if ((PG_STARTED)); then
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m immediate -w stop >/dev/null 2>&1
    fi
    rm -rf "$WORK"
    log "services stopped, $WORK removed"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

dump_logs() {
    for f in "$WORK"/pg/log "$WORK"/garage/log; do
        [[ -f "$f" ]] && { echo "---- $f (tail)" >&2; tail -n 40 "$f" >&2; }
    done
}

# Four distinct free loopback ports (all held open while choosing).
read -r PG_PORT RPC_PORT S3_PORT ADMIN_PORT < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(4)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])
for s in ss: s.close()')

# PostgreSQL: initdb + pg_ctl as the postgres user (initdb refuses to run as root).
if [[ "$(id -u)" -eq 0 ]]; then
    as_pg() { runuser -u postgres -- "$@"; }
    chmod 711 "$WORK"
    mkdir -p "$WORK/pg"
    chown postgres: "$WORK/pg"
else
    as_pg() { "$@"; }
    mkdir -p "$WORK/pg"
fi
log "PostgreSQL ($PG_BIN) on 127.0.0.1:$PG_PORT"
as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
    >"$WORK/pg/initdb.log" 2>&1 || { cat "$WORK/pg/initdb.log" >&2; die "initdb failed"; }
# Throwaway cluster: durability off for speed; sockets only in our temp dir.
as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$WORK/pg/log" -W start -o "\
 -c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=$WORK/pg\
 -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    >/dev/null
PG_STARTED=1
for i in $(seq 300); do
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres && break
    ((i < 300)) || { dump_logs; die "PostgreSQL not ready after 60 s"; }
    sleep 0.2
done
export HUREN_TEST_PG_URL="postgres://postgres:postgres@127.0.0.1:$PG_PORT/postgres"

# Garage: single node, sqlite metadata, replication factor 1.
mkdir -p "$WORK/garage/meta" "$WORK/garage/data"
GARAGE_CFG="$WORK/garage/garage.toml"
RPC_SECRET="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
ADMIN_TOKEN="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
cat >"$GARAGE_CFG" <<EOF
metadata_dir = "$WORK/garage/meta"
data_dir = "$WORK/garage/data"
db_engine = "sqlite"
metadata_fsync = false
data_fsync = false
replication_factor = 1

rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$RPC_SECRET"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3_PORT"

[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
admin_token = "$ADMIN_TOKEN"
EOF
g() { "$GARAGE" -c "$GARAGE_CFG" "$@"; }

log "Garage $("$GARAGE" --version 2>/dev/null | head -n1) on 127.0.0.1 (s3 $S3_PORT, rpc $RPC_PORT, admin $ADMIN_PORT)"
RUST_LOG="${GARAGE_LOG:-warn}" "$GARAGE" -c "$GARAGE_CFG" server >"$WORK/garage/log" 2>&1 &
GARAGE_PID=$!
for i in $(seq 300); do
    kill -0 "$GARAGE_PID" 2>/dev/null || { dump_logs; die "Garage exited at startup"; }
    g status >/dev/null 2>&1 && break
    ((i < 300)) || { dump_logs; die "Garage RPC not ready after 60 s"; }
    sleep 0.2
done
NODE_ID="$(g node id -q 2>/dev/null | cut -d@ -f1)"
[[ -n "$NODE_ID" ]] || { dump_logs; die "could not read the Garage node id"; }
g layout assign -z dc1 -c 1G "$NODE_ID" >/dev/null
g layout apply --version 1 >/dev/null
g bucket create huren-test >/dev/null
g key create huren-test-key >/dev/null
g bucket allow --read --write --owner huren-test --key huren-test-key >/dev/null
KEY_INFO="$(g key info --show-secret huren-test-key)"
S3_KEY_ID="$(sed -n 's/^Key ID:[[:space:]]*//p' <<<"$KEY_INFO" | head -n1)"
S3_SECRET="$(sed -n 's/^Secret key:[[:space:]]*//p' <<<"$KEY_INFO" | head -n1)"
[[ "$S3_KEY_ID" == GK* && -n "$S3_SECRET" ]] ||
    { echo "$KEY_INFO" >&2; dump_logs; die "could not parse the Garage key"; }
# S3 API answers (any HTTP status; unauthenticated requests get 403).
for i in $(seq 300); do
    python3 - "$S3_PORT" <<'PY' && break
import sys, urllib.request, urllib.error
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    opener.open(f"http://127.0.0.1:{sys.argv[1]}/huren-test", timeout=2)
except urllib.error.HTTPError:
    pass
except Exception:
    sys.exit(1)
PY
    ((i < 300)) || { dump_logs; die "Garage S3 API not answering after 60 s"; }
    sleep 0.2
done

export HUREN_TEST_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
export HUREN_TEST_S3_REGION=garage
export HUREN_TEST_S3_BUCKET=huren-test
export HUREN_TEST_S3_ACCESS_KEY_ID="$S3_KEY_ID"
export HUREN_TEST_S3_SECRET_ACCESS_KEY="$S3_SECRET"
export HUREN_TEST_PYTHON="$PY"
export HUREN_TEST_VIEWER_DIR="$VIEWER_DIR"
export TCP_NODELAY=1
log "services ready (temp dir $WORK)"

ENV_VARS=(HUREN_TEST_PG_URL HUREN_TEST_S3_ENDPOINT HUREN_TEST_S3_REGION HUREN_TEST_S3_BUCKET
    HUREN_TEST_S3_ACCESS_KEY_ID HUREN_TEST_S3_SECRET_ACCESS_KEY HUREN_TEST_PYTHON
    HUREN_TEST_VIEWER_DIR TCP_NODELAY)

if [[ "$MODE" == "services" ]]; then
    for v in "${ENV_VARS[@]}"; do
        printf 'export %s=%q\n' "$v" "${!v}"
    done
    log "waiting; stop with Ctrl-C or kill $$"
    sleep infinity &
    WAIT_PID=$!
    wait "$WAIT_PID" || true
    exit 0
fi

# ---------------------------------------------------------------- checks
cd "$REPO_ROOT"
log "cargo fmt --all -- --check"
cargo fmt --all -- --check
log "cargo clippy --all-targets --features jpeg-ls -- -D warnings"
cargo clippy --all-targets --features jpeg-ls -- -D warnings
log "cargo test --all-targets --features jpeg-ls $*"
cargo test --all-targets --features jpeg-ls "$@"
# The region demo with real processes: a registry and two nodes; and the
# federation demo: two provinces' registries and three nodes (only for a
# whole run, not a filtered one).
if [[ $# -eq 0 ]]; then
    log "deploy/region-demo.sh"
    HUREN_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/huren" HUREN_VIEWER_DIR="$VIEWER_DIR" \
        bash deploy/region-demo.sh
    log "deploy/federation-demo.sh"
    HUREN_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/huren" bash deploy/federation-demo.sh
fi
