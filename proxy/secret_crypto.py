"""Envelope encryption of the secrets file: a random data key seals the entries, the master key wraps the data key
(both AES-256-GCM)."""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.errors import ConfigError

KEY_BYTES = 32
NONCE_BYTES = 12
VERSION = 1
DATA_KEY_AAD = b"dbproxy-data-key"
ENTRIES_AAD = b"dbproxy-secrets-v1"
MASTER_KEY_ENV = "DBPROXY_MASTER_KEY"


def new_master_key(path: Path) -> None:
    """Write a new random 256-bit master key (base64, one line) to `path`, mode 0600; an existing file is kept."""
    key = base64.b64encode(AESGCM.generate_key(bit_length=256)) + b"\n"
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path}: exists already; a new master key would make what it sealed unreadable") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the master key file: {exc.strerror}") from None
    with os.fdopen(descriptor, "wb") as file:
        file.write(key)


def decode_master_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: the master key is not base64") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{where}: the master key must be {KEY_BYTES} bytes (256 bits), not {len(key)}")
    return key


def load_master_key(path: Path | None) -> bytes:
    """The master key from `path`, else from DBPROXY_MASTER_KEY (base64); ConfigError if neither works."""
    if path is not None:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not text"
            raise ConfigError(f"{path}: cannot read the master key: {reason}") from None
        return decode_master_key(text, str(path))
    found = os.environ.get(MASTER_KEY_ENV)
    if found is None:
        raise ConfigError(f"an encrypted_file needs a master_key_file or {MASTER_KEY_ENV} in the environment")
    return decode_master_key(found, MASTER_KEY_ENV)


def seal(entries: dict[str, str], master_key: bytes) -> bytes:
    """The encrypted file's content for `entries`: a fresh data key and nonces at every call."""
    data_key = AESGCM.generate_key(bit_length=256)
    key_nonce, nonce = os.urandom(NONCE_BYTES), os.urandom(NONCE_BYTES)
    wrapped = key_nonce + AESGCM(master_key).encrypt(key_nonce, data_key, DATA_KEY_AAD)
    plain = json.dumps({"users": entries}, sort_keys=True).encode()
    document = {"version": VERSION, "wrapped_key": _b64(wrapped), "nonce": _b64(nonce),
                "ciphertext": _b64(AESGCM(data_key).encrypt(nonce, plain, ENTRIES_AAD))}
    return (json.dumps(document, indent=1) + "\n").encode()


def unseal(data: bytes, master_key: bytes, where: str) -> dict[str, str]:
    """The entries of an encrypted file; ConfigError when it is not one, was altered, or the key is not its own."""
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("version") != VERSION:
            raise ValueError("not a version 1 encrypted secrets file")
        wrapped, nonce, ciphertext = (base64.b64decode(document[name], validate=True)
                                      for name in ("wrapped_key", "nonce", "ciphertext"))
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ConfigError(f"{where}: not an encrypted secrets file ({exc})") from None
    try:
        data_key = AESGCM(master_key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], DATA_KEY_AAD)
    except (InvalidTag, ValueError):
        raise ConfigError(f"{where}: the master key does not open this file (a wrong key, or the file was "
                          "altered)") from None
    try:
        plain = AESGCM(data_key).decrypt(nonce, ciphertext, ENTRIES_AAD)
    except (InvalidTag, ValueError):
        raise ConfigError(f"{where}: the encrypted secrets were altered (authentication failed)") from None
    users = json.loads(plain).get("users")
    if not isinstance(users, dict) or not all(isinstance(v, str) for v in users.values()):
        raise ConfigError(f"{where}: the decrypted secrets are not a table of user -> password")
    return dict(users)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
