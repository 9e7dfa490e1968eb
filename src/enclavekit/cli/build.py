"""``enclavekit build-enclave``: nitro-cli's flags (spec §3.2) plus local image sources and run overrides.

stdout: ``{"Measurements": {...}}`` pretty-printed (spec §3.3); stderr: ``Start building the Enclave Image...``,
then ``Enclave Image successfully created.``; a progress bar on stderr when stderr is a terminal and the image is
large.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

from enclavekit.errors import DockerDaemonError
from enclavekit.image.builder import BuildOptions, build_enclave, parse_source_date_epoch
from enclavekit.image.sources import DEFAULT_MAX_LAYER_SIZE, parse_size

__all__ = ["register", "run", "host_arch"]

_PROGRESS_MIN_BYTES = 64 << 20


def host_arch() -> str:
    machine = platform.machine().lower()
    return "aarch64" if machine in ("aarch64", "arm64") else "x86_64"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "build-enclave", help="build an enclave image (EIF) from a local container image or directory",
        description="Build an EIF from docker-archive:PATH, oci-archive:PATH, oci:DIR or dir:DIR. "
        "SOURCE_DATE_EPOCH makes the output byte-reproducible.")
    p.add_argument("--docker-uri", required=True, metavar="URI",
                   help="image source: docker-archive:PATH, oci-archive:PATH, oci:DIR or dir:DIR")
    p.add_argument("--docker-dir", metavar="DIR", help="accepted for nitro-cli compatibility; there is no Docker "
                   "daemon to build with (E49)")
    p.add_argument("--output-file", required=True, metavar="PATH", help="where to write the EIF")
    p.add_argument("--signing-certificate", metavar="PEM", help="signing certificate (with --private-key)")
    p.add_argument("--private-key", metavar="PEM", help="EC private key (with --signing-certificate)")
    p.add_argument("--name", help="ImageName in the metadata (default: derived from the source)")
    p.add_argument("--version", help="ImageVersion in the metadata (default: the image config digest)")
    p.add_argument("--metadata", metavar="FILE", help="custom metadata: a JSON file of at most 4096 bytes")
    p.add_argument("--blobs", metavar="DIR", help="blobs directory (default: $NITRO_CLI_BLOBS, else enclavekit's)")
    p.add_argument("--cmd", help="command to run: a shell-like string or a JSON array (replaces the image's CMD)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable (repeatable; replaces the image's value)")
    p.add_argument("--workdir", metavar="DIR", help="working directory (replaces the image's WORKDIR)")
    p.add_argument("--user", help="user to run as (replaces the image's USER)")
    p.add_argument("--arch", choices=["x86_64", "aarch64"], default=None,
                   help="enclave architecture (default: the host's)")
    p.add_argument("--max-layer-size", metavar="SIZE", default=None,
                   help="the most the image's gzip layers may decompress to, in total, in temporary disk space "
                        f"(e.g. 512M, 32G; default {DEFAULT_MAX_LAYER_SIZE >> 30}G): a guard against "
                        "decompression bombs")
    p.set_defaults(func=run)


def _progress_bar(total: int) -> tuple[Any, Any]:
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import (  # noqa: PLC0415 - only on a terminal
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    # stdout carries the JSON result only; the bar goes to stderr.
    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn(), transient=True, console=Console(stderr=True))
    task = bar.add_task("Writing", total=total)
    bar.start()
    return bar, task


def run(args: argparse.Namespace) -> int:
    if args.docker_dir is not None:
        raise DockerDaemonError(
            "--docker-dir needs a Docker daemon to build the image, and enclavekit has none",
            hint="Build the image with your container tool, export it (docker save / skopeo / buildah push "
                 "oci-archive:...), and pass it with --docker-uri docker-archive:PATH or oci-archive:PATH.")
    options = BuildOptions(
        docker_uri=args.docker_uri, output_file=args.output_file, arch=args.arch or host_arch(),
        blobs_dir=args.blobs, name=args.name, version=args.version, metadata_file=args.metadata, cmd=args.cmd,
        env=tuple(args.env), workdir=args.workdir, user=args.user, signing_certificate=args.signing_certificate,
        private_key=args.private_key, source_date_epoch=parse_source_date_epoch(os.environ.get("SOURCE_DATE_EPOCH")),
        max_layer_size=parse_size(args.max_layer_size) if args.max_layer_size is not None else DEFAULT_MAX_LAYER_SIZE)
    print("Start building the Enclave Image...", file=sys.stderr)
    state: dict[str, Any] = {}

    def on_start(total: int) -> None:
        if sys.stderr.isatty() and total >= _PROGRESS_MIN_BYTES:
            state["bar"], state["task"] = _progress_bar(total)

    def progress(n: int) -> None:
        bar = state.get("bar")
        if bar is not None:
            bar.advance(state["task"], n)

    try:
        result = build_enclave(options, on_start=on_start, progress=progress)
    finally:
        if "bar" in state:
            state["bar"].stop()
    print("Enclave Image successfully created.", file=sys.stderr)
    print(json.dumps({"Measurements": result.measurements.to_json()}, indent=2))
    return 0
