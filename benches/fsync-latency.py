#!/usr/bin/env python3
"""fsync latency of the disk under DIR (default /tmp/huren-bench-work).

Writes a new 0.5 MB file (the size of one `ct` instance), fsyncs it and
deletes it, N times (default 200), and prints the median write+fsync time
and the "fsync-latency limit" 1 / median: the instances per second a server
that fsyncs every instance, one after the other, cannot exceed.
Not a test. See benches/README.md and docs/benchmarks.md.

    benches/fsync-latency.py [--dir DIR] [--count N] [--size BYTES]
"""
import argparse
import os
import statistics
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/huren-bench-work")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--size", type=int, default=500_000)
    args = ap.parse_args()

    os.makedirs(args.dir, exist_ok=True)
    payload = os.urandom(args.size)
    path = os.path.join(args.dir, f"fsync-probe-{os.getpid()}")
    write_s, fsync_s, total_s = [], [], []
    for _ in range(args.count):
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, payload)
            t1 = time.perf_counter()
            os.fsync(fd)
            t2 = time.perf_counter()
        finally:
            os.close(fd)
        os.unlink(path)
        write_s.append(t1 - t0)
        fsync_s.append(t2 - t1)
        total_s.append(t2 - t0)

    def ms(xs, q):
        return statistics.quantiles(xs, n=10)[q] * 1e3 if q is not None else statistics.median(xs) * 1e3

    med = statistics.median(total_s)
    print(f"dir {args.dir}, {args.count} x {args.size} bytes: new file, write, fsync, unlink")
    print(f"fsync alone     median {ms(fsync_s, None):.2f} ms (p10 {ms(fsync_s, 0):.2f}, p90 {ms(fsync_s, 8):.2f})")
    print(f"write + fsync   median {med * 1e3:.2f} ms (p10 {ms(total_s, 0):.2f}, p90 {ms(total_s, 8):.2f})")
    print(f"fsync-latency limit 1 / median(write + fsync) = {1 / med:.0f} /s"
          f" (1 / median(fsync) = {1 / statistics.median(fsync_s):.0f} /s)")


if __name__ == "__main__":
    main()
