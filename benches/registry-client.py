#!/usr/bin/env python3
"""Client side of the registry benchmark (benches/registry.sh). Not a test.

Standard library only. The HTTP client is http.client (HTTP/1.1, one
keep-alive connection, TCP_NODELAY, request line + headers + body in one
send), used one request at a time: every figure is the latency of one
client with nothing else in flight.

  priors   --port P --token-file F --patients N --queries Q --runs R [--warmup W]
           Q priors queries per run for random patients 1..N
           (POST /v1/priors/query, hospital A's token). Every 10th query asks
           with purpose "emergency", the others "treatment". Times each from
           sending the request until the whole body is read; the JSON is
           parsed and checked afterwards, outside the timing: records shown
           plus withheld_count must equal what benches/registry-gen.sql
           wrote for the patient, the access basis must follow the consent
           rule. Before the runs: W unmeasured warm-up queries (default 50,
           counted in the audit), then 200 GET /ready (the server's own
           "SELECT 1"): the floor of client, HTTP and one database round
           trip. Prints one JSON object.
  publish  --port P --token-file F --hospital ID --records N --runs R [--batch 500]
           N new records per run (new Study Instance UIDs each run) in
           batches through POST /v1/hospitals/{ID}/records. The request
           bodies are built before the clock starts. Every result must be
           "applied". Prints one JSON object (records/s per run, batch
           latencies).
  outbox   --db index.sqlite --records N --patients P
           Writes N publication_outbox rows (body {"record": StudyRecord},
           record_version 1, unique UIDs) into a stopped node's SQLite index.
  disk     --dir DIR [--count 2000]
           WAL-like flush latency of the disk under DIR: 8 kB writes at
           successive offsets of a preallocated 16 MB file, each followed by
           fdatasync (PostgreSQL's default wal_sync_method on Linux); prints
           p50/p90/p99/max in ms.
  drain    --port P --t0 EPOCH [--timeout S]
           Polls the node's GET /api/v1/publication every 0.1 s until its
           backlog is 0; prints when the API first answered, when the
           backlog first fell and when it reached 0, relative to --t0 (the
           node's start).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import socket
import sqlite3
import statistics
import sys
import time
from datetime import date, datetime, timedelta, timezone

# ------------------------------------------------------------ data layout
# Must agree with benches/registry-gen.sql.


def patient_key(p: int) -> str:
    return hashlib.sha256(f"huren-bench-patient:{p}".encode()).hexdigest()


def records_of(p: int) -> int:
    return 1 + p % 5


def records_at_a(p: int) -> int:
    return sum(1 for k in range(records_of(p)) if (p + k) % 2 == 0)


def consented(p: int) -> bool:
    return p % 2 == 0


KINDS = [
    # items, modalities, body_parts, contrast, laterality, view_positions, series, instances, bytes each
    ([{"code": "CT-CHEST"}], ["CT"], ["CHEST"], "none", [], [], 3, 620, 525_000),
    ([{"code": "CT-ABDOMEN-ENH"}], ["CT"], ["ABDOMEN"], "plain_and_enhanced", [], [], 6, 1450, 525_000),
    ([{"code": "MR-HEAD"}], ["MR"], ["HEAD"], "none", [], [], 8, 310, 135_000),
    ([{"code": "MR-KNEE", "laterality": "L"}], ["MR"], ["KNEE"], "none", ["L"], [], 5, 140, 135_000),
    ([{"code": "DX-CHEST"}], ["DX"], ["CHEST"], "none", [], ["PA", "LL"], 2, 2, 9_500_000),
    ([], ["US"], ["ABDOMEN"], "none", [], [], 1, 24, 310_000),
    ([{"code": "MG-BREAST", "laterality": "B"}], ["MG"], ["BREAST"], "none", ["L", "R"], ["CC", "MLO"], 1, 4,
     28_000_000),
    ([{"code": "CR-HAND", "laterality": "R"}], ["CR"], ["HAND"], "none", ["R"], ["AP"], 1, 2, 7_200_000),
]


def study_record(uid: str, p: int, i: int) -> dict:
    """A StudyRecord (src/registry/proto.rs) for patient p, kind and date from i."""
    items, mods, parts, contrast, lat, views, series, inst, each = KINDS[(p * 3 + i) % len(KINDS)]
    d = date(2024, 1, 1) + timedelta(days=(p * 31 + i) % 730)
    inst += p % 7
    return {
        "study_instance_uid": uid,
        "record_version": 1,
        "patient_key": patient_key(p),
        "items": items,
        "modalities": mods,
        "body_parts": parts,
        "contrast": contrast,
        "laterality": lat,
        "view_positions": views,
        "study_date": d.isoformat(),
        "study_time": f"{8 + i % 10:02d}:{i % 60:02d}:{p % 60:02d}",
        "report_status": "final",
        "report_issued_date": (d + timedelta(days=1)).isoformat(),
        "qc_status": "passed",
        "images_available": True,
        "number_of_series": series,
        "number_of_instances": inst,
        "bytes": inst * each,
        "content_root": hashlib.sha256(f"huren-bench-root:{uid}".encode()).hexdigest(),
    }


# ------------------------------------------------------------ HTTP


class Client:
    """One keep-alive HTTP/1.1 connection with TCP_NODELAY."""

    def __init__(self, port: int, token: str | None = None):
        self.port = port
        self.token = token
        self.conn: http.client.HTTPConnection | None = None
        self.connects = 0

    def _connect(self):
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connects += 1

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, float]:
        """Returns (status, body, seconds from sending to the last byte read)."""
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            if self.conn is None:
                self._connect()
            try:
                t0 = time.perf_counter()
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                t1 = time.perf_counter()
                if resp.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return resp.status, data, t1 - t0
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                # The server closed an idle keep-alive connection: reconnect
                # once (that request's time is not kept).
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def stats_ms(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p90_ms": round(q[89], 3),
        "p99_ms": round(q[98], 3),
        "max_ms": round(ms[-1], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "min_ms": round(ms[0], 3),
    }


def read_token(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


# ------------------------------------------------------------ priors


def cmd_priors(a) -> int:
    c = Client(a.port, read_token(a.token_file))
    rng = random.Random(a.seed)

    def one(p: int, purpose: str) -> tuple[float, dict, int]:
        # Break-the-glass is honoured for an emergency encounter only.
        encounter = "emergency" if purpose == "emergency" else "outpatient"
        body = json.dumps({"patient_key": patient_key(p), "purpose": purpose,
                           "encounter": encounter, "user_id": "bench-doctor-1"}).encode()
        status, data, secs = c.request("POST", "/v1/priors/query", body)
        if status != 200:
            raise SystemExit(f"priors: HTTP {status}: {data[:300]!r}")
        return secs, json.loads(data), len(data)

    errors: list[str] = []

    def check(p: int, purpose: str, ans: dict):
        total = records_of(p)
        shown = len(ans["records"])
        want_access = "consent" if consented(p) else ("break_the_glass" if purpose == "emergency" else "none")
        if ans["access"] != want_access:
            errors.append(f"patient {p}: access {ans['access']}, expected {want_access}")
        if shown + ans["withheld_count"] != total:
            errors.append(f"patient {p}: {shown} shown + {ans['withheld_count']} withheld != {total}")
        if want_access == "none" and shown != records_at_a(p):
            errors.append(f"patient {p}: {shown} own records shown, expected {records_at_a(p)}")
        if ans["patient_key"] != patient_key(p):
            errors.append(f"patient {p}: wrong patient_key in the answer")

    for _ in range(a.warmup):
        p = rng.randint(1, a.patients)
        one(p, "treatment")

    health = []
    for _ in range(200):
        status, data, secs = c.request("GET", "/ready")
        if status != 200:
            raise SystemExit(f"ready: HTTP {status}")
        health.append(secs)

    runs = []
    for r in range(a.runs):
        times, shown, withheld, sizes, access = [], 0, 0, 0, {}
        for i in range(a.queries):
            p = rng.randint(1, a.patients)
            purpose = "emergency" if i % 10 == 9 else "treatment"
            secs, ans, size = one(p, purpose)
            times.append(secs)
            check(p, purpose, ans)
            shown += len(ans["records"])
            withheld += ans["withheld_count"]
            sizes += size
            access[ans["access"]] = access.get(ans["access"], 0) + 1
        s = stats_ms(times)
        s.update({"run": r + 1, "records_shown_mean": round(shown / a.queries, 2),
                  "withheld_mean": round(withheld / a.queries, 2),
                  "response_bytes_mean": round(sizes / a.queries), "access": access})
        runs.append(s)
        print(f"priors run {r + 1}: p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, max {s['max_ms']} ms",
              file=sys.stderr)
    out = {
        "client": f"Python {sys.version.split()[0]} http.client, 1 keep-alive connection, sequential",
        "queries_per_run": a.queries, "warmup": a.warmup, "runs": runs,
        "median_of_runs": {k: round(statistics.median(r[k] for r in runs), 3)
                           for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")},
        "health_floor": stats_ms(health),
        "connections_opened": c.connects,
        "check_errors": len(errors), "check_error_examples": errors[:5],
        "audited_requests": a.warmup + a.queries * a.runs,
    }
    print(json.dumps(out))
    return 1 if errors else 0


# ------------------------------------------------------------ publish


def cmd_publish(a) -> int:
    c = Client(a.port, read_token(a.token_file))
    rng = random.Random(a.seed)
    path = f"/v1/hospitals/{a.hospital}/records"
    runs = []
    for r in range(a.runs):
        # Bodies first, outside the clock.
        bodies = []
        for start in range(0, a.records, a.batch):
            recs = []
            for i in range(start, min(start + a.batch, a.records)):
                uid = f"1.2.826.0.1.3680043.10.543.2.{a.run_base + r}.{i + 1}"
                recs.append(study_record(uid, rng.randint(1, a.patients), i))
            bodies.append((len(recs), json.dumps({"records": recs}, separators=(",", ":")).encode()))
        times = []
        t0 = time.perf_counter()
        for n, body in bodies:
            status, data, secs = c.request("POST", path, body)
            if status != 200:
                raise SystemExit(f"publish: HTTP {status}: {data[:300]!r}")
            results = json.loads(data)["results"]
            if len(results) != n or any(x["outcome"] != "applied" for x in results):
                raise SystemExit(f"publish: not every record applied: {data[:300]!r}")
            times.append(secs)
        wall = time.perf_counter() - t0
        s = stats_ms(times)
        run = {"run": a.run_base + r, "records": a.records, "seconds": round(wall, 3),
               "records_per_s": round(a.records / wall), "batches": len(bodies),
               "batch_bytes_mean": round(sum(len(b) for _, b in bodies) / len(bodies)),
               "batch_latency": s}
        runs.append(run)
        print(f"publish run {a.run_base + r}: {a.records} records in {wall:.2f} s = {run['records_per_s']}/s "
              f"(batch p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms)", file=sys.stderr)
    print(json.dumps({
        "client": f"Python {sys.version.split()[0]} http.client, 1 keep-alive connection, sequential",
        "batch": a.batch, "runs": runs,
        "median_records_per_s": round(statistics.median(x["records_per_s"] for x in runs)),
        "connections_opened": c.connects,
    }))
    return 0


# ------------------------------------------------------------ node outbox


def cmd_outbox(a) -> int:
    rng = random.Random(a.seed)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    db = sqlite3.connect(a.db)
    rows = []
    for i in range(a.records):
        uid = f"1.2.826.0.1.3680043.10.543.3.{i + 1}"
        body = json.dumps({"record": study_record(uid, rng.randint(1, a.patients), i)},
                          separators=(",", ":"))
        rows.append((uid, 1, body, now, 0, "", 0))
    t0 = time.perf_counter()
    with db:
        db.executemany(
            "INSERT INTO publication_outbox (study_instance_uid, record_version, body, created_at, "
            "attempts, lease_until, dead) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    n = db.execute("SELECT COUNT(*) FROM publication_outbox WHERE dead = 0").fetchone()[0]
    db.close()
    print(json.dumps({"rows": n, "insert_s": round(time.perf_counter() - t0, 2),
                      "body_bytes_mean": round(sum(len(r[2]) for r in rows) / max(1, len(rows)))}))
    return 0 if n == a.records else 1


def cmd_drain(a) -> int:
    # The node's JSON API takes the operator's token (benches/lib.sh bench_token).
    c = Client(a.port, os.environ.get("BENCH_TOKEN"))
    first_answer = first_progress = None
    start_backlog = None
    last = {}
    timeline = []  # (seconds since t0, backlog), about once a second
    deadline = a.t0 + a.timeout
    while time.time() < deadline:
        try:
            status, data, _ = c.request("GET", "/api/v1/publication")
        except OSError:
            c.conn = None
            time.sleep(0.1)
            continue
        now = time.time()
        if status == 200:
            last = json.loads(data)
            if not last.get("enabled"):
                raise SystemExit(f"drain: publication is not enabled on the node: {last}")
            if first_answer is None:
                first_answer = now
                start_backlog = last["backlog"]
            if first_progress is None and last["backlog"] < start_backlog:
                first_progress = now
            if not timeline or now - a.t0 - timeline[-1][0] >= 1 or last["backlog"] == 0:
                timeline.append((round(now - a.t0, 2), last["backlog"]))
            if last["backlog"] == 0:
                out = {"api_up_s": round(first_answer - a.t0, 3),
                       "first_progress_s": round((first_progress or now) - a.t0, 3),
                       "drained_s": round(now - a.t0, 3),
                       "backlog_at_first_answer": start_backlog,
                       "dead": last.get("dead"), "delivered": last.get("delivered"),
                       "last_error": last.get("last_error"), "timeline": timeline}
                print(json.dumps(out))
                return 0 if not last.get("dead") else 1
        time.sleep(0.1)
    raise SystemExit(f"drain: backlog not 0 after {a.timeout} s: {last}")


def cmd_disk(a) -> int:
    import os
    path = os.path.join(a.dir, f"wal-probe-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = 16 << 20
        os.write(fd, b"\0" * size)
        os.fsync(fd)
        block = os.urandom(8192)
        times = []
        for i in range(a.count):
            t0 = time.perf_counter()
            os.pwrite(fd, block, (i * 8192) % size)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    print(json.dumps(stats_ms(times)))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("priors")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token-file", required=True)
    p.add_argument("--patients", type=int, required=True)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("publish")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token-file", required=True)
    p.add_argument("--hospital", required=True)
    p.add_argument("--patients", type=int, required=True)
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--run-base", type=int, default=1)
    p.add_argument("--seed", type=int, default=2)
    p = sub.add_parser("outbox")
    p.add_argument("--db", required=True)
    p.add_argument("--records", type=int, required=True)
    p.add_argument("--patients", type=int, required=True)
    p.add_argument("--seed", type=int, default=3)
    p = sub.add_parser("disk")
    p.add_argument("--dir", required=True)
    p.add_argument("--count", type=int, default=2000)
    p = sub.add_parser("drain")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--t0", type=float, required=True)
    p.add_argument("--timeout", type=float, default=3600)
    a = ap.parse_args()
    return {"priors": cmd_priors, "publish": cmd_publish, "outbox": cmd_outbox, "drain": cmd_drain,
            "disk": cmd_disk}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
