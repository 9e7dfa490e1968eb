"""build-enclave: image source + blobs -> two deterministic cpio ramdisks -> a streamed EIF (spec §3.10, §1.5).

Pipeline (nitro-cli's ``build_from_docker`` with the Docker daemon and linuxkit replaced):

1. resolve the blobs (``--blobs``, ``NITRO_CLI_BLOBS``, the default set) and read ``cmdline`` and the kernel config;
2. read ``--metadata`` (a regular file of at most 4096 bytes of JSON, §1.8), load the signing key if any;
3. open the image source and merge its layers into a tree description (:mod:`enclavekit.image.sources`);
4. ramdisk 0 = bootstrap (``dev/``, ``init``, ``nsm.ko``, all 0755, §3.10 step 4), ramdisk 1 = customer
   (``rootfs/`` + the image, ``rootfs/{dev,run,sys,var,proc,tmp}`` 0755, ``cmd`` and ``env`` 0644, plus
   ``workdir``/``user`` when set): both :class:`~enclavekit.formats.cpio.CpioArchive`, streamed from disk;
5. stream the EIF into a temporary file beside the output and rename it over the output only on success, so a
   failure at any step leaves nothing at the output path.

Determinism: every cpio entry gets mtime ``SOURCE_DATE_EPOCH`` (or 0), entries are sorted, inodes sequential.
With ``SOURCE_DATE_EPOCH`` set BuildTime is derived from it too and two builds are byte-identical; without it
only BuildTime differs (and the PCRs, which never cover metadata, are identical).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import stat
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclavekit import __version__
from enclavekit.errors import ConfigError, FileOperationError, ImageBuildError, UnsafeArchiveEntry
from enclavekit.formats.cpio import BytesContent, CpioArchive, CpioEntry
from enclavekit.formats.eif import BuildMetadata, EIFMetadata, kernel_config_info
from enclavekit.formats.pcr import Measurements
from enclavekit.image.blobs import BlobSet, load_blobs, resolve_blobs_dir
from enclavekit.image.eif_writer import EIFContent, FileSource, write_eif
from enclavekit.image.signing import EIFSigner
from enclavekit.image.sources import (
    ARCH_TO_PLATFORM,
    DEFAULT_MAX_LAYER_SIZE,
    FileContent,
    LoadedImage,
    RunSpec,
    open_source,
    parse_cmd,
    parse_env_overrides,
    resolve_run_spec,
)

__all__ = [
    "BUILD_TOOL",
    "CUSTOM_METADATA_MAX_SIZE",
    "CUSTOMER_DIRS",
    "BuildOptions",
    "BuildResult",
    "build_enclave",
    "bootstrap_ramdisk",
    "customer_ramdisk",
    "parse_source_date_epoch",
    "load_custom_metadata",
    "build_time",
]

BUILD_TOOL = "enclavekit"
CUSTOM_METADATA_MAX_SIZE = 4096  # §1.8 parse_custom_metadata
_NEWC_MAX_FILE = 0xFFFFFFFF  # newc's filesize field is 8 hex digits
CUSTOMER_DIRS = ("dev", "run", "sys", "var", "proc", "tmp")  # §3.10 step 4, customer YAML


@dataclass(frozen=True)
class BuildOptions:
    """build-enclave's inputs.  ``source_date_epoch``/``now`` are the time inputs (BuildTime, cpio mtimes)."""

    docker_uri: str
    output_file: str
    arch: str = "x86_64"
    blobs_dir: str | None = None
    name: str | None = None
    version: str | None = None
    metadata_file: str | None = None
    cmd: str | None = None
    env: Sequence[str] = ()
    workdir: str | None = None
    user: str | None = None
    signing_certificate: str | None = None
    private_key: str | None = None
    source_date_epoch: int | None = None
    now: dt.datetime | None = None
    environ: Mapping[str, str] | None = field(default=None, repr=False)
    max_layer_size: int = DEFAULT_MAX_LAYER_SIZE


@dataclass(frozen=True)
class BuildResult:
    measurements: Measurements
    output: Path
    size: int
    image_name: str
    image_version: str
    run_spec: RunSpec


def parse_source_date_epoch(value: str | None) -> int | None:
    """``SOURCE_DATE_EPOCH`` (reproducible-builds.org): a decimal count of seconds, or unset/empty."""
    if value is None or value == "":
        return None
    if not value.isdigit() or int(value) > 0xFFFFFFFF:
        raise ConfigError(f"SOURCE_DATE_EPOCH must be a decimal number of seconds (0..4294967295), got {value!r}")
    return int(value)


def build_time(source_date_epoch: int | None, now: dt.datetime | None) -> str:
    """§1.8 BuildTime: RFC 3339 UTC with ``+00:00`` (chrono's ``to_rfc3339``)."""
    if source_date_epoch is not None:
        when = dt.datetime.fromtimestamp(source_date_epoch, tz=dt.UTC)
    else:
        when = (now or dt.datetime.now(tz=dt.UTC)).astimezone(dt.UTC)
    return when.isoformat()


def load_custom_metadata(path: str) -> Any:
    """``--metadata FILE``: a regular file of at most 4096 bytes holding one JSON object (§1.8).

    nitro-cli's describe-eif reads ``CustomMetadata`` back as a JSON object (``serde_json::Map``) and fails on an
    EIF holding a string, number, array or null there, so anything but an object is refused at build time.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise FileOperationError(f"cannot open the metadata file {path}: {exc.strerror}",
                                 details={"file": path, "operation": "Open"}) from exc
    if not stat.S_ISREG(st.st_mode):
        raise FileOperationError(f"the metadata file {path} is not a regular file",
                                 details={"file": path, "operation": "Open"})
    if st.st_size > CUSTOM_METADATA_MAX_SIZE:
        raise ConfigError(f"the metadata file {path} is {st.st_size} bytes; at most {CUSTOM_METADATA_MAX_SIZE} "
                          "are allowed")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise FileOperationError(f"cannot read the metadata file {path}: {exc.strerror}",
                                 details={"file": path, "operation": "Read"}) from exc
    if len(data) > CUSTOM_METADATA_MAX_SIZE:
        raise ConfigError(f"the metadata file {path} grew above {CUSTOM_METADATA_MAX_SIZE} bytes")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"the metadata file {path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"the metadata file {path} holds a JSON {_json_kind(value)}; custom metadata must be a "
                          "JSON object ({...})",
                          hint='Wrap the value in an object, e.g. {"note": "..."}: describe-eif only reads objects.')
    return value


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "number"


def _file_entry(path: str, source: Path, mode: int, mtime: int) -> CpioEntry:
    try:
        size = source.stat().st_size
    except OSError as exc:
        raise FileOperationError(f"cannot read {source}: {exc.strerror}",
                                 details={"file": str(source), "operation": "Open"}) from exc
    return CpioEntry(path, stat.S_IFREG | mode, mtime=mtime, content=FileContent(str(source), size))


def bootstrap_ramdisk(blobs: BlobSet, *, mtime: int = 0) -> CpioArchive:
    """Ramdisk 0 (§3.10 step 4, bootstrap YAML): ``dev/`` 0755, ``init`` 0755, ``nsm.ko`` 0755."""
    return CpioArchive([
        CpioEntry("dev", stat.S_IFDIR | 0o755, mtime=mtime),
        _file_entry("init", blobs.init, 0o755, mtime),
        _file_entry("nsm.ko", blobs.nsm_ko, 0o755, mtime),
    ])


def _lines(items: Sequence[str]) -> bytes:
    # §3.10 step 3: one item per line, each \n-terminated.
    return "".join(f"{item}\n" for item in items).encode()


def customer_ramdisk(image: LoadedImage, run: RunSpec, *, mtime: int = 0) -> CpioArchive:
    """Ramdisk 1 (§3.10 step 4, customer YAML): ``rootfs/`` + the image tree, the customer dirs, ``cmd``/``env``.

    ``workdir`` and ``user`` files are added when set (enclavekit's init and runtime read them; AWS's init ignores
    unknown files, see docs/blobs.md).
    """
    entries: dict[str, CpioEntry] = {"rootfs": CpioEntry("rootfs", stat.S_IFDIR | 0o755, mtime=mtime)}
    modes: dict[int, int] = {}
    for e in image.tree.values():
        path = "rootfs/" + e.path
        if e.size > _NEWC_MAX_FILE:
            raise ImageBuildError(f"{e.path} is {e.size} bytes; a newc cpio ramdisk holds files below 4 GiB")
        mode = modes.setdefault(e.file_type | e.mode, e.file_type | e.mode)  # one int object per distinct mode
        entries[path] = CpioEntry(path, mode, uid=e.uid, gid=e.gid, mtime=mtime,
                                  content=e.content if e.file_type == stat.S_IFREG else None,
                                  link_target=e.link_target, rdev_major=e.rdev_major, rdev_minor=e.rdev_minor)
    # Parents the layers did not list explicitly, then the customer YAML's directories (an image's own entry wins:
    # /tmp keeps its 1777).  Last line of defence against writing through a link (E62): the kernel's initramfs
    # unpacker follows a symlink met as a parent, so every ancestor of every entry must be a directory.  Checking
    # each entry's parent suffices: that parent is itself an entry whose parent is checked in turn.
    dir_mode = stat.S_IFDIR | 0o755
    for path in list(entries):
        parent = path.rpartition("/")[0]
        while parent:
            existing = entries.get(parent)
            if existing is not None:
                if existing.file_type != stat.S_IFDIR:
                    kind = "a symlink" if existing.file_type == stat.S_IFLNK else "not a directory"
                    raise UnsafeArchiveEntry(f"{path.removeprefix('rootfs/')!r} lies below "
                                             f"{parent.removeprefix('rootfs/')!r}, which is {kind}; unpacking the "
                                             "ramdisk would write through it")
                break
            entries[parent] = CpioEntry(parent, dir_mode, mtime=mtime)
            parent = parent.rpartition("/")[0]
    for d in CUSTOMER_DIRS:
        path = f"rootfs/{d}"
        entries.setdefault(path, CpioEntry(path, stat.S_IFDIR | 0o755, mtime=mtime))
    files = {"cmd": _lines(run.argv), "env": _lines(run.env)}
    if run.workdir:
        files["workdir"] = _lines([run.workdir])
    if run.user:
        files["user"] = _lines([run.user])
    for name, data in files.items():
        entries[name] = CpioEntry(name, stat.S_IFREG | 0o644, mtime=mtime, content=BytesContent(data))
    return CpioArchive(entries.values())


def _load_signer(certificate: str | None, key: str | None) -> EIFSigner | None:
    if certificate is None and key is None:
        return None
    if certificate is None or key is None:
        raise ConfigError("--signing-certificate and --private-key must be given together", code="E01")
    return EIFSigner.from_files(certificate, key)


def _output_target(output_file: str) -> Path:
    out = Path(output_file)
    if out.is_dir():
        raise FileOperationError(f"the output path {output_file} is a directory",
                                 details={"file": output_file, "operation": "Open"})
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FileOperationError(f"the output directory {parent} does not exist",
                                 details={"file": output_file, "operation": "Open"})
    return out


def build_enclave(options: BuildOptions, *, on_start: Callable[[int], None] | None = None,
                  progress: Callable[[int], None] | None = None) -> BuildResult:
    """Build an EIF.  ``on_start(total_bytes)`` is called once before writing, ``progress(n)`` per chunk."""
    if options.arch not in ("x86_64", "aarch64"):
        raise ConfigError(f"--arch must be x86_64 or aarch64, got {options.arch!r}")
    environ = os.environ if options.environ is None else options.environ
    mtime = options.source_date_epoch or 0
    out = _output_target(options.output_file)

    # Everything that can fail is checked before a byte is written (issue 2, "Bad input").
    blobs = load_blobs(resolve_blobs_dir(options.blobs_dir, options.arch, environ), options.arch)
    custom = load_custom_metadata(options.metadata_file) if options.metadata_file is not None else None
    cmd = parse_cmd(options.cmd) if options.cmd is not None else None
    env = parse_env_overrides(list(options.env))
    signer = _load_signer(options.signing_certificate, options.private_key)

    with open_source(options.docker_uri, arch=options.arch, max_layer_size=options.max_layer_size) as image:
        run = resolve_run_spec(image.config, cmd=cmd, env=env, workdir=options.workdir, user=options.user,
                               transport=image.transport)
        want = ARCH_TO_PLATFORM[options.arch]
        if image.config.architecture and image.config.architecture != want:
            # §3.10 step 6: nitro-cli takes the header flags from the image and the kernel from the host, which
            # can disagree; enclavekit refuses the mismatch instead.
            raise ConfigError(f"the image is built for {image.config.architecture!r} but the enclave "
                              f"architecture is {options.arch} ({want})",
                              hint="Pass --arch x86_64 for amd64 images or --arch aarch64 for arm64 images.")
        ramdisks = [bootstrap_ramdisk(blobs, mtime=mtime), customer_ramdisk(image, run, mtime=mtime)]
        os_name, kernel_version = kernel_config_info(blobs.kernel_config_text)
        name = options.name if options.name is not None else image.name
        version = options.version if options.version is not None else image.version
        metadata = EIFMetadata(
            image_name=name, image_version=version,
            build_metadata=BuildMetadata(build_time(options.source_date_epoch, options.now), BUILD_TOOL,
                                         __version__, os_name, kernel_version),
            docker_info=image.docker_info, custom_metadata=custom)
        try:
            metadata_size = len(metadata.to_bytes())
        except ValueError as exc:
            raise ConfigError(f"image metadata cannot be encoded: {exc}") from exc
        content = EIFContent(kernel=FileSource(blobs.kernel), cmdline=blobs.cmdline, metadata=metadata,
                             ramdisks=ramdisks, arch=options.arch)
        if on_start is not None:
            total = (548 + 12 * 5 + blobs.kernel.stat().st_size + len(blobs.cmdline) + metadata_size
                     + sum(r.size for r in ramdisks))
            on_start(total)
        measurements, size = _write_atomically(out, content, signer, progress)
    return BuildResult(measurements=measurements, output=out, size=size, image_name=name, image_version=version,
                       run_spec=run)


def _write_atomically(out: Path, content: EIFContent, signer: EIFSigner | None,
                      progress: Callable[[int], None] | None) -> tuple[Measurements, int]:
    directory = out.parent if str(out.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=directory)
    except OSError as exc:
        raise FileOperationError(f"cannot create a file in {directory}: {exc.strerror}",
                                 details={"file": str(out), "operation": "Write"}) from exc
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w+b") as f:
            measurements = write_eif(f, content, signer=signer, progress=progress)
            # No fsync (nitro-cli does none either; it costs ~0.15x the hashing floor on a 512 MiB image): the
            # rename gives atomicity against failed builds, and ext4's auto_da_alloc flushes a file renamed over
            # an existing one.
            size = f.tell()
        os.replace(tmp_name, out)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise FileOperationError(f"cannot write {out}: {exc.strerror}",
                                     details={"file": str(out), "operation": "Write"}) from exc
        raise
    return measurements, size
