#!/usr/bin/env python3
"""Sums up a Chromium trace taken by benches/viewer-browser.py
(HUREN_BENCH_CHROME_TRACE=FILE): the renderer main thread's top-level tasks
between two moments after the click (the `huren-click` time stamp), the
largest of them with what they contained, and what the other threads did
meanwhile. A task with no children is native work the trace does not break
down (a compositor stop waiting on the GPU process, for one).

    benches/chrome-trace-summary.py FILE [--from S] [--to S] [--top N]
"""
import argparse
import collections
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--from", dest="lo", type=float, default=0.0)
    ap.add_argument("--to", dest="hi", type=float, default=10.0)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    with open(a.file) as f:
        d = json.load(f)
    events = d["traceEvents"] if isinstance(d, dict) else d
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    click = next(e for e in events if e.get("name") == "TimeStamp"
                 and "huren-click" in json.dumps(e.get("args", {})))
    t0, main_thread = click["ts"], (click["pid"], click["tid"])
    at = lambda e: (e["ts"] - t0) / 1e6
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e and a.lo <= at(e) <= a.hi]
    mine = sorted((e for e in complete if (e["pid"], e["tid"]) == main_thread),
                  key=lambda e: (e["ts"], -e["dur"]))
    top, end = [], -1
    for e in mine:
        if e["ts"] >= end:
            top.append(e)
            end = e["ts"] + e["dur"]
    busy = sum(e["dur"] for e in top) / 1000
    print(f"{a.file}: {a.lo:.2f}-{a.hi:.2f} s after the click; main thread busy {busy:.0f} ms")
    for e in sorted(top, key=lambda e: -e["dur"])[: a.top]:
        inside = collections.Counter()
        for c in mine:
            if c is not e and e["ts"] <= c["ts"] < e["ts"] + e["dur"] and c["dur"] > 2000:
                inside[c["name"]] += c["dur"]
        src = e.get("args", {}).get("src_func", "")
        kids = ", ".join(f"{k} {v / 1000:.0f}" for k, v in inside.most_common(4)) or "(no children)"
        print(f"  {at(e):6.3f} s  {e['dur'] / 1000:6.0f} ms  {src}  {kids}")
    others = collections.Counter()
    for e in complete:
        key = (e["pid"], e["tid"])
        if key != main_thread and e["name"] in ("RunTask", "ThreadPool_RunTask") and e["dur"] > 5000:
            others[names.get(key, str(key))] += e["dur"]
    print("other threads (tasks over 5 ms):")
    for k, v in others.most_common(6):
        print(f"  {k:30s} {v / 1000:6.0f} ms")


if __name__ == "__main__":
    main()
