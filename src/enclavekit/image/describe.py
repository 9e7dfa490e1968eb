"""``describe-eif``: the JSON nitro-cli prints for an image (spec eif-pcr-cli §3.3 ``EifDescribeInfo``)."""

from __future__ import annotations

import os
from typing import Any

from enclavekit.errors import EIFFormatError, FileOperationError
from enclavekit.image.eif_reader import EIFInfo, measure_eif

__all__ = ["describe_info", "describe_eif", "image_metadata"]


def image_metadata(info: EIFInfo) -> dict[str, Any]:
    """``ImageName``, ``ImageVersion`` and ``Metadata`` of describe-eif (and describe-enclaves ``--metadata``).

    ``CustomMetadata`` is flattened into ``Metadata`` as nitro-cli does (serde ``flatten``); where nitro-cli would
    fail (a custom value that is not an object) it is kept under ``"CustomMetadata"``, and a custom key that
    collides with a build field does not override it.  Needs no X.509: enclave launches call it.
    """
    if info.metadata is None:
        return {}
    md = info.metadata
    meta: dict[str, Any] = dict(md.build_metadata.to_json())
    meta["DockerInfo"] = md.docker_info
    custom = md.custom_metadata
    if isinstance(custom, dict):
        for key, value in sorted(custom.items()):
            meta.setdefault(key, value)
    elif custom is not None:
        meta["CustomMetadata"] = custom
    return {"ImageName": md.image_name, "ImageVersion": md.image_version, "Metadata": meta}


def describe_info(info: EIFInfo) -> dict[str, Any]:
    """§3.3 describe-eif, keys in nitro-cli's order (metadata as :func:`image_metadata` gives it)."""
    out: dict[str, Any] = {"EifVersion": info.header.version, "Measurements": info.measurements.to_json()}
    out["IsSigned"] = info.is_signed
    if info.signature is not None:
        # only signed images need the X.509 stack
        from cryptography import x509  # noqa: PLC0415
        from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415

        from enclavekit.image.signing import certificate_info, check_signature  # noqa: PLC0415

        assert info.certificate_der is not None  # the reader derived it from the PEM (PCR8)
        try:
            out["SigningCertificate"] = certificate_info(x509.load_der_x509_certificate(info.certificate_der))
        except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
            raise EIFFormatError(f"the signing certificate in the signature section cannot be read: {exc}") from exc
    out["CheckCRC"] = info.crc_ok
    if info.signature is not None:
        out["SignatureCheck"] = check_signature(info)
    out.update(image_metadata(info))
    return out


def describe_eif(path: str | os.PathLike[str], *, strict: bool = False) -> dict[str, Any]:
    """Measure the EIF at ``path`` (``strict``: refuse what the QEMU rules refuse) and describe it."""
    try:
        with open(path, "rb") as f:
            info = measure_eif(f, strict=strict)
    except OSError as exc:
        raise FileOperationError(f"cannot read the EIF {os.fspath(path)!s}: {exc.strerror or exc}",
                                 details={"File": os.fspath(path), "Operation": "Read"}) from exc
    return describe_info(info)
