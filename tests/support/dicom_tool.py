#!/usr/bin/env python3
"""pynetdicom/pydicom side of huren's interop tests.

Every command prints JSON lines on stdout, so the Rust tests assert on exact
values. pynetdicom sends files bit-preserving (STORE_SEND_CHUNKED_DATASET):
the data set bytes reach the node exactly as they are in the file.

  send HOST PORT FILE...          C-STORE each file; one line per file
  send-slow HOST PORT FILE...     same, printing each success as it happens
                                  (the kill -9 test reads this stream)
  bad HOST PORT WORKDIR           truncated / no SOP Instance UID / SOP Class
                                  mismatch data sets; one line per case
  echo HOST PORT                  C-ECHO status
  gen OUTDIR COUNT SEED           COUNT small valid Secondary Capture files
  modify SRC DEST                 copy of SRC with a changed Study Description
  testset                         pydicom's own test files that are valid
                                  storage instances
"""
import json
import os
import sys
import warnings
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, debug_logger  # noqa: F401
from pynetdicom.presentation import StoragePresentationContexts

_config.STORE_SEND_CHUNKED_DATASET = True
# Some test files carry odd values; the node is what is under test, not
# pynetdicom's validation of our inputs.
_config.ENFORCE_UID_CONFORMANCE = False

STORAGE_CLASSES = {cx.abstract_syntax for cx in StoragePresentationContexts}
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def out(**kw):
    print(json.dumps(kw), flush=True)


def meta_of(path):
    ds = dcmread(path, stop_before_pixels=True, force=True)
    fm = ds.file_meta
    return str(fm.MediaStorageSOPClassUID), str(fm.TransferSyntaxUID)


def associate(host, port, contexts, ae_title=None):
    # CALLING_AE_TITLE: tests of the node's per-AE policies.
    ae = AE(ae_title=ae_title or os.environ.get("CALLING_AE_TITLE", "PYNETDICOM"))
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    ae.network_timeout = 120
    for sop_class, ts in sorted(contexts):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(host, int(port), ae_title="HUREN")
    if not assoc.is_established:
        out(error="association not established")
        sys.exit(3)
    return assoc


def send(host, port, files, stream=False):
    files = [str(f) for f in files]
    # One association may carry at most 128 presentation contexts.
    contexts = {meta_of(f) for f in files}
    if len(contexts) > 120:
        sys.exit("too many presentation contexts for one association")
    assoc = associate(host, port, contexts)
    for f in files:
        try:
            rsp = assoc.send_c_store(f)
            status = rsp.Status if rsp and "Status" in rsp else None
        except Exception as e:  # report, keep going
            status = None
            out(file=f, status=None, error=str(e))
            continue
        out(file=f, status=status)
    assoc.release()


def write_part10(path, sop_class, sop_instance, body, ts=ExplicitVRLittleEndian):
    """A Part-10 file whose data set bytes are `body`, exactly."""
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = sop_instance
    fm.TransferSyntaxUID = ts
    fm.ImplementationClassUID = "1.2.3.4"
    from pydicom.filewriter import write_file_meta_info
    from pydicom.filebase import DicomBytesIO

    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = False
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, fm, enforce_standard=True)
    Path(path).write_bytes(buf.getvalue() + body)


def encode(ds):
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = False
    write_dataset(buf, ds)
    return buf.getvalue()


def small_image(sop_instance, study, series, patient_id="BAD-INPUT", sop_class=SC_IMAGE, n=1):
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = "20250101"
    ds.Modality = "OT"
    ds.PatientName = "Test^Patient"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = n
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((n + i) % 256 for i in range(128))
    return ds


def bad(host, port, workdir):
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    cases = []

    # 1. Truncated: a complete data set with its last 40 bytes cut off, so
    #    Pixel Data's length runs past the end.
    uid = generate_uid()
    body = encode(small_image(uid, study, series))
    write_part10(work / "truncated.dcm", SC_IMAGE, uid, body[:-40])
    cases.append(("truncated", work / "truncated.dcm", uid))

    # 2. No SOP Instance UID in the data set (the command still names one).
    uid = generate_uid()
    ds = small_image(uid, study, series)
    del ds.SOPInstanceUID
    write_part10(work / "no-sop-instance.dcm", SC_IMAGE, uid, encode(ds))
    cases.append(("no-sop-instance-uid", work / "no-sop-instance.dcm", uid))

    # 3. The data set says MR while the request and context say CT.
    uid = generate_uid()
    ds = small_image(uid, study, series, sop_class=MR_IMAGE)
    write_part10(work / "class-mismatch.dcm", CT_IMAGE, uid, encode(ds))
    cases.append(("sop-class-mismatch", work / "class-mismatch.dcm", uid))

    # 4. Not DICOM at all after the command.
    uid = generate_uid()
    write_part10(work / "garbage.dcm", SC_IMAGE, uid, os.urandom(3001))
    cases.append(("garbage-data-set", work / "garbage.dcm", uid))

    # 5. A good one on the same association afterwards: still served.
    uid = generate_uid()
    write_part10(work / "good.dcm", SC_IMAGE, uid, encode(small_image(uid, study, series, n=5)))
    cases.append(("good-after-bad", work / "good.dcm", uid))

    contexts = {(SC_IMAGE, ExplicitVRLittleEndian), (CT_IMAGE, ExplicitVRLittleEndian)}
    assoc = associate(host, port, contexts)
    for name, path, uid in cases:
        rsp = assoc.send_c_store(str(path))
        status = rsp.Status if rsp and "Status" in rsp else None
        comment = str(rsp.ErrorComment) if rsp and "ErrorComment" in rsp else None
        out(case=name, sop_instance_uid=uid, status=status, error_comment=comment)
    assoc.release()


def echo(host, port):
    assoc = associate(host, port, {("1.2.840.10008.1.1", ExplicitVRLittleEndian)})
    rsp = assoc.send_c_echo()
    out(status=rsp.Status if rsp else None)
    assoc.release()


def gen(outdir, count, seed):
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    prefix = f"gen-{seed}"
    study = generate_uid(entropy_srcs=[prefix, "study"])
    series = generate_uid(entropy_srcs=[prefix, "series"])
    for n in range(int(count)):
        uid = generate_uid(entropy_srcs=[prefix, str(n)])
        ds = small_image(uid, study, series, patient_id=f"GEN-{seed}", n=n + 1)
        write_part10(outdir / f"{n:05d}.dcm", SC_IMAGE, uid, encode(ds))
    out(study_instance_uid=study, count=int(count))


def big(path, megabytes, truncate_by="0"):
    """One multi-frame Secondary Capture instance of about MEGABYTES MB of
    pixel data (written frame by frame, never whole in memory), optionally
    with its last TRUNCATE_BY bytes cut off."""
    frame = 512 * 512 * 2
    frames = max(1, int(float(megabytes) * 1_000_000) // frame)
    uid = generate_uid()
    ds = small_image(uid, generate_uid(), generate_uid(), patient_id="BIG")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
    ds.Rows, ds.Columns, ds.NumberOfFrames = 512, 512, frames
    del ds.PixelData
    head = encode(ds)
    # Pixel Data (7FE0,0010) OW with its explicit length, then the frames.
    length = frames * frame
    element = b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little")
    write_part10(path, ds.SOPClassUID, uid, head + element)
    with open(path, "ab") as f:
        chunk = bytes(range(256)) * (frame // 256)
        for _ in range(frames):
            f.write(chunk)
    cut = int(truncate_by)
    if cut:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - cut)
    out(file=str(path), sop_instance_uid=uid, bytes=os.path.getsize(path))


def modify(src, dest):
    ds = dcmread(src)
    ds.StudyDescription = (str(ds.get("StudyDescription", "")) + " CORRECTED")[:64]
    ds.save_as(dest, enforce_file_format=False)
    out(file=dest, sop_instance_uid=str(ds.SOPInstanceUID))


def testset():
    """pydicom's own test files that are valid storage instances: file meta
    present, a storage SOP class, a SOP Instance UID matching the meta, a
    transfer syntax the file really uses, and a data set pydicom parses
    completely."""
    from pydicom.data import get_testdata_files

    seen = set()
    for f in sorted(get_testdata_files("**/*")):
        p = Path(f)
        if not p.is_file() or p.suffix.lower() not in (".dcm", ""):
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = dcmread(f)
            # A data set that is not in the transfer syntax its meta names
            # is not a valid instance, whatever pydicom manages to read.
            if any("Expected explicit VR" in str(w.message) for w in caught):
                continue
            fm = ds.file_meta
            sop_class = str(fm.MediaStorageSOPClassUID)
            ts = UID(str(fm.TransferSyntaxUID))
            if sop_class not in STORAGE_CLASSES or str(ds.SOPClassUID) != sop_class:
                continue
            if str(ds.SOPInstanceUID) != str(fm.MediaStorageSOPInstanceUID):
                continue
            if not ts.is_transfer_syntax:
                continue
            # Touch every element so that a lazily-read broken value fails
            # here rather than at the node.
            for _ in ds.iterall():
                pass
            if ds.is_little_endian != ts.is_little_endian:
                continue
            if not all(ch.isdigit() or ch == "." for ch in str(ds.SOPInstanceUID)):
                continue
            # pydicom reads a file cut inside its last value without
            # complaint (MR_truncated.dcm): a native Pixel Data shorter than
            # its image needs is a truncated, not a valid, instance.
            if "PixelData" in ds and not ts.is_compressed:
                frames = int(ds.get("NumberOfFrames", 1) or 1)
                need = (ds.Rows * ds.Columns * ds.SamplesPerPixel * frames
                        * ds.BitsAllocated) // 8
                if len(ds.PixelData) < need:
                    continue
        except Exception:
            continue
        key = (str(ds.SOPInstanceUID), p.name)
        if key in seen:
            continue
        seen.add(key)
        out(file=f, sop_class_uid=sop_class, sop_instance_uid=str(ds.SOPInstanceUID),
            transfer_syntax_uid=str(ts))


def same_content(a, b):
    """Element by element, allowing what a re-encoding sender changes:
    padding of odd-length values, group length elements, and Data Set
    Trailing Padding (FFFC,FFFC), which dcmtk drops."""
    def norm(v):
        if isinstance(v, (bytes, bytearray)):
            return bytes(v).rstrip(b"\0 ")
        if isinstance(v, str):
            return v.strip(" \0")
        return v

    def keep(el):
        return el.tag.element != 0 and el.tag != 0xFFFCFFFC

    da = {el.tag: el for el in a if keep(el)}
    db = {el.tag: el for el in b if keep(el)}
    if set(da) != set(db):
        return False
    for tag, el in da.items():
        if el.VR == "SQ":
            if len(el.value) != len(db[tag].value):
                return False
            if not all(same_content(x, y) for x, y in zip(el.value, db[tag].value)):
                return False
        elif norm(el.value) != norm(db[tag].value):
            return False
    return True


def compare(pairs_file):
    """Each line of pairs_file: ORIGINAL<TAB>STORED[<TAB>STORED...]. Prints
    whether any stored object holds the original's content."""
    for line in Path(pairs_file).read_text().splitlines():
        original, *stored = line.split("\t")
        a = dcmread(original)
        same = any(same_content(a, dcmread(s)) for s in stored)
        out(file=original, same=same)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "send":
        send(args[0], args[1], args[2:])
    elif cmd == "send-slow":
        send(args[0], args[1], args[2:], stream=True)
    elif cmd == "bad":
        bad(*args)
    elif cmd == "echo":
        echo(*args)
    elif cmd == "gen":
        gen(*args)
    elif cmd == "big":
        big(*args)
    elif cmd == "modify":
        modify(*args)
    elif cmd == "compare":
        compare(*args)
    elif cmd == "testset":
        testset()
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
