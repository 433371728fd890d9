#!/usr/bin/env bash
# Two provinces on one machine (docs/federation.md): a registry for
# Shanghai (member "sh") and one for Jiangsu ("js"), each with its own
# patient-key secret, directory, list and consent records; two hospital
# nodes in Shanghai (A1 in the cross-province pilot, A2 not) and one in
# Jiangsu (B, in the pilot). Each registry's federation configuration
# names the other's URL and Ed25519 public key.
#
# A CT chest study is stored at B. The doctor at A1 asks whether a plain
# chest CT would be a repeat: A1's registry asks Jiangsu's by the
# federation pseudonym only; before the patient's consent in Jiangsu it
# learns a count, after it the duplicate-exam warning cites B's study,
# marked 江苏省, judged under the federation's list. The doctor then opens
# the images through A1 with movescu (Shanghai's registry vouches for A1,
# Jiangsu's issues the grant, A1 fetches from B and verifies the content
# root B published) and on A1's doctor's page. A2, outside the pilot, does
# not fan out. Jiangsu's registry refuses a request signed by a key the
# federation does not list, and audits it. Both audit chains verify.
# Exits 0 when every step worked. CI runs it (scripts/test.sh).
#
#   deploy/federation-demo.sh [--keep]
#
# Environment: HUREN_BIN (default: target/debug/huren, built if missing),
# STORESCU, STORESCP, MOVESCU (default /usr/bin/...).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
HUREN_BIN="${HUREN_BIN:-$target/debug/huren}"
STORESCU="${STORESCU:-/usr/bin/storescu}"
STORESCP="${STORESCP:-/usr/bin/storescp}"
MOVESCU="${MOVESCU:-/usr/bin/movescu}"
keep=0
[[ "${1:-}" == "--keep" ]] && keep=1

if [[ ! -x "$HUREN_BIN" ]]; then
    (cd "$repo" && cargo build --bin huren >&2)
fi
for tool in "$STORESCU" "$STORESCP" "$MOVESCU"; do
    [[ -x "$tool" ]] || { echo "federation-demo: $tool missing (Debian package dcmtk)" >&2; exit 1; }
done

work="$(mktemp -d /tmp/huren-federation-demo.XXXXXX)"
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
proves() { printf '   -> proves: %s\n' "$*"; }
fail() { echo "federation-demo: FAILED: $*" >&2; exit 1; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {'d': d}))" "$1"; }

read -r SH_PORT JS_PORT A1_HTTP A1_DICOM A2_HTTP A2_DICOM B_HTTP B_DICOM SCP_PORT < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(9)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
SH="http://127.0.0.1:$SH_PORT"
JS="http://127.0.0.1:$JS_PORT"
A1="http://127.0.0.1:$A1_HTTP"
A2="http://127.0.0.1:$A2_HTTP"
B="http://127.0.0.1:$B_HTTP"
HOSP_A1=91310000425000001A   # unified social credit codes (made up)
HOSP_A2=91310000425000002B
HOSP_B=91320500466000003C
RID=110105195804120012       # a valid number for the sample patient (born 1958-04-12, male)
STUDY=1.2.826.0.1.3680043.8.498.10592335490470898099914797295349891527  # sample-dicom/manifest.json

wait_http() {  # URL what
    for _ in $(seq 300); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    fail "$2 did not answer at $1"
}
secret() { python3 -c 'import secrets; print(secrets.token_hex(32))' >"$1"; chmod 600 "$1"; }

step "keys and secrets"
# Each province keys its patients with its own secret; the federation's
# pseudonym secret goes to the pilot hospitals' nodes only; no registry has
# any of them.
secret "$work/sh-region.secret"
secret "$work/js-region.secret"
secret "$work/federation.secret"
SH_KEY="$("$HUREN_BIN" registry federation keygen --key-file "$work/sh.key")"
JS_KEY="$("$HUREN_BIN" registry federation keygen --key-file "$work/js.key")"
echo "Shanghai's registry public key: $SH_KEY"
echo "Jiangsu's registry public key:  $JS_KEY"
proves "each province keys its patients with its own secret; registries exchange public keys only"

step "the federation's recognition list (the regional list format), validated"
python3 - "$repo/deploy/recognition/jiangsu-example.toml" "$work/yrd-list.toml" <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8").read()
text = text.replace('version = "2026.1"', 'version = "yrd-2026.1"', 1)
text = text.replace('region = "江苏省（示例）"', 'region = "长三角三省一市（示例）"', 1)
text = text.replace('mark = "苏HR"', 'mark = "长三角HR"', 1)
open(sys.argv[2], "w", encoding="utf-8").write(text)
PY
"$HUREN_BIN" recognition check-list "$work/yrd-list.toml"
proves "the federation list is data, checked by the same validator as a region's"

federation_config() {  # me province key other other_province other_url other_key pilot
    cat >"$work/federation-$1.toml" <<TOML
[federation]
name = "长三角互认试点"
member_id = "$1"
province = "$2"
signing_key_file = "$3"
recognition_list = "yrd-list.toml"
consent_policy = "holding"
deadline_ms = 1000
pilot_hospitals = [$8]

[[member]]
id = "$4"
province = "$5"
url = "$6"
public_key = "$7"
TOML
    "$HUREN_BIN" registry federation check "$work/federation-$1.toml"
}
step "federation configurations (each names the other member and its key)"
federation_config sh 上海市 sh.key js 江苏省 "$JS" "$JS_KEY" "\"$HOSP_A1\""
federation_config js 江苏省 js.key sh 上海市 "$SH" "$SH_KEY" "\"$HOSP_B\""
proves "each member knows the other's URL and public key, the list and the consent policy (holding), nothing else"

start_registry() {  # name port
    "$HUREN_BIN" registry --listen "127.0.0.1:$2" --data-dir "$work/$1-registry" \
        --recognition-list "$repo/deploy/recognition/jiangsu-example.toml" \
        --federation-config "$work/federation-$1.toml" \
        >"$work/$1-registry.log" 2>&1 &
    pids+=($!)
    wait_http "http://127.0.0.1:$2/health" "registry $1"
}
step "Shanghai's registry on $SH, Jiangsu's on $JS"
start_registry sh "$SH_PORT"
start_registry js "$JS_PORT"
grep -h "federation configured" "$work"/sh-registry.log "$work"/js-registry.log | sed 's/.*INFO //'
proves "both registries run with their federation configuration"

step "hospitals, each in its own province's directory"
"$HUREN_BIN" registry hospital add --data-dir "$work/sh-registry" --id "$HOSP_A1" \
    --name "上海市第一人民医院 (A1, pilot)" --level 三级甲等 --token-file "$work/a1.token" >/dev/null
"$HUREN_BIN" registry hospital add --data-dir "$work/sh-registry" --id "$HOSP_A2" \
    --name "上海市某区中心医院 (A2)" --level 二级甲等 --token-file "$work/a2.token" >/dev/null
"$HUREN_BIN" registry hospital add --data-dir "$work/js-registry" --id "$HOSP_B" \
    --name "苏州市立医院 (B, pilot)" --level 三级甲等 --token-file "$work/b.token" \
    --dicomweb-base-url "$B/dicom-web" >/dev/null
"$HUREN_BIN" registry hospital list --data-dir "$work/sh-registry"
"$HUREN_BIN" registry hospital list --data-dir "$work/js-registry"
proves "neither registry lists the other province's hospitals"

python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$work/api.token"
chmod 600 "$work/api.token"
api() { curl -fsS -H "authorization: Bearer $(cat "$work/api.token")" "$@"; }

start_node() {  # name hospital http dicom ae registry region-secret [federation-secret]
    mkdir -p "$work/$1"
    cat >"$work/$1.toml" <<TOML
[[remote_ae]]
ae_title = "VIEWER"
host = "127.0.0.1"
port = $SCP_PORT
TOML
    local fed=()
    [[ -n "${8:-}" ]] && fed=(--federation-secret-file "$8")
    "$HUREN_BIN" node --config "$work/$1.toml" --operator-token-file "$work/api.token" \
        --data-dir "$work/$1" --ae-title "$5" \
        --http-listen "127.0.0.1:$3" --dicom-listen "127.0.0.1:$4" \
        --registry-url "$6" --hospital-id "$2" --registry-token-file "$work/$1.token" \
        --region-secret-file "$7" "${fed[@]}" --identifier-issuers RESIDENT_ID=RID \
        --study-quiet-secs 1 --directory-interval-secs 2 \
        >"$work/$1.log" 2>&1 &
    pids+=($!)
    wait_http "http://127.0.0.1:$3/health" "node $1"
}
step "nodes: A1 and A2 in Shanghai, B in Jiangsu (A1 and B hold the federation secret)"
start_node a1 "$HOSP_A1" "$A1_HTTP" "$A1_DICOM" HOSPA1 "$SH" "$work/sh-region.secret" "$work/federation.secret"
start_node a2 "$HOSP_A2" "$A2_HTTP" "$A2_DICOM" HOSPA2 "$SH" "$work/sh-region.secret"
start_node b "$HOSP_B" "$B_HTTP" "$B_DICOM" HOSPB "$JS" "$work/js-region.secret" "$work/federation.secret"
proves "only the pilot hospitals' nodes can compute the federation pseudonym"

step "storescu: a CT chest study to hospital B in Jiangsu"
TCP_NODELAY=1 "$STORESCU" -aet MODALITY -aec HOSPB +sd +r 127.0.0.1 "$B_DICOM" \
    "$repo/sample-dicom/p1-ct-chest-2024/1-chest-native" || fail "storescu"
TCP_NODELAY=1 "$STORESCU" -aet MODALITY -aec HOSPB -xs +sd +r 127.0.0.1 "$B_DICOM" \
    "$repo/sample-dicom/p1-ct-chest-2024/2-chest-contrast" || fail "storescu"
api -X POST "$B/api/v1/patient-identifiers" -H 'content-type: application/json' \
    -d "{\"patient_id\": \"HUR-100001\", \"issuer_of_patient_id\": \"HUREN-GENERAL\", \"identifier_type\": \"RID\", \"identifier\": \"$RID\"}" >/dev/null
reported="$(python3 -c 'import datetime as d; print((d.datetime.now(d.timezone.utc)+d.timedelta(hours=8)-d.timedelta(days=2)).strftime("%Y-%m-%d"))')"
api -X PUT "$B/api/v1/studies/$STUDY/report" -H 'content-type: application/json' \
    -d "{\"report_status\": \"final\", \"report_issued_date\": \"$reported\"}" >/dev/null
api -X PUT "$B/api/v1/studies/$STUDY/qc" -H 'content-type: application/json' \
    -d '{"qc_status": "passed"}' >/dev/null
published=0
for _ in $(seq 600); do
    status="$(api "$B/api/v1/publication")"
    if [[ "$(json 'd["published_studies"] >= 1 and d["backlog"] == 0' <<<"$status")" == True ]]; then
        published=1; break
    fi
    sleep 0.1
done
((published)) || fail "B did not publish: $status"
for _ in $(seq 300); do
    rec="$(curl -fsS -H "authorization: Bearer $(cat "$work/js-registry/admin-token")" \
        "$JS/v1/hospitals/$HOSP_B/records/$STUDY" 2>/dev/null || true)"
    [[ -n "$rec" && "$(json 'd["record"]["report_status"] == "final" and d["record"]["qc_status"] == "passed"' <<<"$rec")" == True ]] && break
    sleep 0.1
done
echo "$rec" | python3 -m json.tool --no-ensure-ascii | grep -E '"(patient_key|federation_pseudonym|study_date|report_issued_date)"'
proves "B published Jiangsu's patient key and the federation pseudonym: no ID, name or birth date"

for node in "$A1" "$A2"; do
    for _ in $(seq 300); do
        api -o /dev/null "$node/api/v1/recognition/list" 2>/dev/null && break
        sleep 0.1
    done
done
check() {  # node
    api -X POST "$1/api/v1/recognition/check" -H 'content-type: application/json' -d "{
        \"patient\": {\"identifier_type\": \"RID\", \"identifier\": \"$RID\"},
        \"order\": {\"item_code\": \"CT-0301-01\"}, \"ordering_doctor\": \"dr.zhou\", \"encounter\": \"outpatient\"}"
}

step "A1's doctor is about to order a plain chest CT, before the patient's consent in Jiangsu"
answer="$(check "$A1")"
json 'd["federation"]' <<<"$answer"
[[ "$(json 'd["outcome"] != "warn" and d["federation"]["members"][0]["status"] == "reached" and d["federation"]["members"][0]["withheld_count"] == 1' <<<"$answer")" == True ]] \
    || fail "expected a count from Jiangsu and no warning: $answer"
proves "Jiangsu answered under its own consent rule (holding province): a count, no record"

step "the patient consents, in Jiangsu's health app, to Shanghai's hospitals seeing Jiangsu's records"
expires="$(python3 -c 'import datetime as d; print((d.datetime.now(d.timezone.utc)+d.timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ"))')"
JS_KEY_OF_PATIENT="$(json 'd["record"]["patient_key"]' <<<"$rec")"
curl -fsS -H "authorization: Bearer $(cat "$work/js-registry/admin-token")" \
    -H 'content-type: application/json' -X POST "$JS/v1/federation/consents" -d "{
    \"patient_key\": \"$JS_KEY_OF_PATIENT\", \"member_id\": \"sh\", \"method\": \"qr_code\",
    \"recorded_by\": \"js-health-app\", \"state\": \"granted\", \"expires_at\": \"$expires\"}"
echo
proves "the consent is recorded where the records are, under Jiangsu's own patient key"

step "A1's doctor asks again: the duplicate-exam warning cites B's study, from 江苏省"
warning="$(check "$A1")"
python3 -m json.tool --no-ensure-ascii <<<"$warning" | sed -n '1,60p'
[[ "$(json 'd["outcome"]' <<<"$warning")" == warn ]] || fail "expected a duplicate-exam warning"
[[ "$(json 'd["cited"]["hospital_id"]' <<<"$warning")" == "$HOSP_B" ]] || fail "the warning cites the wrong hospital"
[[ "$(json "d['provinces']['$STUDY']" <<<"$warning")" == 江苏省 ]] || fail "the prior's province"
proves "the fan-out found the patient by pseudonym; the record passed the federation list (item, window, eligibility) and A1's list"

step "A2 (Shanghai, outside the pilot) asks the same: no fan-out"
other="$(check "$A2")"
[[ "$(json '"federation" not in d and d["outcome"] != "warn"' <<<"$other")" == True ]] || fail "A2 fanned out: $other"
proves "only pilot hospitals ask other provinces"

step "a workstation at A1 opens B's study with movescu (A1 fetches it across the border, verified)"
mkdir -p "$work/viewer"
TCP_NODELAY=1 "$STORESCP" -aet VIEWER +xa -od "$work/viewer" "$SCP_PORT" >"$work/storescp.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $SCP_PORT), 0.2)" 2>/dev/null && break
    sleep 0.05
done
TCP_NODELAY=1 "$MOVESCU" -S -aet VIEWER -aec HOSPA1 -aem VIEWER 127.0.0.1 "$A1_DICOM" \
    -k QueryRetrieveLevel=STUDY -k "StudyInstanceUID=$STUDY" || fail "movescu"
received="$(find "$work/viewer" -type f | wc -l)"
expected="$(find "$repo/sample-dicom/p1-ct-chest-2024" -type f -name '*.dcm' | wc -l)"
echo "the workstation received $received instances of B's study through A1 (B holds $expected)"
[[ "$received" == "$expected" ]] || fail "expected $expected instances at the workstation, got $received"
api "$A1/api/v1/peer/audit" | python3 -m json.tool --no-ensure-ascii | sed -n '1,20p'
proves "Shanghai's registry vouched for A1, Jiangsu's issued the grant, A1 verified the content root B published"

step "the doctor at A1 opens the study on A1's page"
printf 'demo-password-1\n' >"$work/doctor.password"
"$HUREN_BIN" user add --data-dir "$work/a1" dr.zhou --name 周医生 --password-file "$work/doctor.password" >/dev/null
python3 - "$A1" "$STUDY" <<'PY'
import http.cookiejar, re, sys, urllib.parse, urllib.request
base, uid = sys.argv[1], sys.argv[2]
jar = http.cookiejar.CookieJar()
web = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
page = web.open(base + "/ui/login").read().decode()
csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
form = urllib.parse.urlencode({"csrf": csrf, "user_id": "dr.zhou", "password": "demo-password-1"}).encode()
web.open(base + "/ui/login", form)
study = web.open(base + "/ui/studies/" + uid)
text = study.read().decode()
assert study.status == 200 and uid in text, (study.status, text[:500])
print(f"GET /ui/studies/{uid}: {study.status}, {len(text)} bytes of the doctor's page")
PY
proves "the prior from Jiangsu is a study of A1's own page now"

step "a registry outside the federation is refused, and audited"
code="$(python3 - "$JS" <<'PY'
import json, secrets, sys, time, urllib.request, urllib.error
# "rogue" is no member of Jiangsu's configuration: refused whatever it signs
# (tests/federation.rs also signs with a real key the federation does not
# list, under a member's name).
body = json.dumps({"federation": "长三角互认试点", "pseudonym": "0" * 64, "purpose": "treatment",
                   "asking_hospital_id": "X", "user_id": "x", "asking_consent": True,
                   "request_id": "r1"}).encode()
req = urllib.request.Request(sys.argv[1] + "/v1/federation/priors", body, method="POST", headers={
    "content-type": "application/json", "x-huren-federation-member": "rogue",
    "x-huren-federation-timestamp": str(int(time.time())), "x-huren-federation-nonce": secrets.token_hex(16),
    "x-huren-federation-signature": secrets.token_hex(64)})
try:
    urllib.request.urlopen(req)
    print(200)
except urllib.error.HTTPError as e:
    print(e.code)
PY
)"
echo "POST /v1/federation/priors from 'rogue': $code"
[[ "$code" == 403 ]] || fail "expected 403, got $code"
proves "a registry that is not a member gets a 403 and nothing else (its attempt is audited, below)"

step "both audit trails: the cross-border query and grant, with the other registry's identity"
for r in sh js; do
    echo "-- $r"
    "$HUREN_BIN" registry audit export --data-dir "$work/$r-registry" --format jsonl \
        | python3 -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    if e["action"].startswith("federation") or (e["action"] == "refusal" and e["actor"].startswith("registry:")):
        print(e["seq"], e["actor"], e["action"], e["outcome"], e["detail"][:110])'
done
"$HUREN_BIN" registry audit export --data-dir "$work/js-registry" --format jsonl \
    | grep -q '"actor":"registry:rogue"' || fail "the refusal is not audited"
"$HUREN_BIN" registry audit export --data-dir "$work/js-registry" --format jsonl \
    | grep '"action":"federation_grant"' | grep -q '"actor":"registry:sh"' || fail "Jiangsu's grant entry"
"$HUREN_BIN" registry audit export --data-dir "$work/sh-registry" --format jsonl \
    | grep '"action":"federation_query"' | grep -q 'member js' || fail "Shanghai's query entry"
for r in sh js; do
    "$HUREN_BIN" registry audit verify --data-dir "$work/$r-registry" | tee "$work/verify.out"
    grep -q intact "$work/verify.out" || fail "audit chain of $r"
done
proves "every cross-border query and grant is in both chains, and both chains verify"

step "nothing of the patient's identity is in either registry's database"
birth="$(/usr/bin/dcmdump +P PatientBirthDate "$repo/sample-dicom/p1-ct-chest-2024/1-chest-native/1.dcm" | sed -n 's/.*\[\(.*\)\].*/\1/p')"
[[ -n "$birth" ]] || fail "no birth date in the sample"
for r in sh js; do
    for needle in "$RID" "HUR-100001" "$birth" "Zhang" "张三"; do
        if grep -a -q -- "$needle" "$work/$r-registry"/registry.sqlite*; then
            fail "$needle found in $r's registry database"
        fi
    done
done
echo "searched both registries' SQLite files (and WAL) for the ID number, the local Patient ID, the name and the birth date ($birth): none"
proves "the registries exchanged and kept pseudonyms only (tests/federation.rs searches every byte on every link too)"

if ((keep)); then
    cat <<MSG

Running (pids ${pids[*]}), data in $work:
  Shanghai registry $SH   Jiangsu registry $JS
  node A1 $A1 DICOM 127.0.0.1:$A1_DICOM AE HOSPA1
  node A2 $A2 DICOM 127.0.0.1:$A2_DICOM AE HOSPA2
  node B  $B  DICOM 127.0.0.1:$B_DICOM AE HOSPB
  API token: $work/api.token
Stop with: kill ${pids[*]}
MSG
fi
echo
echo "federation-demo: every step worked"
