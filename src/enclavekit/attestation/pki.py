"""The local attestation PKI: root -> regional -> zonal -> instance -> leaf, with AWS's certificate profiles.

Spec nsm-attestation-kms §3.4 describes the chain real Nitro hosts use.  This module builds the same shape
(ECDSA P-384 keys, ecdsa-with-SHA384 signatures, the same extensions, criticality, pathLen, lifetimes, subject
layouts, extension order and the leaf serial convention) under a root of its own.  The root can never be mistaken
for AWS's: its subject is ``C=US, O=enclavekit, OU=local, CN=enclavekit-local.nitro-enclaves`` and the names below
it end in ``.<region>.eklocal.nitro-enclaves`` (CAs) and ``.<region>.eklocal`` (leaf) where AWS writes
``.aws.nitro-enclaves`` and ``.aws`` (spec 3.9 recommends a distinct CN).  The suffixes are short enough that every
common name fits X.520's 64 characters with any region of up to 16 characters (``ap-southeast-2``,
``us-isof-south-1``) and a full module id (``i-<17 hex>-enc<16 hex>``, 39 characters).

Extensions are written in AWS's order (observed on every fixture): root BC, SKI, KU; regional and zonal BC, AKI,
SKI, KU, CRL DP; instance BC, KU, SKI, AKI; leaf BC, KU.

| cert     | lifetime           | BasicConstraints (critical) | KeyUsage                                    |
|----------|--------------------|-----------------------------|---------------------------------------------|
| root     | 30 years           | CA, no pathLen              | critical: digitalSignature, keyCertSign, cRLSign |
| regional | 20 days + 1 h      | CA, pathLen 2               | critical: digitalSignature, keyCertSign, cRLSign |
| zonal    | 6 days + 1 h       | CA, pathLen 1               | critical: digitalSignature, keyCertSign, cRLSign |
| instance | 24 h               | CA, pathLen 0               | critical: keyCertSign                        |
| leaf     | 3 h 00 min 03 s    | CA:FALSE                    | non-critical: digitalSignature, nonRepudiation |

The regional and zonal certificates carry a CRL distribution point on the reserved ``.invalid`` domain: the
profile has one, but no local CRL is ever served (verifiers check with CRLs disabled, spec 3.6).

State: ``<state dir>/pki/`` (mode 0700) holds ``pki.json`` (region and instance id), ``<name>.pem`` certificates
and ``<name>.key`` PKCS#8 keys (mode 0600).  It is created on first use and loaded afterwards; every load,
creation or renewal holds ``pki/.lock`` so two processes never create two roots.  An intermediate is re-issued
as soon as it would not cover the whole life of the next certificate issued under it (so it is never used
expired); when one is re-issued, those below it are re-issued too.  Leaves are not stored: the issuer keeps one
per module id in memory until it expires.

"now" is a parameter of every call; nothing here reads the clock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclavekit._internal import state
from enclavekit.errors import LocalPKIError

__all__ = [
    "ROOT_LIFETIME",
    "REGIONAL_LIFETIME",
    "ZONAL_LIFETIME",
    "INSTANCE_LIFETIME",
    "LEAF_LIFETIME",
    "LEAF_BACKDATE",
    "ROOT_COMMON_NAME",
    "CertificateProfile",
    "EXTENSION_NAMES",
    "MAX_REGION_LENGTH",
    "PROFILES",
    "IssuedCertificate",
    "CertificateChain",
    "LeafCertificate",
    "LocalPKI",
    "issue_certificate",
    "leaf_serial",
    "enclave_id_bytes",
]

ROOT_LIFETIME = timedelta(days=365 * 30 + 7)  # 30 years (AWS root: 2019-10-28 -> 2049-10-28)
REGIONAL_LIFETIME = timedelta(days=20, hours=1)
ZONAL_LIFETIME = timedelta(days=6, hours=1)
INSTANCE_LIFETIME = timedelta(hours=24)
LEAF_LIFETIME = timedelta(hours=3)  # notAfter = issue time + 3 h (spec 3.4)
LEAF_BACKDATE = timedelta(seconds=3)  # notBefore = issue time - 3 s, so the window is 3 h 00 min 03 s
_CA_BACKDATE = timedelta(seconds=60)  # intermediates start a minute before they are made (clock skew)
_ROOT_BACKDATE = timedelta(hours=1)

ROOT_COMMON_NAME = "enclavekit-local.nitro-enclaves"
# spec 3.4: AWS's CAs are <...>.<region>.aws.nitro-enclaves and the leaf <module_id>.<region>.aws
_DOMAIN = "eklocal.nitro-enclaves"
_LEAF_DOMAIN = "eklocal"
MAX_REGION_LENGTH = 16  # longest AWS region names today: 15 (us-isof-south-1); CNs fit 64 up to 16
_REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_MAX_COMMON_NAME = 64  # X.520 ub-common-name
_ORG = "enclavekit"
_OU = "local"
_CRL_HOST = "http://crl.enclavekit.invalid/crl"  # .invalid (RFC 2606): never resolvable, never fetched

_CHAIN = ("regional", "zonal", "instance")
_CHILD_LIFETIME = {"root": REGIONAL_LIFETIME, "regional": ZONAL_LIFETIME, "zonal": INSTANCE_LIFETIME,
                   "instance": LEAF_LIFETIME + LEAF_BACKDATE}
_LIFETIME = {"root": ROOT_LIFETIME, "regional": REGIONAL_LIFETIME, "zonal": ZONAL_LIFETIME,
             "instance": INSTANCE_LIFETIME}
_PARENT = {"regional": "root", "zonal": "regional", "instance": "zonal"}


# extension names a profile may list, in the order the profile lists them
EXTENSION_NAMES = frozenset({"basic_constraints", "key_usage", "subject_key_identifier",
                             "authority_key_identifier", "crl_distribution_points"})


@dataclass(frozen=True)
class CertificateProfile:
    """Extensions of one position in the chain (spec 3.4 table), written in the order of ``extensions``.

    ``authority_key_identifier`` is written only when the issuer has an SKI, ``crl_distribution_points`` only
    when a CRL URL is given.
    """

    ca: bool
    path_length: int | None
    key_usage: frozenset[str]
    extensions: tuple[str, ...]
    key_usage_critical: bool = True
    serial_bytes: int = 16

    def __post_init__(self) -> None:
        unknown = set(self.extensions) - EXTENSION_NAMES
        if unknown or len(set(self.extensions)) != len(self.extensions):
            raise ValueError(f"profile extensions must be distinct names from {sorted(EXTENSION_NAMES)}")


_CA_USAGE = frozenset({"digital_signature", "key_cert_sign", "crl_sign"})
# spec 3.4, extension order as in every fixture
_ROOT_EXTENSIONS = ("basic_constraints", "subject_key_identifier", "key_usage")
_REGIONAL_EXTENSIONS = ("basic_constraints", "authority_key_identifier", "subject_key_identifier", "key_usage",
                        "crl_distribution_points")
_INSTANCE_EXTENSIONS = ("basic_constraints", "key_usage", "subject_key_identifier", "authority_key_identifier")
PROFILES: dict[str, CertificateProfile] = {
    "root": CertificateProfile(ca=True, path_length=None, key_usage=_CA_USAGE, extensions=_ROOT_EXTENSIONS),
    "regional": CertificateProfile(ca=True, path_length=2, key_usage=_CA_USAGE, extensions=_REGIONAL_EXTENSIONS),
    "zonal": CertificateProfile(ca=True, path_length=1, key_usage=_CA_USAGE, extensions=_REGIONAL_EXTENSIONS),
    # 2025+ instance certificates carry SKI and AKI (after KU) and a 20-byte serial
    "instance": CertificateProfile(ca=True, path_length=0, key_usage=frozenset({"key_cert_sign"}),
                                   extensions=_INSTANCE_EXTENSIONS, serial_bytes=20),
    "leaf": CertificateProfile(ca=False, path_length=None,
                               key_usage=frozenset({"digital_signature", "content_commitment"}),
                               extensions=("basic_constraints", "key_usage"), key_usage_critical=False),
}
_KEY_USAGE_FIELDS = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                     "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate with its DER bytes and (for our own CAs) its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    der: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not self.der:
            object.__setattr__(self, "der", self.certificate.public_bytes(serialization.Encoding.DER))

    @property
    def not_before(self) -> datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def covers(self, start: datetime, length: timedelta) -> bool:
        """True if the certificate is valid over the whole of ``[start, start + length]``."""
        return self.not_before <= start and start + length <= self.not_after


@dataclass(frozen=True)
class CertificateChain:
    """A snapshot of the CA chain: root, regional, zonal, instance."""

    root: IssuedCertificate
    regional: IssuedCertificate
    zonal: IssuedCertificate
    instance: IssuedCertificate

    @property
    def cabundle(self) -> tuple[bytes, ...]:
        """DER certificates root first, as the document's ``cabundle`` holds them (spec 3.2)."""
        return (self.root.der, self.regional.der, self.zonal.der, self.instance.der)


@dataclass(frozen=True)
class LeafCertificate:
    """A signing certificate for one module id, its key, and the chain it was issued under."""

    issued: IssuedCertificate
    chain: CertificateChain
    module_id: str

    @property
    def der(self) -> bytes:
        return self.issued.der

    @property
    def key(self) -> ec.EllipticCurvePrivateKey:
        return self.issued.key

    def usable_at(self, when: datetime) -> bool:
        return self.issued.not_before <= when < self.issued.not_after


def _utc(when: datetime) -> datetime:
    if not isinstance(when, datetime) or when.tzinfo is None:
        raise ValueError("times must be timezone-aware datetimes")
    return when.astimezone(UTC).replace(microsecond=0)


def _name(pairs: Sequence[tuple[x509.ObjectIdentifier, str]]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


def _random_serial(nbytes: int) -> int:
    # a positive DER INTEGER of exactly ``nbytes`` bytes: top bit clear, second bit set
    value = int.from_bytes(os.urandom(nbytes), "big")
    return (value & ((1 << (8 * nbytes - 1)) - 1)) | (1 << (8 * nbytes - 2))


def issue_certificate(
    profile: CertificateProfile,
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
    serial: int | None = None,
    issuer_ski: bytes | None = None,
    crl_url: str | None = None,
) -> x509.Certificate:
    """Sign one certificate with ``profile``'s extensions in the profile's order, ecdsa-with-SHA384 (spec 3.4)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial if serial is not None else _random_serial(profile.serial_bytes))
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    # the builder writes extensions in the order they are added
    for name in profile.extensions:
        if name == "basic_constraints":
            builder = builder.add_extension(
                x509.BasicConstraints(ca=profile.ca, path_length=profile.path_length), critical=True)
        elif name == "key_usage":
            builder = builder.add_extension(
                x509.KeyUsage(**{u: u in profile.key_usage for u in _KEY_USAGE_FIELDS}),
                critical=profile.key_usage_critical)
        elif name == "subject_key_identifier":
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        elif name == "authority_key_identifier":
            if issuer_ski is not None:
                builder = builder.add_extension(x509.AuthorityKeyIdentifier(issuer_ski, None, None), critical=False)
        elif crl_url:  # crl_distribution_points
            builder = builder.add_extension(
                x509.CRLDistributionPoints([x509.DistributionPoint(
                    [x509.UniformResourceIdentifier(crl_url)], None, None, None)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA384())


def _check_region(region: str, error: type[Exception]) -> None:
    """A region name as AWS writes them (``us-east-1``, ``ap-southeast-2``) or a local one (``local``)."""
    if (not isinstance(region, str) or not 1 <= len(region) <= MAX_REGION_LENGTH
            or not _REGION.fullmatch(region)):
        raise error(f"region {str(region)[:40]!r} must be 1..{MAX_REGION_LENGTH} characters of a-z and 0-9 "
                    "in '-'-separated words (e.g. us-east-1)")


def enclave_id_bytes(module_id: str) -> bytes:
    """The 8-byte enclave id of ``i-…-enc<16 hex>`` (spec 3.5); other ids hash to 8 bytes."""
    match = re.fullmatch(r"i-[0-9a-f]+-enc([0-9a-f]{16})", module_id)
    if match:
        return bytes.fromhex(match.group(1))
    return hashlib.sha256(module_id.encode("utf-8")).digest()[:8]


def leaf_serial(module_id: str, issued_at: datetime) -> int:
    """spec 3.4: serial = 8-byte enclave id || 4 zero bytes || 4-byte big-endian issue seconds."""
    seconds = int(_utc(issued_at).timestamp())
    return int.from_bytes(enclave_id_bytes(module_id) + b"\x00" * 4 + (seconds & 0xFFFFFFFF).to_bytes(4, "big"),
                          "big")


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


class LocalPKI:
    """The local attestation PKI kept in ``directory`` (normally ``<state dir>/pki``).

    Use :meth:`open` to create it on first use or load it; :meth:`chain` returns a CA chain valid at ``now``
    (renewing intermediates as needed) and :meth:`issue_leaf` a fresh signing certificate for a module id.
    """

    def __init__(self, directory: Path, *, region: str, instance_id: str, root: IssuedCertificate) -> None:
        self.directory = directory
        self.region = region
        self.instance_id = instance_id
        self.root = root
        self._chain: CertificateChain | None = None

    # ------------------------------------------------------------------------------------------ opening

    @classmethod
    def open(cls, home: Path | None = None, *, now: datetime, region: str = "local",
             create: bool = True) -> LocalPKI:
        """Load ``<home>/pki`` (``home`` defaults to the state directory), creating it if ``create``."""
        now = _utc(now)
        _check_region(region, ValueError)
        directory = (home if home is not None else state.state_home()) / "pki"
        if not (directory / "root.pem").exists() and not create:
            raise LocalPKIError(f"no local attestation PKI in {directory}",
                                hint="Run `enclavekit attestation root-cert` or issue a document to create one.")
        try:
            state.ensure_private_dir(directory)
            with state.file_lock(directory / ".lock"):
                if not (directory / "root.pem").exists():
                    cls._create_root(directory, now, region)
                meta = json.loads((directory / "pki.json").read_text())
                root = cls._load(directory, "root")
        except LocalPKIError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LocalPKIError(f"the local attestation PKI in {directory} is unreadable: "
                                f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("version") != 1:
            raise LocalPKIError(f"{directory / 'pki.json'} has an unknown version")
        _check_region(str(meta.get("region")), LocalPKIError)
        return cls(directory, region=str(meta["region"]), instance_id=str(meta["instance_id"]), root=root)

    @staticmethod
    def _create_root(directory: Path, now: datetime, region: str) -> None:
        key = ec.generate_private_key(ec.SECP384R1())
        subject = _name([(NameOID.COUNTRY_NAME, "US"), (NameOID.ORGANIZATION_NAME, _ORG),
                         (NameOID.ORGANIZATIONAL_UNIT_NAME, _OU), (NameOID.COMMON_NAME, ROOT_COMMON_NAME)])
        cert = issue_certificate(PROFILES["root"], subject=subject, public_key=key.public_key(), issuer=subject,
                                 issuer_key=key, not_before=now - _ROOT_BACKDATE,
                                 not_after=now - _ROOT_BACKDATE + ROOT_LIFETIME)
        instance_id = "i-" + os.urandom(9).hex()[:17]
        LocalPKI._store(directory, "root", IssuedCertificate(cert, key))
        meta = {"version": 1, "region": region, "instance_id": instance_id}
        state.atomic_write(directory / "pki.json", json.dumps(meta, indent=2).encode() + b"\n", mode=0o644)

    @staticmethod
    def _store(directory: Path, name: str, issued: IssuedCertificate) -> None:
        # key first: a certificate on disk always has its key beside it
        key_pem = issued.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
        state.atomic_write(directory / f"{name}.key", key_pem, mode=0o600)
        state.atomic_write(directory / f"{name}.pem",
                           issued.certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)

    @staticmethod
    def _load(directory: Path, name: str) -> IssuedCertificate:
        cert = x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / f"{name}.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
            raise LocalPKIError(f"{directory / (name + '.key')} is not a P-384 private key")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise LocalPKIError(f"{directory / (name + '.key')} does not match {name}.pem")
        return IssuedCertificate(cert, key)

    # ------------------------------------------------------------------------------------------ chain

    @property
    def root_pem(self) -> bytes:
        return self.root.certificate.public_bytes(serialization.Encoding.PEM)

    def _subject(self, name: str) -> x509.Name:
        if name == "regional":
            cn = f"{os.urandom(8).hex()}.{self.region}.{_DOMAIN}"
            return _name([(NameOID.COUNTRY_NAME, "US"), (NameOID.ORGANIZATION_NAME, _ORG),
                          (NameOID.ORGANIZATIONAL_UNIT_NAME, _OU), (NameOID.COMMON_NAME, cn)])
        if name == "zonal":  # spec 3.4: the zonal subject puts CN first
            cn = f"{os.urandom(8).hex()}.zonal.{self.region}.{_DOMAIN}"
            return _name([(NameOID.COMMON_NAME, cn), (NameOID.ORGANIZATIONAL_UNIT_NAME, _OU),
                          (NameOID.ORGANIZATION_NAME, _ORG), (NameOID.COUNTRY_NAME, "US"),
                          (NameOID.STATE_OR_PROVINCE_NAME, "WA"), (NameOID.LOCALITY_NAME, "Seattle")])
        return self._long_subject(f"{self.instance_id}.{self.region}.{_DOMAIN}")

    @staticmethod
    def _long_subject(cn: str) -> x509.Name:
        return _name([(NameOID.COUNTRY_NAME, "US"), (NameOID.STATE_OR_PROVINCE_NAME, "Washington"),
                      (NameOID.LOCALITY_NAME, "Seattle"), (NameOID.ORGANIZATION_NAME, _ORG),
                      (NameOID.ORGANIZATIONAL_UNIT_NAME, _OU), (NameOID.COMMON_NAME, cn)])

    def _issue_ca(self, name: str, parent: IssuedCertificate, now: datetime) -> IssuedCertificate:
        key = ec.generate_private_key(ec.SECP384R1())
        start = now - _CA_BACKDATE
        crl = f"{_CRL_HOST}/{os.urandom(16).hex()}.crl"
        cert = issue_certificate(
            PROFILES[name], subject=self._subject(name), public_key=key.public_key(),
            issuer=parent.certificate.subject, issuer_key=parent.key, not_before=start,
            not_after=min(start + _LIFETIME[name], parent.not_after), issuer_ski=_ski(parent.certificate),
            crl_url=crl)
        return IssuedCertificate(cert, key)

    def _good(self, name: str, issued: IssuedCertificate | None, parent: IssuedCertificate, now: datetime) -> bool:
        return (issued is not None
                and issued.certificate.issuer == parent.certificate.subject
                and issued.covers(now, _CHILD_LIFETIME[name])
                and _ski(parent.certificate) is not None)

    def chain(self, now: datetime) -> CertificateChain:
        """The CA chain to issue under at ``now``: every certificate covers ``now`` plus the life of its child."""
        now = _utc(now)
        if not self.root.covers(now, _CHILD_LIFETIME["root"]):
            raise LocalPKIError(
                f"the local root certificate is not valid at {now.isoformat()} (valid "
                f"{self.root.not_before.isoformat()} .. {self.root.not_after.isoformat()})",
                hint=f"Remove {self.directory} to create a new local PKI.")
        cached = self._chain
        if cached is not None and all(
                getattr(cached, n).covers(now, _CHILD_LIFETIME[n]) for n in _CHAIN):
            return cached
        try:
            with state.file_lock(self.directory / ".lock"):
                current: dict[str, IssuedCertificate] = {"root": self.root}
                renewed = False
                for name in _CHAIN:
                    parent = current[_PARENT[name]]
                    existing = None
                    if not renewed and (self.directory / f"{name}.pem").exists():
                        existing = self._load(self.directory, name)
                    if renewed or not self._good(name, existing, parent, now):
                        existing = self._issue_ca(name, parent, now)
                        self._store(self.directory, name, existing)
                        renewed = True  # everything below a re-issued certificate is re-issued too
                    assert existing is not None
                    current[name] = existing
        except LocalPKIError:
            raise
        except (OSError, ValueError) as exc:
            raise LocalPKIError(f"the local attestation PKI in {self.directory} is unusable: "
                                f"{type(exc).__name__}: {exc}") from exc
        self._chain = CertificateChain(self.root, current["regional"], current["zonal"], current["instance"])
        return self._chain

    def issue_leaf(self, module_id: str, now: datetime) -> LeafCertificate:
        """A signing certificate for ``module_id`` issued at ``now`` (spec 3.4 leaf profile and serial)."""
        if not isinstance(module_id, str) or not module_id:
            raise ValueError("module_id must be a non-empty string")
        now = _utc(now)
        chain = self.chain(now)
        key = ec.generate_private_key(ec.SECP384R1())
        # spec 3.4: CN=<module_id>.<region>.aws; a standard module id (<= 39 characters) always fits
        suffix = f".{self.region}.{_LEAF_DOMAIN}"
        cn = module_id + suffix
        if len(cn) > _MAX_COMMON_NAME:  # a non-standard module id: a hash of it, never a cut-off suffix
            cn = hashlib.sha256(module_id.encode()).hexdigest()[:_MAX_COMMON_NAME - len(suffix)] + suffix
        cert = issue_certificate(
            PROFILES["leaf"], subject=self._long_subject(cn), public_key=key.public_key(),
            issuer=chain.instance.certificate.subject, issuer_key=chain.instance.key,
            not_before=now - LEAF_BACKDATE, not_after=now + LEAF_LIFETIME, serial=leaf_serial(module_id, now))
        return LeafCertificate(IssuedCertificate(cert, key), chain, module_id)
