#!/usr/bin/env bash
# Ingest into an S3 store (Garage) against the store's own PUT rate.
#
# On S3 the durability point is the completed PUT: the anchor is how many
# instance-sized objects one client (and four in parallel) can PUT, measured
# with curl's SigV4 on the same files, right before huren ingests them.
#
#   scripts/test.sh --services > /tmp/huren-env &   # a Garage on loopback
#   . /tmp/huren-env && HUREN_BIN=target/release/huren benches/ingest-s3.sh [--runs 3] [--corpus ct]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
runs=3 corpus=ct corpus_dir=/tmp/huren-bench-corpus
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) runs="$2"; shift ;;
        --corpus) corpus="$2"; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
: "${HUREN_BIN:?set HUREN_BIN}" "${HUREN_TEST_S3_ENDPOINT:?source the env of scripts/test.sh --services}"
python3 "$here/make-corpus.py" --dir "$corpus_dir" --corpus "$corpus" >/dev/null
files=("$corpus_dir/$corpus"/part*/*.dcm)
n=${#files[@]}
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cat "${files[@]}" >/dev/null
now() { date +%s.%N; }
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.0f", n / (b - a) }'; }
put_all() { # prefix list...
    local prefix=$1; shift
    local f
    for f in "$@"; do
        curl -sf -o /dev/null -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 "aws:amz:$HUREN_TEST_S3_REGION:s3" \
            --user "$HUREN_TEST_S3_ACCESS_KEY_ID:$HUREN_TEST_S3_SECRET_ACCESS_KEY" \
            -T "$f" "$HUREN_TEST_S3_ENDPOINT/$HUREN_TEST_S3_BUCKET/$prefix/$(basename "$f")"
    done
}
echo "| run | senders | curl PUT/s | huren relaxed /s | huren full /s |"
echo "|---|---|---|---|---|"
for run in $(seq 1 "$runs"); do
    for senders in 1 4; do
        prefix="bench-$(date +%s%N)"
        t0=$(now)
        if [[ $senders == 1 ]]; then
            put_all "$prefix" "${files[@]}"
        else
            for k in 0 1 2 3; do put_all "$prefix" "$corpus_dir/$corpus"/part$k/*.dcm & done
            wait
        fi
        t1=$(now)
        curl_rate=$(rate "$n" "$t0" "$t1")
        results=()
        for mode in relaxed full; do
            data="$work/$run-$senders-$mode"
            mkdir -p "$data"
            printf 'backend = "s3"\nbucket = "%s"\nendpoint = "%s"\nregion = "%s"\nprefix = "%s"\naccess_key_id = "%s"\nallow_http = true\n' \
                "$HUREN_TEST_S3_BUCKET" "$HUREN_TEST_S3_ENDPOINT" "$HUREN_TEST_S3_REGION" \
                "bench-huren-$(date +%s%N)" "$HUREN_TEST_S3_ACCESS_KEY_ID" >"$data/storage.toml"
            port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
            AWS_SECRET_ACCESS_KEY="$HUREN_TEST_S3_SECRET_ACCESS_KEY" "$HUREN_BIN" node --data-dir "$data" \
                --storage-config "$data/storage.toml" --durability "$mode" \
                --dicom-listen "127.0.0.1:$port" --http-listen 127.0.0.1:0 >"$data/log" 2>&1 &
            pid=$!
            until grep -q "DICOM listening" "$data/log"; do kill -0 "$pid"; sleep 0.05; done
            t0=$(now)
            if [[ $senders == 1 ]]; then
                TCP_NODELAY=1 storescu -ta 600 +sd +r +sp '*.dcm' 127.0.0.1 "$port" "$corpus_dir/$corpus" >/dev/null
            else
                for k in 0 1 2 3; do
                    TCP_NODELAY=1 storescu -ta 600 +sd +r +sp '*.dcm' 127.0.0.1 "$port" "$corpus_dir/$corpus/part$k" >/dev/null &
                done
                wait $(jobs -p | grep -v "^$pid$")
            fi
            t1=$(now)
            got=$(sqlite3 "$data/index.sqlite" 'select count(*) from instance where is_current = 1')
            kill "$pid"; wait "$pid" || true
            [[ "$got" == "$n" ]] || { echo "huren $mode stored $got of $n" >&2; exit 1; }
            results+=("$(rate "$n" "$t0" "$t1")")
        done
        echo "| $run | $senders | $curl_rate | ${results[0]} | ${results[1]} |"
    done
done
