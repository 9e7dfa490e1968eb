"""``run-enclave``, ``describe-enclaves``, ``terminate-enclave`` and ``console``: nitro-cli's lifecycle commands.

Flags, JSON shapes and stderr lines follow spec eif-pcr-cli §3.2–§3.6.  Each enclave is owned by a supervisor
process (:mod:`enclavekit.runtime.supervisor`); these commands reach it through its control socket
(:mod:`enclavekit.runtime.control`).  The run directory is ``$ENCLAVEKIT_RUN_DIR`` (default ``/run/enclavekit``),
the state directory (allocator pool, local PKI, ``parent.json``) is ``$ENCLAVEKIT_HOME``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from enclavekit.errors import AllocatorError, ConfigError, EnclaveKitError, FileOperationError

if TYPE_CHECKING:
    from enclavekit.runtime.registry import EnclaveRecord, Registry

# Start-up time: run-enclave is timed by users, and a running launch server
# (enclavekit.runtime.launch_server) takes the request without this process ever importing the runtime.  So
# only light modules are imported here; each command imports the rest where it needs it.

__all__ = ["register", "run_enclave", "describe_enclaves", "terminate_enclave", "console", "parse_config"]

_CONFIG_MAX = 64 << 10
_CONFIG_FIELDS = ("eif_path", "memory_mib", "cpu_count", "cpu_ids", "enclave_cid", "debug_mode", "attach_console",
                  "enclave_name")
_TERMINATE_TIMEOUT = 30.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run-enclave", help="start an enclave from an EIF (nitro-cli's flags and JSON)")
    p.add_argument("--eif-path", metavar="PATH", help="the enclave image file")
    p.add_argument("--cpu-count", metavar="N", help="number of CPUs taken from the pool")
    p.add_argument("--cpu-ids", nargs="+", metavar="ID", help="the pool CPUs to use")
    p.add_argument("--memory", metavar="MEM", help="memory: an integer with an optional unit M (default), G or T")
    p.add_argument("--enclave-cid", metavar="CID", help="vsock CID (4..4294967294; default: the first free from 16)")
    p.add_argument("--debug-mode", action="store_true", help="allow the console; attestation PCRs read as zeros")
    p.add_argument("--attach-console", action="store_true", help="stream the console after start (implies debug)")
    p.add_argument("--enclave-name", metavar="NAME", help="default: the EIF file name without .eif")
    p.add_argument("--config", metavar="JSON", help="a JSON file with the run parameters (snake_case fields)")
    p.add_argument("--parent-role-arn", metavar="ARN", help="the parent's IAM role ARN (PCR3)")
    p.add_argument("--parent-instance-id", metavar="ID", help="the parent's instance id (PCR4)")
    p.add_argument("--no-device-emulation", action="store_true",
                   help="no /dev/nsm and no AF_VSOCK translation (applications that use only enclavekit.sdk)")
    p.set_defaults(func=run_enclave)

    d = sub.add_parser("describe-enclaves", help="list the running enclaves (JSON array)")
    d.add_argument("--metadata", action="store_true", help="add ImageName, ImageVersion and Metadata")
    d.set_defaults(func=describe_enclaves)

    t = sub.add_parser("terminate-enclave", help="terminate an enclave, or all")
    t.add_argument("--enclave-id", metavar="ID")
    t.add_argument("--enclave-name", metavar="NAME")
    t.add_argument("--all", action="store_true", help="terminate every running enclave")
    t.set_defaults(func=terminate_enclave)

    c = sub.add_parser("console", help="stream a debug-mode enclave's console")
    c.add_argument("--enclave-id", metavar="ID")
    c.add_argument("--enclave-name", metavar="NAME")
    c.add_argument("--disconnect-timeout", metavar="SECS", help="stop after this many seconds")
    c.set_defaults(func=console)


def _dump(obj: Any) -> None:
    print(json.dumps(obj, indent=2))
    sys.stdout.flush()


def _registry() -> Registry:
    from enclavekit.runtime.registry import Registry, run_dir  # noqa: PLC0415

    return Registry(run_dir())


def _clean_stale(registry: Registry) -> None:
    from enclavekit._internal.state import state_home  # noqa: PLC0415
    from enclavekit.runtime.supervisor import clean_stale  # noqa: PLC0415

    clean_stale(registry, state_home())


def _int_arg(name: str, text: str, *, code: str = "E03") -> int:
    if not text.isdigit() or len(text) > 12:
        raise EnclaveKitError(f"{name}: expected a non-negative decimal integer, got {text[:40]!r}", code=code)
    return int(text)


# ---------------------------------------------------------------- run-enclave

def parse_config(text: str) -> dict[str, Any]:
    """``--config`` JSON (§3.2): snake_case fields, ``eif_path`` and ``memory_mib`` required, one CPU field."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise EnclaveKitError(f"--config: not valid JSON: {exc}", code="E17") from exc
    if not isinstance(obj, dict):
        raise EnclaveKitError("--config: expected a JSON object", code="E17")
    unknown = sorted(set(obj) - set(_CONFIG_FIELDS))
    if unknown:
        raise ConfigError(f"--config: unknown field(s) {unknown}; expected {list(_CONFIG_FIELDS)}")
    for key in ("eif_path", "memory_mib"):
        if key not in obj:
            raise EnclaveKitError(f"--config: {key} is required", code="E01")
    has_count = obj.get("cpu_count") is not None
    has_ids = obj.get("cpu_ids") is not None
    if not has_count and not has_ids:
        raise EnclaveKitError("--config: give cpu_count or cpu_ids", code="E01")
    if has_count and has_ids:
        raise EnclaveKitError("--config: cpu_count and cpu_ids exclude each other", code="E02")

    def typed(key: str, kind: type | tuple[type, ...], *, nullable: bool = False) -> Any:
        value = obj.get(key)
        if value is None and (nullable or key not in obj):
            return None
        if isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"--config: {key} has the wrong type")
        if not isinstance(value, kind):
            raise ConfigError(f"--config: {key} has the wrong type ({type(value).__name__})")
        return value

    eif = typed("eif_path", str)
    mem = typed("memory_mib", int)
    count = typed("cpu_count", int, nullable=True)
    ids = typed("cpu_ids", list, nullable=True)
    if ids is not None and not all(type(i) is int and i >= 0 for i in ids):
        raise ConfigError("--config: cpu_ids must be a list of non-negative integers")
    cid = typed("enclave_cid", int, nullable=True)
    if cid is not None and not 0 <= cid <= 0xFFFFFFFF:
        raise ConfigError("--config: enclave_cid must be an unsigned 32-bit number")
    if mem is not None and mem < 0:
        raise ConfigError("--config: memory_mib must be >= 0")
    return {"eif_path": eif, "memory_mib": mem, "cpu_count": count, "cpu_ids": ids,
            "enclave_cid": cid or None, "debug_mode": bool(typed("debug_mode", bool, nullable=True)),
            "attach_console": bool(typed("attach_console", bool, nullable=True)),
            "enclave_name": typed("enclave_name", str, nullable=True)}


def _from_flags(args: argparse.Namespace) -> dict[str, Any]:
    from enclavekit.runtime.params import parse_enclave_cid, parse_memory  # noqa: PLC0415

    if args.eif_path is None:
        raise EnclaveKitError("run-enclave: --eif-path is required", code="E01")
    if args.memory is None:
        raise EnclaveKitError("run-enclave: --memory is required", code="E01")
    if args.cpu_count is None and args.cpu_ids is None:
        raise EnclaveKitError("run-enclave: give --cpu-count or --cpu-ids", code="E01")
    if args.cpu_count is not None and args.cpu_ids is not None:
        raise EnclaveKitError("run-enclave: --cpu-count and --cpu-ids exclude each other", code="E02")
    count = _int_arg("--cpu-count", args.cpu_count) if args.cpu_count is not None else None
    ids = None
    if args.cpu_ids is not None:
        ids = []
        for item in args.cpu_ids:
            if not item.isdigit() or len(item) > 6:
                raise AllocatorError(f"--cpu-ids: {item[:20]!r} is not a CPU id", code="E23")
            ids.append(int(item))
    cid = None
    if args.enclave_cid is not None:
        cid = parse_enclave_cid(args.enclave_cid)
        if cid is None:
            print("The enclave CID will be auto-generated as the provided CID is 0", file=sys.stderr)
    return {"eif_path": args.eif_path, "memory_mib": parse_memory(args.memory), "cpu_count": count, "cpu_ids": ids,
            "enclave_cid": cid, "debug_mode": bool(args.debug_mode), "attach_console": bool(args.attach_console),
            "enclave_name": args.enclave_name}


def run_enclave(args: argparse.Namespace) -> int:
    if args.config is not None:
        others = [f for f in ("eif_path", "cpu_count", "cpu_ids", "memory", "enclave_cid", "enclave_name")
                  if getattr(args, f) is not None] + (["debug_mode"] if args.debug_mode else [])
        if others:
            raise EnclaveKitError(f"run-enclave: --config excludes --{others[0].replace('_', '-')}", code="E02")
        try:
            with open(args.config, "rb") as fh:
                raw = fh.read(_CONFIG_MAX + 1)
        except OSError as exc:
            raise FileOperationError(f"cannot read the --config file {args.config}: {exc.strerror}",
                                     details={"File": args.config, "failing operation": "Open"}) from exc
        if len(raw) > _CONFIG_MAX:
            raise ConfigError(f"--config: the file is larger than {_CONFIG_MAX} bytes")
        params = parse_config(raw.decode("utf-8", errors="replace"))
        params["attach_console"] = params["attach_console"] or bool(args.attach_console)
    else:
        params = _from_flags(args)
    if params["enclave_name"] is not None and not params["enclave_name"]:
        raise ConfigError("--enclave-name must not be empty")
    eif = params["eif_path"]
    if not os.path.isfile(eif):
        raise FileOperationError(f"the EIF {eif} does not exist or is not a file",
                                 details={"File": eif, "failing operation": "Open"})
    debug = params["debug_mode"] or params["attach_console"]  # §3.2: --attach-console implies debug
    from enclavekit._internal.state import state_home  # noqa: PLC0415
    from enclavekit.runtime.launch_server import launch_via_server  # noqa: PLC0415
    from enclavekit.runtime.params import run_dir  # noqa: PLC0415

    # RunRequest.to_json()'s fields; RunRequest.from_json checks them (in the server, or below)
    request = {
        "eif_path": os.path.abspath(eif), "memory_mib": params["memory_mib"], "cpu_count": params["cpu_count"],
        "cpu_ids": list(params["cpu_ids"]) if params["cpu_ids"] is not None else None,
        "enclave_cid": params["enclave_cid"], "debug_mode": debug, "enclave_name": params["enclave_name"],
        "parent_role_arn": args.parent_role_arn, "parent_instance_id": args.parent_instance_id,
        "run_dir": str(run_dir()), "state_home": str(state_home()), "owner_uid": os.getuid(),
        "device_emulation": not args.no_device_emulation}

    def on_stderr(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # the fast path: a running launch server starts the supervisor (and cleans stale records there)
    info = launch_via_server(request, on_stderr=on_stderr)
    if info is None:
        from enclavekit.runtime.supervisor import RunRequest, launch  # noqa: PLC0415

        run_request = RunRequest.from_json(request)
        registry = _registry()
        registry.ensure()
        _clean_stale(registry)
        # the server was asked above (and declined, or there is none): launch directly, then start one
        info = launch(run_request, on_stderr=on_stderr, use_server=False, start_server_after=True)
    _dump(info)
    if params["attach_console"]:
        registry = _registry()
        _stream_console(registry, registry.find(enclave_id=info["EnclaveID"]), None)
    return 0


# ---------------------------------------------------------------- describe-enclaves

def describe_enclaves(args: argparse.Namespace) -> int:
    from enclavekit.runtime import control  # noqa: PLC0415

    registry = _registry()
    _clean_stale(registry)
    out: list[dict[str, Any]] = []
    failed = 0
    for rec in registry.live_records():
        if rec.state == "STARTING":
            continue  # not booted yet: run-enclave has not reported it
        try:
            out.append(control.request(registry.control_path(rec.enclave_id), "describe",
                                       metadata=bool(args.metadata)))
        except EnclaveKitError:
            if registry.is_live(rec):
                failed += 1
    _dump(out)
    if failed:
        print(f"Failed connections: {failed}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- terminate-enclave

def _kill_supervisor(rec: EnclaveRecord) -> None:
    """Last resort for a supervisor that does not answer: SIGKILL it (its sandbox dies with it)."""
    import signal  # noqa: PLC0415
    import time  # noqa: PLC0415

    from enclavekit.runtime.allocator import process_start_time  # noqa: PLC0415

    try:
        fd = os.pidfd_open(rec.owner_pid)
    except OSError:
        return
    try:
        if process_start_time(rec.owner_pid) != rec.owner_start:
            return  # the PID now names another process
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while process_start_time(rec.owner_pid) == rec.owner_start and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.close(fd)


def _terminate(registry: Registry, rec: EnclaveRecord) -> dict[str, Any]:
    import time  # noqa: PLC0415

    from enclavekit.runtime import control  # noqa: PLC0415

    try:
        result: dict[str, Any] = control.request(registry.control_path(rec.enclave_id), "terminate",
                                                 timeout=_TERMINATE_TIMEOUT)
    except EnclaveKitError as exc:
        if exc.code not in ("E38", "E39", "E40", "E08"):
            raise
        _kill_supervisor(rec)
        _clean_stale(registry)
        result = {"EnclaveName": rec.name, "EnclaveID": rec.enclave_id, "Terminated": True}
    # wait until the supervisor process is gone, so nothing of it outlives the command
    deadline = time.monotonic() + 5.0
    while registry.is_live(rec) and time.monotonic() < deadline:
        time.sleep(0.02)
    print(f"Successfully terminated enclave {rec.enclave_id}.", file=sys.stderr)
    return result


def terminate_enclave(args: argparse.Namespace) -> int:
    chosen = sum(x is not None and x is not False for x in (args.enclave_id, args.enclave_name, args.all or None))
    if chosen == 0:
        raise EnclaveKitError("terminate-enclave: give --enclave-id, --enclave-name or --all", code="E01")
    if chosen > 1:
        raise EnclaveKitError("terminate-enclave: --enclave-id, --enclave-name and --all exclude each other",
                              code="E02")
    registry = _registry()
    _clean_stale(registry)
    if args.all:
        from enclavekit.runtime.launch_server import stop_server  # noqa: PLC0415

        results = [_terminate(registry, rec) for rec in registry.live_records()]
        # everything enclavekit runs for this run directory ends: the launch server too (and its image store),
        # so no process, socket or shared tree is left behind (the next run-enclave starts a fresh server)
        stop_server(registry.root)
        _clean_stale(registry)
        _dump(results)
        return 0
    rec = registry.find(enclave_id=args.enclave_id, name=args.enclave_name)
    _dump(_terminate(registry, rec))
    return 0


# ---------------------------------------------------------------- console

def _stream_console(registry: Registry, rec: EnclaveRecord, disconnect_timeout: float | None) -> None:
    from enclavekit.runtime import control  # noqa: PLC0415
    from enclavekit.runtime.console import copy_stream  # noqa: PLC0415

    sock = control.connect(registry.control_path(rec.enclave_id))
    with sock:
        sock.sendall(control.encode_request("console"))
        reply = control.recv_frame(sock)
        if reply is None:
            raise EnclaveKitError("the enclave supervisor closed the console connection", code="E44")
        control.parse_reply(reply)
        # §3.6: nitro-cli prints these two lines on stdout
        print(f"Connecting to the console for enclave {rec.cid}...", flush=True)
        print("Successfully connected to the console.", flush=True)
        try:
            copy_stream(sock, sys.stdout.buffer, disconnect_timeout=disconnect_timeout)
        except OSError as exc:
            raise EnclaveKitError(f"reading the console failed: {exc.strerror or exc}", code="E45") from exc


def console(args: argparse.Namespace) -> int:
    if (args.enclave_id is None) == (args.enclave_name is None):
        raise EnclaveKitError("console: give exactly one of --enclave-id and --enclave-name",
                              code="E01" if args.enclave_id is None else "E02")
    timeout = None
    if args.disconnect_timeout is not None:
        timeout = float(_int_arg("--disconnect-timeout", args.disconnect_timeout))
    registry = _registry()
    _clean_stale(registry)
    rec = registry.find(enclave_id=args.enclave_id, name=args.enclave_name)
    _stream_console(registry, rec, timeout)
    return 0
