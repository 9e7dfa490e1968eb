"""`enclavekit audit validate|events|public-key` on a local trail (exit statuses, output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from audit_helpers import build_trail, files

from enclavekit.cli.main import main


def test_cli_validate_events_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trail = build_trail(tmp_path / "t", rounds=2)
    assert main(["audit", "validate", "--trail", str(trail), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "3/3 digest files valid" in out and "Log file\ts3://local/" in out

    assert main(["audit", "events", "--trail", str(trail), "--json", "--event-name", "TerminateEnclave"]) == 0
    events = json.loads(capsys.readouterr().out)
    assert [e["eventName"] for e in events] == ["TerminateEnclave"]
    assert main(["audit", "events", "--trail", str(trail)]) == 0
    assert "RunEnclave" in capsys.readouterr().out

    assert main(["audit", "public-key", "--trail", str(trail)]) == 0
    pem = capsys.readouterr().out
    (tmp_path / "key.pem").write_text(pem)
    assert main(["audit", "validate", "--trail", str(trail), "--public-key", str(tmp_path / "key.pem")]) == 0
    capsys.readouterr()

    files(trail, "CloudTrail")[0].write_bytes(b"\x1f\x8b\x08\x00")
    assert main(["audit", "validate", "--trail", str(trail)]) == 1
    assert "INVALID" in capsys.readouterr().err


def test_cli_validate_no_digests_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from enclavekit.audit.trail import Trail
    Trail(tmp_path, deliver=False).close(seal=False)
    (tmp_path / "keys").mkdir(exist_ok=True)
    assert main(["audit", "validate", "--trail", str(tmp_path)]) != 0
