"""SCRAM-SHA-256 (RFC 5802/7677) as pure functions and two small exchange objects, server and client side."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from functools import lru_cache

from proxy.errors import AuthenticationFailed, ProtocolViolation

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
NONCE_BYTES = 18


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(left: bytes, right: bytes) -> bytes:
    if len(left) != len(right):
        raise ValueError("SCRAM values of different lengths")
    return (int.from_bytes(left, "big") ^ int.from_bytes(right, "big")).to_bytes(len(left), "big")


@lru_cache(maxsize=4096)
def salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    """Hi() of RFC 5802; cached, so each (secret, salt) pair is derived once per process."""
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """What a server keeps for one secret: salt, iteration count, StoredKey and ServerKey."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def __repr__(self) -> str:
        return f"ScramKeys(iterations={self.iterations})"

    @classmethod
    def derive(cls, password: bytes, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> ScramKeys:
        salt = salt or os.urandom(16)
        salted = salted_password(password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(salt, iterations, _sha256(client_key), _hmac(salted, b"Server Key"))


def _attributes(message: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ProtocolViolation("malformed SCRAM message")
        result[part[0]] = part[2:]
    return result


def _b64decode(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise ProtocolViolation("malformed base64 in SCRAM message") from None


class ScramServer:
    """Server side of one SCRAM exchange: client-first in, server-first out, client-final in, server-final out."""

    def __init__(self, keys: ScramKeys, server_nonce: str | None = None) -> None:
        self._keys = keys
        self._server_nonce = server_nonce or base64.b64encode(os.urandom(NONCE_BYTES)).decode()
        self._nonce = ""
        self._client_first_bare = ""
        self._server_first = ""
        self.client_key = b""  # recovered from the client's proof once it verifies (auth passthrough keeps it)

    def server_first(self, client_first: bytes) -> bytes:
        try:
            text = client_first.decode()
        except UnicodeDecodeError:
            raise ProtocolViolation("SCRAM client-first-message is not UTF-8") from None
        header, sep, bare = text.partition(",")
        _authzid, sep2, bare = bare.partition(",")
        if not sep or not sep2 or header not in ("n", "y"):
            if header.startswith("p="):
                raise ProtocolViolation("SCRAM channel binding was not offered")
            raise ProtocolViolation("malformed SCRAM client-first-message")
        attrs = _attributes(bare)
        client_nonce = attrs.get("r", "")
        if not client_nonce or "m" in attrs:
            raise ProtocolViolation("malformed SCRAM client-first-message")
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        salt = base64.b64encode(self._keys.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={self._keys.iterations}"
        return self._server_first.encode()

    def server_final(self, client_final: bytes) -> bytes:
        try:
            text = client_final.decode()
        except UnicodeDecodeError:
            raise ProtocolViolation("SCRAM client-final-message is not UTF-8") from None
        without_proof, sep, proof_part = text.rpartition(",p=")
        if not sep:
            raise ProtocolViolation("SCRAM client-final-message has no proof")
        attrs = _attributes(without_proof)
        if attrs.get("r") != self._nonce:
            raise ProtocolViolation("SCRAM nonce mismatch")
        if attrs.get("c") not in ("biws", "eSws"):  # "n,," or "y,,"
            raise ProtocolViolation("SCRAM channel binding mismatch")
        proof = _b64decode(proof_part)
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = _hmac(self._keys.stored_key, auth_message)
        if len(proof) != len(signature):
            raise AuthenticationFailed("password authentication failed")
        client_key = _xor(proof, signature)
        if not hmac.compare_digest(_sha256(client_key), self._keys.stored_key):
            raise AuthenticationFailed("password authentication failed")
        self.client_key = client_key
        return b"v=" + base64.b64encode(_hmac(self._keys.server_key, auth_message))


class ScramClient:
    """Client side of one SCRAM exchange, used by the proxy to log in to a backend."""

    def __init__(self, password: bytes, nonce: str | None = None, username: str = "") -> None:
        self._password = password
        self._nonce = nonce or base64.b64encode(os.urandom(NONCE_BYTES)).decode()
        self._client_first_bare = f"n={username},r={self._nonce}"  # PostgreSQL ignores the name here
        self._server_signature = b""

    def client_first(self) -> bytes:
        return f"n,,{self._client_first_bare}".encode()

    def client_final(self, server_first: bytes) -> bytes:
        text = server_first.decode(errors="replace")
        attrs = _attributes(text)
        nonce, salt, iterations = attrs.get("r", ""), attrs.get("s", ""), attrs.get("i", "")
        if not nonce.startswith(self._nonce) or not salt or not iterations.isdigit():
            raise ProtocolViolation("malformed SCRAM server-first-message from the backend")
        client_key, server_key = self._keys(_b64decode(salt), int(iterations))
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._client_first_bare},{text},{without_proof}".encode()
        proof = _xor(client_key, _hmac(_sha256(client_key), auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def _keys(self, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
        """ClientKey and ServerKey for the server's salt and iteration count."""
        salted = salted_password(self._password, salt, iterations)
        return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")

    def verify_server_final(self, server_final: bytes) -> None:
        attrs = _attributes(server_final.decode(errors="replace"))
        if "e" in attrs:
            raise AuthenticationFailed(f"backend refused SCRAM: {attrs['e']}")
        if not hmac.compare_digest(_b64decode(attrs.get("v", "")), self._server_signature):
            raise AuthenticationFailed("backend SCRAM signature does not match: wrong server")
