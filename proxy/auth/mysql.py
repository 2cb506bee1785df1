"""MySQL/MariaDB password authentication (native, caching_sha2, RSA, clear text) as pure functions."""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from proxy.protocol.mysql.constants import SCRAMBLE_LENGTH

# Nonces are 20 bytes; servers often append a NUL (handshake part 2, AuthSwitchRequest) and clients
# hash only the first 20 bytes, so every function here does the same.


def _nonce(nonce: bytes) -> bytes:
    return nonce[:SCRAMBLE_LENGTH]


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _sha1(*parts: bytes) -> bytes:
    h = hashlib.sha1()
    for part in parts:
        h.update(part)
    return h.digest()


def _sha256(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


# --- mysql_native_password ---


def native_password_hash(password: bytes) -> bytes:
    """The stored form: SHA1(SHA1(password)) (b'' for an empty password, as mysqld stores it)."""
    if not password:
        return b""
    return _sha1(_sha1(password))


def scramble_native_password(password: bytes, nonce: bytes) -> bytes:
    """Client response: SHA1(password) XOR SHA1(nonce + SHA1(SHA1(password))); b'' for an empty password."""
    if not password:
        return b""
    return scramble_native_password_from_stage1(_sha1(password), nonce)


def scramble_native_password_from_stage1(stage1: bytes, nonce: bytes) -> bytes:
    """The same response computed from SHA1(password) alone (see recover_native_stage1)."""
    return _xor(stage1, _sha1(_nonce(nonce), _sha1(stage1)))


def check_native_password(password: bytes, nonce: bytes, response: bytes) -> bool:
    """Server side, from the plaintext password."""
    return hmac.compare_digest(scramble_native_password(password, nonce), response)


def recover_native_stage1(stored_hash: bytes, nonce: bytes, response: bytes) -> bytes | None:
    """SHA1(password) recovered from a valid response and the stored SHA1(SHA1(password)), else None.

    Knowing SHA1(password) is enough to answer any later native-password challenge (e.g. to log in to a
    backend as the client): scramble_native_password_from_stage1.
    """
    if len(stored_hash) != 20 or len(response) != 20:
        return None
    stage1 = _xor(response, _sha1(_nonce(nonce), stored_hash))
    return stage1 if hmac.compare_digest(_sha1(stage1), stored_hash) else None


def check_native_password_hash(stored_hash: bytes, nonce: bytes, response: bytes) -> bool:
    """Server side, from the stored SHA1(SHA1(password)) (native_password_hash)."""
    if not stored_hash:
        return hmac.compare_digest(response, b"")
    return recover_native_stage1(stored_hash, nonce, response) is not None


# --- caching_sha2_password ---


def caching_sha2_hash(password: bytes) -> bytes:
    """The form the fast path needs: SHA256(SHA256(password)) (b'' for an empty password)."""
    if not password:
        return b""
    return _sha256(_sha256(password))


def scramble_caching_sha2(password: bytes, nonce: bytes) -> bytes:
    """Client response: SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + nonce); b'' for an empty password."""
    if not password:
        return b""
    p1 = _sha256(password)
    return _xor(p1, _sha256(_sha256(p1), _nonce(nonce)))


def check_caching_sha2(password: bytes, nonce: bytes, response: bytes) -> bool:
    """Server side fast authentication, from the plaintext password."""
    return hmac.compare_digest(scramble_caching_sha2(password, nonce), response)


def check_caching_sha2_hash(stored_hash: bytes, nonce: bytes, response: bytes) -> bool:
    """Server side fast authentication, from SHA256(SHA256(password)) (caching_sha2_hash)."""
    if not stored_hash:
        return hmac.compare_digest(response, b"")
    if len(stored_hash) != 32 or len(response) != 32:
        return False
    p1 = _xor(response, _sha256(stored_hash, _nonce(nonce)))
    return hmac.compare_digest(_sha256(p1), stored_hash)


# --- RSA exchange (caching_sha2_password / sha256_password full authentication without TLS) ---


def generate_rsa_keypair(bits: int = 2048) -> tuple[rsa.RSAPrivateKey, bytes]:
    """A fresh key pair: (private key, public key as the SubjectPublicKeyInfo PEM that mysqld sends)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key, public_key_pem(key)


def public_key_pem(private_key: rsa.RSAPrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(pem: bytes, password: bytes | None = None) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(pem, password=password)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key


_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def _xor_cyclic(data: bytes, nonce: bytes) -> bytes:
    key = _nonce(nonce)
    if not key:
        raise ValueError("empty nonce")
    n = len(key)
    return bytes(b ^ key[i % n] for i, b in enumerate(data))


def rsa_encrypt_password(password: bytes, nonce: bytes, public_pem: bytes) -> bytes:
    """Client side: RSA-OAEP(SHA1) of (password + NUL) XORed cyclically with the nonce."""
    key = serialization.load_pem_public_key(public_pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key.encrypt(_xor_cyclic(password + b"\x00", nonce), _OAEP)


def rsa_decrypt_password(private_key: rsa.RSAPrivateKey | bytes, ciphertext: bytes, nonce: bytes) -> bytes:
    """Server side: the password (without its NUL) from rsa_encrypt_password's output.

    Raises ValueError when the ciphertext does not decrypt or lacks the terminating NUL.
    """
    key = load_private_key(private_key) if isinstance(private_key, bytes) else private_key
    plain = _xor_cyclic(key.decrypt(ciphertext, _OAEP), nonce)
    if not plain.endswith(b"\x00"):
        raise ValueError("decrypted password is not NUL-terminated")
    return plain[:-1]


# --- mysql_clear_password (and caching_sha2 full authentication over TLS) ---


def clear_password_response(password: bytes) -> bytes:
    """What a client sends for mysql_clear_password (and caching_sha2 full auth over TLS): password + NUL."""
    return password + b"\x00"


def parse_clear_password(response: bytes) -> bytes:
    """The password from a clear-text response: the response without its trailing NUL."""
    return response[:-1] if response.endswith(b"\x00") else response


def check_clear_password(password: bytes, response: bytes) -> bool:
    return hmac.compare_digest(parse_clear_password(response), password)
