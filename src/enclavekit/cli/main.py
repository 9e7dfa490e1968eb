"""The ``enclavekit`` command: parses arguments, runs one command, turns errors into exit statuses.

This is the only place where an :class:`~enclavekit.errors.EnclaveKitError` becomes text on stderr and an exit
status.  Usage errors exit 2 (as nitro-cli's clap does); user-facing failures print ``[ EXX ] message`` and exit
with the code's number; nothing a user does wrong prints a Python traceback (``BACKTRACE=1`` shows one).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from enclavekit import __version__
from enclavekit.errors import EnclaveKitError

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

# Each module defines ``register(subparsers)`` which adds its sub-command(s) and sets ``func`` on the parser:
# ``func(args) -> int`` returns the exit status.
COMMAND_MODULES = [
    "enclavekit.cli.build",
    "enclavekit.cli.describe_eif",
    "enclavekit.cli.sign",
    "enclavekit.cli.pcr",
    "enclavekit.cli.eif_diff",
    "enclavekit.cli.explain",
    "enclavekit.cli.attestation",
    "enclavekit.cli.vsock_proxy",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enclavekit",
        description="AWS Nitro Enclaves tooling for any Linux machine: build, sign and describe enclave images "
        "(EIF) with nitro-cli's flags and JSON, attest with an emulated NSM, and verify attestation documents.",
    )
    parser.add_argument("--version", action="version", version=f"enclavekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
        return status
    except EnclaveKitError as exc:
        if os.environ.get("BACKTRACE") == "1":
            traceback.print_exc()
        print(exc.diagnostics(), file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except Exception as exc:  # a bug, not a user error: say so plainly
        if os.environ.get("BACKTRACE") == "1":
            traceback.print_exc()
        print(f"[ E00 ] internal error: {type(exc).__name__}: {exc}\n"
              "  this is a bug in enclavekit; run again with BACKTRACE=1 and report the traceback",
              file=sys.stderr)
        return 1


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
