"""``enclavekit quickstart --json`` end to end (issue 7): the README's first command, run as CI runs it.

It builds (or reuses) the example images, starts the KMS and vsock-proxy, runs the enclave, shows the changed
image denied, validates the audit trail, and must leave nothing behind.  Needs root; without it the test FAILS.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from enclavekit.quickstart import SECRET

pytestmark = pytest.mark.integration

ENCLAVEKIT = str(Path(sys.executable).with_name("enclavekit"))


def _ours() -> set[int]:
    """PIDs of enclavekit kms/vsock-proxy/supervisor processes started from a quickstart work directory."""
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"enclavekit-quickstart-" in cmdline:
                found.add(int(proc.name))
    return found


def test_quickstart_json() -> None:
    if os.geteuid() != 0:
        pytest.fail("the quickstart runs enclaves and needs root")
    before = set(Path("/tmp").glob("enclavekit-quickstart-*"))
    proc = subprocess.run([ENCLAVEKIT, "quickstart", "--json"], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert result["Result"] == "SUCCESS"
    pcr0 = result["Image"]["PCR0"]
    assert len(pcr0) == 96 and pcr0 != result["ChangedImage"]["PCR0"]
    assert result["Condition"] == {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": pcr0}}
    enclave = result["Enclave"]
    assert enclave["Attestation"]["PCR0"] == pcr0
    assert enclave["Attestation"]["ModuleId"] == enclave["EnclaveID"]
    assert enclave["SecretSHA256"] == hashlib.sha256(SECRET).hexdigest()
    assert SECRET.decode() not in proc.stdout and SECRET.decode() not in proc.stderr
    denied = result["Denied"]
    assert denied["Error"] == "AccessDeniedException"
    assert "DecryptOnlyInTheMeasuredEnclave" in denied["Message"]
    assert "kms:RecipientAttestation:ImageSha384" in denied["Message"]
    assert result["Audit"]["Valid"] is True
    assert (result["Audit"]["Allowed"], result["Audit"]["Denied"]) == (1, 1)
    assert [s["Name"] for s in result["Steps"]] == ["prepare", "build", "kms", "proxy", "key", "enclave", "denied",
                                                    "audit"]
    # nothing left behind: no work directory, no process started from one
    assert set(Path("/tmp").glob("enclavekit-quickstart-*")) == before
    assert _ours() == set()
