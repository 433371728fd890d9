"""The DICOMweb side of huren's tests: the Python `dicomweb-client`
package (PyPI) against a spawned node. Prints one JSON object per line.

Usage: dicomweb_client.py URL [--token T] COMMAND ARGS...

  store [--study S] FILE...          STOW-RS; prints the response data set
  search LEVEL [--study S] [--series S] [--fuzzy] [k=v ...]
                                     QIDO-RS; prints each match (DICOM JSON)
  retrieve-study STUDY FILE...       WADO-RS; compares each instance with
                                     the original FILE of the same SOP
                                     Instance UID (all attributes, Pixel Data
                                     bytes)
  metadata STUDY FILE...             WADO-RS metadata, compared likewise
                                     (bulk data as BulkDataURI)
  frames FILE FRAME...               WADO-RS frames of FILE's instance,
                                     compared with FILE's frames
  rendered FILE MEDIA_TYPE           WADO-RS rendered; prints size and magic
  store-memory COUNT                 STOW-RS of COUNT CT data sets built in
                                     memory (dicomweb-client writes them
                                     with pydicom's dcmwrite defaults: no
                                     preamble, no DICM); prints the response
                                     and then their SOP Instance UIDs
"""

import hashlib
import json
import os
import sys

# This file's name is the package's: take its directory off the path so
# that `import dicomweb_client` finds the package, not this script.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import pydicom
from pydicom.encaps import generate_frames
from dicomweb_client.api import DICOMwebClient

BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def out(obj):
    print(json.dumps(obj), flush=True)


def originals(paths):
    by_uid = {}
    for p in paths:
        ds = pydicom.dcmread(p)
        by_uid[ds.SOPInstanceUID] = ds
    return by_uid


def frames_of(ds):
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return [bytes(f) for f in generate_frames(ds.PixelData, number_of_frames=n)]
    data = ds.PixelData
    size = len(data) // n
    return [data[i * size:(i + 1) * size] for i in range(n)]


def differences(got, want):
    """Top-level elements whose value differs (bulk data compared by
    bytes)."""
    diff = []
    for elem in want:
        if elem.tag.group == 0x0002:
            continue
        if elem.tag not in got:
            diff.append(f"{elem.tag} missing")
            continue
        if got[elem.tag].value != elem.value:
            diff.append(f"{elem.tag} differs")
    return diff


def main():
    args = sys.argv[1:]
    url = args.pop(0)
    headers = {}
    if args and args[0] == "--token":
        args.pop(0)
        headers["Authorization"] = f"Bearer {args.pop(0)}"
    client = DICOMwebClient(url=url, headers=headers)
    command = args.pop(0)

    if command == "store":
        study = None
        if args and args[0] == "--study":
            args.pop(0)
            study = args.pop(0)
        datasets = [pydicom.dcmread(p) for p in args]
        result = client.store_instances(datasets, study_instance_uid=study)
        out(result.to_json_dict())

    elif command == "store-memory":
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

        study, series = generate_uid(), generate_uid()
        datasets = []
        for i in range(int(args.pop(0))):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.PatientID = "MEM-0001"
            ds.PatientName = "Memory^Made"
            ds.Modality = "CT"
            ds.InstanceNumber = i + 1
            ds.Rows = ds.Columns = 2
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 0
            ds.PixelData = bytes(8)
            datasets.append(ds)
        result = client.store_instances(datasets)
        out(result.to_json_dict())
        out({"sop_instance_uids": [str(d.SOPInstanceUID) for d in datasets]})

    elif command == "search":
        level = args.pop(0)
        study = series = None
        fuzzy = False
        params = {}
        while args:
            a = args.pop(0)
            if a == "--study":
                study = args.pop(0)
            elif a == "--series":
                series = args.pop(0)
            elif a == "--fuzzy":
                fuzzy = True
            else:
                k, _, v = a.partition("=")
                params.setdefault(k, []).append(v)
        search_filters = {k: v[0] for k, v in params.items() if k not in ("includefield", "limit", "offset")}
        fields = params.get("includefield")
        limit = int(params["limit"][0]) if "limit" in params else None
        offset = int(params["offset"][0]) if "offset" in params else None
        if level == "studies":
            results = client.search_for_studies(fuzzymatching=fuzzy, search_filters=search_filters, fields=fields, limit=limit, offset=offset)
        elif level == "series":
            results = client.search_for_series(study_instance_uid=study, fuzzymatching=fuzzy, search_filters=search_filters, fields=fields, limit=limit, offset=offset)
        else:
            results = client.search_for_instances(study_instance_uid=study, series_instance_uid=series, fuzzymatching=fuzzy, search_filters=search_filters, fields=fields, limit=limit, offset=offset)
        for r in results:
            out(r)

    elif command == "retrieve-study":
        # --as-stored asks for transfer-syntax=*; without it the client's
        # default applies (no transfer-syntax parameter: the server's
        # default, Explicit VR Little Endian).
        as_stored = bool(args) and args[0] == "--as-stored"
        if as_stored:
            args.pop(0)
        study = args.pop(0)
        want = originals(args)
        media_types = (("application/dicom", "*"),) if as_stored else None
        for ds in client.retrieve_study(study, media_types=media_types):
            orig = want.get(ds.SOPInstanceUID)
            ts = str(ds.file_meta.TransferSyntaxUID)
            orig_ts = str(orig.file_meta.TransferSyntaxUID) if orig is not None else None
            converted = orig is not None and ts != orig_ts
            diff = differences(ds, orig) if orig is not None else []
            max_diff = None
            if converted:
                # Pixel Data bytes differ by design; compare the decoded
                # pixels instead.
                diff = [d for d in diff if not d.startswith("(7FE0,0010)")]
                try:
                    import numpy as np
                    a = ds.pixel_array.astype(np.int64)
                    b = orig.pixel_array.astype(np.int64)
                    max_diff = int(np.abs(a - b).max()) if a.shape == b.shape else -1
                except Exception as e:  # no decoder for the original
                    max_diff = f"not compared: {e}"
            out({
                "sop_instance_uid": ds.SOPInstanceUID,
                "known": orig is not None,
                "differences": diff,
                "pixel_data_equal": orig is not None and ds.get("PixelData") == orig.get("PixelData"),
                "transfer_syntax_uid": ts,
                "original_transfer_syntax_uid": orig_ts,
                "pixel_max_diff": max_diff,
            })

    elif command == "metadata":
        study = args.pop(0)
        want = originals(args)
        for item in client.retrieve_study_metadata(study):
            sop = item["00080018"]["Value"][0]
            orig = want.get(sop)
            bulk = sorted(k for k, v in item.items() if "BulkDataURI" in v)
            # Compare the inline attributes with the original's JSON form.
            diff = []
            if orig is not None:
                ref = orig.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "bulk")
                for key, value in ref.items():
                    if key.startswith("0002"):
                        continue
                    if "BulkDataURI" in value or "InlineBinary" in value:
                        if key not in bulk and "InlineBinary" not in item.get(key, {}):
                            diff.append(f"{key} bulk missing")
                        continue
                    # PS3.18 F.2.5: no "Value" for an empty attribute
                    # (pydicom writes an empty list for sequences).
                    if value.get("Value") == []:
                        value = {"vr": value["vr"]}
                    if item.get(key) != value:
                        diff.append(f"{key}: {item.get(key)} != {value}")
            out({"sop_instance_uid": sop, "known": orig is not None, "differences": diff, "bulk": bulk,
                 "bulk_uris": [item[k]["BulkDataURI"] for k in bulk]})

    elif command == "frames":
        path = args.pop(0)
        numbers = [int(a) for a in args]
        ds = pydicom.dcmread(path)
        expected = frames_of(ds)
        got = client.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=numbers)
        for n, frame in zip(numbers, got):
            out({"frame": n, "length": len(frame), "equal": bytes(frame) == expected[n - 1],
                 "sha256": hashlib.sha256(frame).hexdigest()})

    elif command == "rendered":
        path, media_type = args
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        data = client.retrieve_instance_rendered(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, media_types=(media_type,))
        out({"length": len(data), "magic": data[:4].hex()})

    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
