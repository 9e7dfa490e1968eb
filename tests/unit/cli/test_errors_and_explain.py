"""Error codes: stable, nitro-cli's numbers, explained, never a traceback."""

from __future__ import annotations

import pytest

from enclavekit.cli.main import main
from enclavekit.errors import CATALOGUE, EnclaveKitError, FileOperationError, lookup


def test_nitro_cli_codes_keep_their_numbers_and_names() -> None:
    expected = {"E19": "FileOperation", "E22": "InsufficientCpus", "E26": "InsufficientMemoryRequested",
                "E27": "InsufficientMemoryAvailable", "E35": "EifParsing", "E36": "EnclaveBootFailure",
                "E44": "ConsoleConnection", "E58": "EnclaveNaming", "E59": "EIFSignatureChecker", "E60": "EIFSigning"}
    for code, name in expected.items():
        assert CATALOGUE[code].name == name
    assert [f"E{n:02d}" for n in range(61)] == [c for c in CATALOGUE if int(c[1:]) <= 60]


def test_every_code_has_meaning_and_action_and_an_exit_status() -> None:
    for entry in CATALOGUE.values():
        assert entry.meaning and entry.action
        assert 0 < entry.exit_status < 256
    assert lookup("19") == CATALOGUE["E19"]
    assert lookup("e35") == CATALOGUE["E35"]
    assert lookup("E999") is None


def test_diagnostics_format() -> None:
    err = FileOperationError("could not open 'x'", details={"path": "x"})
    text = err.diagnostics()
    assert text.startswith("[ E19 ] could not open 'x'")
    assert "path: x" in text
    assert err.exit_status == 19


def test_code_override_must_exist() -> None:
    assert EnclaveKitError("m", code="E22").code == "E22"
    with pytest.raises(ValueError):
        EnclaveKitError("m", code="E999")


def test_explain_known_and_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--error-code", "E35"]) == 0
    out = capsys.readouterr().out
    assert "[ E35 ] EifParsing" in out and "What to do" in out
    assert main(["explain", "--error-code", "E999"]) != 0
    assert "No such error code E999" in capsys.readouterr().err


def test_explain_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(CATALOGUE)


def test_docs_error_table_matches_the_code() -> None:
    from pathlib import Path

    from enclavekit.cli.explain import markdown_table

    doc = Path(__file__).resolve().parents[3] / "docs" / "errors.md"
    expected = markdown_table()
    assert doc.read_text(encoding="utf-8") == expected, "regenerate: enclavekit explain --markdown > docs/errors.md"
