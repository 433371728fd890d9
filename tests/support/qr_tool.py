#!/usr/bin/env python3
"""pydicom/pynetdicom side of huren's query/retrieve tests. JSON lines out.

  corpus OUTDIR                   the query corpus: three patients (UTF-8,
                                  GB18030 and default character sets), four
                                  studies; one line per study
  dump DIR                        each rsp*.dcm / *.dcm in DIR (sorted) as
                                  {keyword: value}, text decoded by pydicom
  find-cancel HOST PORT [ID]      Study Root C-FIND of every study, C-CANCEL
                                  after the first Pending; the statuses seen
  get-cancel HOST PORT STUDY      Study Root C-GET of STUDY (Secondary
                                  Capture), C-CANCEL after the first Pending;
                                  the final response's status and counts
  commit HOST PORT PAIRS          storage commitment (N-ACTION) for PAIRS
                                  (JSON [[class, instance], ...]); the
                                  N-EVENT-REPORT received on the association
  receive-report AET LISTEN_PORT   listen as AET for one N-EVENT-REPORT on an
                                  association the node requests
"""
import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dicom_tool import CT_IMAGE, MR_IMAGE, encode, out, write_part10  # noqa: E402

from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE, debug_logger, evt  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
)

DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"

# (key, patient, study attributes, series [(modality, count)])
PATIENTS = {
    "P1": dict(PatientName="Wang^Xiaoming=王^小明", PatientID="QR-001",
               PatientBirthDate="19800101", PatientSex="M",
               SpecificCharacterSet="ISO_IR 192"),
    "P2": dict(PatientName="Li^Na=李^娜", PatientID="QR-002",
               PatientBirthDate="19900215", PatientSex="F",
               SpecificCharacterSet="GB18030"),
    "P3": dict(PatientName="O'Brien^Mary", PatientID="QR-003",
               PatientBirthDate="19751231", PatientSex="F"),
}
STUDIES = [
    ("S1", "P1", dict(StudyDate="20240105", StudyTime="083000", AccessionNumber="ACC1",
                      StudyDescription="CT chest", ReferringPhysicianName="Zhao^Lei"),
     [("CT", 3), ("CT", 2)]),
    ("S2", "P1", dict(StudyDate="20240320", StudyTime="101500", AccessionNumber="ACC2",
                      StudyDescription="MR knee", ReferringPhysicianName=""),
     [("MR", 2)]),
    ("S3", "P2", dict(StudyDate="20231201", StudyTime="141500", AccessionNumber="ACC3",
                      StudyDescription="胸部正位", ReferringPhysicianName=""),
     [("DX", 1)]),
    ("S4", "P3", dict(StudyDate="20240106", StudyTime="230000", AccessionNumber="XY-4",
                      StudyDescription="CT head", ReferringPhysicianName=""),
     [("CT", 1)]),
]
CLASS_OF = {"CT": CT_IMAGE, "MR": MR_IMAGE, "DX": DX_IMAGE}


def corpus(outdir):
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for key, patient, attrs, series in STUDIES:
        study_uid = generate_uid(entropy_srcs=["qr", key])
        lines = []
        files = []
        for s_index, (modality, count) in enumerate(series, start=1):
            series_uid = generate_uid(entropy_srcs=["qr", key, str(s_index)])
            for n in range(1, count + 1):
                uid = generate_uid(entropy_srcs=["qr", key, str(s_index), str(n)])
                ds = Dataset()
                for k, v in PATIENTS[patient].items():
                    setattr(ds, k, v)
                for k, v in attrs.items():
                    setattr(ds, k, v)
                ds.SOPClassUID = CLASS_OF[modality]
                ds.SOPInstanceUID = uid
                ds.StudyInstanceUID = study_uid
                ds.SeriesInstanceUID = series_uid
                ds.Modality = modality
                ds.SeriesNumber = s_index
                ds.InstanceNumber = n
                ds.StudyID = key
                ds.Rows, ds.Columns = 4, 4
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
                ds.PixelRepresentation = 0
                ds.PixelData = bytes(range(32))
                path = outdir / f"{key}-{s_index}-{n}.dcm"
                write_part10(path, ds.SOPClassUID, uid, encode(ds))
                files.append(str(path))
            lines.append(dict(series_instance_uid=series_uid, modality=modality, count=count))
        out(key=key, patient=patient, study_instance_uid=study_uid,
            patient_id=PATIENTS[patient]["PatientID"], series=lines, files=files)


def value_text(elem):
    if elem.VR == "SQ":
        return [dict_of(item) for item in elem.value]
    v = elem.value
    if v is None:
        return ""
    if elem.VM > 1:
        return "\\".join(str(x) for x in v)
    return str(v)


def dict_of(ds):
    return {e.keyword or str(e.tag): value_text(e) for e in ds if e.tag.group != 0x0002}


def dump(directory):
    for path in sorted(Path(directory).iterdir()):
        if path.suffix == ".dcm" or path.name.startswith("rsp"):
            ds = dcmread(path, force=True)
            out(**dict_of(ds))


def find_cancel(host, port, cancelled_id="7"):
    """Sends the C-FIND-RQ (Message ID 7) and, at once, a C-CANCEL-RQ for
    `cancelled_id` (its own by default), then reads the responses: the node
    sees the cancel before its first match is ready."""
    from io import BytesIO

    from pydicom.filewriter import write_dataset
    from pydicom.filebase import DicomBytesIO
    from pynetdicom.dimse_primitives import C_FIND

    ae = AE(ae_title="CANCELSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(host, int(port), ae_title="HUREN")
    assert assoc.is_established
    cx = assoc._get_valid_context(StudyRootQueryRetrieveInformationModelFind, "", "scu")
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.SOPInstanceUID = ""
    buf = DicomBytesIO()
    ts = cx.transfer_syntax[0]
    buf.is_little_endian = ts.is_little_endian
    buf.is_implicit_VR = ts.is_implicit_VR
    write_dataset(buf, ds)
    req = C_FIND()
    req.MessageID = 7
    req.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
    req.Priority = 2
    req.Identifier = BytesIO(buf.getvalue())
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        pass
    assoc.dimse.send_msg(req, cx.context_id)
    assoc.send_c_cancel(int(cancelled_id), cx.context_id)
    statuses = []
    while True:
        _, rsp = assoc.dimse.get_msg(block=True)
        if rsp is None:
            break
        statuses.append(rsp.Status)
        if rsp.Status not in (0xFF00, 0xFF01):
            break
    assoc._reactor_checkpoint.set()
    established = assoc.is_established
    assoc.release()
    out(statuses=statuses, established=established)


def get_cancel(host, port, study):
    from pynetdicom import build_role
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    secondary_capture = "1.2.840.10008.5.1.4.1.1.7"
    stored = []
    ae = AE(ae_title="GETCANCEL")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(secondary_capture)
    assoc = ae.associate(
        host, int(port), ae_title="HUREN",
        ext_neg=[build_role(secondary_capture, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, lambda event: stored.append(1) or 0x0000)])
    assert assoc.is_established
    cx = [c for c in assoc.accepted_contexts
          if c.abstract_syntax == StudyRootQueryRetrieveInformationModelGet][0]
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    final, cancelled = None, False
    for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet, msg_id=11):
        if status is None:
            break
        if status.Status == 0xFF00 and not cancelled:
            assoc.send_c_cancel(11, cx.context_id)
            cancelled = True
        final = status
    assoc.release()
    count = lambda k: int(final[k].value) if k in final else None
    out(status=final.Status, stored=len(stored),
        remaining=count("NumberOfRemainingSuboperations"),
        completed=count("NumberOfCompletedSuboperations"),
        failed=count("NumberOfFailedSuboperations"),
        warning=count("NumberOfWarningSuboperations"))


def commitment_request(pairs):
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    ds.ReferencedSOPSequence = []
    for sop_class, sop_instance in pairs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        ds.ReferencedSOPSequence.append(item)
    return ds


def report_of(event):
    ds = event.event_information
    committed = [str(i.ReferencedSOPInstanceUID) for i in ds.get("ReferencedSOPSequence", [])]
    failed = [[str(i.ReferencedSOPInstanceUID), int(i.FailureReason)]
              for i in ds.get("FailedSOPSequence", [])]
    return dict(event_type=event.event_type, transaction_uid=str(ds.TransactionUID),
                committed=committed, failed=failed)


def commit(host, port, pairs):
    # pynetdicom's log goes to stderr, shown when the command fails.
    debug_logger()
    got = {}
    done = threading.Event()

    def on_report(event):
        got.update(report_of(event))
        return 0x0000, None

    # Released only once the N-EVENT-REPORT response has gone out: releasing
    # from the handler's side before pynetdicom has sent it makes pynetdicom
    # send P-DATA after its A-RELEASE-RQ (Evt9 in Sta7), and its state
    # machine then hangs the release.
    def on_sent(event):
        if got and type(event.message).__name__ == "N_EVENT_REPORT_RSP":
            done.set()

    ae = AE(ae_title="COMMITSCU")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(host, int(port), ae_title="HUREN",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report),
                                       (evt.EVT_DIMSE_SENT, on_sent)])
    assert assoc.is_established
    request = commitment_request(json.loads(pairs))
    status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
    # A refused request gets no report: nothing to wait for.
    accepted = bool(status) and status.Status == 0x0000
    received = done.wait(30) if accepted else False
    assoc.release()
    out(action_status=status.Status if status else None, received=received,
        sent_transaction_uid=str(request.TransactionUID), **got)
    if accepted and not received:
        sys.exit("no N-EVENT-REPORT received; pynetdicom's log is above")


def receive_report(aet, listen_port):
    """Listens as AET for one storage commitment report, which the node
    sends on an association it requests (taking the SCP role)."""
    got = {}
    done = threading.Event()

    def on_report(event):
        got.update(report_of(event))
        got["calling_ae_title"] = event.assoc.requestor.ae_title
        got["scp_role"] = event.assoc.requestor.ae_title != aet
        done.set()
        return 0x0000, None

    scp = AE(ae_title=aet)
    scp.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    server = scp.start_server(("127.0.0.1", int(listen_port)), block=False,
                              evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    received = done.wait(30)
    server.shutdown()
    out(received=received, **got)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "corpus": corpus,
        "dump": dump,
        "find-cancel": find_cancel,
        "get-cancel": get_cancel,
        "commit": commit,
        "receive-report": receive_report,
    }[cmd](*args)


if __name__ == "__main__":
    main()
