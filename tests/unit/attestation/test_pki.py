"""The local PKI: AWS's certificate profiles under a root of its own, kept in the state directory."""

from __future__ import annotations

import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from attestation_helpers import NOW
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from enclavekit._internal import state
from enclavekit.attestation.pki import (
    INSTANCE_LIFETIME,
    PROFILES,
    REGIONAL_LIFETIME,
    ROOT_COMMON_NAME,
    ZONAL_LIFETIME,
    LocalPKI,
    enclave_id_bytes,
    issue_certificate,
    leaf_serial,
)
from enclavekit.errors import LocalPKIError

MODULE_ID = "i-0123456789abcdef0-enc0199546b533fd5d0"


def _bc(cert: x509.Certificate) -> x509.Extension[x509.BasicConstraints]:
    return cert.extensions.get_extension_for_class(x509.BasicConstraints)


def _ku(cert: x509.Certificate) -> x509.Extension[x509.KeyUsage]:
    return cert.extensions.get_extension_for_class(x509.KeyUsage)


def test_root_is_never_mistaken_for_aws(pki: LocalPKI) -> None:
    root = pki.root.certificate
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ROOT_COMMON_NAME
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "enclavekit"
    assert "aws" not in root.subject.rfc4514_string().lower()
    assert root.not_valid_after_utc - root.not_valid_before_utc >= timedelta(days=365 * 30)
    bc = _bc(root)
    assert bc.critical and bc.value.ca and bc.value.path_length is None
    ku = _ku(root)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and ku.value.digital_signature


def test_chain_profiles_follow_aws(pki: LocalPKI) -> None:
    chain = pki.chain(NOW)
    expected = [(chain.regional, 2, REGIONAL_LIFETIME, True), (chain.zonal, 1, ZONAL_LIFETIME, True),
                (chain.instance, 0, INSTANCE_LIFETIME, False)]
    parent = pki.root.certificate
    for issued, path_len, lifetime, crl_sign in expected:
        cert = issued.certificate
        assert cert.issuer == parent.subject
        assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == lifetime
        assert _bc(cert).critical and _bc(cert).value.ca and _bc(cert).value.path_length == path_len
        ku = _ku(cert)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign is crl_sign
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        assert aki == parent.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        parent.public_key().verify(  # type: ignore[union-attr]
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))  # type: ignore[arg-type]
        parent = cert
    # the zonal subject puts CN first (spec 3.4)
    assert chain.zonal.certificate.subject.rdns[0].get_attributes_for_oid(NameOID.COMMON_NAME)
    assert ".zonal.local.eklocal.nitro-enclaves" in chain.zonal.certificate.subject.rfc4514_string()
    assert chain.instance.certificate.serial_number.bit_length() > 150  # 20-byte serial
    assert chain.cabundle == (pki.root.der, chain.regional.der, chain.zonal.der, chain.instance.der)


def test_leaf_profile_and_serial(pki: LocalPKI) -> None:
    leaf = pki.issue_leaf(MODULE_ID, NOW)
    cert = leaf.issued.certificate
    assert cert.not_valid_before_utc == NOW - timedelta(seconds=3)
    assert cert.not_valid_after_utc == NOW + timedelta(hours=3)
    serial = cert.serial_number.to_bytes(16, "big")
    assert serial[:8] == bytes.fromhex("0199546b533fd5d0")
    assert serial[8:12] == b"\x00" * 4
    assert int.from_bytes(serial[12:], "big") == int(NOW.timestamp())
    assert cert.serial_number == leaf_serial(MODULE_ID, NOW)
    bc = _bc(cert)
    assert bc.critical and not bc.value.ca
    ku = _ku(cert)
    assert not ku.critical and ku.value.digital_signature and ku.value.content_commitment
    assert len(cert.extensions) == 2
    assert cert.issuer == leaf.chain.instance.certificate.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value.startswith(MODULE_ID)


def test_enclave_id_of_other_module_ids_is_hashed() -> None:
    assert len(enclave_id_bytes("my-enclave")) == 8
    assert enclave_id_bytes("my-enclave") != enclave_id_bytes("other")


def test_state_files_and_modes(tmp_path: Path, pki: LocalPKI) -> None:
    pki.chain(NOW)
    directory = tmp_path / "pki"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in ("root", "regional", "zonal", "instance"):
        assert stat.S_IMODE((directory / f"{name}.key").stat().st_mode) == 0o600
        assert (directory / f"{name}.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
        assert (directory / f"{name}.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_loaded_afterwards_not_recreated(tmp_path: Path, pki: LocalPKI) -> None:
    first = pki.chain(NOW)
    again = LocalPKI.open(tmp_path, now=NOW + timedelta(hours=1))
    assert again.root.der == pki.root.der
    assert again.instance_id == pki.instance_id
    assert again.chain(NOW + timedelta(hours=1)).instance.der == first.instance.der


def test_intermediates_are_reissued_before_they_could_expire(pki: LocalPKI) -> None:
    first = pki.chain(NOW)
    # 22 h later the instance certificate can no longer cover a 3 h leaf: only it is re-issued
    later = pki.chain(NOW + timedelta(hours=22))
    assert later.zonal.der == first.zonal.der and later.instance.der != first.instance.der
    # 6 days later the zonal one (and everything below it) is re-issued
    much_later = pki.chain(NOW + timedelta(days=6))
    assert much_later.regional.der == first.regional.der
    assert much_later.zonal.der != later.zonal.der and much_later.instance.der != later.instance.der
    # 20 days later, the whole chain under the root
    last = pki.chain(NOW + timedelta(days=20))
    assert last.regional.der != first.regional.der and last.root.der == first.root.der
    for issued in (last.regional, last.zonal, last.instance):
        assert issued.covers(NOW + timedelta(days=20), timedelta(hours=3))


def test_missing_pki_is_reported_when_not_creating(tmp_path: Path) -> None:
    with pytest.raises(LocalPKIError) as exc:
        LocalPKI.open(tmp_path, now=NOW, create=False)
    assert exc.value.code == "E75"


def test_damaged_pki_is_reported(tmp_path: Path, pki: LocalPKI) -> None:
    (tmp_path / "pki" / "root.key").write_bytes(b"garbage")
    with pytest.raises(LocalPKIError):
        LocalPKI.open(tmp_path, now=NOW)


def test_root_outside_its_validity_is_reported(pki: LocalPKI) -> None:
    with pytest.raises(LocalPKIError):
        pki.chain(NOW - timedelta(days=1))


def test_naive_now_is_a_caller_bug(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LocalPKI.open(tmp_path, now=NOW.replace(tzinfo=None))


def test_two_processes_create_one_root(tmp_path: Path) -> None:
    code = (
        "import sys; from datetime import datetime, UTC; from pathlib import Path;"
        "from enclavekit.attestation.pki import LocalPKI;"
        "p = LocalPKI.open(Path(sys.argv[1]), now=datetime.now(UTC)); p.chain(datetime.now(UTC));"
        "print(p.root.der.hex())"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outputs = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outputs) == 1


def test_state_home_resolution(tmp_path: Path) -> None:
    assert state.state_home({"ENCLAVEKIT_HOME": str(tmp_path)}) == tmp_path
    assert state.state_home({}, euid=0) == Path("/var/lib/enclavekit")
    assert state.state_home({"HOME": "/home/u"}, euid=1000) == Path("/home/u/.local/share/enclavekit")
    assert state.state_home({"XDG_DATA_HOME": "/x"}, euid=1000) == Path("/x/enclavekit")


# ------------------------------------------------------------------------------------------ extension order


_EXT = {x509.BasicConstraints.oid: "BC", x509.SubjectKeyIdentifier.oid: "SKI", x509.KeyUsage.oid: "KU",
        x509.AuthorityKeyIdentifier.oid: "AKI", x509.CRLDistributionPoints.oid: "CRL-DP"}
# spec 3.4, read off every fixture (instance: the 2025 form with SKI and AKI)
AWS_ORDER = {"root": ["BC", "SKI", "KU"], "regional": ["BC", "AKI", "SKI", "KU", "CRL-DP"],
             "zonal": ["BC", "AKI", "SKI", "KU", "CRL-DP"], "instance": ["BC", "KU", "SKI", "AKI"],
             "leaf": ["BC", "KU"]}


def _order(cert: x509.Certificate) -> list[str]:
    return [_EXT[e.oid] for e in cert.extensions]


def test_extensions_are_in_aws_order(pki: LocalPKI) -> None:
    chain = pki.chain(NOW)
    leaf = pki.issue_leaf(MODULE_ID, NOW).issued.certificate
    got = {"root": _order(pki.root.certificate), "regional": _order(chain.regional.certificate),
           "zonal": _order(chain.zonal.certificate), "instance": _order(chain.instance.certificate),
           "leaf": _order(leaf)}
    assert got == AWS_ORDER


def test_aws_fixture_chains_have_the_profile_order() -> None:
    from attestation_helpers import DOCS, fixture_bytes

    from enclavekit.formats.attestation_doc import AttestationDocument

    doc = AttestationDocument.from_bytes(fixture_bytes(next(d for d in DOCS if "2025" in d)))
    certs = [x509.load_der_x509_certificate(d) for d in (*doc.cabundle, doc.certificate)]
    assert dict(zip(AWS_ORDER, map(_order, certs), strict=True)) == AWS_ORDER


def test_profiles_refuse_unknown_or_repeated_extensions() -> None:
    from dataclasses import replace

    with pytest.raises(ValueError):
        replace(PROFILES["leaf"], extensions=("basic_constraints", "basic_constraints"))
    with pytest.raises(ValueError):
        replace(PROFILES["leaf"], extensions=("subject_alt_name",))
    # a profile without key_usage writes none (used to build negative test chains)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    cert = issue_certificate(replace(PROFILES["leaf"], extensions=("basic_constraints",)), subject=name,
                             public_key=key.public_key(), issuer=name, issuer_key=key, not_before=NOW,
                             not_after=NOW + timedelta(hours=1))
    assert _order(cert) == ["BC"]


# ------------------------------------------------------------------------------------------ names and regions


LONG_MODULE_ID = "i-0123456789abcdef0-enc0199546b533fd5d0"  # 39 characters, the longest standard form


@pytest.mark.parametrize("region", ["ap-southeast-2", "us-gov-west-1", "ap-northeast-3", "il-central-1",
                                    "us-isof-south-1", "x" * 16])
def test_real_region_names_fit_every_common_name(tmp_path: Path, region: str) -> None:
    pki = LocalPKI.open(tmp_path, now=NOW, region=region)
    chain = pki.chain(NOW)
    leaf = pki.issue_leaf(LONG_MODULE_ID, NOW).issued.certificate
    for cert in (chain.regional.certificate, chain.zonal.certificate, chain.instance.certificate, leaf):
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert isinstance(cn, str) and len(cn) <= 64
        assert f".{region}.eklocal" in cn and "aws" not in cn
    # the leaf CN is whole: <module_id>.<region>.eklocal, never cut mid-word
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"{LONG_MODULE_ID}.{region}.eklocal"


def test_an_over_long_module_id_is_hashed_not_cut(tmp_path: Path) -> None:
    pki = LocalPKI.open(tmp_path, now=NOW, region="ap-southeast-2")
    cert = pki.issue_leaf("m" * 80, NOW).issued.certificate
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(cn, str) and len(cn) == 64 and cn.endswith(".ap-southeast-2.eklocal")


@pytest.mark.parametrize("region", ["", "x" * 17, "US-EAST-1", "us_east_1", "-us", "us-", "us--east", "eu/1",
                                    "us-east-1\n"])
def test_bad_region_names_are_refused(tmp_path: Path, region: str) -> None:
    with pytest.raises(ValueError, match="region"):
        LocalPKI.open(tmp_path, now=NOW, region=region)
    assert not (tmp_path / "pki").exists()


def test_a_stored_bad_region_is_reported(tmp_path: Path, pki: LocalPKI) -> None:
    meta = tmp_path / "pki" / "pki.json"
    meta.write_text(meta.read_text().replace('"local"', '"' + "y" * 40 + '"'))
    with pytest.raises(LocalPKIError, match="region"):
        LocalPKI.open(tmp_path, now=NOW)
