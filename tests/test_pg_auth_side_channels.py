"""SCRAM through the proxy gives nothing away about which user names exist, and costs the event loop little."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.servers import PostgresInstance
from proxy.auth import scram
from proxy.auth.scram import MECHANISM, ScramClient
from proxy.protocol.pg import messages as pg
from proxy.secrets import SecretStore
from rawpg import RawClient
from support import ProxyProcess, running_proxy


def server_first(port: int, user: str) -> dict[str, str]:
    """Start a SCRAM login as `user` and return the attributes of the proxy's server-first-message."""
    client = RawClient(port)
    try:
        client.send(pg.startup_message({"user": user, "database": "app"}))
        kind, body = client.recv_message()
        assert kind == "R" and int.from_bytes(body[:4], "big") == pg.AUTH_SASL, (kind, body)
        client.send(pg.sasl_initial_response(MECHANISM, ScramClient(b"wrong").client_first()))
        kind, body = client.recv_message()
        assert kind == "R" and int.from_bytes(body[:4], "big") == pg.AUTH_SASL_CONTINUE, (kind, body)
        return dict(part.split("=", 1) for part in body[4:].decode().split(","))
    finally:
        client.close()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance) -> Iterator[ProxyProcess]:
    with running_proxy(tmp_path_factory.mktemp("authside"), pg_server, server={"workers": 2}) as proxy:
        yield proxy


def test_unknown_user_gets_a_stable_salt(two_workers: ProxyProcess) -> None:
    """Every connection as one unknown user sees the same salt, in every worker; known users look the same."""
    port = two_workers.ports["postgresql"]
    unknown = [server_first(port, "no_such_user") for _ in range(8)]
    known = [server_first(port, "app") for _ in range(8)]
    assert len({a["s"] for a in unknown}) == 1
    assert len({a["s"] for a in known}) == 1  # (8 connections spread over both workers)
    assert server_first(port, "another_unknown")["s"] != unknown[0]["s"]
    assert {a["i"] for a in unknown} == {a["i"] for a in known} == {str(scram.DEFAULT_ITERATIONS)}
    assert len(base64.b64decode(unknown[0]["s"])) == len(base64.b64decode(known[0]["s"]))


def test_unknown_user_costs_no_key_derivation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys for an unknown user are made without PBKDF2; a known user's are derived once and cached."""
    store = SecretStore({"app": "pw"})
    calls: list[bytes] = []
    real = scram.hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append(salt)
        return real(name, password, salt, iterations)

    monkeypatch.setattr(scram.hashlib, "pbkdf2_hmac", counting)
    scram.salted_password.cache_clear()
    fake = store.scram_keys("nobody")
    assert calls == []
    assert fake.iterations == scram.DEFAULT_ITERATIONS and fake == store.scram_keys("nobody")
    known = store.scram_keys("app")
    assert known is store.scram_keys("app") and len(calls) == 1
    assert len(known.salt) == len(fake.salt)


def test_salts_agree_between_processes_with_the_same_secrets(tmp_path: Path) -> None:
    """Workers each load the secrets: the salts they show must agree (per user, known or not)."""
    first, second = SecretStore({"app": "pw"}), SecretStore({"app": "pw"})
    for user in ("app", "nobody"):
        assert first.scram_keys(user).salt == second.scram_keys(user).salt
    assert first.scram_keys("app").salt != first.scram_keys("nobody").salt


def test_wrong_password_and_unknown_user_fail_alike(two_workers: ProxyProcess) -> None:
    port = two_workers.ports["postgresql"]
    for user, password in (("app", "wrong"), ("no_such_user", "whatever")):
        client = RawClient(port)
        with pytest.raises(PermissionError, match=f'password authentication failed for user "{user}"'):
            client.login(user=user, password=password)
        client.close()
    client = RawClient(port)
    client.login()
    client.close()
