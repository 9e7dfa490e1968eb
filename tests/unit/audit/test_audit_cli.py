"""`enclavekit audit validate|events|public-key` on a local trail (exit statuses, output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from audit_helpers import build_trail, files

from enclavekit.cli.main import main


def _export_key(trail: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    """`audit public-key` once, kept outside the trail: the PEM path and the SHA-256 fingerprint."""
    assert main(["audit", "public-key", "--trail", str(trail)]) == 0
    captured = capsys.readouterr()
    out.write_text(captured.out)
    return out, captured.err.split("sha256 ")[1].split()[0]


def test_cli_validate_events_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trail = build_trail(tmp_path / "t", rounds=2)
    pem, sha = _export_key(trail, tmp_path / "key.pem", capsys)
    assert len(sha) == 64
    assert main(["audit", "validate", "--trail", str(trail), "--verbose", "--public-key", str(pem)]) == 0
    out = capsys.readouterr().out
    assert "3/3 digest files valid" in out and "Log file\ts3://local/" in out
    assert main(["audit", "validate", "--trail", str(trail), "--public-key-fingerprint", sha]) == 0
    capsys.readouterr()

    assert main(["audit", "events", "--trail", str(trail), "--json", "--event-name", "TerminateEnclave",
                 "--public-key", str(pem)]) == 0
    events = json.loads(capsys.readouterr().out)
    assert [e["eventName"] for e in events] == ["TerminateEnclave"]
    assert main(["audit", "events", "--trail", str(trail)]) == 0
    assert "RunEnclave" in capsys.readouterr().out

    files(trail, "CloudTrail")[0].write_bytes(b"\x1f\x8b\x08\x00")
    assert main(["audit", "validate", "--trail", str(trail), "--public-key", str(pem)]) == 1
    assert "INVALID" in capsys.readouterr().err


def test_cli_validate_unanchored_keys_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Keys read from the trail itself (next to its private key) anchor nothing: WARNING and exit 2."""
    trail = build_trail(tmp_path / "t", rounds=1)
    assert main(["audit", "validate", "--trail", str(trail)]) == 2
    captured = capsys.readouterr()
    assert "WARNING: unanchored: keys read from the trail itself" in captured.err
    assert "1/1 digest files valid" not in captured.out and "2/2 digest files valid" in captured.out
    assert main(["audit", "validate", "--trail", str(trail), "--trust-trail-keys"]) == 0
    assert "WARNING: unanchored" not in capsys.readouterr().err
    # a pinned fingerprint that is not the trail's: refused
    assert main(["audit", "validate", "--trail", str(trail), "--public-key-fingerprint", "ab" * 32]) != 0
    assert "matches --public-key-fingerprint" in capsys.readouterr().err
    # tampering still says 1, not 2
    files(trail, "CloudTrail")[0].write_bytes(b"\x1f\x8b\x08\x00")
    assert main(["audit", "validate", "--trail", str(trail)]) == 1
    capsys.readouterr()


def test_cli_validate_output_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trail = build_trail(tmp_path / "t", rounds=1)
    assert main(["audit", "validate", "--trail", str(trail), "--trust-trail-keys",
                 "--start-time", "2020-01-01T00:00:00Z"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Validating log files for trail ") and "between 2020-01-01T00:00:00Z and " in out[0]
    assert any(line.startswith("Results requested for 2020-01-01T00:00:00Z to ") for line in out)
    assert any(line.startswith("Results found for ") for line in out)
    assert "0 log file(s) pending (delivered, not yet listed by a digest)" in out


def test_cli_validate_no_digests_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from enclavekit.audit.trail import Trail
    Trail(tmp_path / "t", deliver=False).close(seal=False)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "key.pem"
    pem.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    assert main(["audit", "validate", "--trail", str(tmp_path / "t"), "--public-key", str(pem)]) == 2
    captured = capsys.readouterr()
    assert "No digests found" in captured.out and "GAP: No digests found" in captured.err


def test_cli_seal_closes_the_runtime_trail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    from enclavekit.runtime.audit import RuntimeAudit
    from enclavekit.runtime.registry import EnclaveRecord

    home = tmp_path / "home"
    home.mkdir()
    audit = RuntimeAudit(home, owner_uid=0)
    record = EnclaveRecord(enclave_id="i-0000000000000000-enc0123456789abcdef", name="app", cid=16,
                           owner_pid=os.getpid(), owner_start=1, state="RUNNING", owner_uid=0, memory_mib=64,
                           cpu_ids=(1,), debug_mode=False, measurements={"PCR0": "00" * 48})
    audit.terminate_enclave(record, via="test")
    audit.close()
    assert main(["audit", "seal", "--state-home", str(home)]) == 0
    assert json.loads(capsys.readouterr().out) == {"Trail": str(home / "audit"), "Sealed": True}
    pem, _ = _export_key(home / "audit", tmp_path / "key.pem", capsys)
    assert main(["audit", "validate", "--trail", str(home / "audit"), "--public-key", str(pem)]) == 0
    capsys.readouterr()
    assert main(["audit", "events", "--trail", str(home / "audit"), "--json", "--public-key", str(pem)]) == 0
    names = [e["eventName"] for e in json.loads(capsys.readouterr().out)]
    assert names == ["TerminateEnclave"], names


def test_cli_seal_refuses_when_the_trail_is_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "audit.json").write_text('{"trail": null}')
    assert main(["audit", "seal", "--state-home", str(tmp_path)]) == 3
    assert "turned off" in capsys.readouterr().err
