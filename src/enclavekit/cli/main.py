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
from collections.abc import Sequence

from enclavekit import __version__
from enclavekit.errors import EnclaveKitError

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

# Each module defines ``register(subparsers)`` which adds its sub-command(s) and sets ``func`` on the parser:
# ``func(args) -> int`` returns the exit status.  COMMANDS maps each top-level command to its module so that a run
# imports only the module it needs (start-up time matters: run-enclave is timed by users); ``--help`` imports all.
COMMANDS: dict[str, str] = {
    "build-enclave": "enclavekit.cli.build",
    "describe-eif": "enclavekit.cli.describe_eif",
    "sign-eif": "enclavekit.cli.sign",
    "pcr": "enclavekit.cli.pcr",
    "eif-diff": "enclavekit.cli.eif_diff",
    "run-enclave": "enclavekit.cli.enclaves",
    "describe-enclaves": "enclavekit.cli.enclaves",
    "terminate-enclave": "enclavekit.cli.enclaves",
    "console": "enclavekit.cli.enclaves",
    "attestation": "enclavekit.cli.attestation",
    "vsock-proxy": "enclavekit.cli.vsock_proxy",
    "kms": "enclavekit.cli.kms",
    "audit": "enclavekit.cli.audit",
    "explain": "enclavekit.cli.explain",
    "kmstool": "enclavekit.cli.kmstool",
    "quickstart": "enclavekit.cli.quickstart",
}
COMMAND_MODULES = list(dict.fromkeys(COMMANDS.values()))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``command``, only that command's module is imported."""
    parser = argparse.ArgumentParser(
        prog="enclavekit",
        description="AWS Nitro Enclaves tooling for any Linux machine: build, sign and describe enclave images "
        "(EIF) with nitro-cli's flags and JSON; run them in an isolated sandbox with an emulated NSM; verify "
        "attestation documents; serve an attestation-aware KMS; proxy vsock to allow-listed endpoints.",
    )
    parser.add_argument("--version", action="version", version=f"enclavekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = [COMMANDS[command]] if command in COMMANDS else COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in arguments if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(arguments)
    try:
        status: int = args.func(args)
        return status
    except EnclaveKitError as exc:
        if os.environ.get("BACKTRACE") == "1":
            import traceback  # noqa: PLC0415 - start-up time: only when asked for

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
            import traceback  # noqa: PLC0415 - start-up time: only when asked for

            traceback.print_exc()
        print(f"[ E00 ] internal error: {type(exc).__name__}: {exc}\n"
              "  this is a bug in enclavekit; run again with BACKTRACE=1 and report the traceback",
              file=sys.stderr)
        return 1


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
