"""CiphertextForRecipient (spec 4.4): the enclaver fixture, the exact emitted layout, OpenSSL, an enclaver-style
BER walker, and one negative test per decoder rule."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.errors import FormatError
from enclavekit.formats.cms import CMSFormatError, EnvelopedData, open_envelope, seal, subject_key_identifier

FIXTURES = Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "cms"
BER = (FIXTURES / "enclaver-ciphertext-for-recipient.ber").read_bytes()
KEY = serialization.load_der_private_key((FIXTURES / "enclaver-recipient-key.pk8.der").read_bytes(), None)
assert isinstance(KEY, rsa.RSAPrivateKey)
SPKI = KEY.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
# spec 4.4: the fixed prefix up to the RecipientInfos SET tag
PREFIX = bytes.fromhex("3080 0609 2a864886f70d010703 a080 3080 020102 31".replace(" ", ""))


def _sealed(content: bytes = b"Hello, World", *, key: rsa.RSAPrivateKey = KEY) -> bytes:
    return seal(content, key.public_key(), content_key=bytes(range(32)), iv=bytes(range(16))).to_bytes()


def test_fixture_decrypts_to_hello_world() -> None:
    env = EnvelopedData.from_bytes(BER)
    assert open_envelope(env, KEY) == b"Hello, World"
    assert env.constructed_content


def test_fixture_ski_is_sha256_of_spki() -> None:
    assert EnvelopedData.from_bytes(BER).subject_key_identifier == subject_key_identifier(SPKI)


def test_fixture_reencodes_byte_for_byte() -> None:
    # the encoder's layout IS the layout AWS KMS sent
    assert EnvelopedData.from_bytes(BER).to_bytes() == BER


def test_encoder_layout_matches_spec() -> None:
    out = _sealed()
    assert out.startswith(PREFIX)
    assert out[len(PREFIX):len(PREFIX) + 3] == b"\x82\x01\x6b"           # SET, definite, 363 bytes (RSA-2048)
    assert out[len(PREFIX) + 3:len(PREFIX) + 12] == bytes.fromhex("308201670201028020")
    assert subject_key_identifier(SPKI) in out
    assert out.endswith(b"\x00\x00" * 5)  # [0] content, EncryptedContentInfo, EnvelopedData, [0], ContentInfo
    assert bytes.fromhex("3080 06092a864886f70d010701 301d 060960864801650304012a 0410".replace(" ", "")) in out
    assert open_envelope(out, KEY) == b"Hello, World"


def test_primitive_content_form_round_trips() -> None:
    env = EnvelopedData.from_bytes(_sealed(b"x" * 100))
    prim = EnvelopedData(env.subject_key_identifier, env.encrypted_key, env.iv, env.encrypted_content, False)
    data = prim.to_bytes()
    assert data.count(b"\x00\x00") >= 4 and data.endswith(b"\x00\x00" * 4)
    back = EnvelopedData.from_bytes(data)
    assert not back.constructed_content
    assert open_envelope(back, KEY) == b"x" * 100


def test_large_content_uses_long_form_lengths() -> None:
    content = bytes(range(256)) * 16  # 4096 bytes, the GenerateDataKeyPair private-key size class
    assert open_envelope(_sealed(content), KEY) == content


def test_definite_length_der_is_accepted() -> None:
    from asn1crypto import cms as acms

    ber = _sealed()
    env = EnvelopedData.from_bytes(ber)
    der = acms.ContentInfo.load(ber).dump(force=True)
    assert der[1] != 0x80
    back = EnvelopedData.from_bytes(der)
    assert back.encrypted_content == env.encrypted_content and back.encrypted_key == env.encrypted_key
    assert open_envelope(back, KEY) == b"Hello, World"


# ---------------------------------------------------------------------------------------------- enclaver port


def _walk(data: bytes, pos: int) -> tuple[int, int, int, bool]:
    """enclaver pkcs7.rs-style header read: (tag, content start, content length or -1, indefinite)."""
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first == 0x80:
        return tag, pos, -1, True
    if first & 0x80:
        n = first & 0x7F
        length = int.from_bytes(data[pos:pos + n], "big")
        return tag, pos + n, length, False
    return tag, pos, first, False


def enclaver_decrypt(data: bytes, key: rsa.RSAPrivateKey) -> bytes:
    """A minimal port of enclaver's parser logic: step INTO indefinite-length constructed elements (ContentInfo,
    [0], EnvelopedData, EncryptedContentInfo), skip definite ones whole, pick out the fields by position."""
    from cryptography.hazmat.primitives import hashes, padding
    from cryptography.hazmat.primitives.asymmetric import padding as ap
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    tag, pos, _, indefinite = _walk(data, 0)
    assert tag == 0x30 and indefinite, "ContentInfo must be indefinite"
    tag, start, length, _ = _walk(data, pos)
    assert data[start:start + length] == bytes.fromhex("2a864886f70d010703")
    pos = start + length
    tag, pos, _, indefinite = _walk(data, pos)
    assert tag == 0xA0 and indefinite
    tag, pos, _, indefinite = _walk(data, pos)
    assert tag == 0x30 and indefinite
    tag, start, length, _ = _walk(data, pos)           # version
    assert data[start:start + length] == b"\x02"
    pos = start + length
    tag, start, length, _ = _walk(data, pos)           # RecipientInfos (definite)
    assert tag == 0x31
    ri_end = start + length
    tag, p, _, _ = _walk(data, start)                  # KeyTransRecipientInfo
    fields = []
    while p < ri_end:
        t, s, ln, _ = _walk(data, p)
        fields.append((t, data[s:s + ln]))
        p = s + ln
    encrypted_key = fields[3][1]
    pos = ri_end
    tag, pos, _, indefinite = _walk(data, pos)          # EncryptedContentInfo
    assert tag == 0x30 and indefinite
    tag, start, length, _ = _walk(data, pos)
    pos = start + length                                # id-data
    tag, start, length, _ = _walk(data, pos)           # algorithm
    alg = data[start:start + length]
    iv = alg[-16:]
    pos = start + length
    tag, pos, length, indefinite = _walk(data, pos)
    if indefinite:
        chunks = b""
        while data[pos:pos + 2] != b"\x00\x00":
            t, s, ln, _ = _walk(data, pos)
            chunks += data[s:s + ln]
            pos = s + ln
        ct = chunks
    else:
        ct = data[pos:pos + length]
    aes_key = key.decrypt(encrypted_key, ap.OAEP(ap.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    dec = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).decryptor()
    padded = dec.update(ct) + dec.finalize()
    unpad = padding.PKCS7(128).unpadder()
    return unpad.update(padded) + unpad.finalize()


def test_enclaver_port_reads_fixture_and_our_output() -> None:
    assert enclaver_decrypt(BER, KEY) == b"Hello, World"
    assert enclaver_decrypt(_sealed(b"secret bytes"), KEY) == b"secret bytes"


# ---------------------------------------------------------------------------------------------- OpenSSL


def test_openssl_cms_decrypts_our_output(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "openssl 3 is required for this test"
    (tmp_path / "env.ber").write_bytes(_sealed(b"opened by openssl"))
    (tmp_path / "key.pem").write_bytes(KEY.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    # without -recip, OpenSSL tries the key against every KeyTransRecipientInfo (the SKI needs no certificate)
    result = subprocess.run([openssl, "cms", "-decrypt", "-inform", "DER", "-in", str(tmp_path / "env.ber"),
                             "-inkey", str(tmp_path / "key.pem")], capture_output=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"opened by openssl"


# ---------------------------------------------------------------------------------------------- negative rules


def _mutate(old: bytes, new: bytes, data: bytes = BER) -> bytes:
    assert old in data
    return data.replace(old, new, 1)


@pytest.mark.parametrize(("name", "data"), [
    ("trailing bytes", BER + b"\x00"),
    ("truncated", BER[:-3]),
    ("empty", b""),
    ("not a sequence", b"\x31" + BER[1:]),
    ("wrong content type", _mutate(bytes.fromhex("2a864886f70d010703"), bytes.fromhex("2a864886f70d010701"))),
    ("envelope version", _mutate(bytes.fromhex("3080020102"), bytes.fromhex("3080020100"))),
    ("ktri version", _mutate(bytes.fromhex("3082016702010280"), bytes.fromhex("3082016702010080"))),
    ("key encryption algorithm", _mutate(bytes.fromhex("2a864886f70d010107"), bytes.fromhex("2a864886f70d010101"))),
    ("oaep hash", _mutate(bytes.fromhex("a00f300d06096086480165030402010500"),
                          bytes.fromhex("a00f300d06096086480165030402020500"))),
    ("content algorithm", _mutate(bytes.fromhex("060960864801650304012a"), bytes.fromhex("0609608648016503040102"))),
    ("content type", _mutate(bytes.fromhex("06092a864886f70d010701"), bytes.fromhex("06092a864886f70d010702"))),
    ("iv length", _mutate(bytes.fromhex("301d060960864801650304012a0410"),
                          bytes.fromhex("301d060960864801650304012a0411"))),
    ("content tag", _mutate(bytes.fromhex("a0800410"), bytes.fromhex("a1800410"))),
    ("chunk tag", _mutate(bytes.fromhex("a0800410"), bytes.fromhex("a0800510"))),
    ("content not block aligned", _mutate(bytes.fromhex("a0800410"), bytes.fromhex("a080040f"))),
    ("indefinite primitive", _mutate(bytes.fromhex("a0800410"), bytes.fromhex("a0800480"))),
    ("high tag number", b"\x1f" + BER[1:]),
    ("oversized length", _mutate(bytes.fromhex("31 82 01 6b".replace(" ", "")), bytes.fromhex("3185016b000000"))),
])
def test_decoder_rules(name: str, data: bytes) -> None:
    with pytest.raises(CMSFormatError):
        EnvelopedData.from_bytes(data)


def test_two_recipients_refused() -> None:
    env = EnvelopedData.from_bytes(BER)
    ktri_start = BER.index(bytes.fromhex("30820167"))
    ktri = BER[ktri_start:ktri_start + 4 + 0x167]
    doubled = BER.replace(bytes.fromhex("3182016b") + ktri, bytes.fromhex("318202d6") + ktri + ktri)
    assert doubled != BER and env
    with pytest.raises(CMSFormatError, match="exactly one recipient"):
        EnvelopedData.from_bytes(doubled)


def test_wrong_private_key_refused() -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(CMSFormatError):
        open_envelope(BER, other)


def test_bad_padding_refused() -> None:
    env = EnvelopedData.from_bytes(BER)
    flipped = bytearray(env.encrypted_content)
    flipped[-1] ^= 0x55
    bad = EnvelopedData(env.subject_key_identifier, env.encrypted_key, env.iv, bytes(flipped))
    with pytest.raises(FormatError):
        open_envelope(bad, KEY)


def test_every_single_byte_truncation_raises_only_format_errors() -> None:
    for n in range(len(BER)):
        with pytest.raises(CMSFormatError):
            EnvelopedData.from_bytes(BER[:n])


def test_constructor_rejects_caller_bugs() -> None:
    with pytest.raises(ValueError):
        EnvelopedData(b"s", b"k", b"short", b"0" * 16)
    with pytest.raises(ValueError):
        EnvelopedData(b"s", b"k", b"0" * 16, b"0" * 15)
    with pytest.raises(TypeError):
        EnvelopedData.from_bytes("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        seal(b"x", KEY.public_key(), content_key=b"short", iv=b"0" * 16)


# ---------------------------------------------------------------------------------------------- properties

@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(BER) - 1), st.integers(1, 255))
def test_single_byte_changes_raise_only_format_errors(index: int, xor: int) -> None:
    data = bytearray(BER)
    data[index] ^= xor
    try:
        env = EnvelopedData.from_bytes(bytes(data))
    except CMSFormatError:
        return
    # a change the structure survives either fails to open with a format error or yields bytes (AES-CBC has no
    # integrity: CMS EnvelopedData is confidentiality only, as on AWS)
    with contextlib.suppress(FormatError):
        assert isinstance(open_envelope(env, KEY), bytes)


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=16, max_size=64).filter(lambda b: len(b) % 16 == 0), st.binary(min_size=1, max_size=40),
       st.binary(min_size=1, max_size=300), st.booleans())
def test_codec_round_trip(content: bytes, ski: bytes, key: bytes, constructed: bool) -> None:
    env = EnvelopedData(ski, key, bytes(16), content, constructed)
    assert EnvelopedData.from_bytes(env.to_bytes()) == env
