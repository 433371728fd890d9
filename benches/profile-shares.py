#!/usr/bin/env python3
"""Inclusive shares of the ingest path's costs in folded stacks.

benches/profile.sh leaves the folded stacks of its last run in
/tmp/huren-profile.folded; copy them aside and compare runs:

    python3 benches/profile-shares.py before.folded after.folded

A sample counts for a row when any frame of its stack matches the row's
patterns, so rows overlap. Not a test. See docs/benchmarks.md.
"""
import sys, collections
pats = {
 "dicom-ul read_pdu": ["dicom_ul::pdu::reader::read_pdu"],
 "receive::receive (own reader)": ["huren::dicom::receive::receive"],
 "staging file create (open O_CREAT / O_TMPFILE)": ["__x64_sys_openat"],
 "  of which on the huren-staging pool thread": ["huren-staging"],
 "  ext4 recently_deleted": ["recently_deleted"],
 "publish (rename/linkat)": ["__x64_sys_rename", "__x64_sys_renameat2", "__x64_sys_renameat", "__x64_sys_linkat"],
 "unlink": ["__x64_sys_unlink", "__x64_sys_unlinkat"],
 "write to page cache (vfs_write)": ["vfs_write"],
 "socket read (tcp_recvmsg)": ["tcp_recvmsg"],
 "SQLite worker": ["sqlx-sqlite-wor"],
 "syncfs": ["__x64_sys_syncfs"],
 "sync_file_range (write-behind)": ["__x64_sys_sync_file_range"],
 "fsync": ["__x64_sys_fsync", "__x64_sys_fdatasync"],
 "BLAKE3": ["blake3"],
 "structural check + header parse": ["huren::part10::check_structure_bytes", "huren::part10::read_attributes_bytes", "huren::part10::check_structure", "huren::part10::read_attributes"],
 "page faults": ["asm_exc_page_fault"],
 "memcpy (user)": ["__memmove_avx512_unaligned_erms", "__memcpy_avx512_unaligned_erms", "__memmove_avx_unaligned_erms"],
}
for path in sys.argv[1:]:
    total = 0; incl = collections.Counter()
    for line in open(path):
        stack, n = line.rsplit(" ", 1); n = int(n); total += n
        frames = stack.split(";")
        for k, ps in pats.items():
            if k.startswith("  of which on the huren-staging"):
                if frames[0].startswith("huren-staging") and any("__x64_sys_openat" in f for f in frames):
                    incl[k] += n
                continue
            if any(any(f.startswith(p) or p in f for p in ps) for f in frames):
                incl[k] += n
    print(path, "samples", total)
    for k in pats:
        print(f"  {100*incl[k]/total:5.1f}%  {k}")
