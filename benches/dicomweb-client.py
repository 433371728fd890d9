#!/usr/bin/env python3
"""DICOMweb benchmark helper (benches/dicomweb.sh). Not a test.

  corpus wado DIR            one study of 500 CT instances (512x512x16 bit,
                             ~0.5 MB each), from make-corpus.py's generator
  corpus qido DIR N          N studies of one tiny instance each (PatientID
                             BENCH-qido-NNNN, PatientName Bench^PatientNNNN)
  qido URL HOST PORT N Q     Q queries of each kind, each timed once as
                             QIDO-RS (HTTP keep-alive, body read and JSON
                             parsed) and once as C-FIND (pynetdicom, one
                             association, until the final response); prints
                             JSON with p50/p99 per kind and protocol
"""

from __future__ import annotations

import importlib.util
import json
import random
import statistics
import sys
import time
from pathlib import Path

here = Path(__file__).resolve().parent


def make_corpus_module():
    spec = importlib.util.spec_from_file_location("make_corpus", here / "make-corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def corpus(kind: str, out: Path, n: int = 0):
    mc = make_corpus_module()
    for k in range(mc.PARTS):
        (out / f"part{k}").mkdir(parents=True, exist_ok=True)
    if kind == "wado":
        mc.write_ct(out, "wado500", 500, 1, mc.ct_base_image())
    else:
        mc.write_tiny(out, "qido", n, n)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def qido(url: str, host: str, port: int, n: int, q: int):
    import requests
    from pydicom.dataset import Dataset
    from pynetdicom import AE, transport
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
    import socket

    # pynetdicom leaves Nagle on; the C-FIND-RQ's second PDU would then wait
    # for a delayed ACK.
    create = transport.AssociationSocket._create_socket

    def nodelay(self, address=("", 0)):
        sock = create(self, address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    transport.AssociationSocket._create_socket = nodelay

    rnd = random.Random(20261126)
    kinds = {
        "patient_id": lambda: {"PatientID": f"BENCH-qido-{rnd.randrange(n):04d}"},
        "patient_name": lambda: {"PatientName": f"Bench^Patient{rnd.randrange(max(1, n // 10)):03d}*"},
    }
    returned = ["StudyInstanceUID", "PatientName", "PatientID", "StudyDate",
                "ModalitiesInStudy", "NumberOfStudyRelatedInstances"]
    session = requests.Session()
    ae = AE(ae_title="BENCHQIDO")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(host, port, ae_title="HUREN")
    assert assoc.is_established, "association refused"
    result = {}
    for kind, make in kinds.items():
        qido_ms, find_ms, counts = [], [], []
        for i in range(q + 5):
            keys = make()
            params = dict(keys)
            params["includefield"] = ",".join(returned)
            t0 = time.perf_counter()
            r = session.get(f"{url}/studies", params=params,
                            headers={"Accept": "application/dicom+json"})
            body = r.json() if r.status_code == 200 else []
            t1 = time.perf_counter()
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.SpecificCharacterSet = "ISO_IR 192"
            for k in returned:
                setattr(ds, k, "")
            for k, v in keys.items():
                setattr(ds, k, v)
            t2 = time.perf_counter()
            matches = 0
            for status, ident in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
                if status and status.Status in (0xFF00, 0xFF01):
                    matches += 1
            t3 = time.perf_counter()
            if i < 5:
                continue  # warm-up
            assert matches == len(body), (kind, keys, matches, len(body))
            qido_ms.append((t1 - t0) * 1000)
            find_ms.append((t3 - t2) * 1000)
            counts.append(matches)
        result[kind] = {
            "n": q,
            "mean_matches": statistics.mean(counts),
            "qido_p50": round(pct(qido_ms, 50), 2), "qido_p99": round(pct(qido_ms, 99), 2),
            "cfind_p50": round(pct(find_ms, 50), 2), "cfind_p99": round(pct(find_ms, 99), 2),
        }
    assoc.release()
    print(json.dumps(result))


def main():
    args = sys.argv[1:]
    if args[0] == "corpus":
        corpus(args[1], Path(args[2]), int(args[3]) if len(args) > 3 else 0)
    elif args[0] == "qido":
        qido(args[1], args[2], int(args[3]), int(args[4]), int(args[5]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
