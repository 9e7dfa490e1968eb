"""``enclavekit eif-diff A.eif B.eif [--json]``: explain why two enclave images measure differently.

Exit status, like diff(1): 0 when the measurements (PCR0, PCR1, PCR2, PCR8) are equal, 1 when they differ,
the error code's number (> 1) when an image cannot be read.  Metadata-only differences are reported but exit 0:
no PCR covers the metadata section.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from enclavekit.image.diff import diff_eifs

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "eif-diff", help="explain why two enclave images measure differently",
        description="Compare two EIFs: which PCRs and sections differ, which files inside the ramdisks were added, "
        "removed or changed, and the cmdline and metadata.  Exit 0: same measurements; 1: different; >1: error.")
    p.add_argument("eif_a", metavar="A.eif")
    p.add_argument("eif_b", metavar="B.eif")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = diff_eifs(args.eif_a, args.eif_b)
    text = json.dumps(result.to_json(), indent=2, ensure_ascii=False) if args.json else result.render_text()
    # File names are file system bytes (undecodable bytes carried as surrogates): write them back as bytes.
    sys.stdout.flush()
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape") + b"\n")
    sys.stdout.buffer.flush()
    return 0 if result.measurements_equal else 1
