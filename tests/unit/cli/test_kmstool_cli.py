"""``enclavekit kmstool``: argument rules checked before anything is contacted (spec §5.1), one test per rule."""

from __future__ import annotations

import pytest

from enclavekit.cli.main import main

CREDS = ["--aws-access-key-id", "AKIDEXAMPLE", "--aws-secret-access-key", "secret"]


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    status = main(["kmstool", *args])
    return status, capsys.readouterr().err


def test_decrypt_with_key_id_needs_the_algorithm(capsys: pytest.CaptureFixture[str]) -> None:
    status, err = _run(capsys, "decrypt", *CREDS, "--ciphertext", "AAAA", "--key-id", "k")
    assert status == 1 and "[ E01 ]" in err and "--encryption-algorithm" in err


def test_decrypt_ciphertext_must_be_base64(capsys: pytest.CaptureFixture[str]) -> None:
    status, err = _run(capsys, "decrypt", *CREDS, "--ciphertext", "not base64!")
    assert status == 3 and "--ciphertext" in err


def test_decrypt_unknown_algorithm(capsys: pytest.CaptureFixture[str]) -> None:
    status, err = _run(capsys, "decrypt", *CREDS, "--ciphertext", "AAAA", "--key-id", "k",
                       "--encryption-algorithm", "ROT13")
    assert status == 3 and "ROT13" in err


def test_genkey_key_spec_takes_hyphens(capsys: pytest.CaptureFixture[str]) -> None:
    status, err = _run(capsys, "genkey", *CREDS, "--key-id", "k", "--key-spec", "AES-512")
    assert status == 3 and "AES-256 or AES-128" in err


@pytest.mark.parametrize("length", ["0", "1025", "ten"])
def test_genrandom_length_range(capsys: pytest.CaptureFixture[str], length: str) -> None:
    status, err = _run(capsys, "genrandom", *CREDS, "--length", length)
    assert status == 3 and "--length" in err


def test_proxy_port_must_be_a_port(capsys: pytest.CaptureFixture[str]) -> None:
    status, err = _run(capsys, "genrandom", *CREDS, "--length", "8", "--proxy-port", "x")
    assert status == 3 and "--proxy-port" in err


def test_bad_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    status, err = _run(capsys, "genrandom", *CREDS, "--length", "8", "--endpoint", "ftp://kms")
    assert status == 3 and "endpoint" in err


def test_encryption_context_must_be_a_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    status, err = _run(capsys, "genkey", *CREDS, "--key-id", "k", "--encryption-context", "[1]")
    assert status == 3 and "--encryption-context" in err


def test_credentials_are_required() -> None:
    with pytest.raises(SystemExit) as info:
        main(["kmstool", "genrandom", "--length", "8"])
    assert info.value.code == 2
