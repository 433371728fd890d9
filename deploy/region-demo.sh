#!/usr/bin/env bash
# A region on one machine: a registry and two hospital nodes, each on its
# embedded defaults (SQLite, local files) with its own ports and data
# directory. Registers the hospitals, stores a CT study at hospital B with
# dcmtk's storescu, maps the patient to a resident ID number through B's
# API (as the hospital's master patient index would), waits for B to
# publish, asks for the patient's priors from hospital A (a count only),
# records the patient's consent at A, and shows B's study from A's node.
# Then asks A's node whether a plain chest CT for the patient would be a
# repeat: the duplicate-exam warning cites B's study (the region's
# recognition list, deploy/recognition/jiangsu-example.toml, is activated at
# the registry's start).
# Finally a workstation at A opens B's study through A's own node with
# dcmtk's movescu: A fetches it from B (verified against the content root B
# published) and sends it on to a storescp. The nodes serve the web viewer
# (OHIF, deploy/install-viewer.sh) under /viewer; the demo adds a doctor's
# account at A and prints the viewer's URL for the demo study.
# Exits 0 when every step worked. CI runs it (scripts/test.sh).
#
#   deploy/region-demo.sh [--keep]
#
# --keep leaves the processes running and prints how to reach them.
# Environment: HUREN_BIN (default: target/debug/huren, built if missing),
# STORESCU (default /usr/bin/storescu), HUREN_VIEWER_DIR (the installed
# viewer; default ~/.cache/huren-ci/viewer, installed there if missing).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
HUREN_BIN="${HUREN_BIN:-$target/debug/huren}"
STORESCU="${STORESCU:-/usr/bin/storescu}"
keep=0
[[ "${1:-}" == "--keep" ]] && keep=1

if [[ ! -x "$HUREN_BIN" ]]; then
    (cd "$repo" && cargo build --bin huren >&2)
fi
[[ -x "$STORESCU" ]] || { echo "region-demo: $STORESCU missing (Debian package dcmtk)" >&2; exit 1; }
VIEWER_DIR="${HUREN_VIEWER_DIR:-$HOME/.cache/huren-ci/viewer}"
bash "$here/install-viewer.sh" "$VIEWER_DIR"

work="$(mktemp -d /tmp/huren-region-demo.XXXXXX)"
pids=()
cleanup() {
    local rc=$?
    if ((keep == 0)); then
        for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
        for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
        if ((rc != 0)); then
            for f in "$work"/*.log; do echo "---- $f" >&2; tail -n 30 "$f" >&2; done
        fi
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
fail() { echo "region-demo: FAILED: $*" >&2; exit 1; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {'d': d}))" "$1"; }

read -r REG_PORT A_HTTP A_DICOM B_HTTP B_DICOM SCP_PORT < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(6)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
REG="http://127.0.0.1:$REG_PORT"
A="http://127.0.0.1:$A_HTTP"
B="http://127.0.0.1:$B_HTTP"
HOSP_A=91320100466000001A   # unified social credit codes (made up)
HOSP_B=91320100466000002B

wait_http() {  # URL what
    for _ in $(seq 300); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    fail "$2 did not answer at $1"
}

step "registry on $REG (data in $work/registry)"
"$HUREN_BIN" registry --listen "127.0.0.1:$REG_PORT" --data-dir "$work/registry" \
    --recognition-list "$repo/deploy/recognition/jiangsu-example.toml" \
    >"$work/registry.log" 2>&1 &
pids+=($!)
wait_http "$REG/health" registry

step "hospitals registered with the admin CLI"
"$HUREN_BIN" registry hospital add --data-dir "$work/registry" --id "$HOSP_A" \
    --name "省人民医院 (A)" --level 三级甲等 --group 南京医联体 --token-file "$work/a.token"
"$HUREN_BIN" registry hospital add --data-dir "$work/registry" --id "$HOSP_B" \
    --name "县人民医院 (B)" --level 二级甲等 --group 南京医联体 --token-file "$work/b.token" \
    --dicomweb-base-url "$B/dicom-web"
"$HUREN_BIN" registry hospital list --data-dir "$work/registry"

# The region's patient-key secret: every node has it, the registry never.
python3 -c 'import secrets; print(secrets.token_hex(32))' >"$work/region.secret"
chmod 600 "$work/region.secret"

# The nodes' JSON API and DICOMweb take a bearer token (never open): the
# operator's token is kept in a file readable by its owner; the node keeps
# its SHA-256 only (--operator-token-file).
python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$work/api.token"
chmod 600 "$work/api.token"
# curl with the operator's token.
api() { curl -fsS -H "authorization: Bearer $(cat "$work/api.token")" "$@"; }

start_node() {  # name hospital http dicom ae
    mkdir -p "$work/$1"
    cat >"$work/$1.toml" <<TOML
# The AE directory: the workstation may query, retrieve and receive C-MOVEs.
[[remote_ae]]
ae_title = "VIEWER"
host = "127.0.0.1"
port = $SCP_PORT
TOML
    "$HUREN_BIN" node --config "$work/$1.toml" --operator-token-file "$work/api.token" \
        --data-dir "$work/$1" --ae-title "$5" \
        --http-listen "127.0.0.1:$3" --dicom-listen "127.0.0.1:$4" \
        --registry-url "$REG" --hospital-id "$2" --registry-token-file "$work/$1.token" \
        --region-secret-file "$work/region.secret" --identifier-issuers RESIDENT_ID=RID \
        --study-quiet-secs 1 --directory-interval-secs 2 --viewer-dir "$VIEWER_DIR" \
        >"$work/$1.log" 2>&1 &
    pids+=($!)
    wait_http "http://127.0.0.1:$3/health" "node $1"
}
step "node A (DICOM $A_DICOM, HTTP $A_HTTP) and node B (DICOM $B_DICOM, HTTP $B_HTTP)"
start_node a "$HOSP_A" "$A_HTTP" "$A_DICOM" HOSPA
start_node b "$HOSP_B" "$B_HTTP" "$B_DICOM" HOSPB

step "storescu: a CT chest study to hospital B"
# One run per series: storescu proposes one transfer syntax per SOP Class in
# a run, and the contrast series is JPEG Lossless (-xs proposes it).
TCP_NODELAY=1 "$STORESCU" -aet MODALITY -aec HOSPB +sd +r 127.0.0.1 "$B_DICOM" \
    "$repo/sample-dicom/p1-ct-chest-2024/1-chest-native" || fail "storescu"
TCP_NODELAY=1 "$STORESCU" -aet MODALITY -aec HOSPB -xs +sd +r 127.0.0.1 "$B_DICOM" \
    "$repo/sample-dicom/p1-ct-chest-2024/2-chest-contrast" || fail "storescu"
step "storescu: the patient's older CT head study to hospital B"
TCP_NODELAY=1 "$STORESCU" -aet MODALITY -aec HOSPB +sd +r 127.0.0.1 "$B_DICOM" \
    "$repo/sample-dicom/p1-ct-head-2019/1-head-brain" || fail "storescu"
TCP_NODELAY=1 "$STORESCU" -aet MODALITY -aec HOSPB -xb +sd +r 127.0.0.1 "$B_DICOM" \
    "$repo/sample-dicom/p1-ct-head-2019/2-head-bone" || fail "storescu"
HEAD=1.2.826.0.1.3680043.8.498.27626167968449838318346654095265863116  # sample-dicom/manifest.json
STUDY=1.2.826.0.1.3680043.8.498.10592335490470898099914797295349891527  # sample-dicom/manifest.json

step "B's master patient index maps local patient HUR-100001 to a resident ID number"
api -X POST "$B/api/v1/patient-identifiers" -H 'content-type: application/json' \
    -d '{"patient_id": "HUR-100001", "issuer_of_patient_id": "HUREN-GENERAL", "identifier_type": "RID", "identifier": "110105195804120012"}'
echo
# Reported two days ago (Asia/Shanghai), so that the prior is inside its
# validity window.
reported="$(python3 -c 'import datetime as d; print((d.datetime.now(d.timezone.utc)+d.timedelta(hours=8)-d.timedelta(days=2)).strftime("%Y-%m-%d"))')"
api -X PUT "$B/api/v1/studies/$STUDY/report" -H 'content-type: application/json' \
    -d "{\"report_status\": \"final\", \"report_issued_date\": \"$reported\"}" >/dev/null
api -X PUT "$B/api/v1/studies/$STUDY/qc" -H 'content-type: application/json' \
    -d '{"qc_status": "passed"}' >/dev/null

step "B publishes (quiet time 1 s)"
published=0
for _ in $(seq 600); do
    status="$(api "$B/api/v1/publication")"
    if [[ "$(json 'd["published_studies"] >= 2 and d["backlog"] == 0' <<<"$status")" == True ]]; then
        published=1; break
    fi
    sleep 0.1
done
((published)) || fail "B did not publish: $status"
echo "$status"

step "without the token, the node's API and DICOMweb refuse (401): no anonymous deletion, no anonymous search"
code="$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "$B/api/v1/studies/$STUDY")"
echo "DELETE /api/v1/studies/<uid> without a token: $code"
[[ "$code" == 401 ]] || fail "expected 401 for an anonymous deletion, got $code"
code="$(curl -s -o /dev/null -w '%{http_code}' "$B/dicom-web/studies?PatientName=*")"
echo "QIDO-RS without a token: $code"
[[ "$code" == 401 ]] || fail "expected 401 for an anonymous search, got $code"

priors() {
    api -X POST "$A/api/v1/priors" -H 'content-type: application/json' -d '{
        "patient": {"identifier_type": "RID", "identifier": "110105195804120012"},
        "purpose": "treatment", "user_id": "dr.wang"}'
}
step "A asks for the patient's priors without consent: a count, no records"
answer="$(priors)"
echo "$answer"
[[ "$(json 'd["access"] == "none" and d["withheld_count"] == 2 and d["records"] == []' <<<"$answer")" == True ]] \
    || fail "expected a count only"

step "the patient authorises hospital A (doctor-assisted, 7 days)"
expires="$(python3 -c 'import datetime as d; print((d.datetime.now(d.timezone.utc)+d.timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ"))')"
api -X POST "$A/api/v1/consents" -H 'content-type: application/json' -d "{
    \"patient\": {\"identifier_type\": \"RID\", \"identifier\": \"110105195804120012\"},
    \"method\": \"doctor_assisted\", \"recorded_by\": \"dr.wang\", \"state\": \"granted\",
    \"expires_at\": \"$expires\"}"
echo

step "A asks again: hospital B's studies"
answer="$(priors)"
python3 -m json.tool --no-ensure-ascii <<<"$answer"
[[ "$(json 'd["access"] == "consent" and len(d["records"]) == 2' <<<"$answer")" == True ]] \
    || fail "expected B's record"
[[ "$(json 'd["records"][0]["hospital_id"]' <<<"$answer")" == "$HOSP_B" ]] || fail "wrong hospital"
[[ "$(json 'd["records"][0]["record"]["study_instance_uid"]' <<<"$answer")" == "$STUDY" ]] || fail "wrong study"
[[ "$(json 'd["records"][0]["record"]["qc_status"]' <<<"$answer")" == passed ]] || fail "QC not published"

step "A's doctor is about to order a plain chest CT: the duplicate-exam check"
for _ in $(seq 300); do
    api -o /dev/null "$A/api/v1/recognition/list" 2>/dev/null && break
    sleep 0.1
done
warning="$(api -X POST "$A/api/v1/recognition/check" -H 'content-type: application/json' -d '{
    "patient": {"identifier_type": "RID", "identifier": "110105195804120012"},
    "order": {"item_code": "CT-0301-01"}, "ordering_doctor": "dr.wang", "encounter": "outpatient"}')"
python3 -m json.tool --no-ensure-ascii <<<"$warning"
[[ "$(json 'd["outcome"]' <<<"$warning")" == warn ]] || fail "expected a duplicate-exam warning"
[[ "$(json 'd["cited"]["hospital_id"]' <<<"$warning")" == "$HOSP_B" ]] || fail "the warning cites the wrong hospital"

step "a workstation at A opens B's CT head study with movescu (A fetches it from B, verified)"
STORESCP="${STORESCP:-/usr/bin/storescp}"
mkdir -p "$work/viewer"
TCP_NODELAY=1 "$STORESCP" -aet VIEWER +xa -od "$work/viewer" "$SCP_PORT" >"$work/storescp.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $SCP_PORT), 0.2)" 2>/dev/null && break
    sleep 0.05
done
TCP_NODELAY=1 /usr/bin/movescu -S -aet VIEWER -aec HOSPA -aem VIEWER 127.0.0.1 "$A_DICOM" \
    -k QueryRetrieveLevel=STUDY -k "StudyInstanceUID=$HEAD" || fail "movescu"
received="$(find "$work/viewer" -type f | wc -l)"
echo "the workstation received $received instances of B's study through A"
[[ "$received" == 10 ]] || fail "expected 10 instances at the workstation, got $received"
api "$A/api/v1/peer/audit" | python3 -m json.tool --no-ensure-ascii | sed -n '1,30p'

step "the viewer at A: a doctor's account, and the demo study's URL"
python3 -c 'import secrets; print(secrets.token_urlsafe(12))' >"$work/doctor.password"
chmod 600 "$work/doctor.password"
"$HUREN_BIN" user add --data-dir "$work/a" dr.wang --name 王医生 --password-file "$work/doctor.password"
code="$(curl -s -o "$work/viewer-index.html" -w '%{http_code}' "$A/viewer/viewer?StudyInstanceUIDs=$STUDY")"
[[ "$code" == 200 ]] && grep -q 'PUBLIC_URL="/viewer/"' "$work/viewer-index.html" || fail "the viewer is not served at $A/viewer/ ($code)"
code="$(curl -s -o /dev/null -w '%{http_code}' "$A/dicom-web/studies/$STUDY/series")"
echo "the viewer's DICOMweb without a session: $code"
[[ "$code" == 401 ]] || fail "expected 401 for the viewer's DICOMweb without a session, got $code"
cat <<MSG
Open the demo study in the viewer (sign in as dr.wang, password in $work/doctor.password):
  $A/ui/studies/$STUDY/images
  (it fetches B's study through A, then opens $A/viewer/viewer?StudyInstanceUIDs=$STUDY)
MSG

step "the registry's audit chain"
"$HUREN_BIN" registry audit verify --data-dir "$work/registry" | tee "$work/verify.out"
grep -q intact "$work/verify.out" || fail "audit chain"

if ((keep)); then
    cat <<MSG

Running (pids ${pids[*]}), data in $work:
  registry  $REG       (admin token: $work/registry/admin-token)
  API and DICOMweb token of both nodes: $work/api.token
  node A    $A  DICOM 127.0.0.1:$A_DICOM AE HOSPA
  viewer    $A/ui/studies/$STUDY/images  (dr.wang, password in $work/doctor.password)
  node B    $B  DICOM 127.0.0.1:$B_DICOM AE HOSPB
Stop with: kill ${pids[*]}
MSG
fi
echo
echo "region-demo: every step worked"
