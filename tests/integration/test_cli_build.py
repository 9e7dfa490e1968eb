"""build-enclave and eif-diff through the real `enclavekit` executable: JSON shape, stderr, exit codes."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

pytestmark = pytest.mark.integration

ENCLAVEKIT = [sys.executable, "-m", "enclavekit.cli.main"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("SOURCE_DATE_EPOCH", "NITRO_CLI_BLOBS")}
    full_env.update(env or {})
    return subprocess.run([*ENCLAVEKIT, *args], capture_output=True, text=True, env=full_env, timeout=120,
                          check=False)


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "hello").write_bytes(b"#!/bin/sh\necho hello\n")
    os.chmod(root / "bin" / "hello", 0o755)
    return root


def _assert_clean_error(proc: subprocess.CompletedProcess[str], code: str) -> None:
    assert proc.returncode == int(code[1:]), proc.stderr
    assert f"[ {code} ]" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_build_prints_measurements(rootfs: Path, tmp_path: Path) -> None:
    out = tmp_path / "hello.eif"
    proc = _run("build-enclave", "--docker-uri", f"dir:{rootfs}", "--output-file", str(out), "--cmd", "/bin/hello")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert list(doc) == ["Measurements"]
    assert list(doc["Measurements"]) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2"]
    assert all(len(doc["Measurements"][k]) == 96 for k in ("PCR0", "PCR1", "PCR2"))
    assert proc.stdout.startswith('{\n  "Measurements": {\n    "HashAlgorithm"')
    assert proc.stderr.splitlines()[0] == "Start building the Enclave Image..."
    assert proc.stderr.splitlines()[-1] == "Enclave Image successfully created."
    described = _run("describe-eif", "--eif-path", str(out))
    assert described.returncode == 0, described.stderr
    assert json.loads(described.stdout)["Measurements"] == doc["Measurements"]


def test_source_date_epoch_reproducible(rootfs: Path, tmp_path: Path) -> None:
    for name in ("a.eif", "b.eif"):
        proc = _run("build-enclave", "--docker-uri", f"dir:{rootfs}", "--output-file", str(tmp_path / name),
                    "--cmd", "/bin/hello", env={"SOURCE_DATE_EPOCH": "1700000000"})
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a.eif").read_bytes() == (tmp_path / "b.eif").read_bytes()


def test_signed_build(rootfs: Path, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclavekit test signer")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA384()))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    proc = _run("build-enclave", "--docker-uri", f"dir:{rootfs}", "--output-file", str(tmp_path / "s.eif"),
                "--cmd", "/bin/hello", "--signing-certificate", str(tmp_path / "cert.pem"),
                "--private-key", str(tmp_path / "key.pem"))
    assert proc.returncode == 0, proc.stderr
    assert "PCR8" in json.loads(proc.stdout)["Measurements"]


def test_bad_inputs_exit_with_codes_and_no_traceback(rootfs: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.eif"
    base = ["build-enclave", "--output-file", str(out)]
    _assert_clean_error(_run(*base, "--docker-uri", "hello:latest"), "E50")
    _assert_clean_error(_run(*base, "--docker-uri", "docker://hello"), "E63")
    _assert_clean_error(_run(*base, "--docker-uri", f"dir:{rootfs}"), "E63")            # dir: needs --cmd
    _assert_clean_error(_run(*base, "--docker-uri", f"dir:{rootfs}", "--cmd", "/x", "--blobs",
                             str(tmp_path)), "E19")                                   # missing blob
    big = tmp_path / "meta.json"
    big.write_text(json.dumps({"k": "v" * 5000}))
    _assert_clean_error(_run(*base, "--docker-uri", f"dir:{rootfs}", "--cmd", "/x", "--metadata", str(big)), "E03")
    _assert_clean_error(_run(*base, "--docker-uri", f"dir:{rootfs}", "--docker-dir", str(rootfs)), "E49")
    _assert_clean_error(_run(*base, "--docker-uri", f"dir:{rootfs}", "--cmd", "/x", "--env", "NOEQUALS"), "E03")
    assert not out.exists()


def _docker_archive(archive: Path, layer: bytes) -> Path:
    """A one-layer ``docker save`` archive around ``layer`` (a tar), with a config whose Cmd is ``/x``."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/x"]}}).encode()
    with tarfile.open(archive, "w") as tar:
        for name, data in (("l/layer.tar", layer), ("c.json", config),
                           ("manifest.json", json.dumps([{"Config": "c.json", "Layers": ["l/layer.tar"]}]).encode())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return archive


def test_path_traversal_tarball(tmp_path: Path) -> None:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("../../../tmp/owned")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    archive = _docker_archive(tmp_path / "evil.tar", layer.getvalue())
    out = tmp_path / "x.eif"
    proc = _run("build-enclave", "--docker-uri", f"docker-archive:{archive}", "--output-file", str(out))
    _assert_clean_error(proc, "E62")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar"]


def test_eif_diff_exit_codes(rootfs: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.eif", tmp_path / "b.eif"
    assert _run("build-enclave", "--docker-uri", f"dir:{rootfs}", "--output-file", str(a), "--cmd",
                "/bin/hello").returncode == 0
    assert _run("build-enclave", "--docker-uri", f"dir:{rootfs}", "--output-file", str(b), "--cmd",
                "/bin/hello", "--env", "A=1").returncode == 0
    same = _run("eif-diff", str(a), str(a))
    assert same.returncode == 0 and "identical" in same.stdout
    diff = _run("eif-diff", str(a), str(b), "--json")
    assert diff.returncode == 1
    doc = json.loads(diff.stdout)
    assert set(doc["PCRs"]) == {"PCR0", "PCR2"}
    assert doc["Ramdisks"][0]["changed"][0]["path"] == "env"
    missing = _run("eif-diff", str(a), str(tmp_path / "none.eif"))
    _assert_clean_error(missing, "E19")


def _gzip_docker_archive(path: Path, size: int) -> Path:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/x"]}}).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in (("l/layer.tar", gzip.compress(layer.getvalue(), mtime=0)), ("c.json", config),
                           ("manifest.json", json.dumps([{"Config": "c.json", "Layers": ["l/layer.tar"]}]).encode())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return path


def test_max_layer_size(tmp_path: Path) -> None:
    archive = _gzip_docker_archive(tmp_path / "img.tar", 3 << 20)
    out = tmp_path / "x.eif"
    base = ["build-enclave", "--docker-uri", f"docker-archive:{archive}", "--output-file", str(out), "--arch",
            "x86_64"]
    proc = _run(*base, "--max-layer-size", "1M")
    _assert_clean_error(proc, "E63")
    assert "--max-layer-size" in proc.stderr
    assert not out.exists()
    _assert_clean_error(_run(*base, "--max-layer-size", "lots"), "E03")
    assert _run(*base, "--max-layer-size", "4M").returncode == 0


def test_metadata_that_is_not_an_object_is_refused(rootfs: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text('"str"')
    out = tmp_path / "x.eif"
    proc = _run("build-enclave", "--docker-uri", f"dir:{rootfs}", "--cmd", "/x", "--metadata", str(meta),
                "--output-file", str(out))
    _assert_clean_error(proc, "E03")
    assert "must be a JSON object" in proc.stderr
    assert not out.exists()


def test_symlink_over_a_directory_in_one_layer_is_refused(tmp_path: Path) -> None:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("a/init")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
        link = tarfile.TarInfo("a")
        link.type, link.linkname = tarfile.SYMTYPE, "/"
        tar.addfile(link)
    archive = _docker_archive(tmp_path / "evil.tar", layer.getvalue())
    out = tmp_path / "x.eif"
    _assert_clean_error(_run("build-enclave", "--docker-uri", f"docker-archive:{archive}", "--output-file",
                             str(out), "--arch", "x86_64"), "E62")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar"]


@pytest.mark.parametrize(("code", "name"), [("E49", "DockerImageBuild"), ("E50", "DockerImagePull")])
def test_explain_knows_the_docker_codes(code: str, name: str) -> None:
    proc = _run("explain", "--error-code", code)
    assert proc.returncode == 0 and proc.stdout.startswith(f"[ {code} ] {name}")
