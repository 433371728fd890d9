#!/usr/bin/env python3
"""pynetdicom/pydicom side of huren's interop matrix (tests/interop.rs).

Prints JSON lines on stdout.

  scps OUTDIR TS...        one pynetdicom Storage SCP per transfer syntax,
                           each on its own loopback port, each accepting
                           every storage SOP class in that one syntax only;
                           prints {"ts", "port"} per SCP, then {"ready": true},
                           and serves until stdin closes. What an SCP receives
                           goes to OUTDIR/<n>/<SOP Instance UID>.dcm exactly
                           as received (file meta + the data set's bytes).
  orthanc-files URL OUTDIR every instance Orthanc holds, as the file it stored
  compare                  stdin: JSON list of [received, original]; one line
                           per pair: the received file's transfer syntax,
                           whether its data set bytes equal the original's
                           (when both are in the same syntax; deflated
                           streams compared inflated), and the largest
                           difference between their decoded pixels
"""
import json
import sys
import threading
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts


def out(**kw):
    print(json.dumps(kw), flush=True)


def scps(outdir, syntaxes):
    servers = []
    for n, ts in enumerate(syntaxes):
        target = Path(outdir) / str(n)
        target.mkdir(parents=True, exist_ok=True)

        def on_store(event, target=target):
            uid = event.request.AffectedSOPInstanceUID
            # As received: file meta for the negotiated syntax, then the
            # data set's bytes untouched (deflated ones still deflated).
            (target / f"{uid}.dcm").write_bytes(event.encoded_dataset())
            return 0x0000

        ae = AE(ae_title=f"PYSCP{n}")
        ae.maximum_pdu_size = 131072
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, [ts])
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )
        servers.append(server)
        out(ts=ts, port=server.server_address[1], dir=str(target))
    out(ready=True)
    # Serve until the test closes our stdin (or dies).
    sys.stdin.read()
    for s in servers:
        s.shutdown()


def orthanc_files(url, outdir):
    target = Path(outdir)
    target.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(f"{url}/instances") as r:
        ids = json.load(r)
    for i in ids:
        with urllib.request.urlopen(f"{url}/instances/{i}/file") as r:
            data = r.read()
        (target / f"{i}.dcm").write_bytes(data)
        out(file=str(target / f"{i}.dcm"))


def data_set_bytes(path):
    """The data set's bytes after the file meta group, inflated if deflated."""
    raw = Path(path).read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    ts = ds.file_meta.TransferSyntaxUID
    # 128-byte preamble + DICM, then the group 2 elements (explicit VR LE).
    pos = 132
    while raw[pos : pos + 2] == b"\x02\x00":
        vr = raw[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length = int.from_bytes(raw[pos + 8 : pos + 12], "little")
            pos += 12 + length
        else:
            length = int.from_bytes(raw[pos + 6 : pos + 8], "little")
            pos += 8 + length
    body = raw[pos:]
    if ts == DeflatedExplicitVRLittleEndian:
        body = zlib.decompressobj(-15).decompress(body)
    return ts, body


def pixels(path):
    ds = dcmread(path)
    return np.asarray(ds.pixel_array).astype(np.int64)


def compare():
    pairs = json.load(sys.stdin)
    for received, original in pairs:
        rts, rbytes = data_set_bytes(received)
        ots, obytes = data_set_bytes(original)
        same_syntax = rts == ots
        try:
            a, b = pixels(received), pixels(original)
            if a.shape != b.shape:
                max_diff = None
            else:
                max_diff = int(np.abs(a - b).max())
            error = None
        except Exception as e:  # the matrix reports it; the test fails on it
            max_diff, error = None, f"{type(e).__name__}: {e}"
        out(
            received=received,
            original=original,
            sop_instance_uid=str(dcmread(received, stop_before_pixels=True).SOPInstanceUID),
            ts=str(rts),
            original_ts=str(ots),
            bytes_equal=(rbytes == obytes) if same_syntax else None,
            max_diff=max_diff,
            error=error,
        )


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "scps":
        scps(args[0], args[1:])
    elif cmd == "orthanc-files":
        orthanc_files(args[0], args[1])
    elif cmd == "compare":
        compare()
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
