"""``enclavekit kms``: run the local KMS (``serve``) and make credentials for it (``create-credentials``).

* ``serve``: the AWS KMS JSON 1.1 protocol with SigV4 on 127.0.0.1 (docs/kms-server.md).  When it listens, one
  JSON line goes to stdout: ``{"Endpoint": "http://127.0.0.1:PORT"}`` (plus ``"CABundle"`` with ``--tls``).
  SIGTERM or SIGINT stops it cleanly and seals the audit trail with a final digest.  Every request is recorded
  in the audit trail (``--trail DIR | s3://bucket/prefix``, default ``<data-dir>/audit``; docs/audit.md).
* ``create-credentials --name NAME``: a principal of the configured account; prints ``{"AccessKeyId",
  "SecretAccessKey", "Arn"}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclavekit._internal import state

if TYPE_CHECKING:
    from enclavekit.kms.server import ServerConfig

__all__ = ["register", "run_serve", "run_create_credentials"]


def _default_data_dir() -> Path:
    return state.state_home() / "kms"


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="directory for the SQLite key store, the audit trail's state and TLS files "
                        "(default: <state directory>/kms)")
    parser.add_argument("--database-url", default=None, metavar="URL",
                        help="keep keys and principals in PostgreSQL (postgresql://...) instead of SQLite; the "
                        "audit trail's state stays in --data-dir")
    parser.add_argument("--account-id", default="111122223333", help="the AWS account id this KMS belongs to")
    parser.add_argument("--region", default="us-east-1", help="the region in ARNs and SigV4 scopes")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    kms = sub.add_parser("kms", help="a local AWS KMS that honours attestation",
                         description="A local AWS KMS (JSON 1.1 protocol, SigV4) whose Decrypt, GenerateDataKey, "
                         "GenerateDataKeyPair and GenerateRandom accept Recipient attestation documents.")
    ksub = kms.add_subparsers(dest="kms_command", metavar="COMMAND")
    ksub.required = True

    s = ksub.add_parser("serve", help="run the KMS HTTP server",
                        description="Serve the KMS API until SIGTERM/SIGINT. Prints {\"Endpoint\": URL} on stdout "
                        "once listening.")
    s.add_argument("--host", default="127.0.0.1", help="IP address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one (default)")
    _store_args(s)
    s.add_argument("--workers", type=int, default=1, help="number of server processes sharing the socket")
    s.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain for HTTPS")
    s.add_argument("--tls-key", type=Path, default=None, help="PEM private key for HTTPS")
    s.add_argument("--tls", action="store_true",
                   help="HTTPS with a local CA kept in <data-dir>/tls (clients trust tls/ca.pem)")
    s.add_argument("--trust-aws-root", action="store_true",
                   help="also accept attestation documents from real Nitro Enclaves (AWS Root-G1)")
    s.add_argument("--root", type=Path, action="append", default=[], metavar="PEM",
                   help="also accept attestation documents chaining to this root (repeatable)")
    s.add_argument("--max-attestation-age", type=float, default=None, metavar="SECONDS",
                   help="refuse Recipient documents older than this (beyond AWS; off by default)")
    s.add_argument("--single-use-nonces", action="store_true",
                   help="refuse a Recipient document whose nonce was seen before (beyond AWS; off by default)")
    s.add_argument("--require-signed-target", action="store_true",
                   help="refuse requests whose SigV4 signature does not cover X-Amz-Target (boto3 signs it; the "
                   "AWS C SDK does not): stops a captured request being replayed as another operation")
    s.add_argument("--trail", default=None, metavar="DIR|s3://BUCKET/PREFIX",
                   help="where the audit trail goes: a directory (its state and log files), or an S3 bucket (state "
                   "in <data-dir>/audit) (default: <data-dir>/audit)")
    s.add_argument("--digest-interval", type=_seconds, default=3600.0, metavar="SECONDS",
                   help="write a signed digest file this often (default 3600, CloudTrail's hour)")
    s.add_argument("--trail-name", default="enclavekit", metavar="NAME",
                   help="the trail's name in its digest file names (default enclavekit); give each KMS sharing "
                   "one bucket prefix its own name (3-128 letters, digits, '.', '_', '-')")
    s.add_argument("--audit-endpoint-url", default=None, metavar="URL",
                   help="S3-compatible endpoint for --trail s3://... (credentials from the usual AWS variables)")
    # benchmarks only: drops every audit record; deliberately left out of --help
    s.add_argument("--unsafe-no-audit", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(func=run_serve)

    c = ksub.add_parser("create-credentials", help="create a principal and print its access key",
                        description="Create a principal of the configured account and print "
                        "{\"AccessKeyId\", \"SecretAccessKey\", \"Arn\"}.")
    c.add_argument("--name", required=True, help="the principal's user name (ARN ...:user/NAME)")
    _store_args(c)
    c.set_defaults(func=run_create_credentials)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _server() -> Any:
    # imported when a kms command runs, not for every enclavekit command (botocore alone costs ~0.2 s)
    return importlib.import_module("enclavekit.kms.server")


def _config(args: argparse.Namespace, **extra: object) -> ServerConfig:
    data_dir = args.data_dir if args.data_dir is not None else _default_data_dir()
    config: ServerConfig = _server().ServerConfig(data_dir=data_dir, database_url=args.database_url,
                                                  account_id=args.account_id, region=args.region, **extra)
    return config


def run_serve(args: argparse.Namespace) -> int:
    config = _config(args, host=args.host, port=args.port, workers=args.workers, tls_cert=args.tls_cert,
                     tls_key=args.tls_key, tls_local_ca=args.tls, trust_aws_root=args.trust_aws_root,
                     extra_roots=tuple(args.root), max_attestation_age=args.max_attestation_age,
                     single_use_nonces=args.single_use_nonces, trail=args.trail,
                     require_signed_target=args.require_signed_target,
                     digest_interval=args.digest_interval, trail_name=args.trail_name,
                     audit_endpoint_url=args.audit_endpoint_url,
                     unsafe_no_audit=args.unsafe_no_audit)

    def announce(info: dict[str, str]) -> None:
        print(json.dumps(info), flush=True)
        print(f"kms: listening on {info['Endpoint']} (data in {config.data_dir})", file=sys.stderr, flush=True)

    status: int = _server().serve(config, announce=announce)
    return status


def run_create_credentials(args: argparse.Namespace) -> int:
    result = _server().create_credentials(_config(args), args.name)
    print(json.dumps(result, indent=2))
    return 0
