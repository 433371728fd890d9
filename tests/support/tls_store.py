"""C-STORE over DICOM TLS on one association that spans a pause.

    tls_store.py HOST PORT CA_FILE CERT_FILE KEY_FILE CALLING_AE FILE...

Associates over TLS (server verified against CA_FILE, client certificate
CERT_FILE/KEY_FILE), stores the first file, prints {"stored": 1, "status":
...}, then waits for a line on stdin before storing the rest on the same
association: the test reloads the node's certificate in that pause. Prints
one JSON line per C-STORE-RSP and {"released": true} at the end.
"""

import json
import ssl
import sys

from pydicom import dcmread
from pynetdicom import AE


def out(**kw):
    print(json.dumps(kw), flush=True)


def main():
    host, port, ca_file, cert_file, key_file, calling = sys.argv[1:7]
    files = sys.argv[7:]
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    ae = AE(ae_title=calling)
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    data_sets = [dcmread(f) for f in files]
    for sop_class, ts in sorted(
        {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in data_sets}
    ):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(host, int(port), ae_title="HUREN", tls_args=(context, "localhost"))
    if not assoc.is_established:
        out(error="association not established")
        sys.exit(3)
    for n, ds in enumerate(data_sets):
        if n == 1:
            sys.stdin.readline()
        status = assoc.send_c_store(ds)
        out(stored=n + 1, status=int(status.Status) if status else None)
    assoc.release()
    out(released=True)


if __name__ == "__main__":
    main()
