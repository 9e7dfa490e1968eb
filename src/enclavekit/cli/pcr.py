"""``enclavekit pcr --input FILE | --signing-certificate PEM`` (nitro-cli's pcr, spec eif-pcr-cli §2.6)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclavekit.errors import FileOperationError, SigningCertificateError
from enclavekit.formats.pcr import pcr_from_digest, pcr_of_content

__all__ = ["register", "run", "pcr_of_file", "pcr_of_certificate"]

_CHUNK = 1 << 20


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "pcr",
        help="compute the PCR of a file or of a signing certificate (PCR8)",
        description="Print {\"PCR\": ...} = SHA384(0^48 || SHA384(file)) for --input, or {\"PCR8\": ...} for a "
        "PEM signing certificate (hashing its DER), as nitro-cli's pcr command does.",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--input", metavar="FILE", help="any file")
    g.add_argument("--signing-certificate", metavar="PEM", help="a PEM X.509 certificate")
    p.set_defaults(func=run)


def _open_error(path: str, exc: OSError) -> FileOperationError:
    return FileOperationError(f"cannot read {path}: {exc.strerror or exc}", details={"File": path, "Operation": "Read"})


def pcr_of_file(path: str | os.PathLike[str]) -> bytes:
    """§2.6 ``--input``: the file hashed in chunks, then extended."""
    h = hashlib.sha384()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise _open_error(os.fspath(path), exc) from exc
    return pcr_from_digest(h.digest())


def pcr_of_certificate(path: str | os.PathLike[str]) -> bytes:
    """§2.6 ``--signing-certificate``: PCR of the certificate's DER (= describe-eif's PCR8)."""
    try:
        with open(path, "rb") as f:
            pem = f.read(1 << 20)
    except OSError as exc:
        raise _open_error(os.fspath(path), exc) from exc
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except (ValueError, x509.InvalidVersion) as exc:
        raise SigningCertificateError(f"{os.fspath(path)} is not a PEM X.509 certificate: {exc}") from exc
    return pcr_of_content(cert.public_bytes(Encoding.DER))


def run(args: argparse.Namespace) -> int:
    if args.input is not None:
        result = {"PCR": pcr_of_file(args.input).hex()}
    else:
        result = {"PCR8": pcr_of_certificate(args.signing_certificate).hex()}
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0
