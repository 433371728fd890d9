#!/usr/bin/env python3
"""Sum up a V8 .cpuprofile (benches/viewer-browser.py, HUREN_BENCH_CPUPROFILE).

    cpuprofile-summary.py FILE [--from S] [--to S] [--top N] [--by function|script|stack]

Self time of the samples between --from and --to seconds after the
profile's start (the click), grouped by function (name, script, line), by
script, or by the innermost frames of the viewer's own scripts along the
stack (`stack`: the deepest frame that is not a builtin, for time spent in
builtins on their behalf). Also prints the busy time per 250 ms window, so
the gaps where the page's thread waited are visible.
"""

import argparse
import collections
import json
import os


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--from", dest="start", type=float, default=0.0)
    ap.add_argument("--to", dest="end", type=float, default=1e9)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--by", choices=("function", "script", "stack"), default="function")
    a = ap.parse_args()
    prof = json.load(open(a.file))
    nodes = {n["id"]: n for n in prof["nodes"]}
    parent = {}
    for n in prof["nodes"]:
        for c in n.get("children", []):
            parent[c] = n["id"]

    def frame(node_id):
        cf = nodes[node_id]["callFrame"]
        return cf["functionName"] or "(anonymous)", os.path.basename(cf["url"]) or "", cf["lineNumber"] + 1

    def key(node_id):
        name, script, line = frame(node_id)
        if a.by == "script":
            return script or name
        if a.by == "stack":
            at = node_id
            while at in nodes and not frame(at)[1] and at in parent:
                at = parent[at]
            name, script, line = frame(at)
        return f"{name}  {script}:{line}" if script else name

    t = prof["startTime"]
    self_us = collections.Counter()
    windows = collections.Counter()
    idle = {"(idle)", "(program)"}
    for sample, delta in zip(prof["samples"], prof["timeDeltas"]):
        t += delta
        at = (t - prof["startTime"]) / 1e6
        if not a.start <= at < a.end:
            continue
        # A sample's time is the gap to the next one; the delta before it
        # is close enough at a 200 µs interval.
        self_us[key(sample)] += delta
        if frame(sample)[0] not in idle:
            windows[int(at / 0.25)] += delta
    total = sum(self_us.values())
    busy = total - sum(v for k, v in self_us.items() if k in idle)
    print(f"{a.file}: {a.start:.2f}-{min(a.end, (t - prof['startTime']) / 1e6):.2f} s,"
          f" sampled {total / 1e6:.2f} s, busy {busy / 1e6:.2f} s")
    for k, v in self_us.most_common(a.top):
        print(f"{v / 1e3:9.1f} ms  {100 * v / max(total, 1):5.1f}%  {k}")
    print("busy ms per 250 ms window after the click:")
    print(" ".join(f"{w * 0.25:.2f}:{windows[w] / 1e3:.0f}" for w in sorted(windows)))


if __name__ == "__main__":
    main()
