#!/usr/bin/env python3
"""pydicom side of huren's lifecycle tests (tests/lifecycle.rs); JSON lines
on stdout like dicom_tool.py.

  study OUTDIR STUDY_UID SERIES PER_SERIES STUDY_DATE PATIENT_ID
        small Secondary Capture instances of one study; one line per file
        (file, study, series, sop)
  kos OUT CODE STUDY_UID SERIES_UID:SOP_UID...
        an IHE IOCM rejection note: a Key Object Selection Document whose
        Concept Name is (CODE, DCM) and whose Current Requested Procedure
        Evidence Sequence names the instances (Secondary Capture)
"""
import json
import os
import sys
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).parent))
from dicom_tool import SC_IMAGE, encode, small_image, write_part10  # noqa: E402

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
MEANINGS = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}


def out(**kw):
    print(json.dumps(kw), flush=True)


def study(outdir, study_uid, series, per_series, study_date, patient_id):
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    n = 0
    for s in range(int(series)):
        series_uid = f"{study_uid}.{s + 1}"
        for i in range(int(per_series)):
            n += 1
            sop = f"{series_uid}.{i + 1}"
            ds = small_image(sop, study_uid, series_uid, patient_id=patient_id, n=n)
            ds.StudyDate = study_date
            ds.SeriesNumber = s + 1
            path = outdir / f"{sop}.dcm"
            write_part10(path, SC_IMAGE, sop, encode(ds))
            out(file=str(path), study=study_uid, series=series_uid, sop=sop)


def code(value):
    c = Dataset()
    c.CodeValue = value
    c.CodingSchemeDesignator = "DCM"
    c.CodeMeaning = MEANINGS.get(value, "Of Interest")
    return c


def kos(path, value, study_uid, refs):
    sop = generate_uid()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = KOS
    ds.SOPInstanceUID = sop
    ds.StudyDate = "20250101"
    ds.ContentDate = "20250101"
    ds.ContentTime = "120000"
    ds.Modality = "KO"
    ds.PatientName = "Test^Patient"
    # KOS_PATIENT_ID: a note naming another patient than its instances'.
    ds.PatientID = os.environ.get("KOS_PATIENT_ID", "LIFECYCLE")
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = [code(value)]
    by_series = {}
    for ref in refs:
        series_uid, sop_uid = ref.split(":")
        by_series.setdefault(series_uid, []).append(sop_uid)
    evidence = Dataset()
    evidence.StudyInstanceUID = study_uid
    evidence.ReferencedSeriesSequence = []
    content = []
    for series_uid, sops in by_series.items():
        s = Dataset()
        s.SeriesInstanceUID = series_uid
        s.ReferencedSOPSequence = []
        for sop_uid in sops:
            r = Dataset()
            r.ReferencedSOPClassUID = SC_IMAGE
            r.ReferencedSOPInstanceUID = sop_uid
            s.ReferencedSOPSequence.append(r)
            item = Dataset()
            item.RelationshipType = "CONTAINS"
            item.ValueType = "IMAGE"
            item.ReferencedSOPSequence = [r]
            content.append(item)
        evidence.ReferencedSeriesSequence.append(s)
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    ds.ContentSequence = content
    write_part10(path, KOS, sop, encode(ds))
    out(file=str(path), sop=sop)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "study":
        study(*args)
    elif cmd == "kos":
        kos(args[0], args[1], args[2], args[3:])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
