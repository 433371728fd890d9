#!/usr/bin/env python3
"""What one acknowledgement's flush costs under full durability, two ways.

Per iteration, as the ingest path does for one instance: a new 0.5 MB file
written (the blob), given its name in one of 256 directories (the link),
and 3 WAL-sized pages appended to a log file (the index commit); then
either

  syncfs   one syncfs(2) of the file system (what huren does: one call
           covers blob, name and WAL), or
  fsyncs   fdatasync of the blob, fsync of its directory (the name; this
           root file system runs ext4 without a journal) and fdatasync of
           the log (SQLite's synchronous=FULL commit),

alternating between the two, N times each (default 200), and prints the
medians. Optionally with write-behind: sync_file_range(WRITE) after every
256 KiB, as crate::storage does under full durability. Not a test. See
docs/benchmarks.md.

    benches/flush-choice.py [--dir DIR] [--count N] [--size BYTES]
"""
import argparse
import ctypes
import os
import statistics
import time

libc = ctypes.CDLL("libc.so.6", use_errno=True)
SYNC_FILE_RANGE_WRITE = 2


def syncfs(fd):
    if libc.syncfs(fd) != 0:
        raise OSError(ctypes.get_errno(), "syncfs")


def start_writeback(fd, off, n):
    libc.sync_file_range(fd, ctypes.c_int64(off), ctypes.c_int64(n), SYNC_FILE_RANGE_WRITE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/huren-bench-work/flush-choice")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--size", type=int, default=500_000)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    dirs = []
    for i in range(256):
        d = os.path.join(args.dir, f"{i:02x}")
        os.makedirs(d, exist_ok=True)
        dirs.append(d)
    log = os.open(os.path.join(args.dir, "wal"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    root = os.open(args.dir, os.O_RDONLY)
    page = os.urandom(4096 + 24)
    times = {"syncfs": [], "fsyncs": [], "syncfs+wb": [], "fsyncs+wb": []}
    names = []
    for i in range(args.count):
        for way in times:
            payload = os.urandom(args.size)
            d = dirs[len(names) % 256]
            name = os.path.join(d, f"{i}-{way}")
            t0 = time.perf_counter()
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            off = 0
            while off < len(payload):
                n = os.write(fd, payload[off:off + 131072])
                if way.endswith("+wb") and (off + n) // 262144 != off // 262144:
                    start_writeback(fd, 0, 0)
                off += n
            for _ in range(3):
                os.write(log, page)
            if way.startswith("syncfs"):
                syncfs(root)
            else:
                os.fdatasync(fd)
                dfd = os.open(d, os.O_RDONLY)
                os.fsync(dfd)
                os.close(dfd)
                os.fdatasync(log)
            times[way].append(time.perf_counter() - t0)
            os.close(fd)
            names.append(name)
    for name in names:
        os.unlink(name)
    os.close(log)
    print(f"dir {args.dir}, {args.count} x {args.size} bytes each way, alternating")
    for way, xs in times.items():
        med = statistics.median(xs)
        print(f"{way:10s} median {med * 1e3:.2f} ms ({1 / med:.0f} /s), p90 {statistics.quantiles(xs, n=10)[8] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
