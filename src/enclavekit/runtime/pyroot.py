"""A root filesystem that lets an enclave image carry a Python application (docs/runtime.md "Python in enclaves").

An enclave sees no host file: whatever its application needs must be inside the image.  For a Python application
that is the interpreter, the shared libraries it loads, the standard-library modules it imports, and the
packages it uses (``enclavekit`` for the SDK).  :func:`build_python_rootfs` copies exactly that from the host's
Python into a directory, which ``build-enclave --docker-uri dir:DIR`` then packs like any other rootfs::

    python -m enclavekit.runtime.pyroot ROOTFS --app app/main.py [--app-dir /app] [--module NAME ...]
    enclavekit build-enclave --docker-uri dir:ROOTFS --cmd '["/usr/bin/python3", "/app/main.py"]' \\
        --output-file app.eif

Layout inside (the interpreter finds its home from its own location, ``<prefix>/bin``, by the landmark
``<prefix>/lib/pythonX.Y/os.pyc``; no environment variable is needed):

    /usr/bin/python3                      the host interpreter's binary
    /usr/lib/pythonX.Y/                   the standard-library modules the application imports
    /usr/lib/pythonX.Y/lib-dynload/       their extension modules
    /usr/lib/pythonX.Y/site-packages/     every other module it imports (enclavekit, ...)
    <same absolute path as on the host>   each shared library ``ldd`` names for the interpreter and extensions
    /app/                                 the application's files (``--app``), as source

Which modules: :mod:`modulefinder`'s static closure of the application's scripts, plus what the interpreter
imports at start-up (``site``, the ``encodings`` package), plus ``--module`` names for imports made by name at
run time (``importlib.import_module``).  Modules are stored compiled only (sourceless ``.pyc`` with unchecked
hashes, so the timestamps of the ramdisk do not matter and nothing is recompiled at start): the image stays small
and each launch unpacks less.  Tracebacks then show no source lines for library frames; the application's own
files keep their source.

The result depends on the host's Python (same interpreter version inside as on the host) and on the host's
architecture and C library; it is meant for enclavekit's sandbox and for images whose base is the same
distribution.

Reproducible for a given host (two builds of the same application give byte-identical trees, hence the same
PCR0): the file list is sorted; each ``.pyc`` records its path *inside the image* (``co_filename``), not the build
directory's; the header holds a source hash, not an mtime (``UNCHECKED_HASH``); and everything is compiled by one
fresh interpreter (``PYTHONHASHSEED=0``, no site, no user environment) in sorted order.  The last point matters:
:mod:`marshal` writes a back-reference for an object whose reference count is above one, so bytecode compiled
inside a long-running process (the one that just ran :mod:`modulefinder`) depends on what that process happened
to hold, and the hash seed decides the order of frozenset constants.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import modulefinder
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from enclavekit.errors import ImageBuildError

__all__ = ["PythonRootfs", "build_python_rootfs", "INTERPRETER", "DEFAULT_EXCLUDES", "main"]

INTERPRETER = "/usr/bin/python3"
_STARTUP_MODULES = ("site", "encodings", "codecs", "io", "abc", "os", "stat", "posixpath", "genericpath",
                    "_collections_abc", "_sitebuiltins", "runpy", "pkgutil", "importlib.util")
_ALWAYS_PACKAGES = ("encodings",)
# Reached only through optional branches (help(), debuggers, GUIs, test runners): never needed in an enclave, and
# large (tkinter drags in libtk/libX11).  More names with ``--exclude``.
DEFAULT_EXCLUDES = ("tkinter", "_tkinter", "idlelib", "turtle", "turtledemo", "test", "lib2to3", "distutils",
                    "pydoc", "pydoc_data", "ensurepip", "doctest", "pdb", "unittest", "venv")
# run by a fresh interpreter: compiles the (source, cfile, dfile) triples read as JSON from stdin, in order
_COMPILER = """
import json, py_compile, sys
for source, cfile, dfile in json.load(sys.stdin):
    try:
        py_compile.compile(source, cfile=cfile, dfile=dfile, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    except py_compile.PyCompileError as exc:
        print(json.dumps({"file": source, "error": exc.msg}))
        sys.exit(1)
"""
_LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


@dataclass(frozen=True)
class PythonRootfs:
    """What :func:`build_python_rootfs` wrote: the interpreter path inside, module count, library list, size."""

    root: Path
    interpreter: str
    modules: tuple[str, ...]
    libraries: tuple[str, ...]
    size: int


def _version_dir() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


# module imported from compiled code -> the module whose presence means it is needed
_HIDDEN_IMPORTS = {"_cffi_backend": "cryptography"}


def _closure(scripts: Sequence[Path], extra: Iterable[str], path: list[str],
             excludes: Sequence[str]) -> dict[str, str]:
    """module name → file (``.py``, extension ``.so``) for everything the scripts and start-up need."""
    finder = modulefinder.ModuleFinder(path=path, excludes=list(excludes))
    for name in (*_STARTUP_MODULES, *extra):
        try:
            finder.import_hook(name)
        except ImportError as exc:
            raise ImageBuildError(f"module {name!r} cannot be found on the host: {exc}") from exc
    for script in scripts:
        if script.suffix == ".py":
            try:
                finder.run_script(str(script))
            except SyntaxError as exc:
                raise ImageBuildError(f"{script}: {exc}") from exc
    for package in _ALWAYS_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            for directory in spec.submodule_search_locations:
                for entry in sorted(Path(directory).glob("*.py")):
                    if entry.stem != "__init__":
                        finder.import_hook(f"{package}.{entry.stem}")
    # imports no static scan can see: cryptography's compiled core loads _cffi_backend from C
    for hidden, needed_by in _HIDDEN_IMPORTS.items():
        if needed_by in finder.modules and hidden not in finder.modules:
            with contextlib.suppress(ImportError):
                finder.import_hook(hidden)
    found: dict[str, str] = {}
    for name, module in finder.modules.items():
        file = getattr(module, "__file__", None)
        if name == "__main__" or not isinstance(file, str) or not file:
            continue
        found[name] = file
    return found


def _destination(file: str, search: list[str], lib: Path) -> Path:
    """Where ``file`` goes: the standard library keeps its relative place, anything else goes to site-packages."""
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    real = os.path.realpath(file)
    if real.startswith(stdlib + os.sep) and f"{os.sep}site-packages{os.sep}" not in real[len(stdlib):]:
        return lib / os.path.relpath(real, stdlib)
    # the longest sys.path entry holding it gives the package-relative name
    best = max((os.path.realpath(p) for p in search if p and real.startswith(os.path.realpath(p) + os.sep)),
               key=len, default=None)
    if best is None:
        raise ImageBuildError(f"{file} is not below any sys.path entry; cannot place it in the image")
    return lib / "site-packages" / os.path.relpath(real, best)


def _libraries(binaries: Iterable[str]) -> set[str]:
    libs: set[str] = set()
    for binary in binaries:
        try:
            out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImageBuildError(f"ldd {binary} failed: {exc}") from exc
        for line in out.splitlines():
            m = _LDD_LINE.match(line)
            if m:
                libs.add(m.group(1))
    return libs


def _copy_file(source: str, target: Path, mode: int | None = None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)  # follows symlinks: the image holds the bytes under the linked name
    os.chmod(target, mode if mode is not None else (os.stat(source).st_mode & 0o755))


def _compile_all(jobs: Sequence[tuple[str, str, str]]) -> None:
    """Compile ``(source, cfile, dfile)`` jobs reproducibly: one fresh interpreter, fixed hash seed, given order."""
    env = {"PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    try:
        # -S: no site (the same modules loaded every time); -s: no user site; env: no PYTHONPATH and friends
        proc = subprocess.run([sys.executable, "-S", "-s", "-c", _COMPILER], input=json.dumps(list(jobs)),
                              capture_output=True, text=True, env=env, check=False, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(f"compiling the modules failed: {exc}") from exc
    if proc.returncode != 0:
        try:
            failure = json.loads(proc.stdout.strip().splitlines()[-1])
            message = f"cannot compile {failure['file']}: {failure['error']}"
        except (ValueError, IndexError, KeyError, TypeError):
            message = f"compiling the modules failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
        raise ImageBuildError(message)


def build_python_rootfs(root: Path, *, scripts: Sequence[Path] = (), app_dir: str = "/app",
                        modules: Iterable[str] = (), search_path: Sequence[str] | None = None,
                        excludes: Sequence[str] = DEFAULT_EXCLUDES, strip: bool = True) -> PythonRootfs:
    """Write the host's Python, the modules ``scripts`` need, and the scripts themselves into ``root``.

    ``strip`` removes debugging symbols from the copied libraries when ``strip`` (binutils) is installed: the
    host's libpython is often 20+ MiB unstripped, and every launch unpacks the image into memory.
    """
    if not app_dir.startswith("/") or ".." in app_dir.split("/"):
        raise ValueError("app_dir must be an absolute path inside the image")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    search = list(search_path if search_path is not None else sys.path)
    found = _closure([Path(s) for s in scripts], modules, search, excludes)
    lib = root / "usr" / "lib" / _version_dir()
    extensions: list[str] = []
    names: list[str] = []
    jobs: list[tuple[str, str, str]] = []
    for name, file in sorted(found.items()):
        target = _destination(file, search, lib)
        if file.endswith(".py"):
            pyc = target.with_suffix(".pyc")
            pyc.parent.mkdir(parents=True, exist_ok=True)
            # the path tracebacks show is the one inside the image, never the build directory
            jobs.append((file, str(pyc), "/" + target.relative_to(root).as_posix()))
        elif file.endswith(".so"):
            _copy_file(file, target)
            extensions.append(file)
        else:
            continue
        names.append(name)
    _compile_all(sorted(jobs, key=lambda job: job[1]))
    # the interpreter's landmark (3.11 getpath: lib/pythonX.Y/os.py or os.pyc) must exist
    if not (lib / "os.pyc").exists():
        raise ImageBuildError("the standard library's os module was not collected")
    interpreter = os.path.realpath(sys.executable)
    _copy_file(interpreter, root / INTERPRETER.lstrip("/"), 0o755)
    libraries = sorted(_libraries([interpreter, *extensions]))
    for library in libraries:
        _copy_file(library, root / library.lstrip("/"))
    strip_tool = shutil.which("strip") if strip else None
    if strip_tool is not None:
        shared = [str(root / p.lstrip("/")) for p in (*libraries, INTERPRETER)]
        shared += [str(p) for p in lib.rglob("*.so")]
        subprocess.run([strip_tool, "--strip-unneeded", *shared], capture_output=True, check=False, timeout=120)
    for script in scripts:
        _copy_file(str(script), root / app_dir.lstrip("/") / Path(script).name, 0o644)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return PythonRootfs(root=root, interpreter=INTERPRETER, modules=tuple(names), libraries=tuple(libraries),
                        size=size)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m enclavekit.runtime.pyroot",
                                     description="write a rootfs with the host's Python for a Python enclave app")
    parser.add_argument("root", type=Path, help="output directory (then: build-enclave --docker-uri dir:ROOT)")
    parser.add_argument("--app", action="append", default=[], type=Path, help="an application script (repeat)")
    parser.add_argument("--app-dir", default="/app", help="where the scripts go inside (default /app)")
    parser.add_argument("--module", action="append", default=[], help="a module imported by name at run time")
    parser.add_argument("--exclude", action="append", default=[], help="a module never to include (repeat)")
    parser.add_argument("--no-strip", action="store_true", help="keep the libraries' debugging symbols")
    args = parser.parse_args(argv)
    try:
        result = build_python_rootfs(args.root, scripts=args.app, app_dir=args.app_dir, modules=args.module,
                                     excludes=(*DEFAULT_EXCLUDES, *args.exclude), strip=not args.no_strip)
    except ImageBuildError as exc:
        print(exc.diagnostics(), file=sys.stderr)
        return exc.exit_status
    print(f"{result.root}: {result.interpreter}, {len(result.modules)} modules, {len(result.libraries)} "
          f"libraries, {result.size / 1048576:.1f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
