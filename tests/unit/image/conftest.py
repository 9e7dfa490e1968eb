"""Fixtures for the image tests: small container images built on the fly (see image_fixtures.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from image_fixtures import M, docker_archive, oci_archive, oci_dir


@pytest.fixture
def images(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(kind: str, layers: Sequence[Sequence[M]], config: dict[str, Any] | None = None, **kw: Any) -> Path:
        cfg = config if config is not None else {"Cmd": ["/bin/app"]}
        n = next(counter)
        if kind == "docker-archive":
            return docker_archive(tmp_path / f"img{n}.tar", layers, cfg, **kw)
        if kind == "oci-archive":
            return oci_archive(tmp_path / f"oci{n}.tar", layers, cfg, **kw)
        if kind == "oci":
            d = tmp_path / f"oci{n}"
            d.mkdir()
            return oci_dir(d, layers, cfg, **kw)
        raise ValueError(kind)

    return make
