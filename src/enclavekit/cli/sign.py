"""``enclavekit sign-eif``: sign an EIF in place, or sign it offline in two steps (spec eif-pcr-cli §1.9).

* ``--eif-path P --signing-certificate C --private-key K``: nitro-cli's sign-eif (append or replace).
* ``--eif-path P --export-payload FILE [--signing-certificate C]``: write the bytes an HSM or an offline machine
  must sign (ECDSA with the curve's hash; see :mod:`enclavekit.image.signing`).
* ``--eif-path P --signature FILE --signing-certificate C``: attach that signature (DER or raw r||s) after
  checking it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from enclavekit._internal.ecdsa import alg_for_key
from enclavekit.errors import ConfigError, FileOperationError
from enclavekit.formats.cose import ALGORITHMS
from enclavekit.image.signing import (
    DEFAULT_OFFLINE_ALG,
    EIFSigner,
    attach_signature,
    export_payload,
    load_signing_certificate,
    sign_eif,
)

__all__ = ["register", "run"]

_MAX_SIGNATURE = 4096
_ALG_BY_NAME = {name: alg for alg, (name, _, _) in ALGORITHMS.items()}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "sign-eif",
        help="sign an enclave image (in place), or export/attach a signature made elsewhere",
        description="Sign an EIF in place with a certificate and its EC private key (nitro-cli's sign-eif), "
        "replacing any existing signature; or sign offline: --export-payload writes the bytes to sign, "
        "--signature attaches the signature (DER or raw r||s) after verifying it against the certificate.",
    )
    p.add_argument("--eif-path", required=True, metavar="PATH", help="the enclave image file (rewritten in place)")
    p.add_argument("--signing-certificate", metavar="PEM", help="the PEM X.509 signing certificate")
    p.add_argument("--private-key", metavar="PEM", help="the PEM EC private key (P-256, P-384 or P-521)")
    p.add_argument("--export-payload", metavar="FILE", help="write the bytes to sign to FILE and stop")
    p.add_argument("--algorithm", choices=sorted(_ALG_BY_NAME),
                   help="with --export-payload and no certificate: the COSE algorithm (default ES384)")
    p.add_argument("--signature", metavar="FILE", help="attach the ECDSA signature in FILE (DER or raw r||s)")
    p.add_argument("--force", action="store_true",
                   help="sign (or export the payload of) an image whose CRC does not match, i.e. a corrupt one")
    p.set_defaults(func=run)


def _read(path: str, what: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as exc:
        raise FileOperationError(f"cannot read the {what} {path}: {exc.strerror or exc}",
                                 details={"File": path, "Operation": "Read"}) from exc


def _check_not_the_eif(payload_path: str, eif_path: str) -> None:
    """Refuse a payload path that names the EIF itself (or a link to it): writing it would destroy the image."""
    try:
        same = os.path.samefile(payload_path, eif_path)
    except OSError:
        same = False  # the payload file does not exist yet (or the EIF does not: measuring reports that)
    if same or Path(payload_path).absolute() == Path(eif_path).absolute():
        raise ConfigError(f"--export-payload {payload_path} is the image itself (--eif-path {eif_path}); writing "
                          "the payload there would overwrite the image",
                          hint="Write the payload to another file, e.g. --export-payload payload.bin.")


def _write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename: never a half-written file."""
    target = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", prefix=f".{target.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise FileOperationError(f"cannot write {path}: {exc.strerror or exc}",
                                 details={"File": path, "Operation": "Write"}) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _print_measurements(measurements: dict[str, str]) -> None:
    sys.stdout.write(json.dumps({"Measurements": measurements}, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    modes = [m for m in ("export_payload", "signature", "private_key") if getattr(args, m) is not None]
    if len(modes) > 1:
        flags = ", ".join("--" + m.replace("_", "-") for m in modes)
        raise ConfigError(f"{flags} cannot be used together", code="E02")
    if args.algorithm is not None and (modes != ["export_payload"] or args.signing_certificate is not None):
        raise ConfigError("--algorithm only applies to --export-payload without --signing-certificate", code="E02")
    if not modes:
        raise ConfigError("give --private-key (sign here), --export-payload FILE or --signature FILE", code="E01")
    mode = modes[0]
    if mode == "export_payload":
        alg = _ALG_BY_NAME[args.algorithm] if args.algorithm else DEFAULT_OFFLINE_ALG
        if args.signing_certificate is not None:
            key = load_signing_certificate(_read(args.signing_certificate, "signing certificate", 1 << 16))
            public_key = key.public_key()
            assert isinstance(public_key, ec.EllipticCurvePublicKey)
            alg = alg_for_key(public_key)
        _check_not_the_eif(args.export_payload, args.eif_path)
        payload = export_payload(args.eif_path, alg=alg, force=args.force)
        _write_atomic(args.export_payload, payload)
        name, hash_name, _ = ALGORITHMS[alg]
        sys.stdout.write(json.dumps({"PayloadFile": args.export_payload, "Algorithm": name,
                                     "Hash": hash_name.upper()}, indent=2) + "\n")
        print(f"Payload written to {args.export_payload}: sign it with ECDSA-{hash_name.upper()} "
              f"(e.g. openssl dgst -{hash_name} -sign key.pem -out sig.der {args.export_payload}), then run "
              "sign-eif --signature sig.der --signing-certificate CERT", file=sys.stderr)
        return 0
    if args.signing_certificate is None:
        raise ConfigError(f"--{mode.replace('_', '-')} needs --signing-certificate", code="E01")
    if mode == "signature":
        signature = _read(args.signature, "signature", _MAX_SIGNATURE)
        if len(signature) > _MAX_SIGNATURE:
            raise ConfigError(f"the signature file {args.signature} is larger than {_MAX_SIGNATURE} bytes; an "
                              "ECDSA signature is at most 139 bytes")
        cert_pem = _read(args.signing_certificate, "signing certificate", 1 << 16)
        measurements = attach_signature(args.eif_path, signature, cert_pem, force=args.force)
    else:
        signer = EIFSigner.from_files(args.signing_certificate, args.private_key)
        measurements = sign_eif(args.eif_path, signer, force=args.force)
    _print_measurements(measurements.to_json())
    print("Enclave Image successfully signed.", file=sys.stderr)
    return 0
