"""docs/commands.md is generated from the argument parser: it must equal what the generator prints now."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from enclavekit.cli.main import COMMANDS

REPO = Path(__file__).resolve().parents[3]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_command_docs", REPO / "scripts" / "gen_command_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_command_reference_matches_the_parser() -> None:
    expected = _generator().render()
    doc = REPO / "docs" / "commands.md"
    assert doc.read_text(encoding="utf-8") == expected, (
        "regenerate: .venv/bin/python scripts/gen_command_docs.py > docs/commands.md")


def test_every_command_has_a_section() -> None:
    text = _generator().render()
    for command in COMMANDS:
        assert f"\n## `enclavekit {command}`\n" in text, command


def test_sub_commands_and_options_are_rendered() -> None:
    text = _generator().render()
    for heading in ("### `enclavekit attestation verify`", "### `enclavekit kms serve`",
                    "### `enclavekit audit validate`", "### `enclavekit kmstool decrypt`"):
        assert heading in text
    assert "| `--eif-path PATH` | yes |" in text
    assert "| `--arch {x86_64,aarch64}` |" in text


def test_output_does_not_depend_on_the_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    narrow = _generator().render()
    monkeypatch.setenv("COLUMNS", "250")
    assert _generator().render() == narrow


def test_hidden_options_stay_hidden() -> None:
    text = _generator().render()
    assert "--unsafe-no-audit" not in text
    assert "==SUPPRESS==" not in text
