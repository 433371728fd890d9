#!/usr/bin/env python3
"""Time study-level C-FIND queries over one association (benches/query.sh).

Reads a manifest written by `query-gen.py manifest` (queries per kind and the
number of studies each one must match), opens ONE association to the SCP
(Study Root Query/Retrieve - FIND, plus Verification), and for every query
measures the time from sending the C-FIND-RQ until the final (non-pending)
C-FIND-RSP has been received, all pending responses (matches) included.
Before the queries it times C-ECHOs on the same association: that is the
client's own floor (pynetdicom's reactor and Python decoding), printed with
the figures.

Query (Study Root, QueryRetrieveLevel STUDY, Specific Character Set ISO_IR
192) has the return keys StudyInstanceUID, PatientName, PatientID, StudyDate,
ModalitiesInStudy, NumberOfStudyRelatedInstances, with one (or two) of them
set as matching keys according to the kind:

  patient_id     PatientID = <an existing id>               (1-4 matches)
  patient_name   PatientName = <Family>^<given prefix>*      (~5-20 patients)
  study_date     StudyDate = <3-day range>                   (~80 at 100k studies)
  modality       ModalitiesInStudy = <CT|MR|DX|US|CR>        (10-40% of studies)
  modality_date  ModalitiesInStudy + StudyDate 3-day range

Prints one JSON object: per kind n, p50/p90/p99/mean/min/max in ms, the
mean number of matches, and how many queries returned a count different from
the manifest's (`wrong_count`, with a few examples). Exit status 0 unless the
association failed.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import time

from pydicom.dataset import Dataset
from pynetdicom import AE, transport
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

# pynetdicom leaves Nagle's algorithm on: the C-FIND-RQ goes out as two small
# P-DATA-TF PDUs (command, identifier), and the second then waits for the
# peer's delayed ACK (~40 ms on loopback). Every client in this benchmark
# runs with TCP_NODELAY, like the dcmtk tools (TCP_NODELAY=1).
_create_socket = transport.AssociationSocket._create_socket


def _create_socket_nodelay(self, address):
    sock = _create_socket(self, address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


transport.AssociationSocket._create_socket = _create_socket_nodelay

RETURN_KEYS = ["StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "ModalitiesInStudy",
               "NumberOfStudyRelatedInstances"]


def identifier(q: dict) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = "STUDY"
    for k in RETURN_KEYS:
        setattr(ds, k, q.get(k, ""))
    return ds


def stats(ms: list[float]) -> dict:
    ms = sorted(ms)
    if len(ms) >= 2:
        qs = statistics.quantiles(ms, n=100, method="inclusive")
        p50, p90, p99 = statistics.median(ms), qs[89], qs[98]
    else:
        p50 = p90 = p99 = ms[0]
    return {"n": len(ms), "p50_ms": round(p50, 3), "p90_ms": round(p90, 3), "p99_ms": round(p99, 3),
            "mean_ms": round(statistics.fmean(ms), 3), "min_ms": round(ms[0], 3), "max_ms": round(ms[-1], 3)}


def run_query(assoc, prepared) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    matches, status_code = assoc.find(prepared)
    return (time.perf_counter() - t0) * 1000, matches, status_code


# ------------------------------------------------------------ raw client
# A minimal DIMSE requestor on a plain socket: no reactor thread, no polling,
# no decoding of the matches (only counted). It measures the server, not the
# client library. `--client pynetdicom` runs the same queries through
# pynetdicom instead.

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
APP_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPL_UID = "1.2.826.0.1.3680043.8.498.7731.1"

# (tag, VR) of the identifier's elements, in tag order
IDENT_TAGS = {
    "SpecificCharacterSet": (0x00080005, "CS"), "StudyDate": (0x00080020, "DA"),
    "QueryRetrieveLevel": (0x00080052, "CS"), "ModalitiesInStudy": (0x00080061, "CS"),
    "PatientName": (0x00100010, "PN"), "PatientID": (0x00100020, "LO"),
    "StudyInstanceUID": (0x0020000D, "UI"), "NumberOfStudyRelatedInstances": (0x00201208, "IS"),
}


def _elem(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _text(value: str, vr: str) -> bytes:
    b = value.encode("utf-8")
    if len(b) % 2:
        b += b"\0" if vr == "UI" else b" "
    return b


def encode_identifier(q: dict) -> bytes:
    values = {k: "" for k in RETURN_KEYS}
    values.update({k: v for k, v in q.items() if k in IDENT_TAGS})
    values["SpecificCharacterSet"] = "ISO_IR 192"
    values["QueryRetrieveLevel"] = "STUDY"
    items = sorted((IDENT_TAGS[k][0], _text(v, IDENT_TAGS[k][1])) for k, v in values.items())
    return b"".join(_elem(t, v) for t, v in items)


def encode_command(sop_class: str, command_field: int, message_id: int, has_dataset: bool) -> bytes:
    body = (_elem(0x00000002, _text(sop_class, "UI"))
            + _elem(0x00000100, struct.pack("<H", command_field))
            + _elem(0x00000110, struct.pack("<H", message_id))
            + (_elem(0x00000700, struct.pack("<H", 0)) if command_field == 0x0020 else b"")
            + _elem(0x00000800, struct.pack("<H", 0x0102 if has_dataset else 0x0101)))
    return _elem(0x00000000, struct.pack("<I", len(body))) + body


def _item(t: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", t, 0, len(payload)) + payload


def pdata(pcid: int, fragments) -> bytes:
    """One P-DATA-TF with one PDV per (control header, bytes)."""
    pdvs = b"".join(struct.pack(">IB", len(v) + 2, pcid) + bytes([ctl]) + v for ctl, v in fragments)
    return struct.pack(">BBI", 0x04, 0, len(pdvs)) + pdvs


class RawAssociation:
    def __init__(self, host, port, calling, called, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.msg_id = 0
        pcs = b""
        for pcid, uid in ((1, STUDY_ROOT_FIND), (3, VERIFICATION)):
            sub = _item(0x30, uid.encode()) + _item(0x40, IMPLICIT_LE.encode())
            pcs += _item(0x20, bytes([pcid, 0, 0, 0]) + sub)
        user = _item(0x50, _item(0x51, struct.pack(">I", 1 << 20)) + _item(0x52, IMPL_UID.encode()))
        body = (struct.pack(">HH", 1, 0) + calling.encode().ljust(16) + called.encode().ljust(16)
                + bytes(32) + _item(0x10, APP_CONTEXT.encode()) + pcs + user)
        self.sock.sendall(struct.pack(">BBI", 0x01, 0, len(body)) + body)
        t, pdu = self._read_pdu()
        if t != 0x02:
            raise RuntimeError(f"association not accepted (PDU type 0x{t:02X})")
        # presentation context results
        self.accepted = set()
        off = 68
        while off < len(pdu):
            it, ln = pdu[off], struct.unpack(">H", pdu[off + 2:off + 4])[0]
            if it == 0x21 and pdu[off + 6] == 0:
                self.accepted.add(pdu[off + 4])
            off += 4 + ln
        if 1 not in self.accepted:
            raise RuntimeError("Study Root FIND presentation context rejected")

    def _recv(self, n: int):
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("connection closed by peer")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _read_pdu(self):
        t, _, ln = struct.unpack(">BBI", self._recv(6))
        return t, self._recv(ln)

    def _responses(self, pcid_expected):
        """Yield (command bytes, has data set) per response, data sets skipped."""
        cmd = bytearray()
        while True:
            t, pdu = self._read_pdu()
            if t != 0x04:
                raise RuntimeError(f"unexpected PDU type 0x{t:02X} (abort or release)")
            off = 0
            while off < len(pdu):
                ln = struct.unpack(">I", pdu[off:off + 4])[0]
                ctl = pdu[off + 5]
                if ctl & 1:  # command fragment
                    cmd += pdu[off + 6:off + 4 + ln]
                    if ctl & 2:
                        yield bytes(cmd)
                        cmd = bytearray()
                off += 4 + ln

    @staticmethod
    def _status(cmd: bytes) -> int:
        off = 0
        while off + 8 <= len(cmd):
            g, e, ln = struct.unpack("<HHI", cmd[off:off + 8])
            if (g, e) == (0, 0x0900):
                return struct.unpack("<H", cmd[off + 8:off + 10])[0]
            off += 8 + ln
        raise RuntimeError("response without status")

    def echo(self) -> int:
        self.msg_id += 1
        self.sock.sendall(pdata(3, [(0x03, encode_command(VERIFICATION, 0x0030, self.msg_id, False))]))
        for cmd in self._responses(3):
            return self._status(cmd)

    def find(self, identifier: bytes) -> tuple[int, int]:
        self.msg_id += 1
        command = encode_command(STUDY_ROOT_FIND, 0x0020, self.msg_id, True)
        # command and identifier in one P-DATA-TF (one write)
        self.sock.sendall(pdata(1, [(0x03, command), (0x02, identifier)]))
        matches = 0
        for cmd in self._responses(1):
            st = self._status(cmd)
            if st in (0xFF00, 0xFF01):
                matches += 1
            else:
                return matches, st

    def release(self):
        try:
            self.sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))
            self._read_pdu()
        finally:
            self.sock.close()


class PynetdicomAssociation:
    def __init__(self, host, port, calling, called, timeout, loop_delay):
        ae = AE(ae_title=calling)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        self.assoc = ae.associate(host, port, ae_title=called)
        if not self.assoc.is_established:
            raise RuntimeError("association failed")
        if loop_delay is not None:
            self.assoc.dul._run_loop_delay = loop_delay

    def echo(self) -> int:
        st = self.assoc.send_c_echo()
        return st.Status if st else -1

    def find(self, q: dict) -> tuple[int, int]:
        ds = identifier(q)
        matches, code = 0, -1
        for status, _ in self.assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
            if status is None:
                raise RuntimeError("C-FIND: no response (association aborted or timed out)")
            code = status.Status
            if code in (0xFF00, 0xFF01):
                matches += 1
        return matches, code

    def release(self):
        self.assoc.release()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--aec", default="HUREN", help="called AE title")
    ap.add_argument("--aet", default="QUERYBENCH", help="calling AE title")
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--kinds", default="patient_id,patient_name,study_date,modality_date,modality")
    ap.add_argument("--queries", type=int, default=200, help="queries per kind (at most the manifest's)")
    ap.add_argument("--unselective-queries", type=int, default=10,
                    help="queries for the `modality` kind, whose matches are thousands (default 10)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed queries of each kind first")
    ap.add_argument("--echoes", type=int, default=200)
    ap.add_argument("--loop-delay", type=float, default=None,
                    help="pynetdicom DUL reactor idle sleep in s (its default: 0.001)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--client", choices=["raw", "pynetdicom"], default="raw",
                    help="raw: a minimal DIMSE client on a socket (default); pynetdicom: the same through pynetdicom")
    ap.add_argument("--label", default="")
    ap.add_argument("--dump", help="write every timed query (kind, keys, ms, matches, status) to this JSONL file")
    a = ap.parse_args()

    manifest = json.load(open(a.manifest))
    try:
        if a.client == "raw":
            assoc = RawAssociation(a.host, a.port, a.aet, a.aec, a.timeout)
            prepare = encode_identifier
        else:
            assoc = PynetdicomAssociation(a.host, a.port, a.aet, a.aec, a.timeout, a.loop_delay)
            prepare = lambda q: q  # noqa: E731 (the Dataset is built inside the timing, as a caller would)
    except (OSError, RuntimeError) as e:
        print(f"query-client: association to {a.aec}@{a.host}:{a.port} failed: {e}", file=sys.stderr)
        sys.exit(2)
    out = {"label": a.label, "client": a.client, "studies": manifest["studies"], "kinds": {}}
    dump = open(a.dump, "w") if a.dump else None
    try:
        echo = []
        for _ in range(a.echoes):
            t0 = time.perf_counter()
            st = assoc.echo()
            echo.append((time.perf_counter() - t0) * 1000)
            if st != 0:
                raise RuntimeError(f"C-ECHO failed: status {st}")
        if echo:
            out["echo"] = stats(echo)
        for kind in a.kinds.split(","):
            qs = manifest["kinds"][kind]
            n = min(a.unselective_queries if kind == "modality" else a.queries, len(qs))
            for q in qs[:a.warmup]:
                run_query(assoc, prepare(q))
            times, counts, wrong, failed, capped = [], [], [], 0, 0
            t_kind = time.perf_counter()
            for q in qs[:n]:
                ms, matches, code = run_query(assoc, prepare(q))
                if dump:
                    dump.write(json.dumps({"kind": kind, "query": q, "ms": round(ms, 3), "matches": matches,
                                           "status": f"{code:04X}"}, ensure_ascii=False) + "\n")
                if code == 0xA700 and matches > 0:
                    # Out of resources after some matches: the SCP's cap on
                    # matches per query (huren: max_query_matches). Timed,
                    # counted as capped, count not checked.
                    capped += 1
                    times.append(ms)
                    counts.append(matches)
                    continue
                if code != 0:
                    failed += 1
                    if failed <= 3:
                        print(f"query-client: {kind} {q}: final status 0x{code:04X}", file=sys.stderr)
                    continue
                times.append(ms)
                counts.append(matches)
                if matches != q["expect"]:
                    wrong.append({"query": {k: v for k, v in q.items() if k != "expect"},
                                  "expected": q["expect"], "got": matches})
            r = stats(times) if times else {"n": 0}
            r.update(matches_mean=round(statistics.fmean(counts), 1) if counts else 0,
                     matches_min=min(counts, default=0), matches_max=max(counts, default=0),
                     failed=failed, capped=capped, wrong_count=len(wrong), wrong_examples=wrong[:3],
                     seconds=round(time.perf_counter() - t_kind, 2))
            out["kinds"][kind] = r
            print(f"query-client: {a.label} {kind}: p50 {r.get('p50_ms')} ms, p99 {r.get('p99_ms')} ms, "
                  f"{r['matches_mean']} matches, {len(wrong)} wrong counts, {failed} failed, {capped} capped",
                  file=sys.stderr, flush=True)
    finally:
        assoc.release()
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
