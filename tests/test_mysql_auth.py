"""Tests for MySQL password authentication: scrambles (checked against PyMySQL), checkers, RSA exchange."""

from __future__ import annotations

import hashlib

import pymysql._auth as reference
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.auth.mysql import (
    caching_sha2_hash,
    check_caching_sha2,
    check_caching_sha2_hash,
    check_clear_password,
    check_native_password,
    check_native_password_hash,
    clear_password_response,
    generate_rsa_keypair,
    load_private_key,
    native_password_hash,
    parse_clear_password,
    public_key_pem,
    recover_native_stage1,
    rsa_decrypt_password,
    rsa_encrypt_password,
    scramble_caching_sha2,
    scramble_native_password,
    scramble_native_password_from_stage1,
)

NONCE = bytes(range(1, 21))
OTHER_NONCE = bytes(range(21, 41))
passwords = st.binary(min_size=1, max_size=64)
nonces = st.binary(min_size=20, max_size=20)
_KEY = generate_rsa_keypair(1024)  # a second, smaller key: fast enough for hypothesis


@pytest.fixture(scope="module")
def keypair() -> tuple[rsa.RSAPrivateKey, bytes]:
    return generate_rsa_keypair()


# --- mysql_native_password ---


def test_native_known_vector() -> None:
    # SHA1("secret") XOR SHA1(nonce + SHA1(SHA1("secret"))), written out with hashlib
    stage1 = hashlib.sha1(b"secret").digest()
    mix = hashlib.sha1(NONCE + hashlib.sha1(stage1).digest()).digest()
    expected = bytes(a ^ b for a, b in zip(stage1, mix, strict=True))
    assert scramble_native_password(b"secret", NONCE) == expected
    assert native_password_hash(b"secret") == hashlib.sha1(stage1).digest()


@given(passwords, nonces)
def test_native_matches_pymysql(password: bytes, nonce: bytes) -> None:
    response = scramble_native_password(password, nonce)
    assert response == reference.scramble_native_password(password, nonce)
    assert len(response) == 20
    assert check_native_password(password, nonce, response)
    assert check_native_password_hash(native_password_hash(password), nonce, response)


def test_native_nonce_with_trailing_nul() -> None:
    assert scramble_native_password(b"pw", NONCE + b"\x00") == scramble_native_password(b"pw", NONCE)


def test_native_empty_password() -> None:
    assert scramble_native_password(b"", NONCE) == b"" == reference.scramble_native_password(b"", NONCE)
    assert native_password_hash(b"") == b""
    assert check_native_password(b"", NONCE, b"")
    assert check_native_password_hash(b"", NONCE, b"")
    assert not check_native_password_hash(b"", NONCE, b"\x00" * 20)
    assert not check_native_password(b"pw", NONCE, b"")


def test_native_rejects() -> None:
    response = scramble_native_password(b"right", NONCE)
    stored = native_password_hash(b"right")
    assert not check_native_password(b"wrong", NONCE, response)
    assert not check_native_password(b"right", OTHER_NONCE, response)
    assert not check_native_password_hash(native_password_hash(b"wrong"), NONCE, response)
    assert not check_native_password_hash(stored, OTHER_NONCE, response)
    assert not check_native_password_hash(stored, NONCE, response[:19])
    assert not check_native_password_hash(stored, NONCE, b"")


def test_native_stage1_recovery_answers_other_challenges() -> None:
    stored = native_password_hash(b"hunter2")
    stage1 = recover_native_stage1(stored, NONCE, scramble_native_password(b"hunter2", NONCE))
    assert stage1 == hashlib.sha1(b"hunter2").digest()
    assert scramble_native_password_from_stage1(stage1, OTHER_NONCE) == scramble_native_password(
        b"hunter2", OTHER_NONCE
    )
    assert recover_native_stage1(stored, NONCE, scramble_native_password(b"nope", NONCE)) is None


# --- caching_sha2_password ---


def test_caching_sha2_known_vector() -> None:
    p1 = hashlib.sha256(b"secret").digest()
    p3 = hashlib.sha256(hashlib.sha256(p1).digest() + NONCE).digest()
    expected = bytes(a ^ b for a, b in zip(p1, p3, strict=True))
    assert scramble_caching_sha2(b"secret", NONCE) == expected
    assert caching_sha2_hash(b"secret") == hashlib.sha256(p1).digest()


@given(passwords, nonces)
def test_caching_sha2_matches_pymysql(password: bytes, nonce: bytes) -> None:
    response = scramble_caching_sha2(password, nonce)
    assert response == reference.scramble_caching_sha2(password, nonce)
    assert len(response) == 32
    assert check_caching_sha2(password, nonce, response)
    assert check_caching_sha2_hash(caching_sha2_hash(password), nonce, response)


def test_caching_sha2_nonce_with_trailing_nul() -> None:
    assert scramble_caching_sha2(b"pw", NONCE + b"\x00") == scramble_caching_sha2(b"pw", NONCE)


def test_caching_sha2_empty_and_wrong() -> None:
    assert scramble_caching_sha2(b"", NONCE) == b"" == reference.scramble_caching_sha2(b"", NONCE)
    assert check_caching_sha2(b"", NONCE, b"")
    assert check_caching_sha2_hash(b"", NONCE, b"")
    response = scramble_caching_sha2(b"right", NONCE)
    assert not check_caching_sha2(b"wrong", NONCE, response)
    assert not check_caching_sha2(b"right", OTHER_NONCE, response)
    assert not check_caching_sha2_hash(caching_sha2_hash(b"wrong"), NONCE, response)
    assert not check_caching_sha2_hash(caching_sha2_hash(b"right"), NONCE, response[:31])
    assert not check_caching_sha2_hash(caching_sha2_hash(b"right"), NONCE, b"")


# --- RSA exchange ---


def test_rsa_round_trip(keypair: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    private_key, public_pem = keypair
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    ciphertext = rsa_encrypt_password(b"s3cret pass", NONCE, public_pem)
    assert len(ciphertext) == 256
    assert rsa_decrypt_password(private_key, ciphertext, NONCE) == b"s3cret pass"
    assert rsa_decrypt_password(private_key, ciphertext, NONCE + b"\x00") == b"s3cret pass"


def test_rsa_interoperates_with_pymysql(keypair: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    private_key, public_pem = keypair
    for password in (b"x", b"a password longer than the twenty byte nonce", b""):
        ciphertext = reference.sha2_rsa_encrypt(password, NONCE, public_pem)
        assert rsa_decrypt_password(private_key, ciphertext, NONCE) == password


@settings(max_examples=20, deadline=None)
@given(st.binary(max_size=100), nonces)
def test_rsa_round_trip_any_password(password: bytes, nonce: bytes) -> None:
    private_key, public_pem = _KEY
    assert rsa_decrypt_password(private_key, rsa_encrypt_password(password, nonce, public_pem), nonce) == password


def test_rsa_wrong_nonce_or_key(keypair: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    private_key, public_pem = keypair
    ciphertext = rsa_encrypt_password(b"pw", NONCE, public_pem)
    with pytest.raises(ValueError):  # the NUL terminator comes out wrong
        rsa_decrypt_password(private_key, ciphertext, bytes(b ^ 0xFF for b in NONCE))
    with pytest.raises(ValueError):  # OAEP check fails
        rsa_decrypt_password(_KEY[0], ciphertext, NONCE)
    with pytest.raises(ValueError):
        rsa_decrypt_password(private_key, ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]), NONCE)
    with pytest.raises(ValueError):
        rsa_encrypt_password(b"pw", b"", public_pem)


def test_private_key_from_pem(keypair: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    from cryptography.hazmat.primitives import serialization

    private_key, public_pem = keypair
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert public_key_pem(load_private_key(pem)) == public_pem
    ciphertext = rsa_encrypt_password(b"pw", NONCE, public_pem)
    assert rsa_decrypt_password(pem, ciphertext, NONCE) == b"pw"


# --- clear text ---


def test_clear_password() -> None:
    assert clear_password_response(b"pw") == b"pw\x00"
    assert parse_clear_password(b"pw\x00") == b"pw"
    assert parse_clear_password(b"pw") == b"pw"
    assert parse_clear_password(b"") == b""
    assert check_clear_password(b"pw", b"pw\x00")
    assert not check_clear_password(b"pw", b"pw2\x00")
