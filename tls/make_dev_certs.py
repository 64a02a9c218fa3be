"""Make a throwaway local CA and a server certificate for trying HTTPS by hand.

    .venv/bin/python tls/make_dev_certs.py            # writes into tls/
    .venv/bin/fastrelay serve --certfile tls/server.pem --keyfile tls/server.key
    curl --cacert tls/ca.pem https://localhost:8080/healthz

The certificate is valid for localhost, 127.0.0.1 and ::1. Development and
testing only: the CA key is not even written out, and generated files are
git-ignored. Needs `trustme` (installed with the test extra).
"""

from __future__ import annotations

import argparse
import os
import pathlib

import trustme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent), help="folder")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="fastrelay dev CA")
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1")
    ca.cert_pem.write_to_path(str(out / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(out / "server.pem"))
    key = out / "server.key"
    leaf.private_key_pem.write_to_path(str(key))
    os.chmod(key, 0o600)
    for name in ("ca.pem", "server.pem", "server.key"):
        print(out / name)


if __name__ == "__main__":
    main()
