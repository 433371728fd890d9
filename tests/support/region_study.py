"""Copies a sample study for region tests: fresh UIDs (derived from a seed,
so a test can name them) and, optionally, the patient's resident ID number
in OtherPatientIDsSequence under a given issuer, as a hospital's RIS would
put it there.

    region_study.py --syntax FILE...      (the files' transfer syntaxes)
    region_study.py SRC_DIR OUT_DIR SEED [--resident-id N] [--issuer I]
                    [--patient-id P] [--limit K] [--study-uid U]
                    [--set Keyword=Value]...

Prints one JSON line: {"study_instance_uid": ..., "files": [...],
"patient_id", "patient_name", "patient_birth_date"} (the last three so that
the PHI test knows what must never reach the registry).
"""
import argparse
import hashlib
import json
import pathlib
import sys

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence


def uid(seed, *parts):
    # 2.25 + a decimal of 128 hash bits: a valid UID (PS3.5 B.2) that the
    # same seed and parts always give.
    digest = hashlib.sha256("/".join((seed,) + parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def main():
    if sys.argv[1:2] == ["--syntax"]:
        # The transfer syntax of each file named, for storescu's options.
        for f in sys.argv[2:]:
            meta = pydicom.dcmread(f, stop_before_pixels=True).file_meta
            print(json.dumps({"file": f, "transfer_syntax_uid": str(meta.TransferSyntaxUID)}))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("seed")
    ap.add_argument("--resident-id")
    ap.add_argument("--issuer", default="RESIDENT_ID")
    ap.add_argument("--patient-id")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--study-uid", help="add to this study instead of a new one")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        help="Keyword=Value on every file (Keyword= removes it); "
        "Keyword@N=Value on the N-th file (0-based) only",
    )
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(pathlib.Path(a.src).rglob("*.dcm"))
    if a.limit:
        files = files[: a.limit]
    study_uid = a.study_uid or uid(a.seed, "study")
    written = []
    phi = {}
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = uid(a.seed, "series", ds.SeriesInstanceUID)
        ds.SOPInstanceUID = uid(a.seed, "instance", ds.SOPInstanceUID)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if a.patient_id:
            ds.PatientID = a.patient_id
        if a.resident_id:
            # The person the number names: a resident ID number encodes the
            # birth date and the sex (GB 11643), and a node never publishes
            # a study whose header says otherwise.
            rid = a.resident_id.upper()
            if len(rid) == 18 and rid[:17].isdigit():
                ds.PatientBirthDate = rid[6:14]
                ds.PatientSex = "M" if int(rid[16]) % 2 else "F"
            item = Dataset()
            item.PatientID = a.resident_id
            item.IssuerOfPatientID = a.issuer
            item.TypeOfPatientID = "TEXT"
            ds.OtherPatientIDsSequence = Sequence([item])
        for setting in a.set:
            key, value = setting.split("=", 1)
            if "@" in key:
                key, n = key.split("@", 1)
                if int(n) != i:
                    continue
            if value == "" and key in ds:
                delattr(ds, key)
            elif value != "":
                setattr(ds, key, value)
        phi = {
            "patient_id": str(ds.PatientID),
            "patient_name": str(ds.PatientName),
            "patient_birth_date": str(ds.get("PatientBirthDate", "")),
        }
        target = out / f"{i:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        written.append(str(target))
    print(json.dumps({"study_instance_uid": study_uid, "files": written, **phi}))


if __name__ == "__main__":
    main()
