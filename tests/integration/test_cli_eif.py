"""The describe-eif, pcr and sign-eif commands as a user runs them: real processes, JSON on stdout, error codes."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from enclavekit.formats.eif import BuildMetadata, EIFMetadata
from enclavekit.image.eif_writer import BytesSource, EIFContent, write_eif

pytestmark = pytest.mark.integration

ENCLAVEKIT = [sys.executable, "-m", "enclavekit.cli.main"]
TINY_PCR0 = "56c3b42b79cb7dc9775b587a8dc520ac3854ada07f89b21ff608b94f68a918f31c085cc6d26df9224918c037fba03733"
TINY_PCR1 = "a85c761fc79b20dc65c344a9b3e98033982da0f0aea81862e824b1f37386f739456cdc4dbc050449b98f960d3d38e2b9"
TINY_PCR2 = "a919d0a5b993e68465b0c305340c039a0249cdf42f97e263cf09aec414a58bb6c2865f8c91778dc28a58fd328f9abab4"
META = EIFMetadata("test", "1.0", BuildMetadata("2024-01-01T00:00:00+00:00", "eif_build", "0.3.1", "OS", "kernel"),
                   custom_metadata={"team": "infra"})


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ENCLAVEKIT, *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def ok(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = run(*args)
    assert result.returncode == 0, result.stderr
    return result


def failed(code: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    result = run(*args)
    assert result.returncode == int(code[1:]), (result.returncode, result.stderr)
    assert f"[ {code} ]" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    return result


@pytest.fixture
def eif(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.eif"
    with open(path, "wb") as f:
        write_eif(f, EIFContent(BytesSource(b"KERNEL-BYTES"), b"console=ttyS0", META,
                                [BytesSource(b"RAMDISK-0"), BytesSource(b"RAMDISK-1")]))
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signer")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
            .sign(key, hashes.SHA384()))
    paths = {"cert": d / "cert.pem", "key": d / "key.pem", "rsa": d / "rsa.pem"}
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths["rsa"].write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


def test_describe_eif_json(eif: Path) -> None:
    result = ok("describe-eif", "--eif-path", eif)
    d = json.loads(result.stdout)
    assert list(d) == ["EifVersion", "Measurements", "IsSigned", "CheckCRC", "ImageName", "ImageVersion", "Metadata"]
    assert d["Measurements"] == {"HashAlgorithm": "Sha384 { ... }", "PCR0": TINY_PCR0, "PCR1": TINY_PCR1,
                                 "PCR2": TINY_PCR2}
    assert d["EifVersion"] == 4 and d["IsSigned"] is False and d["CheckCRC"] is True
    assert d["Metadata"] == {"BuildTime": "2024-01-01T00:00:00+00:00", "BuildTool": "eif_build",
                             "BuildToolVersion": "0.3.1", "OperatingSystem": "OS", "KernelVersion": "kernel",
                             "DockerInfo": None, "team": "infra"}
    assert result.stdout.startswith('{\n  "EifVersion": 4,\n  "Measurements": {\n    "HashAlgorithm"')
    ok("describe-eif", "--eif-path", eif, "--strict")


def test_describe_eif_bad_crc_is_reported_then_refused_in_strict_mode(eif: Path) -> None:
    data = bytearray(eif.read_bytes())
    data[-1] ^= 1
    eif.write_bytes(bytes(data))
    assert json.loads(ok("describe-eif", "--eif-path", eif).stdout)["CheckCRC"] is False
    assert "CRC mismatch" in failed("E61", "describe-eif", "--eif-path", eif, "--strict").stderr


@pytest.mark.parametrize(("mangle", "code"), [
    (lambda d: b"XXXX" + d[4:], "E35"),  # wrong magic
    (lambda d: d[:300], "E35"),  # truncated header
    (lambda d: d[:548] + bytes.fromhex("0001 0000 7fffffffffffffff") + d[560:], "E35"),  # size past EOF
    (lambda d: d[:548] + bytes.fromhex("0007 0000 0000000000000000") + d[560:], "E35"),  # unknown type
])
def test_describe_eif_corrupt_files(eif: Path, mangle: object, code: str) -> None:
    eif.write_bytes(mangle(eif.read_bytes()))  # type: ignore[operator]
    failed(code, "describe-eif", "--eif-path", eif)


def test_describe_eif_missing_file(tmp_path: Path) -> None:
    failed("E19", "describe-eif", "--eif-path", tmp_path / "nope.eif")


def test_pcr_input(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    result = ok("pcr", "--input", tmp_path / "empty")
    assert json.loads(result.stdout) == {"PCR": "21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c10"
                                                "edb30948c90ba67310f7b964fc500a"}
    assert run("pcr", "--input", "a", "--signing-certificate", "b").returncode == 2


def test_pcr_signing_certificate_errors(tmp_path: Path, keys: dict[str, Path]) -> None:
    failed("E64", "pcr", "--signing-certificate", keys["key"])
    failed("E19", "pcr", "--signing-certificate", tmp_path / "nope.pem")


def test_sign_eif_then_describe(eif: Path, keys: dict[str, Path]) -> None:
    result = ok("sign-eif", "--eif-path", eif, "--signing-certificate", keys["cert"], "--private-key", keys["key"])
    assert "Enclave Image successfully signed." in result.stderr
    m = json.loads(result.stdout)["Measurements"]
    assert list(m) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"] and m["PCR0"] == TINY_PCR0
    d = json.loads(ok("describe-eif", "--eif-path", eif, "--strict").stdout)
    assert list(d) == ["EifVersion", "Measurements", "IsSigned", "SigningCertificate", "CheckCRC", "SignatureCheck",
                       "ImageName", "ImageVersion", "Metadata"]
    assert d["Measurements"] == m and d["SignatureCheck"] is True and d["CheckCRC"] is True
    assert d["SigningCertificate"]["IssuerName"] == {"commonName": "signer"}
    assert d["SigningCertificate"]["Algorithm"] == "ecdsa-with-SHA384"
    # spec §6 item 9: `pcr --signing-certificate` == describe-eif PCR8
    assert json.loads(ok("pcr", "--signing-certificate", keys["cert"]).stdout) == {"PCR8": m["PCR8"]}
    # re-signing keeps a strictly valid file
    ok("sign-eif", "--eif-path", eif, "--signing-certificate", keys["cert"], "--private-key", keys["key"])
    ok("describe-eif", "--eif-path", eif, "--strict")


def test_sign_eif_bad_inputs_write_nothing(eif: Path, keys: dict[str, Path]) -> None:
    before = eif.read_bytes()
    failed("E64", "sign-eif", "--eif-path", eif, "--signing-certificate", keys["key"], "--private-key", keys["key"])
    failed("E65", "sign-eif", "--eif-path", eif, "--signing-certificate", keys["cert"], "--private-key", keys["rsa"])
    failed("E65", "sign-eif", "--eif-path", eif, "--signing-certificate", keys["cert"], "--private-key",
           keys["cert"])
    failed("E01", "sign-eif", "--eif-path", eif)
    failed("E02", "sign-eif", "--eif-path", eif, "--private-key", keys["key"], "--signature", keys["key"])
    failed("E01", "sign-eif", "--eif-path", eif, "--private-key", keys["key"])
    assert eif.read_bytes() == before
    assert sorted(p.name for p in eif.parent.iterdir()) == ["tiny.eif"]


def test_offline_signing(eif: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    payload = tmp_path / "payload.bin"
    result = ok("sign-eif", "--eif-path", eif, "--export-payload", payload, "--signing-certificate", keys["cert"])
    assert json.loads(result.stdout)["Algorithm"] == "ES384"
    key = serialization.load_pem_private_key(keys["key"].read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    before = eif.read_bytes()
    (tmp_path / "bad.der").write_bytes(key.sign(b"not the payload", ec.ECDSA(hashes.SHA384())))
    failed("E66", "sign-eif", "--eif-path", eif, "--signature", tmp_path / "bad.der", "--signing-certificate",
           keys["cert"])
    assert eif.read_bytes() == before
    (tmp_path / "sig.der").write_bytes(key.sign(payload.read_bytes(), ec.ECDSA(hashes.SHA384())))
    result = ok("sign-eif", "--eif-path", eif, "--signature", tmp_path / "sig.der", "--signing-certificate",
                keys["cert"])
    assert "Enclave Image successfully signed." in result.stderr
    assert json.loads(ok("describe-eif", "--eif-path", eif, "--strict").stdout)["SignatureCheck"] is True


def test_export_payload_failure_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "bad.eif").write_bytes(b"not an eif")
    failed("E35", "sign-eif", "--eif-path", tmp_path / "bad.eif", "--export-payload", tmp_path / "payload.bin")
    assert not (tmp_path / "payload.bin").exists()


@pytest.mark.parametrize("how", ["same-path", "other-spelling", "symlink", "hard-link"])
def test_export_payload_onto_the_eif_itself_is_refused(eif: Path, how: str) -> None:
    before = eif.read_bytes()
    if how == "same-path":
        target = eif
    elif how == "other-spelling":
        target = eif.parent / "." / eif.name
    elif how == "symlink":
        target = eif.parent / "link.eif"
        target.symlink_to(eif.name)
    else:
        target = eif.parent / "hard.eif"
        target.hardlink_to(eif)
    result = failed("E03", "sign-eif", "--eif-path", eif, "--export-payload", target)
    assert "is the image itself" in result.stderr
    assert eif.read_bytes() == before


def test_sign_eif_refuses_a_corrupt_image_unless_forced(eif: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(eif.read_bytes())
    data[-1] ^= 1
    eif.write_bytes(bytes(data))
    sign = ["sign-eif", "--eif-path", eif, "--signing-certificate", keys["cert"], "--private-key", keys["key"]]
    result = failed("E61", *sign)
    assert "the image's CRC does not match; it is corrupt" in result.stderr and "--force" in result.stderr
    assert eif.read_bytes() == bytes(data)
    failed("E61", "sign-eif", "--eif-path", eif, "--export-payload", tmp_path / "payload.bin")
    assert not (tmp_path / "payload.bin").exists()
    ok(*sign, "--force")
    assert json.loads(ok("describe-eif", "--eif-path", eif, "--strict").stdout)["CheckCRC"] is True
