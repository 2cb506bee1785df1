"""Envelope encryption of the secrets file: round trip, fresh keys and nonces, and a clear refusal of an altered
file or a wrong master key."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from proxy.config import SecretsSettings
from proxy.errors import ConfigError
from proxy.secret_crypto import DATA_KEY_AAD, load_master_key, new_master_key, seal, unseal
from proxy.secret_sources import read_all, update


def test_round_trip_and_layout(tmp_path: Path) -> None:
    new_master_key(tmp_path / "master.key")
    assert os.stat(tmp_path / "master.key").st_mode & 0o777 == 0o600
    key = load_master_key(tmp_path / "master.key")
    assert len(key) == 32
    sealed = seal({"alice_user": "pw-1", "bench": "pw-2"}, key)
    document = json.loads(sealed)
    assert set(document) == {"version", "wrapped_key", "nonce", "ciphertext"} and document["version"] == 1
    assert b"pw-1" not in sealed and b"alice_user" not in sealed  # user names are sealed too
    assert unseal(sealed, key, "f") == {"alice_user": "pw-1", "bench": "pw-2"}
    again = json.loads(seal({"alice_user": "pw-1", "bench": "pw-2"}, key))
    assert all(again[name] != document[name] for name in ("wrapped_key", "nonce", "ciphertext"))


def test_the_data_key_is_wrapped_with_its_own_aad(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = AESGCM.generate_key(bit_length=256)
    wrapped = base64.b64decode(json.loads(seal({"a": "b"}, key))["wrapped_key"])
    data_key = AESGCM(key).decrypt(wrapped[:12], wrapped[12:], DATA_KEY_AAD)
    assert len(data_key) == 32


def test_master_key_file_is_never_overwritten(tmp_path: Path) -> None:
    new_master_key(tmp_path / "k")
    before = (tmp_path / "k").read_bytes()
    with pytest.raises(ConfigError, match="exists already"):
        new_master_key(tmp_path / "k")
    assert (tmp_path / "k").read_bytes() == before


@pytest.mark.parametrize("field", ["ciphertext", "wrapped_key", "nonce"])
def test_altered_file_is_refused(tmp_path: Path, field: str) -> None:
    key = os.urandom(32)
    document = json.loads(seal({"app": "pw"}, key))
    raw = bytearray(base64.b64decode(document[field]))
    raw[-1] ^= 1
    document[field] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(ConfigError, match="altered"):
        unseal(json.dumps(document).encode(), key, "secrets.enc")


def test_wrong_master_key_is_refused() -> None:
    sealed = seal({"app": "pw"}, os.urandom(32))
    with pytest.raises(ConfigError, match="master key does not open"):
        unseal(sealed, os.urandom(32), "secrets.enc")


@pytest.mark.parametrize("content", [b"", b"not json", b'{"version": 2}', b'{"version": 1, "nonce": "x"}'])
def test_not_an_encrypted_file(content: bytes) -> None:
    with pytest.raises(ConfigError, match="not an encrypted secrets file"):
        unseal(content, os.urandom(32), "secrets.enc")


def test_master_key_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = os.urandom(32)
    monkeypatch.setenv("DBPROXY_MASTER_KEY", base64.b64encode(key).decode())
    settings = SecretsSettings(encrypted_file=tmp_path / "s.enc")
    update(settings, {"app": "pw-env"})
    assert unseal((tmp_path / "s.enc").read_bytes(), key, "f") == {"app": "pw-env"}
    assert read_all(settings) == {"app": "pw-env"}
    assert os.stat(tmp_path / "s.enc").st_mode & 0o777 == 0o600
    monkeypatch.setenv("DBPROXY_MASTER_KEY", base64.b64encode(key[:16]).decode())
    with pytest.raises(ConfigError, match="must be 32 bytes"):
        read_all(settings)
    monkeypatch.setenv("DBPROXY_MASTER_KEY", "%%%")
    with pytest.raises(ConfigError, match="not base64"):
        read_all(settings)
    monkeypatch.delenv("DBPROXY_MASTER_KEY")
    with pytest.raises(ConfigError, match="needs a master_key_file or DBPROXY_MASTER_KEY"):
        read_all(settings)
