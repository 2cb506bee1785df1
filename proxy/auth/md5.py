"""PostgreSQL md5 password authentication as pure functions."""

from __future__ import annotations

import hashlib
import hmac


def md5_password_hash(user: bytes, password: bytes) -> bytes:
    """The stored form: 'md5' + md5(password + user) in hex."""
    return b"md5" + hashlib.md5(password + user).hexdigest().encode()


def md5_response(user: bytes, password: bytes, salt: bytes) -> bytes:
    """What a client sends for a 4-byte salt: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5(password + user).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


def check_md5_response(user: bytes, password: bytes, salt: bytes, response: bytes) -> bool:
    return hmac.compare_digest(md5_response(user, password, salt), response)
