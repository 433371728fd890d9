#!/usr/bin/env python3
"""Generate huren's committed sample DICOM studies.

Writes small, synthetic but realistic studies as DICOM Part-10 files under
sample-dicom/<study>/<series>/<n>.dcm, converts each series to the transfer
syntax assigned to it with dcmtk, validates the result and writes
sample-dicom/manifest.json (read back from the files with pydicom).

Deterministic: UIDs come from generate_uid() with fixed entropy sources, pixel
data from a seeded numpy generator and all dates/times are fixed, so a rerun
with the same pydicom / numpy / dcmtk versions reproduces the same bytes.

Usage (see sample-dicom/README.md):
    /tmp/samples-venv/bin/python sample-dicom/make-samples.py [--out DIR]
        [--no-roundtrip] [--no-iod-check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

# pydicom's UID root; the suffix is a hash of our fixed entropy sources, so
# UIDs are stable across reruns and unique to this sample set.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
UID_NAMESPACE = "huren/sample-dicom/v1"

IMPLEMENTATION_VERSION_NAME = "HUREN_SAMPLES1"  # max 16 chars

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

TS_NAMES = {
    IMPLICIT_LE: "Implicit VR Little Endian",
    EXPLICIT_LE: "Explicit VR Little Endian",
    DEFLATED_LE: "Deflated Explicit VR Little Endian",
    EXPLICIT_BE: "Explicit VR Big Endian (retired)",
    JPEG_BASELINE: "JPEG Baseline (Process 1), lossy 8-bit",
    JPEG_EXTENDED: "JPEG Extended (Process 2 & 4), lossy 12-bit",
    JPEG_LOSSLESS_SV1: "JPEG Lossless, Non-Hierarchical, First-Order Prediction (SV1)",
    JPEG_LS_LOSSLESS: "JPEG-LS Lossless",
    RLE_LOSSLESS: "RLE Lossless",
}

LOSSY_TS = {JPEG_BASELINE, JPEG_EXTENDED}

# dcmtk command (argv prefix; input and output paths are appended) that turns
# an Explicit VR Little Endian file into the given transfer syntax.
# "+un": never invent a new SOP Instance UID (we give every lossy series its
# own UIDs instead, and dcmtk's invented UIDs would be random).
DCMTK_CONVERT = {
    IMPLICIT_LE: ["dcmconv", "+ti"],
    EXPLICIT_BE: ["dcmconv", "+tb"],
    DEFLATED_LE: ["dcmconv", "+td"],
    JPEG_LOSSLESS_SV1: ["dcmcjpeg", "+e1", "+un"],
    JPEG_LS_LOSSLESS: ["dcmcjpls", "+el", "+un"],
    RLE_LOSSLESS: ["dcmcrle", "+un"],
    # "+sr": scale by the full bit range, i.e. keep the stored values (dcmtk's
    # default "+sp" stretches min..max to the full range for lossy processes).
    JPEG_BASELINE: ["dcmcjpeg", "+eb", "+q", "90", "+sr", "+un"],
    JPEG_EXTENDED: ["dcmcjpeg", "+ee", "+q", "90", "+sr", "+un"],
}
# dcmtk command that decompresses back to Explicit VR Little Endian (for the
# pixel check); uncompressed syntaxes go through dcmconv.
DCMTK_DECOMPRESS = {
    JPEG_LOSSLESS_SV1: ["dcmdjpeg"],
    JPEG_BASELINE: ["dcmdjpeg"],
    JPEG_EXTENDED: ["dcmdjpeg"],
    JPEG_LS_LOSSLESS: ["dcmdjpls"],
    RLE_LOSSLESS: ["dcmdrle"],
}

# storescu option that proposes the given transfer syntax (storescp runs with +xa)
STORESCU_PROPOSE = {
    IMPLICIT_LE: "-xi",
    EXPLICIT_LE: "-xe",
    DEFLATED_LE: "-xd",
    EXPLICIT_BE: "-xb",
    JPEG_BASELINE: "-xy",
    JPEG_EXTENDED: "-xx",
    JPEG_LOSSLESS_SV1: "-xs",
    JPEG_LS_LOSSLESS: "-xt",
    RLE_LOSSLESS: "-xr",
}

# Debian's dcmtk lives in /usr/bin; PATH may hold same-named shims first.
DCMTK_BIN = Path(os.environ.get("DCMTK_BIN", "/usr/bin"))


def dcmtk(name: str) -> str:
    p = DCMTK_BIN / name
    if not p.exists():
        sys.exit(f"dcmtk tool {p} not found (apt-get install dcmtk)")
    return str(p)


def uid(*parts: object) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[UID_NAMESPACE, *map(str, parts)])


IMPLEMENTATION_CLASS_UID = uid("implementation-class")

# --------------------------------------------------------------------------
# Study descriptions
# --------------------------------------------------------------------------


@dataclass
class Patient:
    key: str
    patient_id: str
    name: str  # PN, already in DICOM form
    birth_date: str
    sex: str
    charset: str  # SpecificCharacterSet, "" for default repertoire
    weight: str
    size: str


@dataclass
class Series:
    key: str  # folder name: "<number>-<slug>"
    number: int
    description: str
    n_images: int
    ts: str
    extra: dict = field(default_factory=dict)


@dataclass
class Study:
    key: str  # folder name
    patient: Patient
    kind: str  # "ct-chest" | "ct-head" | "mr-knee" | "dx-chest"
    date: str
    time: str
    accession: str
    study_id: str
    description: str
    referring: str
    body_part: str
    series: list[Series]


PATIENTS = {
    "p1": Patient("p1", "HUR-100001", "Zhang^San=张^三", "19580412", "M", "ISO_IR 192", "78", "1.74"),
    "p2": Patient("p2", "HUR-100002", "O'Brien^Anna^Marie", "19850923", "F", "", "64", "1.68"),
    "p3": Patient("p3", "HUR-100003", "Doe^John^Q", "19720101", "M", "", "91", "1.83"),
}

INSTITUTION = "Huren General Hospital"
ISSUER = "HUREN-GENERAL"
MANUFACTURER = "Huren Synthetic Imaging"

STUDIES = [
    Study(
        "p1-ct-chest-2024", PATIENTS["p1"], "ct-chest", "20240314", "091502",
        "ACC2403140017", "4711", "CT CHEST", "Weber^Klaus^^Dr.", "CHEST",
        [
            Series("1-chest-native", 1, "CHEST 5.0 B30f native", 6, EXPLICIT_LE),
            Series("2-chest-contrast", 2, "CHEST 5.0 B30f C+ venous", 6, JPEG_LOSSLESS_SV1,
                   {"contrast": True}),
        ],
    ),
    Study(
        "p1-ct-head-2019", PATIENTS["p1"], "ct-head", "20190702", "224811",
        "ACC1907020342", "2093", "CT HEAD", "Schmidt^Eva^^Dr.", "HEAD",
        [
            Series("1-head-brain", 1, "HEAD 5.0 H30s brain", 5, IMPLICIT_LE),
            Series("2-head-bone", 2, "HEAD 5.0 H70h bone", 5, EXPLICIT_BE, {"bone": True}),
        ],
    ),
    Study(
        "p2-mr-knee-2025", PATIENTS["p2"], "mr-knee", "20250117", "143020",
        "ACC2501170088", "5120", "MR KNEE LEFT", "Novak^Petra", "KNEE",
        [
            Series("1-sag-pd-fs", 1, "SAG PD FS", 4, JPEG_LS_LOSSLESS, {"plane": "sag"}),
            Series("2-cor-t1", 2, "COR T1", 4, RLE_LOSSLESS, {"plane": "cor"}),
        ],
    ),
    Study(
        "p3-dx-chest-2023", PATIENTS["p3"], "dx-chest", "20230905", "080145",
        "ACC2309050004", "3301", "XR CHEST PA", "Okafor^Chinedu", "CHEST",
        [
            Series("1-chest-pa", 1, "CHEST PA", 1, DEFLATED_LE, {"view": "PA", "bits": 12}),
        ],
    ),
    Study(
        "p3-dx-chest-2025", PATIENTS["p3"], "dx-chest", "20250611", "102233",
        "ACC2506110051", "6402", "XR CHEST PA AND LATERAL", "Okafor^Chinedu", "CHEST",
        [
            Series("1-chest-pa-8bit", 1, "CHEST PA", 1, JPEG_BASELINE, {"view": "PA", "bits": 8}),
            Series("2-chest-lat", 2, "CHEST LAT", 1, JPEG_EXTENDED, {"view": "LL", "bits": 12}),
        ],
    ),
]

# --------------------------------------------------------------------------
# Synthetic pixel data
# --------------------------------------------------------------------------


def grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1]: u = columns (x), v = rows (y)."""
    c = (np.arange(n) - (n - 1) / 2) / (n / 2)
    v, u = np.meshgrid(c, c, indexing="ij")
    return u, v


def ellipse(u, v, cx, cy, rx, ry):
    return ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0


def smooth(img: np.ndarray, passes: int = 1) -> np.ndarray:
    out = img.astype(np.float64)
    for _ in range(passes):
        p = np.pad(out, 1, mode="edge")
        out = (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] + 4 * p[1:-1, 1:-1]) / 8
    return out


def ct_chest_slice(i: int, n: int, contrast: bool, rng) -> np.ndarray:
    """HU values of an axial chest slice; i=0 is the most cranial slice."""
    u, v = grid(128)
    t = i / max(n - 1, 1)  # 0 (apex side) .. 1 (towards the diaphragm)
    hu = np.full(u.shape, -1000.0)
    hu[ellipse(u, v, 0, 0.02, 0.86, 0.60)] = -100  # subcutaneous fat
    hu[ellipse(u, v, 0, 0.02, 0.80, 0.54)] = 45  # muscle / soft tissue
    # lungs grow towards the base, the heart appears in the lower slices
    lr = 0.26 + 0.06 * t
    hu[ellipse(u, v, -0.38, -0.02, lr, 0.40)] = -860
    hu[ellipse(u, v, 0.38, -0.02, lr, 0.40)] = -860
    # vessels inside the lungs
    for cx, cy in [(-0.45, -0.2), (-0.3, 0.15), (0.42, -0.1), (0.3, 0.2), (-0.5, 0.05)]:
        hu[ellipse(u, v, cx, cy, 0.025, 0.025)] = 40 if not contrast else 160
    blood = 200 if contrast else 42
    if t > 0.3:
        hu[ellipse(u, v, 0.08, 0.05, 0.12 + 0.14 * t, 0.10 + 0.14 * t)] = 55  # myocardium
        hu[ellipse(u, v, 0.1, 0.05, 0.08 + 0.1 * t, 0.06 + 0.1 * t)] = blood  # chambers
    else:
        hu[ellipse(u, v, -0.05, -0.15, 0.07, 0.07)] = blood  # ascending aorta
        hu[ellipse(u, v, 0.08, -0.2, 0.06, 0.05)] = blood  # pulmonary trunk
    hu[ellipse(u, v, -0.12, 0.3, 0.055, 0.055)] = blood  # descending aorta
    # spine and ribs
    hu[ellipse(u, v, 0, 0.44, 0.11, 0.1)] = 1050  # cortical bone
    hu[ellipse(u, v, 0, 0.44, 0.085, 0.075)] = 260  # cancellous bone
    hu[ellipse(u, v, 0, 0.56, 0.035, 0.03)] = 20  # spinal canal
    hu[ellipse(u, v, 0, -0.5, 0.07, 0.03)] = 700  # sternum
    for a in np.linspace(0, 2 * np.pi, 16, endpoint=False):
        if abs(np.cos(a)) > 0.3:  # ribs along the chest wall, not at sternum/spine
            hu[ellipse(u, v, 0.79 * np.cos(a), 0.02 + 0.53 * np.sin(a), 0.035, 0.025)] = 750
    # patient table
    hu[(v > 0.7) & (v < 0.74) & (np.abs(u) < 0.9)] = 150
    hu = smooth(hu) + rng.normal(0, 9, hu.shape)
    hu[u**2 + v**2 > 1.0] = -2024  # outside the reconstruction circle
    return hu


def ct_head_slice(i: int, n: int, bone: bool, rng) -> np.ndarray:
    u, v = grid(128)
    t = i / max(n - 1, 1)
    s = 1.0 - 0.25 * t  # the head gets smaller towards the vertex
    hu = np.full(u.shape, -1000.0)
    hu[ellipse(u, v, 0, 0, 0.66 * s, 0.82 * s)] = 30  # scalp
    hu[ellipse(u, v, 0, 0, 0.62 * s, 0.78 * s)] = 1400  # skull
    hu[ellipse(u, v, 0, 0, 0.56 * s, 0.72 * s)] = 38  # grey matter
    hu[ellipse(u, v, 0, 0, 0.42 * s, 0.58 * s)] = 28  # white matter
    if t < 0.7:
        hu[ellipse(u, v, -0.1, -0.05, 0.05, 0.2 * s)] = 6  # lateral ventricles
        hu[ellipse(u, v, 0.1, -0.05, 0.05, 0.2 * s)] = 6
    hu[(np.abs(u) < 0.012) & ellipse(u, v, 0, 0, 0.56 * s, 0.72 * s)] = 60  # falx
    hu[(v > 0.86) & (v < 0.9) & (np.abs(u) < 0.8)] = 150  # head holder
    if bone:
        hu = hu + rng.normal(0, 35, hu.shape)  # sharp kernel: more noise
    else:
        hu = smooth(hu) + rng.normal(0, 4, hu.shape)
    hu[u**2 + v**2 > 1.0] = -2024
    return hu


def mr_knee_slice(i: int, n: int, plane: str, rng) -> np.ndarray:
    """Signal intensity (unsigned, 12-bit range) of a sagittal PD FS or coronal T1 slice."""
    u, v = grid(128)
    t = i / max(n - 1, 1) - 0.5
    fs = plane == "sag"  # PD fat-sat: fat dark, fluid/cartilage bright
    fat, muscle, marrow, cartilage, fluid = (
        (180, 420, 160, 900, 1500) if fs else (1300, 450, 1250, 600, 300))
    img = np.zeros(u.shape)
    img[ellipse(u, v, 0, 0, 0.78 - 0.1 * abs(t), 0.98)] = fat
    img[ellipse(u, v, 0, 0, 0.68 - 0.1 * abs(t), 0.98)] = muscle
    if plane == "sag":
        img[(np.abs(u + 0.05) < 0.22) & (v < -0.05)] = marrow  # femoral shaft
        img[ellipse(u, v, -0.05, -0.05, 0.34, 0.26)] = marrow  # condyle
        img[(np.abs(u + 0.02) < 0.3) & (v > 0.12)] = marrow  # tibia
        img[ellipse(u, v, -0.05, -0.05, 0.37, 0.29) & ~ellipse(u, v, -0.05, -0.05, 0.34, 0.26)
            & (v > -0.1)] = cartilage
        img[ellipse(u, v, -0.48, -0.12, 0.07, 0.18)] = marrow  # patella
        img[ellipse(u, v, -0.4, -0.3, 0.06, 0.12)] = fluid  # suprapatellar effusion
    else:
        img[(np.abs(u) < 0.25) & (v < -0.1)] = marrow
        img[ellipse(u, v, -0.22, -0.05, 0.2, 0.17)] = marrow  # medial condyle
        img[ellipse(u, v, 0.22, -0.05, 0.2, 0.17)] = marrow  # lateral condyle
        img[(np.abs(u) < 0.45) & (v > 0.15)] = marrow  # tibial plateau
        img[(np.abs(u) < 0.45) & (v > 0.11) & (v <= 0.15)] = cartilage
        img[ellipse(u, v, 0.55, 0.25, 0.07, 0.4)] = marrow  # fibula
    img = smooth(img, 2) + rng.normal(0, 12, u.shape)
    # coil sensitivity falls off at the edges
    img *= 1.15 - 0.35 * (u**2 + v**2)
    return np.clip(img, 0, 4095)


def dx_chest(view: str, bits: int, rng) -> np.ndarray:
    """A 256x256 'for presentation' chest radiograph, MONOCHROME2 (bone bright)."""
    u, v = grid(256)
    img = np.full(u.shape, 0.06)  # direct exposure
    if view == "PA":
        body = (np.abs(u) < 0.82 - 0.12 * (v < -0.6) * (-v - 0.6) * 3) & (v > -0.95)
        img[body] = 0.55
        img[ellipse(u, v, -0.36, 0.0, 0.28, 0.62)] = 0.22  # right lung (viewer's left)
        img[ellipse(u, v, 0.36, 0.0, 0.28, 0.62)] = 0.22
        img[ellipse(u, v, 0.1, 0.25, 0.3, 0.28)] = 0.6  # heart
        img[(np.abs(u) < 0.09) & (v > -0.9)] = 0.72  # spine / mediastinum
        for k in range(9):  # posterior ribs as arcs
            y0 = -0.55 + 0.13 * k
            for side in (-1, 1):
                arc = np.abs(v - (y0 + 0.25 * (np.abs(u) - 0.1) ** 2)) < 0.018
                img[arc & (np.sign(u) == side) & (np.abs(u) > 0.1) & (np.abs(u) < 0.7)] += 0.18
        for side in (-1, 1):  # clavicles
            img[(np.abs(v + 0.62 - 0.1 * np.abs(u)) < 0.03) & (np.sign(u) == side)
                & (np.abs(u) < 0.55)] += 0.25
        abdomen = body & (v > 0.62)
        img[abdomen] = np.maximum(img[abdomen], 0.6)  # diaphragm / abdomen
    else:  # left lateral
        body = ellipse(u, v, 0.0, 0.05, 0.55, 0.95)
        img[body] = 0.5
        img[ellipse(u, v, 0.02, -0.05, 0.42, 0.6)] = 0.25  # lungs superimposed
        img[ellipse(u, v, -0.15, 0.28, 0.25, 0.25)] = 0.55  # heart (anterior)
        img[(u > 0.42) & (u < 0.55) & (v > -0.9) & (v < 0.7)] = 0.75  # thoracic spine
        img[(u < -0.5) & (u > -0.56) & (v > -0.6) & (v < 0.3)] = 0.7  # sternum
        abdomen = body & (v > 0.62)
        img[abdomen] = np.maximum(img[abdomen], 0.6)
    img = smooth(img, 3) + rng.normal(0, 0.012, u.shape)
    maxval = (1 << bits) - 1
    return np.clip(img * maxval, 0, maxval)


# --------------------------------------------------------------------------
# Dataset construction
# --------------------------------------------------------------------------


def age(birth: str, on: str) -> str:
    y = int(on[:4]) - int(birth[:4]) - ((on[4:]) < birth[4:])
    return f"{y:03d}Y"


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    d = Dataset()
    d.CodeValue = value
    d.CodingSchemeDesignator = scheme
    d.CodeMeaning = meaning
    return d


def base_dataset(study: Study, series: Series, sop_class: str, modality: str,
                 inst: int) -> Dataset:
    p = study.patient
    ds = Dataset()
    if p.charset:
        ds.SpecificCharacterSet = p.charset
    ds.InstanceCreationDate = study.date
    ds.InstanceCreationTime = study.time
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid(study.key, series.key, "instance", inst)
    ds.StudyDate = study.date
    ds.SeriesDate = study.date
    ds.AcquisitionDate = study.date
    ds.ContentDate = study.date
    hh, mm, ss = int(study.time[:2]), int(study.time[2:4]), int(study.time[4:6])
    secs = hh * 3600 + mm * 60 + ss + 120 * series.number + inst
    st = f"{secs // 3600 % 24:02d}{secs // 60 % 60:02d}{secs % 60:02d}"
    ds.StudyTime = study.time
    ds.SeriesTime = st
    ds.AcquisitionTime = st
    ds.ContentTime = st
    ds.AccessionNumber = study.accession
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = INSTITUTION
    ds.InstitutionAddress = "1 Example Road, Springfield"
    ds.ReferringPhysicianName = study.referring
    ds.StationName = {"CT": "CT01", "MR": "MR02", "DX": "DR03"}[modality]
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.InstitutionalDepartmentName = "Radiology"
    ds.OperatorsName = "Tech^Alex"
    ds.ManufacturerModelName = {"CT": "Phantom CT 64", "MR": "Phantom MR 1.5T",
                                "DX": "Phantom DR"}[modality]
    ds.PatientName = p.name
    ds.PatientID = p.patient_id
    ds.IssuerOfPatientID = ISSUER
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = p.sex
    ds.PatientAge = age(p.birth_date, study.date)
    ds.PatientSize = p.size
    ds.PatientWeight = p.weight
    ds.BodyPartExamined = study.body_part
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "synthetic-1.0"
    ds.StudyInstanceUID = uid(study.key, "study")
    ds.SeriesInstanceUID = uid(study.key, series.key, "series")
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = inst
    return ds


def set_pixels(ds: Dataset, arr: np.ndarray, bits_alloc: int, bits_stored: int, signed: bool):
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = bits_alloc
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {(8, False): "u1", (16, False): "<u2", (16, True): "<i2"}[(bits_alloc, signed)]
    data = np.rint(arr).astype(dtype)
    ds.PixelData = data.tobytes()
    ds["PixelData"].VR = "OB" if bits_alloc == 8 else "OW"
    return data


def ct_instance(study: Study, series: Series, inst: int, rng) -> tuple[Dataset, np.ndarray]:
    ds = base_dataset(study, series, CT_IMAGE_STORAGE, "CT", inst)
    head = study.kind == "ct-head"
    bone = series.extra.get("bone", False)
    contrast = series.extra.get("contrast", False)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    if contrast:
        ds.ContrastBolusAgent = "Iohexol 350 mg/ml"
        ds.ContrastBolusRoute = "IV"
        ds.ContrastBolusVolume = "80"
        ds.ContrastBolusStartTime = study.time
        ds.ContrastBolusTotalDose = "80"
        ds.ContrastFlowRate = "3"
        ds.ContrastFlowDuration = "27"
        ds.ContrastBolusIngredient = "IODINE"
        ds.ContrastBolusIngredientConcentration = "350"
        ds.ContrastBolusAgentSequence = Sequence([code_item("C-B0322", "SRT", "Iohexol")])
    fov = 230.0 if head else 350.0
    thickness = 5.0
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = f"{thickness:.1f}"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = f"{fov:.0f}"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = 280 if head else 180
    ds.Exposure = 140 if head else 90
    ds.FilterType = "FLAT"
    ds.GeneratorPower = "30"
    ds.FocalSpots = "1.2"
    ds.ConvolutionKernel = "H70h" if bone else ("H30s" if head else "B30f")
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = uid(study.key, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    n = series.n_images
    ps = fov / 128
    z = (20.0 + (inst - 1) * thickness) if head else (-40.0 - (inst - 1) * thickness)
    ds.ImagePositionPatient = [f"{-fov / 2 + ps / 2:.4f}", f"{-fov / 2 + ps / 2:.4f}", f"{z:.1f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{z:.1f}"
    ds.PixelSpacing = [f"{ps:.6f}", f"{ps:.6f}"]
    if head:
        hu = ct_head_slice(inst - 1, n, bone, rng)
    else:
        hu = ct_chest_slice(inst - 1, n, contrast, rng)
    stored = set_pixels(ds, np.clip(hu + 1024, -1000, 3071), 16, 16, signed=True)
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    if head and bone:
        ds.WindowCenter, ds.WindowWidth = ["600", "40"], ["2800", "80"]
        ds.WindowCenterWidthExplanation = ["BONE", "BRAIN"]
    elif head:
        ds.WindowCenter, ds.WindowWidth = ["40", "600"], ["80", "2800"]
        ds.WindowCenterWidthExplanation = ["BRAIN", "BONE"]
    else:
        ds.WindowCenter, ds.WindowWidth = ["40", "-600"], ["400", "1500"]
        ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
    ds.LossyImageCompression = "00"
    return ds, stored


def mr_instance(study: Study, series: Series, inst: int, rng) -> tuple[Dataset, np.ndarray]:
    ds = base_dataset(study, series, MR_IMAGE_STORAGE, "MR", inst)
    plane = series.extra["plane"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.Laterality = "L"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = ["SK", "SP"] if plane == "sag" else "SP"
    ds.ScanOptions = ["FS", "PFP"] if plane == "sag" else "PFP"
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = "*tse2d1_7" if plane == "sag" else "*se2d1"
    ds.AngioFlag = "N"
    thickness = 3.0
    ds.SliceThickness = f"{thickness:.1f}"
    ds.RepetitionTime = "3200" if plane == "sag" else "550"
    ds.EchoTime = "33" if plane == "sag" else "12"
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "63.676"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = "1.5"
    ds.SpacingBetweenSlices = "3.3"
    ds.EchoTrainLength = "7" if plane == "sag" else "1"
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.ReceiveCoilName = "Knee 15"
    ds.TransmitCoilName = "Body"
    ds.AcquisitionMatrix = [0, 128, 128, 0]
    ds.InPlanePhaseEncodingDirection = "ROW"
    ds.FlipAngle = "150" if plane == "sag" else "90"
    ds.PatientPosition = "FFS"
    ds.FrameOfReferenceUID = uid(study.key, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    fov = 160.0
    ps = fov / 128
    off = (inst - 1 - (series.n_images - 1) / 2) * 3.3
    if plane == "sag":  # rows along +y (posterior), columns along -z (foot)
        ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
        ds.ImagePositionPatient = [f"{80 + off:.2f}", f"{-fov / 2:.2f}", f"{-420 + fov / 2:.2f}"]
        ds.SliceLocation = f"{80 + off:.2f}"
    else:
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        ds.ImagePositionPatient = [f"{80 - fov / 2:.2f}", f"{off:.2f}", f"{-420 + fov / 2:.2f}"]
        ds.SliceLocation = f"{off:.2f}"
    ds.PixelSpacing = [f"{ps:.4f}", f"{ps:.4f}"]
    img = mr_knee_slice(inst - 1, series.n_images, plane, rng)
    stored = set_pixels(ds, img, 16, 12, signed=False)
    ds.WindowCenter = "700" if plane == "sag" else "800"
    ds.WindowWidth = "1500" if plane == "sag" else "1600"
    ds.LossyImageCompression = "00"
    return ds, stored


def dx_instance(study: Study, series: Series, inst: int, rng) -> tuple[Dataset, np.ndarray]:
    ds = base_dataset(study, series, DX_PRESENTATION_STORAGE, "DX", inst)
    view = series.extra["view"]
    bits = series.extra["bits"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ViewPosition = view
    ds.ViewCodeSequence = Sequence([
        code_item("399348003", "SCT", "postero-anterior")
        if view == "PA" else code_item("260318008", "SCT", "left lateral")])
    ds.PatientOrientation = ["L", "F"] if view == "PA" else ["A", "F"]
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = Sequence([code_item("43799004", "SCT", "Chest")])
    ds.AcquisitionContextSequence = Sequence([])
    ds.PatientPosition = ""
    ds.PositionerType = "COLUMN"
    ds.KVP = "125" if view == "PA" else "120"
    ds.ExposureTime = "8" if view == "PA" else "20"
    ds.XRayTubeCurrent = 320
    ds.Exposure = 3 if view == "PA" else 6
    ds.DistanceSourceToDetector = "1800"
    ds.DistanceSourceToPatient = "1650"
    ds.DetectorType = "SCINTILLATOR"
    ds.DetectorConfiguration = "AREA"
    ds.DetectorID = "DET-0042"
    ds.Grid = "FOCUSED"
    ds.ImagerPixelSpacing = ["1.68", "1.68"]
    ds.PixelSpacing = ["1.54", "1.54"]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "Corrected for the estimated magnification"
    ds.EstimatedRadiographicMagnificationFactor = "1.09"
    ds.FieldOfViewShape = "RECTANGLE"
    ds.FieldOfViewDimensions = [430, 430]
    img = dx_chest(view, bits, rng)
    stored = set_pixels(ds, img, 8 if bits == 8 else 16, bits, signed=False)
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    maxval = (1 << bits) - 1
    ds.WindowCenter = str((maxval + 1) // 2)
    ds.WindowWidth = str(maxval + 1)
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.QualityControlImage = "NO"
    return ds, stored


BUILDERS = {"ct-chest": ct_instance, "ct-head": ct_instance, "mr-knee": mr_instance,
            "dx-chest": dx_instance}


def write_part10(ds: Dataset, path: Path):
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = EXPLICIT_LE
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = "HUREN_SAMPLES"
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def check_run(argv: list[str]) -> subprocess.CompletedProcess:
    r = run(argv)
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(argv)}\n{r.stdout}{r.stderr}")
    return r


def generate(out: Path, tmp: Path) -> dict[str, np.ndarray]:
    """Write every file; returns the original pixel arrays keyed by relative path."""
    originals: dict[str, np.ndarray] = {}
    for study in STUDIES:
        shutil.rmtree(out / study.key, ignore_errors=True)
        for series in study.series:
            rng = np.random.default_rng(
                int.from_bytes(hashlib.sha256(f"{study.key}/{series.key}".encode()).digest()[:8],
                               "little"))
            for inst in range(1, series.n_images + 1):
                ds, stored = BUILDERS[study.kind](study, series, inst, rng)
                rel = f"{study.key}/{series.key}/{inst}.dcm"
                dest = out / rel
                if series.ts == EXPLICIT_LE:
                    write_part10(ds, dest)
                else:
                    src = tmp / "src.dcm"
                    write_part10(ds, src)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    prog, *args = DCMTK_CONVERT[series.ts]
                    check_run([dcmtk(prog), *args, str(src), str(dest)])
                originals[rel] = stored
    return originals


def validate(out: Path, tmp: Path, originals: dict[str, np.ndarray], iod_check: bool) -> list[dict]:
    """Read back every file (pydicom, dcmdump, optionally dciodvfy), check the pixels.

    Returns the manifest entries."""
    entries = []
    failures = []
    expected_ts = {f"{s.key}/{se.key}/": se.ts for s in STUDIES for se in s.series}
    for rel, orig in sorted(originals.items()):
        path = out / rel
        ds = pydicom.dcmread(path)  # raises on a malformed file
        ts = str(ds.file_meta.TransferSyntaxUID)
        want_ts = next(v for k, v in expected_ts.items() if rel.startswith(k))
        if ts != want_ts:
            failures.append(f"{rel}: transfer syntax {ts}, expected {want_ts}")
        if ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID:
            failures.append(f"{rel}: meta/dataset SOP Instance UID mismatch")
        ds.PatientName  # decode the (possibly UTF-8) PN
        r = run([dcmtk("dcmdump"), "+E", str(path)])
        if r.returncode != 0 or re.search(r"^[EW]: ", r.stderr + r.stdout, re.M):
            failures.append(f"{rel}: dcmdump: {r.stderr.strip()}")
        # decode to Explicit VR Little Endian with dcmtk (pydicom needs no codec plugins)
        decoded = tmp / "decoded.dcm"
        prog, *dargs = DCMTK_DECOMPRESS.get(ts, ["dcmconv", "+te"])
        check_run([dcmtk(prog), *dargs, str(path), str(decoded)])
        if iod_check and shutil.which("dciodvfy"):
            r = run(["dciodvfy", "-new", str(decoded)])
            errs = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
            if errs:
                failures.append(f"{rel}: dciodvfy: " + "; ".join(errs))
        # pixels: lossless syntaxes must round-trip exactly
        got = pydicom.dcmread(decoded).pixel_array
        if got.shape != orig.shape:
            failures.append(f"{rel}: pixel shape {got.shape} != {orig.shape}")
        elif ts in LOSSY_TS:
            diff = np.abs(got.astype(np.int64) - orig.astype(np.int64))
            if diff.mean() > 0.01 * (1 << int(ds.BitsStored)):
                failures.append(f"{rel}: lossy error too large (mean {diff.mean():.1f})")
        elif not np.array_equal(got, orig):
            failures.append(f"{rel}: pixel data differs after {TS_NAMES[ts]} roundtrip")
        data = path.read_bytes()
        study_key, series_key, _ = rel.split("/")
        entries.append({
            "path": rel,
            "study": study_key,
            "series": series_key,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "transfer_syntax_uid": ts,
            "sop_class_uid": str(ds.SOPClassUID),
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "study_instance_uid": str(ds.StudyInstanceUID),
            "series_instance_uid": str(ds.SeriesInstanceUID),
            "patient_id": str(ds.PatientID),
            "patient_name": str(ds.PatientName),
            "specific_character_set": ds.get("SpecificCharacterSet", ""),
            "modality": str(ds.Modality),
            "study_date": str(ds.StudyDate),
            "accession_number": str(ds.AccessionNumber),
            "series_number": int(ds.SeriesNumber),
            "instance_number": int(ds.InstanceNumber),
            "rows": int(ds.Rows),
            "columns": int(ds.Columns),
            "bits_allocated": int(ds.BitsAllocated),
            "bits_stored": int(ds.BitsStored),
            "pixel_representation": int(ds.PixelRepresentation),
        })
    sops = [e["sop_instance_uid"] for e in entries]
    if len(set(sops)) != len(sops):
        failures.append("duplicate SOP Instance UIDs in the set")
    if failures:
        sys.exit("validation failed:\n  " + "\n  ".join(failures))
    return entries


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def roundtrip(out: Path, tmp: Path, entries: list[dict]):
    """Send every file with dcmtk's storescu to dcmtk's storescp and check they all arrive
    in the transfer syntax they are stored in."""
    recv = tmp / "received"
    recv.mkdir()
    port = free_port()
    env = dict(os.environ, TCP_NODELAY="1")
    scp = subprocess.Popen([dcmtk("storescp"), "+xa", "-od", str(recv), str(port)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(100):
            if run([dcmtk("echoscu"), "127.0.0.1", str(port)], env=env).returncode == 0:
                break
            time.sleep(0.05)
        else:
            sys.exit("storescp did not come up")
        # storescu proposes one family of transfer syntaxes per run: send each
        # transfer syntax on its own association, proposing that syntax first.
        for ts in sorted({e["transfer_syntax_uid"] for e in entries}):
            files = [str(out / e["path"]) for e in entries if e["transfer_syntax_uid"] == ts]
            r = run([dcmtk("storescu"), STORESCU_PROPOSE[ts], "127.0.0.1", str(port), *files],
                    env=env)
            if r.returncode != 0:
                sys.exit(f"storescu failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    got = {}
    for f in recv.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        got[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
    missing = [e["path"] for e in entries if e["sop_instance_uid"] not in got]
    if missing:
        sys.exit(f"roundtrip: {len(missing)} instances did not arrive: {missing}")
    changed = [f"{e['path']} ({e['transfer_syntax_uid']} -> {got[e['sop_instance_uid']]})"
               for e in entries if got[e["sop_instance_uid"]] != e["transfer_syntax_uid"]]
    print(f"roundtrip: {len(got)}/{len(entries)} instances received by storescp")
    for c in changed:
        print(f"  received in another transfer syntax: {c}")


def studies_table(entries: list[dict]) -> str:
    lines = [
        "| Study folder | Patient ID | Patient name | Modality | Study date | Body part "
        "| Series (instances: transfer syntax UID) | Instances |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for study in STUDIES:
        es = [e for e in entries if e["study"] == study.key]
        series = "<br>".join(
            f"`{se.key}` ({sum(1 for e in es if e['series'] == se.key)}: "
            f"`{se.ts}` {TS_NAMES[se.ts]})" for se in study.series)
        p = study.patient
        cs = f" ({p.charset})" if p.charset else ""
        d = study.date
        lines.append(
            f"| `{study.key}` | {p.patient_id} | {p.name}{cs} | {es[0]['modality']} "
            f"| {d[:4]}-{d[4:6]}-{d[6:]} | {study.body_part} | {series} | {len(es)} |")
    return "\n".join(lines)


def update_readme(out: Path, entries: list[dict]):
    readme = out / "README.md"
    if not readme.exists():
        return
    text = readme.read_text()
    begin, end = "<!-- BEGIN GENERATED STUDIES TABLE -->", "<!-- END GENERATED STUDIES TABLE -->"
    if begin not in text or end not in text:
        return
    total = sum(e["size"] for e in entries)
    body = (f"{studies_table(entries)}\n\n{len(entries)} files, {total:,} bytes "
            f"({len({e['transfer_syntax_uid'] for e in entries})} transfer syntaxes).")
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    readme.write_text(f"{pre}{begin}\n{body}\n{end}{post}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                    help="output folder (default: the folder of this script)")
    ap.add_argument("--no-roundtrip", action="store_true",
                    help="skip the storescu -> storescp network check")
    ap.add_argument("--no-iod-check", action="store_true",
                    help="skip dciodvfy (dicom3tools) even if it is installed")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="huren-samples-") as t:
        tmp = Path(t)
        originals = generate(out, tmp)
        entries = validate(out, tmp, originals, not args.no_iod_check)
        manifest = {
            "generator": "sample-dicom/make-samples.py",
            "pydicom_version": pydicom.__version__,
            "numpy_version": np.__version__,
            "dcmtk_version": run([dcmtk("dcmconv"), "--version"]).stdout.split("\n")[0].strip(),
            "uid_prefix": UID_PREFIX,
            "file_count": len(entries),
            "total_bytes": sum(e["size"] for e in entries),
            "transfer_syntaxes": {ts: TS_NAMES[ts] for ts in
                                  sorted({e["transfer_syntax_uid"] for e in entries})},
            "files": entries,
        }
        (out / "manifest.json").write_text(
            json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        update_readme(out, entries)
        print(studies_table(entries))
        print(f"\n{len(entries)} files, {manifest['total_bytes']:,} bytes, "
              f"{len(manifest['transfer_syntaxes'])} transfer syntaxes; all valid")
        if not args.no_roundtrip:
            roundtrip(out, tmp, entries)


if __name__ == "__main__":
    main()
