"""Imports point one way (STYLE.md): formats <- attestation <- pure cores <- I/O adapters <- sdk, cli.

Also: the codecs in ``formats/`` are pure: no file, socket, process, clock or randomness imports, no ``open()``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "enclavekit"

RANK = {
    "errors": 0, "_internal": 1, "formats": 1, "attestation": 2, "nsm": 3, "kms": 3, "audit": 3,
    "image": 4, "runtime": 4, "vsock": 4, "testing": 5, "sdk": 5, "cli": 6, "quickstart": 6, "__init__": 0,
}
IMPURE = {"os", "socket", "time", "random", "secrets", "subprocess", "threading", "pathlib", "shutil", "tempfile"}


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0].removesuffix(".py")


def _imports(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_every_package_has_a_rank() -> None:
    for path in _modules():
        assert _package_of(path) in RANK, f"{path}: add its package to RANK"


def test_imports_point_one_way() -> None:
    violations = []
    for path in _modules():
        own = _package_of(path)
        for name in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if not name.startswith("enclavekit."):
                continue
            target = name.split(".")[1]
            if target == own:
                continue
            if RANK.get(target, 99) > RANK[own]:
                violations.append(f"{path.relative_to(SRC)} imports {name}")
    assert not violations, "\n".join(violations)


def test_formats_are_pure() -> None:
    violations = []
    for path in (SRC / "formats").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name in _imports(tree):
            if name.split(".")[0] in IMPURE:
                violations.append(f"{path.name} imports {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                violations.append(f"{path.name} calls open()")
    assert not violations, "\n".join(violations)
