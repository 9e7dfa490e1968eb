"""Signing, re-signing, offline signing, verification rules and describe-eif's certificate fields."""

from __future__ import annotations

import io
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from enclavekit.errors import (
    DetachedSignatureError,
    EIFSignatureError,
    EIFValidationError,
    FileOperationError,
    FormatError,
    SigningCertificateError,
    SigningKeyError,
)
from enclavekit.formats.cose import COSESign1
from enclavekit.formats.eif import BuildMetadata, EIFMetadata, SectionType
from enclavekit.formats.eif_signature import EIFSignature, PCRInfo, PCRSignature
from enclavekit.formats.pcr import pcr_of_content
from enclavekit.image.describe import describe_eif, describe_info
from enclavekit.image.eif_reader import EIFInfo, measure_eif
from enclavekit.image.eif_writer import BytesSource, EIFContent, EIFStreamWriter, write_eif
from enclavekit.image.signing import (
    EIFSigner,
    attach_signature,
    certificate_info,
    check_signature,
    export_payload,
    load_private_key,
    load_signing_certificate,
    sign_eif,
    signing_payload,
    verify_eif_signature,
)

META = EIFMetadata("test", "1.0", BuildMetadata("2024-01-01T00:00:00+00:00", "eif_build", "0.3.1", "OS", "kernel"))
NOT_BEFORE = datetime(2025, 1, 1, tzinfo=UTC)
NOW = datetime(2025, 6, 1, tzinfo=UTC)


def make_cert(key: object, cn: str = "enclave signer", sign_key: object = None) -> bytes:
    pub = key.public_key()  # type: ignore[attr-defined]
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pub)
            .serial_number(7).not_valid_before(NOT_BEFORE).not_valid_after(NOT_BEFORE + timedelta(days=365))
            .sign(sign_key or key, hashes.SHA384()))  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: object, password: bytes | None = None) -> bytes:
    enc = (serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)  # type: ignore


def signer_for(curve: ec.EllipticCurve, cn: str = "enclave signer") -> EIFSigner:
    key = ec.generate_private_key(curve)
    return EIFSigner.from_pem(make_cert(key, cn), key_pem(key))


@pytest.fixture(scope="module")
def p384() -> EIFSigner:
    return signer_for(ec.SECP384R1())


def tiny(path: Path) -> Path:
    with open(path, "wb") as f:
        write_eif(f, EIFContent(BytesSource(b"KERNEL-BYTES"), b"console=ttyS0", META,
                                [BytesSource(b"RAMDISK-0"), BytesSource(b"RAMDISK-1")]))
    return path


def info_of(path: Path, strict: bool = True) -> EIFInfo:
    with open(path, "rb") as f:
        return measure_eif(f, strict=strict)


TINY_PCR0 = "56c3b42b79cb7dc9775b587a8dc520ac3854ada07f89b21ff608b94f68a918f31c085cc6d26df9224918c037fba03733"


# ------------------------------------------------------------------------------------------- signing round trips


@pytest.mark.parametrize(("curve", "alg"), [(ec.SECP384R1(), -35), (ec.SECP256R1(), -7), (ec.SECP521R1(), -36)])
def test_sign_and_verify_round_trip(tmp_path: Path, curve: ec.EllipticCurve, alg: int) -> None:
    signer = signer_for(curve)
    path = tiny(tmp_path / "a.eif")
    m = sign_eif(path, signer)
    info = info_of(path)
    assert info.measurements == m and m.pcr0.hex() == TINY_PCR0
    assert m.pcr8 == pcr_of_content(signer.certificate_der)
    assert [s.section_type for s in info.sections][-1] == SectionType.SIGNATURE
    assert info.signature is not None and info.signature.first.signing_certificate == signer.certificate_pem
    verified = verify_eif_signature(info, NOW)
    assert verified.alg == alg and verified.pcr0 == m.pcr0 and verified.pcr8 == m.pcr8
    assert check_signature(info)
    cose = COSESign1.from_bytes(info.signature.first.signature)
    assert cose.algorithm() == alg and not cose.tagged


def test_signing_at_build_time_equals_signing_later(tmp_path: Path, p384: EIFSigner) -> None:
    out = io.BytesIO()
    m = write_eif(out, EIFContent(BytesSource(b"KERNEL-BYTES"), b"console=ttyS0", META,
                                  [BytesSource(b"RAMDISK-0"), BytesSource(b"RAMDISK-1")]), signer=p384)
    (tmp_path / "b.eif").write_bytes(out.getvalue())
    info = info_of(tmp_path / "b.eif")
    assert info.measurements == m and m.pcr8 == p384.pcr8
    verify_eif_signature(info, NOW)
    assert sign_eif(tiny(tmp_path / "c.eif"), p384) == m


def test_resigning_with_a_different_certificate_size_updates_the_header(tmp_path: Path, p384: EIFSigner) -> None:
    path = tiny(tmp_path / "a.eif")
    sign_eif(path, p384)
    first = info_of(path)
    # same curve, a certificate ~60 bytes longer (ECDSA DER lengths vary by a few bytes only)
    other = signer_for(ec.SECP384R1(), cn="a much longer common name, " * 2)
    m = sign_eif(path, other)
    info = info_of(path)  # strict: section table, sizes, offsets and CRC all consistent
    assert len(info.sections_of(SectionType.SIGNATURE)) == 1
    sig = info.sections_of(SectionType.SIGNATURE)[0]
    assert sig.size != first.sections_of(SectionType.SIGNATURE)[0].size
    assert info.header.section_sizes[sig.index] == sig.size and info.crc_ok
    assert info.header.num_sections == 6 and path.stat().st_size == sig.end
    assert m.pcr8 == other.pcr8 != p384.pcr8 and m.pcr0 == first.measurements.pcr0
    verify_eif_signature(info, NOW)


def test_signing_keeps_the_file_mode_and_leaves_no_temporary_file(tmp_path: Path, p384: EIFSigner) -> None:
    path = tiny(tmp_path / "a.eif")
    os.chmod(path, 0o640)
    sign_eif(path, p384)
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.eif"]


def test_failed_signing_leaves_the_original_intact(tmp_path: Path, p384: EIFSigner) -> None:
    path = tmp_path / "bad.eif"
    good = tiny(tmp_path / "good.eif").read_bytes()
    path.write_bytes(good[:700])  # truncated
    with pytest.raises(FormatError):
        sign_eif(path, p384)
    assert path.read_bytes() == good[:700]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.eif", "good.eif"]


def test_signing_a_missing_file(tmp_path: Path, p384: EIFSigner) -> None:
    with pytest.raises(FileOperationError):
        sign_eif(tmp_path / "missing.eif", p384)


# ------------------------------------------------------------------------------------------- offline signing


def test_offline_signing_round_trip_der(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = make_cert(key)
    path = tiny(tmp_path / "a.eif")
    payload = export_payload(path)
    assert payload == signing_payload(bytes.fromhex(TINY_PCR0))
    assert payload == COSESign1.create(-35, PCRInfo(0, bytes.fromhex(TINY_PCR0)).to_bytes()).sig_structure()
    # what an HSM does: ECDSA-SHA384 over the exported bytes, DER output
    der = key.sign(payload, ec.ECDSA(hashes.SHA384()))
    m = attach_signature(path, der, cert)
    info = info_of(path)
    assert m == info.measurements and m.pcr8 == pcr_of_content(load_signing_certificate(cert).public_bytes(
        serialization.Encoding.DER))
    verify_eif_signature(info, NOW)


def test_offline_signing_round_trip_raw_p256(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_cert(key)
    path = tiny(tmp_path / "a.eif")
    payload = export_payload(path, certificate_pem=cert)
    assert payload == signing_payload(bytes.fromhex(TINY_PCR0), -7)
    r, s = decode_dss_signature(key.sign(payload, ec.ECDSA(hashes.SHA256())))
    attach_signature(path, r.to_bytes(32, "big") + s.to_bytes(32, "big"), cert)
    verify_eif_signature(info_of(path), NOW)


def test_offline_wrong_signature_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = make_cert(key)
    path = tiny(tmp_path / "a.eif")
    before = path.read_bytes()
    wrong = key.sign(b"something else", ec.ECDSA(hashes.SHA384()))
    with pytest.raises(DetachedSignatureError) as exc:
        attach_signature(path, wrong, cert)
    assert exc.value.code == "E66"
    with pytest.raises(DetachedSignatureError):
        attach_signature(path, b"\x00" * 96, cert)
    with pytest.raises(DetachedSignatureError):
        attach_signature(path, b"junk", cert)
    # signed by another key
    other = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(DetachedSignatureError):
        attach_signature(path, other.sign(export_payload(path), ec.ECDSA(hashes.SHA384())), cert)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.eif"]


def test_offline_signature_for_another_image_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = make_cert(key)
    a = tiny(tmp_path / "a.eif")
    b = tmp_path / "b.eif"
    with open(b, "wb") as f:
        write_eif(f, EIFContent(BytesSource(b"other"), b"c", META, [BytesSource(b"r")]))
    sig = key.sign(export_payload(a), ec.ECDSA(hashes.SHA384()))
    with pytest.raises(DetachedSignatureError):
        attach_signature(b, sig, cert)


# ------------------------------------------------------------------------------------------- key/cert errors


def test_certificate_not_pem() -> None:
    with pytest.raises(SigningCertificateError) as exc:
        load_signing_certificate(b"hello")
    assert exc.value.code == "E64"


def test_certificate_pem_but_not_x509() -> None:
    with pytest.raises(SigningCertificateError):
        load_signing_certificate(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_certificate_with_rsa_key() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(SigningCertificateError, match="EC key"):
        load_signing_certificate(make_cert(key))


def test_key_not_pem() -> None:
    with pytest.raises(SigningKeyError) as exc:
        load_private_key(b"not a key")
    assert exc.value.code == "E65"


def test_key_garbage_pem() -> None:
    with pytest.raises(SigningKeyError):
        load_private_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def test_key_wrong_type() -> None:
    with pytest.raises(SigningKeyError, match="EC key"):
        load_private_key(key_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))


def test_key_wrong_curve() -> None:
    with pytest.raises(SigningKeyError, match="curve"):
        load_private_key(key_pem(ec.generate_private_key(ec.SECP256K1())))


def test_key_encrypted() -> None:
    with pytest.raises(SigningKeyError, match="encrypted"):
        load_private_key(key_pem(ec.generate_private_key(ec.SECP384R1()), b"pw"))


def test_key_does_not_match_certificate() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(SigningCertificateError, match="does not match"):
        EIFSigner.from_pem(make_cert(key), key_pem(ec.generate_private_key(ec.SECP384R1())))


def test_signer_from_files(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "cert.pem").write_bytes(make_cert(key))
    (tmp_path / "key.pem").write_bytes(key_pem(key))
    signer = EIFSigner.from_files(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert signer.certificate_pem == (tmp_path / "cert.pem").read_bytes()
    with pytest.raises(FileOperationError):
        EIFSigner.from_files(tmp_path / "cert.pem", tmp_path / "nope.pem")
    with pytest.raises(SigningKeyError, match="KMS"):
        EIFSigner.from_files(tmp_path / "cert.pem", "arn:aws:kms:us-east-1:123456789012:key/abcd-1234")


# ------------------------------------------------------------------------------------------- verification rules


def signed_with_section(tmp_path: Path, section: bytes) -> EIFInfo:
    out = io.BytesIO()
    w = EIFStreamWriter(out)
    for kind, data in [(SectionType.KERNEL, b"KERNEL-BYTES"), (SectionType.CMDLINE, b"console=ttyS0"),
                       (SectionType.METADATA, META.to_bytes()), (SectionType.RAMDISK, b"RAMDISK-0"),
                       (SectionType.RAMDISK, b"RAMDISK-1"), (SectionType.SIGNATURE, section)]:
        w.section_bytes(kind, data)
    w.finish()
    return measure_eif(io.BytesIO(out.getvalue()), strict=True)


def rule(info: EIFInfo, now: datetime | None = NOW) -> str:
    with pytest.raises(EIFSignatureError) as exc:
        verify_eif_signature(info, now)
    assert exc.value.code == "E59"
    return exc.value.rule


def test_verify_rule_unsigned(tmp_path: Path) -> None:
    info = info_of(tiny(tmp_path / "a.eif"))
    assert rule(info) == "unsigned" and not check_signature(info)


def test_verify_rule_certificate(tmp_path: Path) -> None:
    # a valid X.509 certificate (so PCR8 can be computed) whose key is not EC
    rsa_cert = make_cert(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    section = EIFSignature((PCRSignature(rsa_cert, b"\x80"),)).to_bytes()
    assert rule(signed_with_section(tmp_path, section)) == "certificate"


def test_verify_rule_cose_format(tmp_path: Path, p384: EIFSigner) -> None:
    section = EIFSignature((PCRSignature(p384.certificate_pem, b"\x80"),)).to_bytes()
    assert rule(signed_with_section(tmp_path, section)) == "cose-format"


def test_verify_rule_algorithm(tmp_path: Path, p384: EIFSigner) -> None:
    cose = COSESign1.create(-7, PCRInfo(0, bytes.fromhex(TINY_PCR0)).to_bytes(), b"\x01" * 64)
    section = EIFSignature((PCRSignature(p384.certificate_pem, cose.to_bytes()),)).to_bytes()
    assert rule(signed_with_section(tmp_path, section)) == "algorithm"


def test_verify_rule_signature(tmp_path: Path, p384: EIFSigner) -> None:
    good = p384.sign_pcr0(bytes.fromhex(TINY_PCR0))
    bad = COSESign1(good.protected, {}, good.payload, bytes([good.signature[0] ^ 1]) + good.signature[1:])
    section = EIFSignature((PCRSignature(p384.certificate_pem, bad.to_bytes()),)).to_bytes()
    info = signed_with_section(tmp_path, section)
    assert rule(info) == "signature" and not check_signature(info)


@pytest.mark.parametrize("now", [NOT_BEFORE - timedelta(seconds=1), NOT_BEFORE + timedelta(days=366)])
def test_verify_rule_certificate_validity(tmp_path: Path, p384: EIFSigner, now: datetime) -> None:
    info = signed_with_section(tmp_path, p384.signature_section(bytes.fromhex(TINY_PCR0)))
    assert rule(info, now) == "certificate-validity"
    assert check_signature(info)  # describe-eif does not look at the clock


def test_verify_rule_pcr0(tmp_path: Path, p384: EIFSigner) -> None:
    info = signed_with_section(tmp_path, p384.signature_section(bytes(48)))
    assert rule(info) == "pcr0" and not check_signature(info)
    verify_eif_signature(info, NOW, check_pcr0=False)  # nitro-cli's run-enclave behaviour


def test_verify_rule_payload(tmp_path: Path, p384: EIFSigner) -> None:
    from enclavekit._internal.ecdsa import sign_cose

    cose = sign_cose(p384.private_key, b"\xa0")
    section = EIFSignature((PCRSignature(p384.certificate_pem, cose.to_bytes()),)).to_bytes()
    info = signed_with_section(tmp_path, section)
    with pytest.raises(EIFSignatureError) as exc:
        verify_eif_signature(info, NOW, check_pcr0=False)
    assert exc.value.rule == "payload"


def test_verify_needs_an_aware_time(tmp_path: Path, p384: EIFSigner) -> None:
    info = signed_with_section(tmp_path, p384.signature_section(bytes.fromhex(TINY_PCR0)))
    with pytest.raises(ValueError):
        verify_eif_signature(info, datetime(2025, 6, 1))


# ------------------------------------------------------------------------------------------- describe-eif


def test_certificate_info_openssl_forms(p384: EIFSigner) -> None:
    ci = certificate_info(p384.certificate)
    assert list(ci) == ["IssuerName", "Algorithm", "NotBefore", "NotAfter", "Signature"]
    assert ci["IssuerName"] == {"countryName": "DE", "commonName": "enclave signer"}
    assert ci["Algorithm"] == "ecdsa-with-SHA384"
    assert ci["NotBefore"] == "Jan  1 00:00:00 2025 GMT"
    assert ci["NotAfter"] == "Jan  1 00:00:00 2026 GMT"
    assert ci["Signature"] == ":".join(f"{b:02X}" for b in p384.certificate.signature)


def test_describe_signed_eif_shape(tmp_path: Path, p384: EIFSigner) -> None:
    path = tiny(tmp_path / "a.eif")
    sign_eif(path, p384)
    d = describe_eif(path, strict=True)
    assert list(d) == ["EifVersion", "Measurements", "IsSigned", "SigningCertificate", "CheckCRC",
                       "SignatureCheck", "ImageName", "ImageVersion", "Metadata"]
    assert d["IsSigned"] and d["CheckCRC"] and d["SignatureCheck"] and d["EifVersion"] == 4
    assert list(d["Measurements"]) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert list(d["Metadata"]) == ["BuildTime", "BuildTool", "BuildToolVersion", "OperatingSystem",
                                   "KernelVersion", "DockerInfo"]


def test_describe_flattens_custom_metadata(tmp_path: Path) -> None:
    from dataclasses import replace

    out = io.BytesIO()
    md = replace(META, custom_metadata={"b": 1, "a": {"x": 1}, "BuildTime": "custom"})
    write_eif(out, EIFContent(BytesSource(b"k"), b"c", md, [BytesSource(b"r")]))
    d = describe_info(measure_eif(io.BytesIO(out.getvalue())))
    assert "SigningCertificate" not in d and "SignatureCheck" not in d and d["IsSigned"] is False
    assert d["Metadata"]["a"] == {"x": 1} and d["Metadata"]["b"] == 1
    assert d["Metadata"]["BuildTime"] == META.build_metadata.build_time
    assert "CustomMetadata" not in d["Metadata"]
    out = io.BytesIO()
    write_eif(out, EIFContent(BytesSource(b"k"), b"c", replace(META, custom_metadata=[1]), [BytesSource(b"r")]))
    assert describe_info(measure_eif(io.BytesIO(out.getvalue())))["Metadata"]["CustomMetadata"] == [1]


def test_describe_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileOperationError):
        describe_eif(tmp_path / "nope.eif")


# ------------------------------------------------------------------------------------------- corrupt images


def _corrupt(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # a ramdisk byte: the file still parses, its CRC no longer matches
    path.write_bytes(bytes(data))
    assert not info_of(path, strict=False).crc_ok
    return bytes(data)


def test_signing_an_image_whose_crc_fails_is_refused(tmp_path: Path, p384: EIFSigner) -> None:
    path = tiny(tmp_path / "a.eif")
    corrupt = _corrupt(path)
    with pytest.raises(EIFValidationError, match="the image's CRC does not match; it is corrupt") as info:
        sign_eif(path, p384)
    assert info.value.code == "E61" and info.value.rule == "crc"
    assert path.read_bytes() == corrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.eif"]


def test_signing_a_corrupt_image_with_force(tmp_path: Path, p384: EIFSigner) -> None:
    path = tiny(tmp_path / "a.eif")
    _corrupt(path)
    sign_eif(path, p384, force=True)
    assert info_of(path).crc_ok


def test_offline_signing_of_a_corrupt_image_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = make_cert(key)
    path = tiny(tmp_path / "a.eif")
    payload = export_payload(path)
    signature = key.sign(payload, ec.ECDSA(hashes.SHA384()))
    corrupt = _corrupt(path)
    with pytest.raises(EIFValidationError, match="CRC does not match"):
        export_payload(path)
    with pytest.raises(EIFValidationError, match="CRC does not match"):
        attach_signature(path, signature, cert)
    assert path.read_bytes() == corrupt
    assert export_payload(path, force=True) != payload  # the corrupt ramdisk byte changes PCR0
