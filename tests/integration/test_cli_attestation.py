"""`enclavekit attestation …` run as a real process: exit statuses, JSON on stdout, codes and rules on stderr."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
ENCLAVEKIT = str(Path(sys.executable).with_name("enclavekit"))
SIGNED = "attestation/aws-signed-eif-2022-10-13.cbor"
DEBUG = "attestation/aws-debug-2023-09-18.cbor"
PCR0 = "ab" * 48


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ENCLAVEKIT_HOME": str(home)}
    return subprocess.run([ENCLAVEKIT, "attestation", *args], capture_output=True, text=True, env=env, timeout=60,
                          check=False)


def fixture(name: str) -> str:
    return str(FIXTURES / name)


def test_describe_prints_the_document(tmp_path: Path) -> None:
    proc = run(tmp_path, "describe", fixture(SIGNED))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["module_id"] == MANIFEST[SIGNED]["module_id"]
    assert out["pcrs"]["8"] == MANIFEST[SIGNED]["pcrs"]["8"]
    assert out["payload_map"] == "definite"
    assert out["cose"] == {"tagged": False, "protected": "a1013822", "signature_length": 96}


def test_describe_refuses_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cbor"
    bad.write_bytes(b"not cbor at all")
    proc = run(tmp_path, "describe", str(bad))
    assert proc.returncode == 70
    assert "[ E70 ]" in proc.stderr and "Traceback" not in proc.stderr


def test_verify_a_real_document_as_of_its_time(tmp_path: Path) -> None:
    pcrs = MANIFEST[SIGNED]["pcrs"]
    proc = run(tmp_path, "verify", fixture(SIGNED), "--at", MANIFEST[SIGNED]["verify_at"],
               "--expect-pcr", f"0={pcrs['0']}", "--expect-pcr", f"8={pcrs['8']}", "--min-nonce-bytes", "256")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"module_id", "timestamp", "pcrs", "public_key", "user_data", "nonce"} <= set(out)
    assert out["module_id"] == MANIFEST[SIGNED]["module_id"]
    assert out["timestamp"] == MANIFEST[SIGNED]["timestamp_ms"]
    assert out["pcrs"]["0"] == MANIFEST[SIGNED]["pcrs"]["0"]
    assert out["user_data"] is None and len(bytes.fromhex(out["nonce"])) == 256


def test_verify_now_fails_on_validity(tmp_path: Path) -> None:
    proc = run(tmp_path, "verify", fixture(SIGNED))
    assert proc.returncode == 71
    assert "[ E71 ]" in proc.stderr and "rule: certificate-validity" in proc.stderr
    assert proc.stdout == ""


def test_verify_policy_failures(tmp_path: Path) -> None:
    at = MANIFEST[SIGNED]["verify_at"]
    proc = run(tmp_path, "verify", fixture(SIGNED), "--at", at, "--expect-pcr", f"0={PCR0}")
    assert proc.returncode == 72 and "rule: pcrs" in proc.stderr
    proc = run(tmp_path, "verify", fixture(SIGNED), "--at", at, "--nonce-hex", "00")
    assert proc.returncode == 72 and "rule: nonce" in proc.stderr


def test_debug_documents_need_allow_debug(tmp_path: Path) -> None:
    at = MANIFEST[DEBUG]["verify_at"]
    proc = run(tmp_path, "verify", fixture(DEBUG), "--at", at)
    assert proc.returncode == 72 and "rule: debug-mode" in proc.stderr
    proc = run(tmp_path, "verify", fixture(DEBUG), "--at", at, "--allow-debug")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["debug_mode"] is True


def test_root_options(tmp_path: Path) -> None:
    at = MANIFEST[SIGNED]["verify_at"]
    aws_pem = fixture("attestation/aws-nitro-enclaves-root-g1.pem")
    assert run(tmp_path, "verify", fixture(SIGNED), "--at", at, "--root", aws_pem).returncode == 0
    assert run(tmp_path, "verify", fixture(SIGNED), "--at", at, "--no-aws-root", "--root", aws_pem).returncode == 0
    assert run(tmp_path, "root-cert").returncode == 0  # creates the local PKI
    proc = run(tmp_path, "verify", fixture(SIGNED), "--at", at, "--local-root")
    assert proc.returncode == 71 and "rule: trust-root" in proc.stderr
    assert run(tmp_path, "verify", fixture(SIGNED), "--at", at, "--local-root", "--aws-root").returncode == 0
    proc = run(tmp_path, "verify", fixture(SIGNED), "--at", at, "--no-aws-root")
    assert proc.returncode == 3  # no trust root at all: invalid argument


def test_issue_then_verify_with_the_local_root(tmp_path: Path) -> None:
    out = tmp_path / "doc.cbor"
    proc = run(tmp_path, "issue", "--output", str(out), "--pcr", f"0={PCR0}", "--nonce-hex", "0011",
               "--user-data-hex", "cafe", "--parent-instance-id", "i-0123456789abcdef0")
    assert proc.returncode == 0, proc.stderr
    issued = json.loads(proc.stdout)
    assert issued["module_id"].startswith("i-0123456789abcdef0-enc")
    assert out.read_bytes()[:7] == bytes.fromhex("8444a1013822a0")

    proc = run(tmp_path, "verify", str(out), "--local-root", "--expect-pcr", f"0={PCR0}", "--nonce-hex", "0011",
               "--max-age", "600")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["module_id"] == issued["module_id"]
    assert result["user_data"] == "cafe" and result["nonce"] == "0011" and result["public_key"] is None
    assert sorted(int(i) for i in result["pcrs"]) == list(range(16))
    assert result["pcrs"]["1"] == "00" * 48
    # PCR4 = SHA384(0^48 || instance id)
    assert result["pcrs"]["4"] == hashlib.sha384(b"\x00" * 48 + b"i-0123456789abcdef0").hexdigest()

    proc = run(tmp_path, "verify", str(out))  # AWS root only
    assert proc.returncode == 71 and "rule: trust-root" in proc.stderr

    root_pem = tmp_path / "root.pem"
    root = run(tmp_path, "root-cert")
    assert root.returncode == 0 and root.stdout.startswith("-----BEGIN CERTIFICATE-----")
    root_pem.write_text(root.stdout)
    assert run(tmp_path / "elsewhere", "verify", str(out), "--root", str(root_pem)).returncode == 0


def test_issue_debug_mode_and_definite_map(tmp_path: Path) -> None:
    out = tmp_path / "debug.cbor"
    proc = run(tmp_path, "issue", "--output", str(out), "--pcr", f"0={PCR0}", "--debug-mode", "--definite-map",
               "--module-id", "i-0123456789abcdef0-enc0000000000000001")
    assert proc.returncode == 0, proc.stderr
    described = json.loads(run(tmp_path, "describe", str(out)).stdout)
    assert described["payload_map"] == "definite" and described["debug_mode"] is True
    assert described["pcrs"]["0"] == "00" * 48
    assert run(tmp_path, "verify", str(out), "--local-root").returncode == 72
    assert run(tmp_path, "verify", str(out), "--local-root", "--allow-debug").returncode == 0


def test_issue_argument_errors(tmp_path: Path) -> None:
    out = str(tmp_path / "x.cbor")
    assert run(tmp_path, "issue", "--output", out, "--pcr", "0=zz").returncode == 3
    assert run(tmp_path, "issue", "--output", out, "--pcr", "40=" + PCR0).returncode == 3
    assert run(tmp_path, "issue", "--output", out, "--nonce-hex", "00" * 1025).returncode == 3
    assert run(tmp_path, "issue", "--output", out, "--eif-path", "/nonexistent.eif").returncode == 19
    assert run(tmp_path, "issue").returncode == 2  # --output is required


def test_issue_from_an_eif_carries_its_measurements(tmp_path: Path) -> None:
    from enclavekit.formats.eif import BuildMetadata, EIFMetadata
    from enclavekit.image.eif_writer import BytesSource, EIFContent, write_eif

    meta = EIFMetadata("img", "1", BuildMetadata("2024-01-01T00:00:00+00:00", "enclavekit", "0.1.0", "Linux", "6.1"))
    eif = tmp_path / "image.eif"
    with eif.open("wb") as fh:
        measured = write_eif(fh, EIFContent(kernel=BytesSource(b"kernel"), cmdline=b"console=ttyS0", metadata=meta,
                                            ramdisks=[BytesSource(b"boot"), BytesSource(b"app")]))
    out = tmp_path / "doc.cbor"
    proc = run(tmp_path, "issue", "--output", str(out), "--eif-path", str(eif))
    assert proc.returncode == 0, proc.stderr
    proc = run(tmp_path, "verify", str(out), "--local-root", "--expect-pcr", f"0={measured.pcr0.hex()}",
               "--expect-pcr", f"1={measured.pcr1.hex()}", "--expect-pcr", f"2={measured.pcr2.hex()}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["pcrs"]["8"] == "00" * 48


def test_describe_survives_a_corrupt_certificate_without_warnings(tmp_path: Path) -> None:
    # the issue's repro: bit 0 of byte 944 of this document is in the leaf's version field
    data = bytearray((FIXTURES / "attestation/aws-debug-2022-10-12.cbor").read_bytes())
    data[944] ^= 0x01
    bad = tmp_path / "bad-version.cbor"
    bad.write_bytes(bytes(data))
    proc = run(tmp_path, "describe", str(bad))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no cryptography warnings either
    assert json.loads(proc.stdout)["certificate"]["error"] == "not a parsable X.509 certificate (InvalidVersion)"


def test_oversize_document_is_a_format_error(tmp_path: Path) -> None:
    big = tmp_path / "big.cbor"
    big.write_bytes(b"\x84" + b"\x00" * 20000)
    for command in ("describe", "verify"):
        proc = run(tmp_path, command, str(big))
        assert proc.returncode == 70, proc.stderr
        assert "[ E70 ]" in proc.stderr and "rule: document-size" in proc.stderr


def _pcr4(instance_id: str) -> str:
    return hashlib.sha384(b"\x00" * 48 + instance_id.encode()).hexdigest()


def test_issue_pcr4_follows_the_instance_id_used(tmp_path: Path) -> None:
    # spec 2.5: PCR4 is never zero on Nitro; it measures the instance id the module id names
    out = tmp_path / "doc.cbor"
    proc = run(tmp_path, "issue", "--output", str(out), "--pcr", f"0={PCR0}")
    assert proc.returncode == 0, proc.stderr
    module_id = json.loads(proc.stdout)["module_id"]
    described = json.loads(run(tmp_path, "describe", str(out)).stdout)
    assert described["pcrs"]["4"] == _pcr4(module_id.split("-enc")[0]) != "00" * 48
    # the local PKI's instance certificate names the same instance
    assert module_id.split("-enc")[0] + "." in described["cabundle"][3]["subject"]

    proc = run(tmp_path, "issue", "--output", str(out), "--module-id", "i-0a1b2c3d-enc0000000000000001")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(run(tmp_path, "describe", str(out)).stdout)["pcrs"]["4"] == _pcr4("i-0a1b2c3d")


@pytest.mark.parametrize("bad", ["i-XYZ", "i-0123456", "0123456789abcdef0", "i-0123456789ABCDEF0",
                                 "i-0123456789abcdef01"])
def test_issue_refuses_a_malformed_parent_instance_id(tmp_path: Path, bad: str) -> None:
    proc = run(tmp_path, "issue", "--output", str(tmp_path / "x.cbor"), "--parent-instance-id", bad)
    assert proc.returncode == 3 and "[ E03 ]" in proc.stderr
    assert not (tmp_path / "x.cbor").exists()
