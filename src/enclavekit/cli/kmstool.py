"""``enclavekit kmstool decrypt | genkey | genrandom``: kmstool_enclave_cli for enclaves (spec §5.1).

Same flags and output lines as the C tool, so scripts written for it run unchanged::

    enclavekit kmstool decrypt --region R --proxy-port 8000 --aws-access-key-id A --aws-secret-access-key S \\
        [--aws-session-token T] --ciphertext B64 [--key-id K --encryption-algorithm SYMMETRIC_DEFAULT]
        -> PLAINTEXT: <b64>
    enclavekit kmstool genkey ... --key-id K --key-spec AES-256|AES-128   -> CIPHERTEXT: <b64> / PLAINTEXT: <b64>
    enclavekit kmstool genrandom ... --length N (1..1024)                  -> PLAINTEXT: <b64>

Each call makes a fresh RSA-2048 key, attests it with the NSM and sends ``Recipient`` through vsock-proxy
(:mod:`enclavekit.sdk.kms`).  Beyond the C tool: ``--endpoint`` (the host name in ``Host`` and the signature,
default ``kms.<region>.amazonaws.com``; ``http://HOST`` for plain HTTP to a local KMS), ``--ca-bundle`` (PEM CAs
for HTTPS), ``--encryption-context`` (JSON object).  ``--aws-session-token`` is optional here (the C tool requires
it; a local KMS issues long-term keys).  Errors go to stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from typing import Any

from enclavekit.cli._args import bounded_int
from enclavekit.errors import ConfigError

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--region", default="us-east-1", help="AWS region (default us-east-1)")
    common.add_argument("--proxy-port", default="8000", metavar="PORT",
                        help="vsock port of vsock-proxy on the parent, CID 3 (default 8000)")
    common.add_argument("--aws-access-key-id", required=True, metavar="ID")
    common.add_argument("--aws-secret-access-key", required=True, metavar="SECRET")
    common.add_argument("--aws-session-token", default=None, metavar="TOKEN")
    common.add_argument("--endpoint", default=None, metavar="HOST",
                        help="KMS host name for Host and SigV4 (default kms.<region>.amazonaws.com); "
                        "http://HOST for plain HTTP")
    common.add_argument("--ca-bundle", default=None, metavar="PEM", help="CA certificates for an HTTPS endpoint")

    p: argparse.ArgumentParser = subparsers.add_parser(
        "kmstool", help="kmstool_enclave_cli: decrypt, genkey, genrandom with attestation (inside an enclave)",
        description="Call KMS from inside an enclave with an attestation document (Recipient), through "
        "vsock-proxy; output lines as kmstool_enclave_cli prints them.")
    sub = p.add_subparsers(dest="kmstool_command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("decrypt", parents=[common], help="decrypt a CiphertextBlob; prints PLAINTEXT: <b64>")
    d.add_argument("--ciphertext", required=True, metavar="B64", help="the CiphertextBlob, base64")
    d.add_argument("--key-id", default=None, metavar="KEY")
    d.add_argument("--encryption-algorithm", default=None, metavar="ALG",
                   help="SYMMETRIC_DEFAULT | RSAES_OAEP_SHA_1 | RSAES_OAEP_SHA_256 (needed with --key-id)")
    d.add_argument("--encryption-context", default=None, metavar="JSON", help="a JSON object of strings")
    d.set_defaults(func=run)

    g = sub.add_parser("genkey", parents=[common],
                       help="generate a data key; prints CIPHERTEXT: <b64> and PLAINTEXT: <b64>")
    g.add_argument("--key-id", required=True, metavar="KEY")
    g.add_argument("--key-spec", default="AES-256", metavar="SPEC", help="AES-256 (default) | AES-128")
    g.add_argument("--encryption-context", default=None, metavar="JSON", help="a JSON object of strings")
    g.set_defaults(func=run)

    r = sub.add_parser("genrandom", parents=[common], help="random bytes from KMS; prints PLAINTEXT: <b64>")
    r.add_argument("--length", required=True, metavar="N", help="number of bytes, 1..1024")
    r.set_defaults(func=run)


def _context(text: str | None) -> dict[str, str] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError("--encryption-context must be a JSON object", code="E17") from exc
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError("--encryption-context must be a JSON object of string values")
    return value


def run(args: argparse.Namespace) -> int:
    # imported here: `enclavekit --help` and other commands do not pay for botocore and the NSM client
    from enclavekit.sdk.kms import KEY_SPECS, AWSCredentials, KMSClient  # noqa: PLC0415

    proxy_port = bounded_int("--proxy-port", args.proxy_port, 0, 0xFFFFFFFF)
    try:
        credentials = AWSCredentials(args.aws_access_key_id, args.aws_secret_access_key, args.aws_session_token)
        client = KMSClient(args.region, credentials=credentials, endpoint=args.endpoint, proxy_port=proxy_port,
                           ca_bundle=args.ca_bundle)
    except ValueError as exc:
        raise ConfigError(f"Invalid argument provided: {exc}") from exc

    command = args.kmstool_command
    if command == "decrypt":
        if args.key_id is not None and args.encryption_algorithm is None:
            # §5.1: kmstool requires the algorithm when a key id is given
            raise ConfigError("--encryption-algorithm is required with --key-id", code="E01")
        try:
            ciphertext = base64.b64decode(args.ciphertext, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError("--ciphertext must be base64") from exc
        if not 1 <= len(ciphertext) <= 6144:
            raise ConfigError(f"--ciphertext must be 1..6144 bytes, got {len(ciphertext)}")
        algorithm = args.encryption_algorithm
        if algorithm is not None and algorithm not in ("SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_1",
                                                       "RSAES_OAEP_SHA_256"):
            raise ConfigError(f"Invalid argument provided: --encryption-algorithm {algorithm!r}")
        plaintext = client.decrypt(ciphertext, _context(args.encryption_context), key_id=args.key_id,
                                   encryption_algorithm=algorithm)
        print(f"PLAINTEXT: {base64.b64encode(plaintext).decode()}")
    elif command == "genkey":
        # §6 pitfall 15: the CLI takes AES-256 with a hyphen, the API AES_256
        spec = str(args.key_spec).replace("-", "_")
        if spec not in KEY_SPECS:
            raise ConfigError(f"Invalid argument provided: --key-spec must be AES-256 or AES-128, got "
                              f"{args.key_spec!r}")
        key = client.generate_data_key(args.key_id, spec, _context(args.encryption_context))
        print(f"CIPHERTEXT: {base64.b64encode(key.ciphertext_blob).decode()}")
        print(f"PLAINTEXT: {base64.b64encode(key.plaintext).decode()}")
    else:
        length = bounded_int("--length", args.length, 1, 1024)
        print(f"PLAINTEXT: {base64.b64encode(client.generate_random(length)).decode()}")
    sys.stdout.flush()
    return 0
