"""``enclavekit quickstart [--json] [--keep] [--no-cache] [--examples DIR]``: the whole flow in one command.

Builds the example enclave application into an EIF, starts the KMS and vsock-proxy, creates a key only that
image's PCR0 may decrypt with, runs the enclave (it attests and decrypts through the proxy), shows a changed image
being denied, validates the audit trail, prints a summary and cleans up (logic: :mod:`enclavekit.quickstart`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "quickstart", help="see enclavekit work end to end: build, attest, decrypt, deny, audit",
        description="Build the example enclave application, run it against a local KMS through vsock-proxy, show "
        "that only its measured image can decrypt, validate the audit trail, then clean up. Needs root.")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress stays on stderr)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, KMS data, trail)")
    p.add_argument("--no-cache", action="store_true",
                   help="rebuild the images even if <state>/quickstart/ holds them for this code")
    p.add_argument("--examples", type=Path, default=None, metavar="DIR",
                   help="the examples directory (default: the repository's examples/)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from enclavekit.quickstart import run_quickstart  # noqa: PLC0415 - boto3 and rich only for this command

    return run_quickstart(json_output=args.json, keep=args.keep, use_cache=not args.no_cache,
                          examples=args.examples)
