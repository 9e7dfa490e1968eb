"""COSE_Sign1 codec and ECDSA helpers."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from enclavekit._internal import ecdsa
from enclavekit.formats import cbor
from enclavekit.formats.cose import COSEFormatError, COSESign1


@pytest.mark.parametrize(("curve", "alg", "header"), [
    (ec.SECP256R1(), -7, "a10126"), (ec.SECP384R1(), -35, "a1013822"), (ec.SECP521R1(), -36, "a1013823"),
])
def test_sign_verify_round_trip(curve: ec.EllipticCurve, alg: int, header: str) -> None:
    key = ec.generate_private_key(curve)
    msg = ecdsa.sign_cose(key, b"payload")
    data = msg.to_bytes()
    assert data[0] == 0x84  # untagged array(4)
    assert msg.protected.hex() == header
    parsed = COSESign1.from_bytes(data)
    assert parsed.algorithm() == alg
    assert ecdsa.verify_cose(parsed, key.public_key())
    tampered = COSESign1(parsed.protected, {}, b"payloaD", parsed.signature)
    assert not ecdsa.verify_cose(tampered, key.public_key())
    other = ec.generate_private_key(curve)
    assert not ecdsa.verify_cose(parsed, other.public_key())


def test_p384_envelope_layout() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    data = ecdsa.sign_cose(key, b"x" * 300).to_bytes()
    assert data[:7].hex() == "8444a1013822a0"
    assert data[-98:-96].hex() == "5860"


def test_tagged_form_accepted_and_other_tags_refused() -> None:
    body = [cbor.encode({1: -35}), {}, b"p", b"s"]
    assert COSESign1.from_bytes(cbor.encode(cbor.Tag(18, body))).tagged
    with pytest.raises(COSEFormatError, match="tag 98"):
        COSESign1.from_bytes(cbor.encode(cbor.Tag(98, body)))


@pytest.mark.parametrize("body", [
    [b"", {}, b"p"],                      # 3 items
    ["x", {}, b"p", b"s"],                # protected not bstr
    [b"", [], b"p", b"s"],                # unprotected not map
    [b"", {}, None, b"s"],                # detached payload
    [b"", {}, b"p", "s"],                 # signature not bstr
    {"a": 1},                             # not an array
])
def test_structure_rules(body: object) -> None:
    with pytest.raises(COSEFormatError):
        COSESign1.from_bytes(cbor.encode(body))


def test_unknown_algorithm_refused() -> None:
    msg = COSESign1(cbor.encode({1: -8}), {}, b"p", b"s")
    with pytest.raises(COSEFormatError, match="algorithm"):
        msg.algorithm()
    with pytest.raises(COSEFormatError, match="no algorithm"):
        COSESign1(cbor.encode({4: b"kid"}), {}, b"p", b"s").algorithm()


def test_wrong_length_signature_does_not_verify() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    msg = ecdsa.sign_cose(key, b"p")
    short = COSESign1(msg.protected, {}, msg.payload, msg.signature[:-1])
    assert not ecdsa.verify_cose(short, key.public_key())
