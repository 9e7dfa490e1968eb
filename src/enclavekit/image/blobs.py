"""Enclave blobs: the kernel, its ``.config``, the kernel command line, the bootstrap ``init`` and ``nsm.ko``.

Layout as nitro-cli's ``/usr/share/nitro_enclaves/blobs`` (spec §3.10 step 1): ``bzImage`` (x86_64) or ``Image``
(aarch64), ``<kernel>.config``, ``cmdline``, ``init``, ``nsm.ko``.  The directory is ``--blobs DIR``, else
``$NITRO_CLI_BLOBS``, else enclavekit's default set shipped with the package (``image/blobs/<arch>/``: a labelled
stand-in kernel and ``nsm.ko``, AWS's command line text, and enclavekit's own bootstrap ``init``; see
``docs/blobs.md``).  A missing file is E19 naming the file and the directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from enclavekit.errors import FileOperationError

__all__ = ["KERNEL_NAMES", "DEFAULT_BLOBS_ROOT", "BlobSet", "resolve_blobs_dir", "load_blobs"]

KERNEL_NAMES = {"x86_64": "bzImage", "aarch64": "Image"}
DEFAULT_BLOBS_ROOT = Path(__file__).resolve().parent / "blobs"
_MAX_CMDLINE = 64 << 10
_MAX_CONFIG = 4 << 20


@dataclass(frozen=True)
class BlobSet:
    """Resolved blob files for one architecture.  ``cmdline`` is the trimmed command line (spec §1.5)."""

    directory: Path
    arch: str
    kernel: Path
    kernel_config: Path
    cmdline: bytes
    init: Path
    nsm_ko: Path
    kernel_config_text: str

    @property
    def is_default(self) -> bool:
        return self.directory.resolve().parent == DEFAULT_BLOBS_ROOT


def resolve_blobs_dir(explicit: str | None, arch: str, environ: Mapping[str, str] | None = None) -> Path:
    """``--blobs``, else ``NITRO_CLI_BLOBS``, else the default set for ``arch``."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get("NITRO_CLI_BLOBS"):
        return Path(env["NITRO_CLI_BLOBS"])
    if arch not in KERNEL_NAMES:
        raise ValueError(f"unknown architecture {arch!r}")
    return DEFAULT_BLOBS_ROOT / arch


def _require(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise FileOperationError(
            f"blob file {name!r} is missing from the blobs directory {directory}",
            details={"file": str(path), "blobs directory": str(directory), "operation": "Open"},
            hint="Pass --blobs DIR (nitro-cli's layout: bzImage or Image, its .config, cmdline, init, nsm.ko) "
                 "or unset NITRO_CLI_BLOBS to use enclavekit's default blob set.")
    return path


def _read_text(path: Path, cap: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError as exc:
        raise FileOperationError(f"cannot read blob {path}: {exc.strerror}",
                                 details={"file": str(path), "operation": "Read"}) from exc
    if len(data) > cap:
        raise FileOperationError(f"blob {path} is larger than {cap} bytes", details={"file": str(path)})
    return data


def load_blobs(directory: Path, arch: str) -> BlobSet:
    """Check that every blob exists and read the small ones (cmdline, kernel config)."""
    if arch not in KERNEL_NAMES:
        raise ValueError(f"unknown architecture {arch!r}")
    if not directory.is_dir():
        raise FileOperationError(f"blobs directory {directory} does not exist",
                                 details={"file": str(directory), "operation": "Open"})
    kernel_name = KERNEL_NAMES[arch]
    kernel = _require(directory, kernel_name)
    config = _require(directory, f"{kernel_name}.config")
    cmdline_path = _require(directory, "cmdline")
    init = _require(directory, "init")
    nsm = _require(directory, "nsm.ko")
    # spec §1.5: nitro-cli trims the cmdline file; the EIF stores it without a NUL.  An interior NUL is refused.
    cmdline = _read_text(cmdline_path, _MAX_CMDLINE).strip()
    if b"\0" in cmdline:
        raise FileOperationError(f"blob {cmdline_path} contains a NUL byte", details={"file": str(cmdline_path)})
    config_text = _read_text(config, _MAX_CONFIG).decode("utf-8", "replace")
    return BlobSet(directory=directory, arch=arch, kernel=kernel, kernel_config=config, cmdline=cmdline,
                   init=init, nsm_ko=nsm, kernel_config_text=config_text)
