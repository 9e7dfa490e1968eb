"""Root filesystem sources for ``build-enclave --docker-uri``: container images without a Docker daemon.

Transports (spec §3.10 step 2 replaced: nitro-cli pulls through the Docker daemon; enclavekit reads local sources):

* ``docker-archive:PATH``: a ``docker save`` tarball (``manifest.json``, the config JSON, layer tars).
* ``oci-archive:PATH``: a tar of an OCI image layout.
* ``oci:DIR``: an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``).
* ``dir:DIR``: a plain root filesystem; needs ``--cmd``.

Layers are applied in order into an in-memory *tree description* (path -> :class:`TreeEntry`), honouring OCI
whiteouts (``.wh.NAME`` removes NAME from lower layers, ``.wh..wh..opq`` hides a directory's lower-layer content)
and hard links.  Nothing is extracted: a file's content stays where it is, as a region of a tar file on disk
(gzip layers are decompressed once into a private temporary file, never unpacked).  File contents are read only
when the ramdisk is written, chunk by chunk.

Refused with :class:`~enclavekit.errors.UnsafeArchiveEntry` (E62), before anything is written: names with ``..``
components or a leading ``/``, symlinks whose target climbs above the image root, hard links naming such a target,
and entries below a symlink (the kernel's initramfs unpacker would write through the link).  Device nodes and FIFOs
are kept as entries only; nothing is ever created on the host.

Ownership and permissions of image entries are kept as the image declares them (they are image content, already
deterministic, and an application running as ``USER 1000`` needs its files to stay its own); ``dir:`` sources are
normalised (owner 0:0, modes per :func:`enclavekit.formats.cpio.normalised_mode`) because host umask and owners are
not part of an image.  Modification times are not kept: the builder stamps every entry with ``SOURCE_DATE_EPOCH``
or 0.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from enclavekit._internal.fileio import FileWindow
from enclavekit.errors import (
    ArchiveError,
    ConfigError,
    FileOperationError,
    ImagePullError,
    ImageSourceError,
    UnsafeArchiveEntry,
)
from enclavekit.formats.cpio import CpioContent, normalised_mode

__all__ = [
    "TRANSPORTS",
    "ARCH_TO_PLATFORM",
    "TreeEntry",
    "ImageConfig",
    "RunSpec",
    "LoadedImage",
    "FileContent",
    "FileRegionContent",
    "ImagePullError",
    "DEFAULT_MAX_LAYER_SIZE",
    "open_source",
    "parse_size",
    "parse_cmd",
    "parse_env_overrides",
    "resolve_run_spec",
    "check_link_target",
    "clean_member_name",
]

TRANSPORTS = ("docker-archive", "oci-archive", "oci", "dir")
ARCH_TO_PLATFORM = {"x86_64": "amd64", "aarch64": "arm64"}
_READ_CHUNK = 1 << 20
_MAX_JSON = 4 << 20          # manifests, indexes and configs are small documents
# A tree description larger than this is not an enclave image (docs/eif.md, "Limits").  build-enclave needs about
# 0.6 KiB of memory per entry (100k empty files: 92 MiB peak RSS), so the cap also bounds it to about 0.6 GiB.
_MAX_ENTRIES = 1_000_000
_MAX_ID = 0xFFFFFFFF
# Default cap on what an image's gzip layers may decompress to, in total (temporary disk space, see _Workspace).
DEFAULT_MAX_LAYER_SIZE = 16 << 30
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^([0-9]{1,16})\s*([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_PORT_RE = re.compile(r"^[0-9]+/")
_OTHER_TRANSPORTS = {"docker", "docker-daemon", "containers-storage", "ostree", "sif", "tarball", "http", "https"}
_INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json"}


# ---------------------------------------------------------------------------------------------- contents


@dataclass(frozen=True, slots=True)
class FileContent:
    """A regular file on disk (``dir:`` sources); its size is checked again while reading.

    With ``root``, ``path`` is relative to it: a ``dir:`` source shares one root string and the tree entry's own
    path string, instead of holding one more absolute path per file.
    """

    path: str
    size: int
    root: str | None = None

    @property
    def file_path(self) -> str:
        return os.path.join(self.root, self.path) if self.root is not None else self.path

    def chunks(self) -> Iterator[bytes | memoryview]:
        yield from _read_region(self.file_path, 0, self.size, whole_file=True)


@dataclass(frozen=True, slots=True)
class FileRegionContent:
    """``size`` bytes at ``offset`` of a file: a member of an (uncompressed) layer tar."""

    path: str
    offset: int
    size: int

    def chunks(self) -> Iterator[bytes | memoryview]:
        yield from _read_region(self.path, self.offset, self.size, whole_file=False)


def _read_region(path: str, offset: int, size: int, *, whole_file: bool) -> Iterator[bytes]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed in finally, generator-friendly
    except OSError as exc:
        raise FileOperationError(f"cannot open {path}: {exc.strerror}",
                                 details={"file": path, "operation": "Open"}) from exc
    try:
        if offset:
            f.seek(offset)
        left = size
        while left > 0:
            chunk = f.read(min(left, _READ_CHUNK))
            if not chunk:
                raise FileOperationError(f"{path} became shorter while the image was built",
                                         details={"file": path, "operation": "Read"})
            left -= len(chunk)
            yield chunk
        if whole_file and f.read(1):
            raise FileOperationError(f"{path} grew while the image was built",
                                     details={"file": path, "operation": "Read"})
    except OSError as exc:
        raise FileOperationError(f"cannot read {path}: {exc.strerror}",
                                 details={"file": path, "operation": "Read"}) from exc
    finally:
        f.close()


# ---------------------------------------------------------------------------------------------- the tree


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """One path of the merged image: type bits, permissions (0o7777), owner, and where its content lives."""

    path: str
    file_type: int
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    link_target: str | None = None
    content: CpioContent | None = None
    rdev_major: int = 0
    rdev_minor: int = 0

    @property
    def is_dir(self) -> bool:
        return self.file_type == stat.S_IFDIR


@dataclass(frozen=True)
class ImageConfig:
    """What the image config says about running it (OCI image config ``config`` object)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""
    architecture: str = ""
    os: str = ""


@dataclass(frozen=True)
class RunSpec:
    """What the enclave's init runs: the ``cmd``, ``env``, ``workdir`` and ``user`` files of ramdisk 1."""

    argv: tuple[str, ...]
    env: tuple[str, ...]
    workdir: str = ""
    user: str = ""


@dataclass
class LoadedImage:
    """A source opened for building.  Close it (or use ``with``) to remove its private temporary files."""

    uri: str
    transport: str
    name: str
    version: str
    tree: dict[str, TreeEntry]
    config: ImageConfig
    docker_info: Any = None
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LoadedImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- names


def clean_member_name(name: str) -> str:
    """A layer member name as a root-relative path ("" for the root); refuses ``..``, absolute names and NUL."""
    if "\0" in name:
        raise UnsafeArchiveEntry(f"archive entry name contains a NUL byte: {name!r}")
    if name.startswith("/"):
        raise UnsafeArchiveEntry(f"archive entry has an absolute path: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveEntry(f"archive entry climbs out of the root with '..': {name!r}")
    return "/".join(parts)


def check_link_target(path: str, target: str) -> None:
    """Refuse a symlink at ``path`` whose ``target``, resolved within the image, climbs above the image root."""
    if not target or "\0" in target:
        raise UnsafeArchiveEntry(f"symlink {path!r} has an empty or NUL-containing target")
    stack: list[str] = [] if target.startswith("/") else path.split("/")[:-1]
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                raise UnsafeArchiveEntry(f"symlink {path!r} -> {target!r} points outside the image root")
            stack.pop()
        else:
            stack.append(part)


def _shared_int(value: int, _cache: dict[int, int] = {}) -> int:  # noqa: B006 - the cache is the point
    """One int object per distinct value: modes, owners and sizes above 256 are otherwise one object per entry."""
    if len(_cache) < 65536:
        return _cache.setdefault(value, value)
    return _cache.get(value, value)


def _parents(path: str) -> Iterator[str]:
    parts = path.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


class _Tree:
    """Applies layers: the in-memory merged tree with whiteout and hard-link handling.

    Besides ``entries`` it keeps a children index (node -> child nodes, ``""`` is the root) over every entry and
    every ancestor of an entry, listed or not, so that a whiteout or a replaced directory touches only its own
    subtree: applying a layer costs time in proportion to the layer, not to the image times its whiteouts.
    """

    def __init__(self) -> None:
        self.entries: dict[str, TreeEntry] = {}
        self._children: dict[str, set[str]] = {}

    def _link(self, path: str) -> None:
        # Invariant: a node with a children set is itself linked into its parent's set.
        while path:
            parent = _parent(path)
            siblings = self._children.get(parent)
            if siblings is not None:
                siblings.add(path)
                return
            self._children[parent] = {path}
            path = parent

    def _unlink_if_unused(self, path: str) -> None:
        # A node that is neither an entry nor an ancestor of one leaves the index (and so may its parent).
        while path and path not in self.entries and not self._children.get(path):
            self._children.pop(path, None)
            parent = _parent(path)
            siblings = self._children.get(parent)
            if siblings is None:
                return
            siblings.discard(path)
            path = parent

    def _descendants(self, path: str) -> list[str]:
        """Every node strictly below ``path``, parents before their children."""
        out: list[str] = []
        stack = list(self._children.get(path, ()))
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(self._children.get(node, ()))
        return out

    def _remove_subtree(self, path: str, keep: set[str] | None = None) -> None:
        """Remove the entries below ``path`` except those in ``keep`` (and the ancestors of those)."""
        for node in reversed(self._descendants(path)):  # children before parents
            if keep is not None and node in keep:
                continue
            self.entries.pop(node, None)
            if not self._children.get(node):
                self._children.pop(node, None)
                self._children[_parent(node)].discard(node)
        self._unlink_if_unused(path)

    def _check_parents(self, path: str) -> None:
        for parent in _parents(path):
            existing = self.entries.get(parent)
            if existing is None:
                continue
            if existing.file_type == stat.S_IFLNK:
                raise UnsafeArchiveEntry(f"archive entry {path!r} lies below the symlink {parent!r}; unpacking "
                                         "it would write through the link")
            if not existing.is_dir:
                raise ArchiveError(f"archive entry {path!r} lies below {parent!r}, which is not a directory")

    def add(self, entry: TreeEntry, added: set[str]) -> None:
        if len(self.entries) >= _MAX_ENTRIES:
            raise ArchiveError(f"image has more than {_MAX_ENTRIES:,} entries (enclavekit's limit)")
        path = entry.path
        self._check_parents(path)
        if not entry.is_dir and self._children.get(path):
            # OCI image spec, layer changesets: an entry replaces whatever the lower layers had at its path, so a
            # file, symlink or device hides every lower-layer entry below that path.  Within one layer, a
            # non-directory listed after entries below it is refused: the kernel's unpacker would create the
            # link first and then write `path/...` through it (or fail), depending on the unpacker.
            below = self._descendants(path)
            clash = next((p for p in below if p in added), None)
            if clash is not None:
                kind = "symlink" if entry.file_type == stat.S_IFLNK else "non-directory"
                raise UnsafeArchiveEntry(f"archive entry {path!r} is a {kind} but the same layer already put "
                                         f"{clash!r} below it; unpacking would write through it")
            self._remove_subtree(path)
        self.entries[path] = entry
        self._link(path)
        added.add(path)

    def whiteout(self, directory: str, name: str, added: set[str]) -> None:
        if name == ".wh..opq":
            # OCI image spec, layer changesets: an opaque whiteout hides all lower-layer children of the directory.
            self._remove_subtree(directory, keep=added)
            return
        target = f"{directory}/{name}" if directory else name
        if target in added:
            return
        self.entries.pop(target, None)
        self._remove_subtree(target, keep=added)

    def finish(self) -> dict[str, TreeEntry]:
        """The merged tree; the children index is dropped (it is only needed while layers are applied)."""
        self._children = {}
        return self.entries


# ---------------------------------------------------------------------------------------------- tar regions


@dataclass(frozen=True)
class _Blob:
    """An uncompressed-or-not byte range of a file on disk."""

    path: str
    offset: int
    size: int


def _open_tar(f: BinaryIO, what: str) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=f, mode="r:")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"{what} is not a readable tar archive: {exc}") from exc


def _tar_members(tar: tarfile.TarFile, what: str) -> Iterator[tarfile.TarInfo]:
    try:
        while True:
            member = tar.next()
            if member is None:
                return
            # TarFile keeps every member it has read; a layer may hold 100k files, so keep memory flat.
            tar.members.clear()  # type: ignore[attr-defined]
            yield member
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{what} is a corrupt tar archive: {exc}") from exc


class _Workspace:
    """Private temporary files (decompressed gzip layers), removed when the image is closed.

    ``max_expanded`` caps the bytes all gzip layers of one image may decompress to, in total: a small hostile
    layer (a "gzip bomb", 1 MiB expanding to terabytes) would otherwise fill the temporary file system.
    """

    def __init__(self, max_expanded: int = DEFAULT_MAX_LAYER_SIZE) -> None:
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self._n = 0
        self.max_expanded = max_expanded
        self.expanded = 0

    def new_file(self) -> str:
        if self.tmp is None:
            self.tmp = tempfile.TemporaryDirectory(prefix="enclavekit-layers-")
        self._n += 1
        return os.path.join(self.tmp.name, f"layer{self._n}.tar")

    def cleanup(self) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def _uncompressed(blob: _Blob, ws: _Workspace, what: str) -> _Blob:
    """The blob itself if it is a plain tar; a decompressed private copy if it is gzip; zstd is refused."""
    with open(blob.path, "rb") as f:
        f.seek(blob.offset)
        magic = f.read(4)
        if magic[:2] == b"\x1f\x8b":
            out_path = ws.new_file()
            total = 0
            try:
                out = open(out_path, "wb")  # noqa: SIM115 - closed in finally
            except OSError as exc:
                raise FileOperationError(f"cannot create a temporary file for {what}: {exc.strerror}",
                                         details={"file": out_path, "operation": "Open"}) from exc
            try:
                with gzip.GzipFile(fileobj=io.BufferedReader(FileWindow(f, blob.offset, blob.size)), mode="rb") as gz:
                    while True:
                        try:
                            # Never more than the remaining allowance (+1 to notice going over it).
                            chunk = gz.read(min(_READ_CHUNK, ws.max_expanded - ws.expanded + 1))
                        except (OSError, EOFError, zlib.error) as exc:
                            raise ArchiveError(f"{what} is a corrupt gzip stream: {exc}") from exc
                        if not chunk:
                            break
                        if ws.expanded + len(chunk) > ws.max_expanded:
                            raise ImageSourceError(
                                f"{what}: the image's gzip layers decompress to more than {ws.max_expanded} bytes "
                                "(the --max-layer-size limit)",
                                hint="A layer that expands this much is likely a decompression bomb; if the image "
                                     "is genuine, raise --max-layer-size.")
                        try:
                            out.write(chunk)
                        except OSError as exc:
                            raise FileOperationError(f"cannot write the decompressed {what} to {out_path}: "
                                                     f"{exc.strerror}",
                                                     details={"file": out_path, "operation": "Write"}) from exc
                        total += len(chunk)
                        ws.expanded += len(chunk)
            finally:
                out.close()
            return _Blob(out_path, 0, total)
        if magic == b"\x28\xb5\x2f\xfd":
            raise ImageSourceError(f"{what} is zstd-compressed; enclavekit reads plain and gzip layers only",
                                   hint="Re-export the image with gzip or uncompressed layers.")
    return blob


def _apply_layer(tree: _Tree, blob: _Blob, what: str) -> None:
    added: set[str] = set()
    with open(blob.path, "rb") as f:
        region = io.BufferedReader(FileWindow(f, blob.offset, blob.size), buffer_size=1 << 16)
        tar = _open_tar(region, what)
        for m in _tar_members(tar, what):
            path = clean_member_name(m.name)
            if not path:
                continue  # the root directory itself
            directory, _, base = path.rpartition("/")
            if base.startswith(".wh."):
                tree.whiteout(directory, base[len(".wh."):], added)
                continue
            uid = _shared_int(m.uid if 0 <= m.uid <= _MAX_ID else 0)
            gid = _shared_int(m.gid if 0 <= m.gid <= _MAX_ID else 0)
            perm = _shared_int(m.mode & 0o7777)
            if m.issparse():
                raise ArchiveError(f"{what}: sparse file {path!r} is not supported")
            if m.isreg():
                if blob.offset + m.offset_data + m.size > blob.offset + blob.size:
                    raise ArchiveError(f"{what}: member {path!r} runs past the end of the layer")
                entry = TreeEntry(path, stat.S_IFREG, perm, uid, gid, m.size,
                                  content=FileRegionContent(blob.path, blob.offset + m.offset_data, m.size))
            elif m.isdir():
                entry = TreeEntry(path, stat.S_IFDIR, perm, uid, gid)
            elif m.issym():
                check_link_target(path, m.linkname)
                entry = TreeEntry(path, stat.S_IFLNK, perm, uid, gid, link_target=m.linkname)
            elif m.islnk():
                try:
                    target = clean_member_name(m.linkname)
                except UnsafeArchiveEntry as exc:
                    raise UnsafeArchiveEntry(f"hard link {path!r} -> {m.linkname!r} points outside the image "
                                             "root") from exc
                source = tree.entries.get(target)
                if source is None or source.file_type != stat.S_IFREG:
                    raise ArchiveError(f"{what}: hard link {path!r} -> {m.linkname!r} names no regular file")
                entry = TreeEntry(path, stat.S_IFREG, source.mode, source.uid, source.gid, source.size,
                                  content=source.content)
            elif m.ischr() or m.isblk():
                ftype = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                entry = TreeEntry(path, ftype, perm, uid, gid, rdev_major=m.devmajor, rdev_minor=m.devminor)
            elif m.isfifo():
                entry = TreeEntry(path, stat.S_IFIFO, perm, uid, gid)
            else:
                raise ArchiveError(f"{what}: member {path!r} has an unsupported tar type {m.type!r}")
            tree.add(entry, added)


# ---------------------------------------------------------------------------------------------- configs


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageSourceError(f"{what} is not valid JSON: {exc}") from exc


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageSourceError(f"image config {what} must be a list of strings")
    return tuple(value)


def _image_config(doc: Any) -> ImageConfig:
    if not isinstance(doc, dict):
        raise ImageSourceError("image config is not a JSON object")
    cfg = doc.get("config") or {}
    if not isinstance(cfg, dict):
        raise ImageSourceError("image config 'config' is not an object")
    workdir = cfg.get("WorkingDir") or ""
    user = cfg.get("User") or ""
    if not isinstance(workdir, str) or not isinstance(user, str):
        raise ImageSourceError("image config WorkingDir/User must be strings")
    return ImageConfig(entrypoint=_str_list(cfg.get("Entrypoint"), "Entrypoint"),
                       cmd=_str_list(cfg.get("Cmd"), "Cmd"), env=_str_list(cfg.get("Env"), "Env"),
                       workdir=workdir, user=user, architecture=str(doc.get("architecture") or ""),
                       os=str(doc.get("os") or ""))


def _docker_info(image_id: str, repo_tags: Sequence[str], doc: dict[str, Any]) -> dict[str, Any]:
    # A description in the spirit of `docker image inspect` (spec §1.8 DockerInfo); keys are sorted on encoding.
    return {"Id": image_id, "RepoTags": list(repo_tags), "Architecture": doc.get("architecture"),
            "Os": doc.get("os"), "Created": doc.get("created"), "Config": doc.get("config")}


def _read_blob(blob: _Blob, cap: int, what: str) -> bytes:
    if blob.size > cap:
        raise ImageSourceError(f"{what} is {blob.size} bytes, above the {cap}-byte limit")
    with open(blob.path, "rb") as f:
        f.seek(blob.offset)
        data = f.read(blob.size)
    if len(data) != blob.size:
        raise ArchiveError(f"{what} is truncated")
    return data


def _verify_digest(blob: _Blob, digest: str, what: str) -> None:
    alg, _, expected = digest.partition(":")
    h = hashlib.new(alg)
    with open(blob.path, "rb") as f:
        f.seek(blob.offset)
        left = blob.size
        while left:
            chunk = f.read(min(left, _READ_CHUNK))
            if not chunk:
                raise ArchiveError(f"{what} is truncated")
            h.update(chunk)
            left -= len(chunk)
    if h.hexdigest() != expected:
        raise ImageSourceError(f"{what} does not match its digest {digest} (got {alg}:{h.hexdigest()})")


def _name_from_tag(tag: str) -> str:
    repo, sep, suffix = tag.rpartition(":")
    return repo if sep and "/" not in suffix else tag


# ---------------------------------------------------------------------------------------------- tar lookups


class _OuterTar:
    """Members of an outer archive (docker save / oci-archive) by normalised name, as byte ranges."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            f = open(path, "rb")  # noqa: SIM115
        except OSError as exc:
            raise FileOperationError(f"cannot open {path}: {exc.strerror}",
                                     details={"file": path, "operation": "Open"}) from exc
        with f:
            tar = _open_tar(f, what)
            for m in _tar_members(tar, what):
                self.members["/".join(p for p in m.name.split("/") if p not in ("", "."))] = m

    def blob(self, name: str, what: str) -> _Blob:
        key = "/".join(p for p in name.split("/") if p not in ("", "."))
        for _ in range(8):
            m = self.members.get(key)
            if m is None:
                raise ImageSourceError(f"{what}: {name!r} is missing from the archive")
            if m.issym() or m.islnk():
                base = key.rpartition("/")[0] if m.issym() else ""
                key = os.path.normpath(os.path.join(base, m.linkname)).lstrip("/")
                continue
            if not m.isreg():
                raise ImageSourceError(f"{what}: {name!r} is not a regular file in the archive")
            return _Blob(self.path, m.offset_data, m.size)
        raise ImageSourceError(f"{what}: too many links resolving {name!r}")


class _OCIStore:
    """Blob access for an OCI layout, either a directory or an outer tar."""

    def __init__(self, root: Path | None, outer: _OuterTar | None) -> None:
        self.root = root
        self.outer = outer

    def file(self, name: str, what: str) -> _Blob:
        if self.outer is not None:
            return self.outer.blob(name, what)
        assert self.root is not None
        p = self.root / name
        try:
            st = p.stat()
        except OSError as exc:
            raise ImageSourceError(f"{what}: {p} is missing") from exc
        return _Blob(str(p), 0, st.st_size)

    def blob(self, descriptor: Any, what: str) -> _Blob:
        if not isinstance(descriptor, dict):
            raise ImageSourceError(f"{what}: descriptor is not an object")
        digest = descriptor.get("digest")
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            # Also what keeps a hostile digest from naming a path outside blobs/.
            raise ImageSourceError(f"{what}: descriptor digest {digest!r} is not sha256:/sha512: hex")
        alg, _, hexpart = digest.partition(":")
        blob = self.file(f"blobs/{alg}/{hexpart}", what)
        size = descriptor.get("size")
        if isinstance(size, int) and size != blob.size:
            raise ImageSourceError(f"{what}: blob {digest} is {blob.size} bytes, its descriptor says {size}")
        _verify_digest(blob, digest, what)
        return blob


def _select_manifest(store: _OCIStore, descriptors: Any, arch: str, depth: int = 0) -> tuple[Any, str]:
    """The image manifest (and its ref-name annotation) for linux/``arch`` from an index's descriptors."""
    if depth > 4:
        raise ImageSourceError("OCI index nesting is too deep")
    if not isinstance(descriptors, list) or not descriptors:
        raise ImageSourceError("OCI index lists no manifests")
    want = ARCH_TO_PLATFORM.get(arch, arch)
    chosen: list[Any] = []
    for d in descriptors:
        if not isinstance(d, dict):
            raise ImageSourceError("OCI index has a descriptor that is not an object")
        platform = d.get("platform")
        if isinstance(platform, dict):
            if platform.get("os") == "linux" and platform.get("architecture") == want:
                chosen.append(d)
        elif len(descriptors) == 1 or d.get("mediaType") in _INDEX_TYPES:
            chosen.append(d)
    if not chosen:
        raise ImageSourceError(f"OCI index has no manifest for linux/{want}")
    d = chosen[0]
    ref = ""
    annotations = d.get("annotations")
    if isinstance(annotations, dict):
        ref = str(annotations.get("org.opencontainers.image.ref.name") or "")
    doc = _json(_read_blob(store.blob(d, "OCI manifest"), _MAX_JSON, "OCI manifest"), "OCI manifest")
    if not isinstance(doc, dict):
        raise ImageSourceError("OCI manifest is not a JSON object")
    if d.get("mediaType") in _INDEX_TYPES or doc.get("mediaType") in _INDEX_TYPES or "manifests" in doc:
        inner, inner_ref = _select_manifest(store, doc.get("manifests"), arch, depth + 1)
        return inner, inner_ref or ref
    return doc, ref


# ---------------------------------------------------------------------------------------------- transports


def _load_oci(store: _OCIStore, arch: str, ws: _Workspace, fallback_name: str) -> tuple[
        _Tree, ImageConfig, str, str, Any]:
    index = _json(_read_blob(store.file("index.json", "OCI layout"), _MAX_JSON, "index.json"), "index.json")
    if not isinstance(index, dict):
        raise ImageSourceError("OCI index.json is not a JSON object")
    manifest, ref = _select_manifest(store, index.get("manifests"), arch)
    config_desc = manifest.get("config")
    config_bytes = _read_blob(store.blob(config_desc, "image config"), _MAX_JSON, "image config")
    doc = _json(config_bytes, "image config")
    config = _image_config(doc)
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ImageSourceError("OCI manifest has no layers list")
    tree = _Tree()
    for i, desc in enumerate(layers):
        what = f"layer {i}"
        tree_blob = _uncompressed(store.blob(desc, what), ws, what)
        _apply_layer(tree, tree_blob, what)
    image_id = str(config_desc["digest"])
    # org.opencontainers.image.ref.name is a full reference (`docker.io/library/x:1`) or just a tag (`latest`).
    name = _name_from_tag(ref) if ("/" in ref or ":" in ref) else fallback_name
    return tree, config, name, image_id, _docker_info(image_id, [ref] if ref else [], doc)


def _load_docker_archive(path: str, ws: _Workspace) -> tuple[_Tree, ImageConfig, str, str, Any]:
    outer = _OuterTar(path, f"docker archive {path}")
    manifest = _json(_read_blob(outer.blob("manifest.json", "docker archive"), _MAX_JSON, "manifest.json"),
                     "manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise ImageSourceError("docker archive manifest.json lists no image")
    if len(manifest) > 1:
        raise ImageSourceError(f"docker archive holds {len(manifest)} images; enclavekit needs exactly one",
                               hint="docker save exactly one image into the archive.")
    item = manifest[0]
    if not isinstance(item, dict) or not isinstance(item.get("Config"), str):
        raise ImageSourceError("docker archive manifest.json entry has no Config")
    config_bytes = _read_blob(outer.blob(item["Config"], "docker archive"), _MAX_JSON, "image config")
    doc = _json(config_bytes, "image config")
    config = _image_config(doc)
    layers = item.get("Layers")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise ImageSourceError("docker archive manifest.json entry has no Layers list")
    diff_ids = (doc.get("rootfs") or {}).get("diff_ids") if isinstance(doc.get("rootfs"), dict) else None
    tree = _Tree()
    for i, layer_name in enumerate(layers):
        what = f"layer {i} ({layer_name})"
        blob = _uncompressed(outer.blob(layer_name, what), ws, what)
        if isinstance(diff_ids, list) and i < len(diff_ids) and isinstance(diff_ids[i], str) \
                and _DIGEST_RE.match(diff_ids[i]):
            # docker save: rootfs.diff_ids are the digests of the uncompressed layer tars.
            _verify_digest(blob, diff_ids[i], what)
        _apply_layer(tree, blob, what)
    image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    tags = item.get("RepoTags") or []
    tags = [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []
    name = _name_from_tag(tags[0]) if tags else Path(path).name.removesuffix(".tar")
    return tree, config, name, image_id, _docker_info(image_id, tags, doc)


def _load_dir(root: str) -> tuple[_Tree, str]:
    base = Path(root)
    if not base.is_dir():
        raise ImageSourceError(f"dir: source {root} is not a directory")
    base_str = str(base)
    tree = _Tree()
    added: set[str] = set()
    listing = hashlib.sha256()

    def walk(directory: Path, rel: str) -> None:
        try:
            with os.scandir(directory) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise FileOperationError(f"cannot list {directory}: {exc.strerror}",
                                     details={"file": str(directory), "operation": "Read"}) from exc
        for item in items:
            path = f"{rel}/{item.name}" if rel else item.name
            try:
                st = item.stat(follow_symlinks=False)
            except OSError as exc:
                raise FileOperationError(f"cannot stat {item.path}: {exc.strerror}",
                                         details={"file": item.path, "operation": "Read"}) from exc
            ftype = _shared_int(stat.S_IFMT(st.st_mode))
            if ftype == stat.S_IFSOCK:
                continue  # sockets cannot be archived (as tar does)
            mode = _shared_int(stat.S_IMODE(normalised_mode(ftype, st.st_mode)))
            if ftype == stat.S_IFREG:
                size = _shared_int(st.st_size)
                entry = TreeEntry(path, ftype, mode, size=size, content=FileContent(path, size, base_str))
            elif ftype == stat.S_IFDIR:
                entry = TreeEntry(path, ftype, mode)
            elif ftype == stat.S_IFLNK:
                target = os.readlink(item.path)
                check_link_target(path, target)
                entry = TreeEntry(path, ftype, mode, link_target=target)
            else:
                entry = TreeEntry(path, ftype, mode, rdev_major=os.major(st.st_rdev),
                                  rdev_minor=os.minor(st.st_rdev))
            listing.update(f"{ftype:o} {mode:o} {entry.size} {path}\0{entry.link_target or ''}\0".encode())
            tree.add(entry, added)
            if ftype == stat.S_IFDIR:
                walk(Path(item.path), path)

    walk(base, "")
    return tree, listing.hexdigest()


def parse_size(text: str) -> int:
    """A byte count: decimal digits with an optional binary suffix (``1048576``, ``512M``, ``16G``, ``16GiB``)."""
    m = _SIZE_RE.match(text.strip())
    if m is None or int(m.group(1)) == 0:
        raise ConfigError(f"expected a positive size such as 16G, 512M or 1048576, got {text!r}")
    return int(m.group(1)) * _SIZE_SUFFIXES[m.group(2).upper()]


def open_source(uri: str, *, arch: str = "x86_64", max_layer_size: int = DEFAULT_MAX_LAYER_SIZE) -> LoadedImage:
    """Open a ``--docker-uri`` source and build its merged tree description (nothing is extracted or written).

    ``max_layer_size`` caps the bytes the image's gzip layers may decompress to, in total (E63 beyond it).
    """
    if max_layer_size <= 0:
        raise ValueError("max_layer_size must be positive")
    transport, sep, location = uri.partition(":")
    if transport not in TRANSPORTS:
        # A bare reference (`hello`, `hello:v1`, `registry:5000/x:tag`, `public.ecr.aws/x/y:v1`) would be pulled
        # through the Docker daemon by nitro-cli (E50); anything else with a prefix is an unknown transport (E63).
        looks_like_reference = (not sep or "/" in transport or "." in transport or _TAG_RE.match(location)
                                or _PORT_RE.match(location)) and transport not in _OTHER_TRANSPORTS
        if looks_like_reference:
            raise ImagePullError(
                f"{uri!r} looks like a registry image name; enclavekit has no Docker daemon to pull it",
                hint="Export the image first (`docker save IMAGE -o image.tar`, `skopeo copy docker://IMAGE "
                     "oci-archive:image.tar`) and pass docker-archive:PATH, oci-archive:PATH, oci:DIR or dir:DIR.")
        raise ImageSourceError(f"unknown image source transport {transport!r} in {uri!r}",
                               hint="Use docker-archive:PATH, oci-archive:PATH, oci:DIR or dir:DIR.")
    if not location:
        raise ImageSourceError(f"image source {uri!r} names no path")
    if arch not in ARCH_TO_PLATFORM:
        raise ValueError(f"unknown architecture {arch!r}")
    ws = _Workspace(max_layer_size)
    try:
        if transport == "dir":
            tree, digest = _load_dir(location)
            name = Path(location).resolve().name or "rootfs"
            image = LoadedImage(uri, transport, name, f"dir:sha256:{digest[:16]}", tree.finish(), ImageConfig())
        else:
            if not Path(location).exists():
                raise FileOperationError(f"image source {location} does not exist",
                                         details={"file": location, "operation": "Open"})
            if transport == "docker-archive":
                t, config, name, image_id, info = _load_docker_archive(location, ws)
            elif transport == "oci-archive":
                store = _OCIStore(None, _OuterTar(location, f"OCI archive {location}"))
                t, config, name, image_id, info = _load_oci(store, arch, ws, Path(location).name.removesuffix(".tar"))
            else:
                if not Path(location).is_dir():
                    raise ImageSourceError(f"oci: source {location} is not a directory")
                t, config, name, image_id, info = _load_oci(_OCIStore(Path(location), None), arch, ws,
                                                            Path(location).resolve().name)
            image = LoadedImage(uri, transport, name, image_id.partition(":")[2], t.finish(), config, info)
        image._tmp = ws.tmp
        ws.tmp = None
        return image
    except BaseException:
        ws.cleanup()
        raise


# ---------------------------------------------------------------------------------------------- run spec


def parse_cmd(text: str) -> tuple[str, ...]:
    """``--cmd``: a JSON array of strings (``'["/app", "-v"]'``) or a shell-like string split with shlex."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except ValueError as exc:
            raise ConfigError(f"--cmd looks like a JSON array but does not parse: {exc}") from exc
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError("--cmd JSON must be an array of strings")
        argv = tuple(value)
    else:
        try:
            argv = tuple(shlex.split(text))
        except ValueError as exc:
            raise ConfigError(f"--cmd does not parse as a shell-like command line: {exc}") from exc
    if not argv:
        raise ConfigError("--cmd is empty")
    return argv


def parse_env_overrides(items: Sequence[str]) -> tuple[str, ...]:
    """``--env KEY=VALUE`` values, checked."""
    out = []
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key or "\n" in item or "\0" in item:
            raise ConfigError(f"--env expects KEY=VALUE without newlines, got {item!r}")
        out.append(item)
    return tuple(out)


def _merge_env(base: Sequence[str], overrides: Sequence[str]) -> tuple[str, ...]:
    merged: dict[str, str] = {}
    for item in (*base, *overrides):
        key = item.partition("=")[0]
        merged[key] = item
    return tuple(merged.values())


def resolve_run_spec(config: ImageConfig, *, cmd: Sequence[str] | None = None, env: Sequence[str] = (),
                     workdir: str | None = None, user: str | None = None, transport: str = "") -> RunSpec:
    """What the enclave runs: argv = Entrypoint + Cmd (``cmd`` replaces Cmd, as ``docker run IMAGE ARGS`` does).

    nitro-cli drops ENTRYPOINT when CMD is set and ignores WORKDIR/USER (spec §3.10 step 3, issue #388); enclavekit
    keeps both.  ``env`` entries replace image entries with the same key.
    """
    argv = (*config.entrypoint, *(cmd if cmd is not None else config.cmd))
    if not argv:
        hint = ("A dir: source has no image config: give the command with --cmd."
                if transport == "dir" else "The image has no ENTRYPOINT or CMD: give one with --cmd.")
        raise ImageSourceError("no command to run in the enclave", hint=hint)
    wd = config.workdir if workdir is None else workdir
    if wd and not wd.startswith("/"):
        raise ConfigError(f"the working directory must be an absolute path, got {wd!r}")
    usr = config.user if user is None else user
    merged = _merge_env(config.env, env)
    # The cmd/env files hold one item per line (spec §3.10 step 3): an item with a newline cannot be encoded.
    for item in (*argv, *merged, wd, usr):
        if "\n" in item or "\0" in item:
            raise ConfigError(f"command, environment, workdir and user items may not contain newlines: {item!r}")
    return RunSpec(argv=tuple(argv), env=merged, workdir=wd, user=usr)


def source_description(image: LoadedImage) -> Mapping[str, Any]:
    """Short facts about an opened source, for progress messages."""
    return {"transport": image.transport, "name": image.name, "entries": len(image.tree)}


@contextlib.contextmanager
def opened(uri: str, *, arch: str = "x86_64",
           max_layer_size: int = DEFAULT_MAX_LAYER_SIZE) -> Iterator[LoadedImage]:
    image = open_source(uri, arch=arch, max_layer_size=max_layer_size)
    try:
        yield image
    finally:
        image.close()
