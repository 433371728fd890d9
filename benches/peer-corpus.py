#!/usr/bin/env python3
"""Corpus of the peer-retrieval benchmark (benches/peer.sh). Not a test.

    peer-corpus.py --instances N --out DIR [--resident-id ID] [--seed S]

One CT study of N instances, one series: CT Image Storage, Explicit VR
Little Endian, 512x512 signed 16-bit, different pixel data in every
instance (no content-addressed store can deduplicate them), fresh UIDs on
every run. Each file is ~525 kB. The patient carries an
OtherPatientIDsSequence item (IssuerOfPatientID RESIDENT_ID, the given
resident ID number), which a node started with
--identifier-issuers RESIDENT_ID=RID turns into the patient key it
publishes. Writes DIR/0000.dcm ... and prints one JSON line:
{"study_instance_uid", "series_instance_uid", "instances", "bytes"}.

Needs pydicom and numpy (the CI venv, $HOME/.cache/huren-ci/venv).
"""

import argparse
import datetime
import json
import os
import sys

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resident-id", default="11010519491231002X")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    if a.instances < 1:
        sys.exit("--instances must be at least 1")
    os.makedirs(a.out, exist_ok=True)
    if any(f.endswith(".dcm") for f in os.listdir(a.out)):
        sys.exit(f"{a.out} already holds .dcm files")

    rng = np.random.default_rng(a.seed)
    study_uid = generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    now = datetime.datetime.now()
    date = now.strftime("%Y%m%d")
    time = now.strftime("%H%M%S")
    # A smooth, body-like base image; each slice adds its own noise, so
    # the pixel data differ everywhere but look roughly like CT numbers.
    yy, xx = np.mgrid[0:512, 0:512]
    r2 = ((xx - 256) / 200.0) ** 2 + ((yy - 256) / 160.0) ** 2
    base = np.where(r2 < 1.0, 40, -1000).astype(np.int16)

    total = 0
    for i in range(a.instances):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.543.99"
        meta.ImplementationVersionName = "HUREN_BENCH"

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = date
        ds.SeriesDate = date
        ds.ContentDate = date
        ds.StudyTime = time
        ds.SeriesTime = time
        ds.ContentTime = time
        ds.AccessionNumber = "BENCH" + date
        ds.Modality = "CT"
        ds.Manufacturer = "huren bench"
        ds.InstitutionName = "Hospital B"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT CHEST PLAIN"
        ds.SeriesDescription = "CHEST 1.0 B30f"
        ds.ProtocolName = "CHEST PLAIN"
        ds.PatientName = "Bench^Peer"
        ds.PatientID = "BENCH-PEER-0001"
        ds.IssuerOfPatientID = "HOSPB"
        other = Dataset()
        other.PatientID = a.resident_id
        other.IssuerOfPatientID = "RESIDENT_ID"
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = Sequence([other])
        ds.PatientBirthDate = "19491231"
        ds.PatientSex = "F"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = "1.0"
        ds.KVP = "120"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = "1"
        ds.InstanceNumber = str(i + 1)
        ds.ImagePositionPatient = ["-250.0", "-250.0", f"{-i * 1.0:.1f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.SliceLocation = f"{-i * 1.0:.1f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = 512
        ds.Columns = 512
        ds.PixelSpacing = ["0.976562", "0.976562"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        noise = rng.integers(-60, 61, size=(512, 512), dtype=np.int16)
        ds.PixelData = (base + noise).astype("<i2").tobytes()

        path = os.path.join(a.out, f"{i:04d}.dcm")
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        total += os.path.getsize(path)

    print(json.dumps({"study_instance_uid": study_uid, "series_instance_uid": series_uid,
                      "instances": a.instances, "bytes": total}))


if __name__ == "__main__":
    main()
