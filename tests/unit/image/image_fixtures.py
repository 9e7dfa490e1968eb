"""Builders for small container images in the formats build-enclave reads (docker save, OCI layout, OCI archive)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class M:
    """A layer member: kind in file/dir/symlink/hardlink/char/fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    link: str = ""
    uid: int = 0
    gid: int = 0


def layer_tar(members: Sequence[M]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.mode, info.uid, info.gid, info.mtime = m.mode, m.uid, m.gid, 1234567890
            if m.kind == "file":
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "char": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[m.kind]
            info.linkname = m.link
            if m.kind == "char":
                info.devmajor, info.devminor = 1, 3
            tar.addfile(info)
    return buf.getvalue()


def _tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def image_config(config: dict[str, Any], layers: Sequence[bytes], arch: str = "amd64") -> bytes:
    return json.dumps({"architecture": arch, "os": "linux", "config": config,
                       "rootfs": {"type": "layers",
                                  "diff_ids": ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]}}).encode()


def docker_archive(path: Path, layers: Sequence[Sequence[M]], config: dict[str, Any], *, gzip_layers: bool = False,
                   tags: Sequence[str] = ("example/app:v1",)) -> Path:
    raw = [layer_tar(x) for x in layers]
    cfg = image_config(config, raw)
    files: dict[str, bytes] = {}
    names = []
    for i, data in enumerate(raw):
        name = f"layer{i}/layer.tar"
        files[name] = gzip.compress(data, mtime=0) if gzip_layers else data
        names.append(name)
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    files[cfg_name] = cfg
    files["manifest.json"] = json.dumps([{"Config": cfg_name, "RepoTags": list(tags), "Layers": names}]).encode()
    path.write_bytes(_tar_of(files))
    return path


def _blob(blobs: dict[str, bytes], data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    blobs[f"blobs/sha256/{digest}"] = data
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data), **extra}


def oci_files(layers: Sequence[Sequence[M]], config: dict[str, Any], *, gzip_layers: bool = True,
              arm_too: bool = True) -> dict[str, bytes]:
    blobs: dict[str, bytes] = {}
    raw = [layer_tar(x) for x in layers]
    layer_descs = [_blob(blobs, gzip.compress(x, mtime=0) if gzip_layers else x,
                         "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gzip_layers else ""))
                   for x in raw]
    cfg = _blob(blobs, image_config(config, raw), "application/vnd.oci.image.config.v1+json")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": cfg, "layers": layer_descs}).encode()
    entries = [_blob(blobs, manifest, "application/vnd.oci.image.manifest.v1+json",
                     platform={"os": "linux", "architecture": "amd64"})]
    if arm_too:
        arm_layer = layer_tar([M("arm-only", data=b"arm")])
        arm_l = _blob(blobs, arm_layer, "application/vnd.oci.image.layer.v1.tar")
        arm_cfg = _blob(blobs, image_config({"Cmd": ["/arm"]}, [arm_layer], "arm64"),
                        "application/vnd.oci.image.config.v1+json")
        arm_manifest = json.dumps({"schemaVersion": 2, "config": arm_cfg, "layers": [arm_l]}).encode()
        entries.append(_blob(blobs, arm_manifest, "application/vnd.oci.image.manifest.v1+json",
                             platform={"os": "linux", "architecture": "arm64"}))
    nested = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                         "manifests": entries}).encode()
    top = _blob(blobs, nested, "application/vnd.oci.image.index.v1+json",
                annotations={"org.opencontainers.image.ref.name": "v2"})
    blobs["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [top]}).encode()
    blobs["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    return blobs


def oci_dir(path: Path, layers: Sequence[Sequence[M]], config: dict[str, Any], **kw: Any) -> Path:
    for name, data in oci_files(layers, config, **kw).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def oci_archive(path: Path, layers: Sequence[Sequence[M]], config: dict[str, Any], **kw: Any) -> Path:
    path.write_bytes(_tar_of(oci_files(layers, config, **kw)))
    return path


