"""run-enclave's parameters that the command line parses before anything else: memory, CID, the run directory.

Kept apart from :mod:`~enclavekit.runtime.registry` and :mod:`~enclavekit.runtime.allocator` (which re-export
them) so that ``enclavekit run-enclave`` can check its flags and hand the request to a running launch server
(:mod:`~enclavekit.runtime.launch_server`) without importing the runtime: start-up time is what users wait for.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from enclavekit.errors import ConfigError

__all__ = [
    "RUN_DIR_ENV",
    "DEFAULT_RUN_DIR",
    "PARENT_CID",
    "MAX_ENCLAVE_CID",
    "MAX_MEMORY_MIB",
    "run_dir",
    "parse_enclave_cid",
    "parse_memory",
]

RUN_DIR_ENV = "ENCLAVEKIT_RUN_DIR"
DEFAULT_RUN_DIR = Path("/run/enclavekit")
# §3.5: the parent is CID 3; enclaves get 4 … 2^32-2
PARENT_CID = 3
MAX_ENCLAVE_CID = 0xFFFFFFFF - 1
MAX_MEMORY_MIB = 1 << 40  # a sanity cap on --memory
_MEMORY = re.compile(r"^(\d{1,20})([MmGgTt]?)$")


def run_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The run directory: ``$ENCLAVEKIT_RUN_DIR`` if set and non-empty, else ``/run/enclavekit``."""
    env = os.environ if environ is None else environ
    value = env.get(RUN_DIR_ENV, "")
    return Path(value) if value else DEFAULT_RUN_DIR


def parse_enclave_cid(text: str) -> int | None:
    """``--enclave-cid`` as nitro-cli checks it (§3.5): None for ``0`` (auto), else a CID in 4 … 2^32-2.

    A non-number, the well-known CIDs 1 and 2, the parent's 3, and 2^32-1 or more are E03.
    """
    if not isinstance(text, str):
        raise TypeError("the CID must be given as str")
    if not text.isdigit() or len(text) > 20:
        raise ConfigError(f"--enclave-cid: expected a decimal number, got {text[:40]!r}")
    cid = int(text)
    if cid == 0:
        return None
    if cid <= 2:
        raise ConfigError(f"--enclave-cid {cid}: CIDs 1 and 2 are well-known CIDs (local, host) and cannot be used")
    if cid == PARENT_CID:
        raise ConfigError(f"--enclave-cid {cid}: CID 3 is the parent instance's")
    if cid > MAX_ENCLAVE_CID:
        raise ConfigError(f"--enclave-cid {cid}: the largest enclave CID is {MAX_ENCLAVE_CID}")
    return cid


def parse_memory(text: str) -> int:
    """nitro-cli's ``--memory``: an integer with an optional unit (spec §3.2), returned in MiB.

    ``M``/``m``/none = MiB, ``G``/``g`` = ×1024, ``T``/``t`` = ×1024².  Anything else (``256_mb``, ``1.5G``,
    ``-1``) is E03.  ``0`` parses (the allocator then refuses it with E26, as nitro-cli does).
    """
    if not isinstance(text, str):
        raise TypeError("memory must be a str")
    m = _MEMORY.match(text)
    if m is None:
        raise ConfigError(f"--memory: expected an integer with an optional unit M, G or T, got {text[:40]!r}")
    value = int(m.group(1)) * {"": 1, "m": 1, "g": 1024, "t": 1024 * 1024}[m.group(2).lower()]
    if value > MAX_MEMORY_MIB:
        raise ConfigError(f"--memory: {text!r} is larger than {MAX_MEMORY_MIB} MiB")
    return value
