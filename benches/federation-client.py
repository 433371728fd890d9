#!/usr/bin/env python3
"""Client side of the federation benchmark (benches/federation.sh). Not a test.

Standard library only: http.client, one keep-alive connection per
registry, TCP_NODELAY, one request at a time.

  --plain-port P --fed-port F --token-file T --patients N --queries Q --runs R
  [--members M] [--warmup W]

Each query is one priors query (POST /v1/priors/query, hospital A's
token, purpose treatment) for a random patient 1..N of
benches/registry-gen.sql, with the patient's federation pseudonym (the
bench's stand-in: sha256("huren-bench-pseudonym:" || p)). It goes to both
registries on the same database, in alternating order: `plain` (no
federation configuration, which ignores the pseudonym) and `fed` (the
fan-out to M members). Each is timed from sending the request to reading
the last byte; checks come after the clock: every member `reached`, and
for a patient with the members' consent (even p) each member's records.
Prints one JSON object: per run and mode p50/p90/p99/max in ms, and the
same of the slowest member's `elapsed_ms` in each fed answer (the
fan-out's share, in whole ms as the registry reports it).
"""

import argparse
import hashlib
import http.client
import json
import random
import socket
import statistics
import sys
import time


def key(p):
    return hashlib.sha256(f"huren-bench-patient:{p}".encode()).hexdigest()


def pseudonym(p):
    return hashlib.sha256(f"huren-bench-pseudonym:{p}".encode()).hexdigest()


class Conn:
    def __init__(self, port, token):
        self.port = port
        self.token = token
        self.c = None

    def post(self, path, body):
        if self.c is None:
            self.c = http.client.HTTPConnection("127.0.0.1", self.port)
            self.c.connect()
            self.c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = json.dumps(body).encode()
        t0 = time.perf_counter()
        self.c.request("POST", path, data, {
            "content-type": "application/json",
            "authorization": f"Bearer {self.token}",
        })
        r = self.c.getresponse()
        raw = r.read()
        t1 = time.perf_counter()
        return r.status, raw, (t1 - t0) * 1000.0


def pct(xs, q):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def summary(xs):
    return {"n": len(xs), "p50": pct(xs, 0.50), "p90": pct(xs, 0.90),
            "p99": pct(xs, 0.99), "max": round(max(xs), 3),
            "mean": round(statistics.fmean(xs), 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain-port", type=int, required=True)
    ap.add_argument("--fed-port", type=int, required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--patients", type=int, required=True)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=50)
    a = ap.parse_args()
    token = open(a.token_file).read().strip()
    plain, fed = Conn(a.plain_port, token), Conn(a.fed_port, token)
    rng = random.Random(18)

    def ask(conn, p):
        body = {"patient_key": key(p), "purpose": "treatment", "user_id": "bench",
                "page_size": 1000, "federation_pseudonym": pseudonym(p)}
        status, raw, ms = conn.post("/v1/priors/query", body)
        if status != 200:
            sys.exit(f"priors query: {status} {raw[:300]!r}")
        return json.loads(raw), ms

    def check(answer_plain, answer_fed, p):
        members = answer_fed.get("federation", {}).get("members", [])
        if len(members) != a.members:
            sys.exit(f"patient {p}: {len(members)} member answers, expected {a.members}")
        bad = [m for m in members if m["status"] != "reached"]
        if bad:
            sys.exit(f"patient {p}: members not reached: {bad}")
        studies = 1 + p % 5
        for m in members:
            expected = studies if p % 2 == 0 else 0
            if m["records"] != expected:
                sys.exit(f"patient {p}: member {m['member_id']} showed {m['records']}, expected {expected}")
        if "federation" in answer_plain:
            sys.exit("the plain registry fanned out")
        extra = len(answer_fed["records"]) - len(answer_plain["records"])
        if extra != sum(m["records"] for m in members):
            sys.exit(f"patient {p}: {extra} records more with the federation, members said otherwise")

    for _ in range(a.warmup):
        p = rng.randint(1, a.patients)
        ask(plain, p)
        ask(fed, p)
    runs = []
    for run in range(a.runs):
        t = {"plain": [], "fed": [], "slowest_member": []}
        for i in range(a.queries):
            p = rng.randint(1, a.patients)
            order = [("plain", plain), ("fed", fed)]
            if i % 2:
                order.reverse()
            got = {}
            for name, conn in order:
                answer, ms = ask(conn, p)
                t[name].append(ms)
                got[name] = answer
            check(got["plain"], got["fed"], p)
            # The fan-out's part, as the fed registry timed it (ms, whole).
            t["slowest_member"].append(
                max(m["elapsed_ms"] for m in got["fed"]["federation"]["members"]))
        runs.append({"plain": summary(t["plain"]), "fed": summary(t["fed"]),
                     "slowest_member": summary(t["slowest_member"]),
                     "added_p99": round(summary(t["fed"])["p99"] - summary(t["plain"])["p99"], 3)})
        print(f"run {run + 1}: plain p99 {runs[-1]['plain']['p99']} ms, "
              f"fed p99 {runs[-1]['fed']['p99']} ms", file=sys.stderr)
    med = lambda mode, k: round(statistics.median(r[mode][k] for r in runs), 3)
    out = {"runs": runs,
           "median": {mode: {k: med(mode, k) for k in ("p50", "p90", "p99", "max")}
                      for mode in ("plain", "fed", "slowest_member")}}
    out["median"]["added_p99"] = round(out["median"]["fed"]["p99"] - out["median"]["plain"]["p99"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
