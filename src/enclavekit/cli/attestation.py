"""``enclavekit attestation``: describe, verify and issue attestation documents; print the local root.

* ``describe DOC``: the decoded document as JSON.  Nothing is verified; no trust is implied.
* ``verify DOC``: signature, chain to a pinned root, validity at ``--at`` (default: now), then the policy.
  Trust roots: exactly the ones named (``--root PEM``, ``--local-root``, ``--aws-root``); when none is named,
  the built-in AWS Nitro Enclaves Root-G1 alone.  ``--no-aws-root`` never trusts the AWS root.
  Exit 0 and JSON on success; otherwise ``[ E70|E71|E72 ] …`` with the failed rule.
* ``issue --output FILE``: a document signed by the local PKI (the state directory's ``pki/``), PCRs 0-15 as
  the NSM reports them at boot: the given values (``--pcr`` or ``--eif-path``), PCR3 from the parent's role ARN
  when given, PCR4 from the parent instance id (``--parent-instance-id``, else the one in ``--module-id``, else
  the local PKI's; never zero, as on Nitro), zeros elsewhere; ``--debug-mode`` zeroes PCR0/1/2/8 as Nitro does.
* ``root-cert``: the local root certificate (PEM), creating the local PKI on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from enclavekit.attestation.issuer import DocumentIssuer
from enclavekit.attestation.pki import LocalPKI
from enclavekit.attestation.policy import AttestationPolicy, parse_pcr_value
from enclavekit.attestation.verifier import AWS_ROOT_G1, TrustRoot, verify
from enclavekit.errors import AttestationFormatError, ConfigError, FileOperationError
from enclavekit.formats.attestation_doc import MAX_DOCUMENT_SIZE, MAX_FIELD_SIZE, parse_document
from enclavekit.formats.pcr import pcr3_role_arn, pcr4_instance_id
from enclavekit.image.eif_reader import measure_eif
from enclavekit.nsm.module import instance_id_of

__all__ = ["register", "describe_document", "run_describe", "run_verify", "run_issue", "run_root_cert"]

_BOOT_PCRS = 16  # PCRs 0-15 are locked at boot (spec 2.5)
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")  # spec 3.5: EC2 instance ids


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "attestation",
        help="describe, verify and issue attestation documents",
        description="Work with NSM attestation documents (COSE_Sign1, AWS's format).",
    )
    p.set_defaults(func=lambda _args: _usage(p))
    asub = p.add_subparsers(dest="attestation_command", metavar="SUBCOMMAND")

    d = asub.add_parser("describe", help="print a document as JSON (nothing verified)",
                        description="Decode an attestation document and print it as JSON. No trust is implied: "
                        "use `verify` to check it.")
    d.add_argument("document", metavar="DOC", help="file holding the raw COSE_Sign1 bytes")
    d.set_defaults(func=run_describe)

    v = asub.add_parser(
        "verify", help="verify a document against pinned roots and a policy",
        description="Verify the signature, the certificate chain to a pinned root and the validity of every "
        "certificate at --at, then the policy. Trust roots are exactly those named with --root, --local-root and "
        "--aws-root; with none named, the built-in AWS Nitro Enclaves Root-G1 is used. Prints JSON and exits 0 "
        "when the document is trusted.")
    v.add_argument("document", metavar="DOC", help="file holding the raw COSE_Sign1 bytes")
    v.add_argument("--root", metavar="PEM", action="append", default=[],
                   help="trust the root certificate(s) in this PEM file (repeatable)")
    aws = v.add_mutually_exclusive_group()
    aws.add_argument("--aws-root", dest="aws_root", action="store_true", default=None,
                     help="trust the AWS Nitro Enclaves Root-G1 (the default when no other root is named)")
    aws.add_argument("--no-aws-root", dest="aws_root", action="store_false",
                     help="never trust the AWS root")
    v.add_argument("--local-root", action="store_true", help="trust the local PKI's root (state directory)")
    v.add_argument("--at", metavar="ISO8601",
                   help="verify as of this time (e.g. 2022-10-13T08:58:02Z; naive times are UTC); default now")
    v.add_argument("--expect-pcr", metavar="N=HEX", action="append", default=[],
                   help="require PCR N to equal HEX (repeatable; all together form one accepted set)")
    v.add_argument("--nonce-hex", metavar="HEX", help="require this nonce")
    v.add_argument("--min-nonce-bytes", metavar="N", type=int, default=0, help="require a nonce of >= N bytes")
    v.add_argument("--max-age", metavar="SECONDS", type=float,
                   help="refuse documents signed more than SECONDS before --at")
    v.add_argument("--user-data-hex", metavar="HEX", help="require this user_data")
    v.add_argument("--public-key-hex", metavar="HEX", help="require this public_key")
    v.add_argument("--allow-debug", action="store_true",
                   help="UNSAFE: accept debug-mode documents (PCR0/1/2 all zero prove nothing)")
    v.set_defaults(func=run_verify)

    i = asub.add_parser(
        "issue", help="issue a document signed by the local PKI",
        description="Write an attestation document in AWS's exact format, signed by the local PKI (created in "
        "the state directory on first use: $ENCLAVEKIT_HOME, else ~/.local/share/enclavekit, or "
        "/var/lib/enclavekit for root). It verifies with `verify --local-root`, never with the AWS root.")
    i.add_argument("--output", metavar="FILE", required=True, help="where to write the document")
    src = i.add_mutually_exclusive_group()
    src.add_argument("--eif-path", metavar="EIF", help="take PCR0/1/2 (and PCR8) from this enclave image")
    src.add_argument("--pcr", metavar="N=HEX", action="append", default=[],
                     help="set locked PCR N (0..31) to HEX (48 bytes; repeatable)")
    i.add_argument("--debug-mode", action="store_true", help="zero PCR0/1/2/8 as a debug-mode enclave's NSM does")
    i.add_argument("--parent-role-arn", metavar="ARN", help="PCR3 = SHA384(0^48 || ARN)")
    i.add_argument("--parent-instance-id", metavar="ID",
                   help="i-<8..17 hex>: PCR4 = SHA384(0^48 || ID); also the module id's (default: the instance "
                   "id in --module-id, else the local PKI's)")
    i.add_argument("--user-data-hex", metavar="HEX")
    i.add_argument("--nonce-hex", metavar="HEX")
    i.add_argument("--public-key-file", metavar="FILE", help="raw bytes to put in public_key (<= 1024)")
    i.add_argument("--module-id", metavar="ID", help="default: <instance id>-enc<creation ms><random>")
    i.add_argument("--definite-map", action="store_true", help="write the payload map as a9 (pre-2025 form)")
    i.set_defaults(func=run_issue)

    r = asub.add_parser("root-cert", help="print the local PKI's root certificate (PEM)",
                        description="Print the local attestation root certificate, creating the local PKI on first "
                        "use. Give it to verifiers that should trust locally issued documents.")
    r.set_defaults(func=run_root_cert)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


# --------------------------------------------------------------------------------------------- helpers


def _read(path: str, *, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise FileOperationError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes")
    return data


def _hex(value: str | None, option: str) -> bytes | None:
    if value is None:
        return None
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{option}: not valid hex") from None
    if len(data) > MAX_FIELD_SIZE:
        raise ConfigError(f"{option}: {len(data)} bytes, at most {MAX_FIELD_SIZE}")
    return data


def _pcr_args(items: list[str], option: str) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for item in items:
        index_text, sep, value = item.partition("=")
        if not sep or not index_text.strip().isdigit():
            raise ConfigError(f"{option} {item!r}: expected N=HEX")
        index = int(index_text)
        if not 0 <= index < 32:
            raise ConfigError(f"{option} {item!r}: PCR index must be 0..31")
        try:
            out[index] = parse_pcr_value(value.strip())
        except ValueError as exc:
            raise ConfigError(f"{option} {item!r}: {exc}") from None
    return out


def _parse_time(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--at {text!r}: not an ISO 8601 time") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# --------------------------------------------------------------------------------------------- commands


def _read_document(path: str) -> bytes:
    try:
        return _read(path, limit=MAX_DOCUMENT_SIZE, what="document")
    except ConfigError as exc:  # untrusted bytes of the wrong size: a format error (attestation doc 3.1)
        raise AttestationFormatError(str(exc), rule="document-size") from exc


def describe_document(data: bytes) -> dict[str, Any]:
    """What ``describe`` prints for ``data``.  Raises only :class:`~enclavekit.errors.FormatError`s."""
    envelope, document = parse_document(data)
    out = document.describe()
    out["cose"] = {"tagged": envelope.tagged, "protected": envelope.protected.hex(),
                   "signature_length": len(envelope.signature)}
    return out


def run_describe(args: argparse.Namespace) -> int:
    _print_json(describe_document(_read_document(args.document)))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    data = _read_document(args.document)
    at_time = _parse_time(args.at)
    roots: list[TrustRoot] = []
    for path in args.root:
        pem = _read(path, limit=1 << 20, what="root certificate file")
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise ConfigError(f"--root {path}: no PEM certificate in the file") from None
        roots += [TrustRoot.from_certificate(c, name=path) for c in certs]
    if args.local_root:
        pki = LocalPKI.open(now=datetime.now(UTC), create=False)
        roots.append(TrustRoot.from_certificate(pki.root.certificate, name="enclavekit local root"))
    use_aws = args.aws_root if args.aws_root is not None else not roots
    if use_aws:
        roots.append(AWS_ROOT_G1)
    if not roots:
        raise ConfigError("no trust root: give --root PEM, --local-root or --aws-root")
    if args.min_nonce_bytes < 0 or (args.max_age is not None and args.max_age < 0):
        raise ConfigError("--min-nonce-bytes and --max-age must be >= 0")
    expected = _pcr_args(args.expect_pcr, "--expect-pcr")
    policy = AttestationPolicy(
        pcr_sets=(expected,) if expected else (),
        nonce=_hex(args.nonce_hex, "--nonce-hex"),
        min_nonce_length=args.min_nonce_bytes,
        max_age=None if args.max_age is None else timedelta(seconds=args.max_age),
        public_key=_hex(args.public_key_hex, "--public-key-hex"),
        user_data=_hex(args.user_data_hex, "--user-data-hex"),
        unsafe_allow_debug=args.allow_debug,
    )
    result = verify(data, roots, at_time, policy)
    _print_json(result.to_json())
    return 0


def _boot_pcrs(args: argparse.Namespace, instance_id: str) -> dict[int, bytes]:
    pcrs = {i: b"\x00" * 48 for i in range(_BOOT_PCRS)}
    if args.eif_path:
        try:
            with open(args.eif_path, "rb") as fh:
                info = measure_eif(fh)
        except OSError as exc:
            raise FileOperationError(f"cannot read EIF {args.eif_path}: {exc.strerror or exc}") from exc
        m = info.measurements
        pcrs.update({0: m.pcr0, 1: m.pcr1, 2: m.pcr2})
        if m.pcr8 is not None:
            pcrs[8] = m.pcr8
    given = _pcr_args(args.pcr, "--pcr")
    for index, value in given.items():
        if len(value) != 48:
            raise ConfigError(f"--pcr {index}: the NSM's PCRs are 48 bytes (SHA-384), got {len(value)}")
    pcrs.update(given)
    if args.parent_role_arn:
        pcrs[3] = pcr3_role_arn(args.parent_role_arn)
    # spec 2.5: PCR4 measures the parent instance id and is never zero on Nitro
    pcrs[4] = pcr4_instance_id(instance_id)
    if args.debug_mode:  # spec 2.5: debug mode zeroes PCR0/1/2 and PCR8; PCR3 and PCR4 stay real
        for index in (0, 1, 2, 8):
            pcrs[index] = b"\x00" * 48
    return dict(sorted(pcrs.items()))


def run_issue(args: argparse.Namespace) -> int:
    if args.parent_instance_id is not None and not _INSTANCE_ID.fullmatch(args.parent_instance_id):
        raise ConfigError(f"--parent-instance-id {args.parent_instance_id[:40]!r}: expected i- and 8 to 17 "
                          "lowercase hex digits (e.g. i-0123456789abcdef0)")
    now = datetime.now(UTC)
    timestamp_ms = int(now.timestamp() * 1000)
    public_key = None
    if args.public_key_file:
        public_key = _read(args.public_key_file, limit=MAX_FIELD_SIZE, what="public key file")
        if not public_key:
            raise ConfigError(f"--public-key-file {args.public_key_file} is empty")
    user_data = _hex(args.user_data_hex, "--user-data-hex")
    nonce = _hex(args.nonce_hex, "--nonce-hex")
    pki = LocalPKI.open(now=now)
    module_id = args.module_id
    # the instance id PCR4 measures: the parent's if given, else the one the module id names, else the PKI's
    instance = args.parent_instance_id or (module_id and instance_id_of(module_id)) or pki.instance_id
    if module_id is None:
        # spec 3.5: <instance id>-enc<12 hex creation ms><4 hex>
        module_id = f"{instance}-enc{timestamp_ms:012x}{os.urandom(2).hex()}"
    if not module_id or len(module_id) > 256:
        raise ConfigError("--module-id must be 1..256 characters")
    pcrs = _boot_pcrs(args, instance)
    issuer = DocumentIssuer(pki, definite_map=args.definite_map)
    document = issuer.issue(module_id=module_id, timestamp_ms=timestamp_ms, pcrs=pcrs, public_key=public_key,
                            user_data=user_data, nonce=nonce)
    try:
        Path(args.output).write_bytes(document)
    except OSError as exc:
        raise FileOperationError(f"cannot write {args.output}: {exc.strerror or exc}") from exc
    print(f"attestation document written to {args.output} ({len(document)} bytes)", file=sys.stderr)
    _print_json({"output": args.output, "module_id": module_id, "timestamp": timestamp_ms,
                 "size": len(document), "debug_mode": bool(args.debug_mode)})
    return 0


def run_root_cert(args: argparse.Namespace) -> int:
    pki = LocalPKI.open(now=datetime.now(UTC))
    sys.stdout.write(pki.root_pem.decode("ascii"))
    return 0
