"""``enclavekit describe-eif --eif-path P [--strict]`` (nitro-cli's describe-eif, spec eif-pcr-cli §3.3)."""

from __future__ import annotations

import argparse
import json
import sys

from enclavekit.image.describe import describe_eif

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "describe-eif",
        help="print an enclave image's measurements, signature and metadata",
        description="Print the EIF's version, PCR measurements, signing certificate, CRC check and metadata as "
        "JSON (nitro-cli's describe-eif).  By default the file is read as nitro-cli reads it (CRC reported, not "
        "enforced); --strict refuses images the hypervisor/QEMU rules reject.",
    )
    p.add_argument("--eif-path", required=True, metavar="PATH", help="the enclave image file")
    p.add_argument("--strict", action="store_true",
                   help="validate the file strictly (version 4, section table, CRC, no trailing bytes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = describe_eif(args.eif_path, strict=args.strict)
    # serde_json writes raw UTF-8 whatever the locale
    sys.stdout.flush()
    sys.stdout.buffer.write((json.dumps(result, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    sys.stdout.buffer.flush()
    return 0
