"""Signed tokens as the PostgreSQL password (psql, asyncpg) over TLS, per endpoint and user, against a real server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from token_support import (
    Issuer,
    JwksServer,
    bad_tokens,
    generate_token,
    init_keys,
    reload_proxy,
    token_proxy,
    tokens_section,
    write_projected_token,
)

from devtools.servers import PostgresInstance, free_port
from support import ProxyProcess, backend_connections

NAMESPACE, ACCOUNT = "shop", "orders"  # the service account the policy lets log in as app
POOL_SIZE = 2


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture(scope="module")
def jwks(issuer: Issuer) -> Iterator[JwksServer]:
    with JwksServer([issuer]) as server:
        yield server


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_keys(tmp_path_factory.mktemp("keys") / "keys")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance, keys: Path,
          jwks: JwksServer) -> Iterator[ProxyProcess]:
    """Endpoints tok (tokens required), either (token or password) and secure (TLS required; bench by token)."""
    sections: dict[str, dict[str, Any]] = {
        "server": {"log_level": "info", "client_login_timeout": 5.0, "workers": 1},
        "secrets": {"file": "secrets.toml"},
        "postgresql.pool": {"max_connections": POOL_SIZE, "connection_borrow_timeout": 30.0},
        "postgresql.clusters.main": {"instances": [{"host": "127.0.0.1", "port": pg_server.port}]},
        "postgresql.endpoints.tok": {"port": free_port(), "cluster": "main", "token_auth": "required"},
        "postgresql.endpoints.either": {"port": free_port(), "cluster": "main", "token_auth": "optional"},
        "postgresql.endpoints.secure": {"port": free_port(), "cluster": "main", "require_tls": True,
                                        "token_auth_users": {"bench": "required"}},
        "mysql": {"enabled": False},
    }
    toml = tokens_section(keys, jwks.url, "app", [(NAMESPACE, ACCOUNT)])
    with token_proxy(tmp_path_factory.mktemp("proxy"), sections, toml) as running:
        yield running


async def connect(proxy: ProxyProcess, endpoint: str, password: str, *, user: str = "app",
                  tls: bool = True) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=proxy.ports[endpoint], user=user, password=password,
                                 database="app", ssl="require" if tls else False)


async def current_user(proxy: ProxyProcess, endpoint: str, password: str, *, user: str = "app",
                       tls: bool = True) -> str:
    conn = await connect(proxy, endpoint, password, user=user, tls=tls)
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


async def refused(proxy: ProxyProcess, endpoint: str, password: str, *, user: str = "app",
                  tls: bool = True) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as info:
        await current_user(proxy, endpoint, password, user=user, tls=tls)
    return info.value


def psql(proxy: ProxyProcess, endpoint: str, password: str, sslmode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", f"host=127.0.0.1 port={proxy.ports[endpoint]} user=app dbname=app sslmode={sslmode}",
         "-XAt", "-c", "SELECT current_user, 6 * 7"],
        env=dict(os.environ, PGPASSWORD=password), capture_output=True, text=True, timeout=30)


def test_psql_with_a_token_in_pgpassword(proxy: ProxyProcess, keys: Path) -> None:
    token = generate_token(keys, "app", "tok")
    done = psql(proxy, "tok", token, "require")
    assert (done.returncode, done.stdout) == (0, "app|42\n"), done.stderr
    done = psql(proxy, "tok", token, "disable")
    assert done.returncode == 2 and "token authentication requires TLS (sslmode=require)" in done.stderr


async def test_asyncpg_with_a_token(proxy: ProxyProcess, keys: Path) -> None:
    assert await current_user(proxy, "tok", generate_token(keys, "app", "tok")) == "app"


async def test_kubernetes_projected_token_through_jwks(proxy: ProxyProcess, issuer: Issuer, tmp_path: Path) -> None:
    path = write_projected_token(tmp_path, issuer.service_account_token(NAMESPACE, ACCOUNT))
    assert await current_user(proxy, "tok", path.read_text()) == "app"


@pytest.mark.parametrize("kind", ["expired", "not yet valid", "wrong audience", "wrong issuer", "wrong key",
                                  "alg none", "HS256 with the public key", "tampered"])
async def test_bad_tokens_are_refused_with_28P01(proxy: ProxyProcess, issuer: Issuer, kind: str) -> None:
    assert await current_user(proxy, "tok", issuer.service_account_token(NAMESPACE, ACCOUNT)) == "app"
    error = await refused(proxy, "tok", bad_tokens(issuer, NAMESPACE, ACCOUNT)[kind])
    assert isinstance(error, asyncpg.InvalidPasswordError) and error.sqlstate == "28P01"
    assert error.args[0] == 'token authentication failed for user "app"'


async def test_subjects_the_policy_does_not_allow_are_refused(proxy: ProxyProcess, issuer: Issuer,
                                                              keys: Path) -> None:
    other_account = issuer.service_account_token(NAMESPACE, "intruder")
    other_namespace = issuer.service_account_token("elsewhere", ACCOUNT)
    bench_as_app = generate_token(keys, "bench", "tok")
    for token in (other_account, other_namespace, bench_as_app):
        assert (await refused(proxy, "tok", token)).sqlstate == "28P01"


async def test_a_token_without_tls_is_refused(proxy: ProxyProcess, issuer: Issuer) -> None:
    token = issuer.service_account_token(NAMESPACE, ACCOUNT)
    error = await refused(proxy, "tok", token, tls=False)
    assert isinstance(error, asyncpg.InvalidAuthorizationSpecificationError) and error.sqlstate == "28000"
    assert error.args[0] == "token authentication requires TLS (sslmode=require)"
    error = await refused(proxy, "either", token, tls=False)  # SCRAM without TLS: the token is no password
    assert isinstance(error, asyncpg.InvalidPasswordError) and error.sqlstate == "28P01"


async def test_required_mode_refuses_a_password(proxy: ProxyProcess) -> None:
    error = await refused(proxy, "tok", "app-secret")
    assert isinstance(error, asyncpg.InvalidPasswordError) and error.sqlstate == "28P01"


async def test_optional_mode_takes_a_password_or_a_token(proxy: ProxyProcess, issuer: Issuer) -> None:
    token = issuer.service_account_token(NAMESPACE, ACCOUNT)
    assert await current_user(proxy, "either", token) == "app"
    assert await current_user(proxy, "either", "app-secret") == "app"  # cleartext over TLS
    assert await current_user(proxy, "either", "app-secret", tls=False) == "app"  # SCRAM
    assert (await refused(proxy, "either", "wrong-secret")).sqlstate == "28P01"
    assert (await refused(proxy, "either", bad_tokens(issuer, NAMESPACE, ACCOUNT)["expired"])).sqlstate == "28P01"


async def test_require_tls_and_per_user_modes(proxy: ProxyProcess, keys: Path) -> None:
    error = await refused(proxy, "secure", "app-secret", tls=False)
    assert isinstance(error, asyncpg.InvalidAuthorizationSpecificationError) and error.sqlstate == "28000"
    assert error.args[0] == "endpoint secure requires TLS (sslmode=require)"
    assert await current_user(proxy, "secure", "app-secret") == "app"  # SCRAM over TLS: tokens are off for app
    assert (await refused(proxy, "secure", generate_token(keys, "app", "secure"))).sqlstate == "28P01"
    assert (await refused(proxy, "secure", "bench-secret", user="bench")).sqlstate == "28P01"  # bench: tokens only
    assert await current_user(proxy, "secure", generate_token(keys, "bench", "secure"), user="bench") == "bench"


async def test_a_session_outlives_its_token(proxy: ProxyProcess, issuer: Issuer) -> None:
    now = int(time.time())
    token = issuer.service_account_token(NAMESPACE, ACCOUNT, iat=now, nbf=now, exp=now + 2)
    conn = await connect(proxy, "tok", token)
    try:
        while time.time() < now + 2 + 1 + 1:  # past its expiry and the proxy's leeway of one second
            assert await conn.fetchval("SELECT 1") == 1
            await asyncio.sleep(0.25)
        assert await conn.fetchval("SELECT current_user") == "app"
        assert (await refused(proxy, "tok", token)).sqlstate == "28P01"  # no new login with it
    finally:
        await conn.close()


async def test_more_token_clients_than_backends(proxy: ProxyProcess, issuer: Issuer,
                                                pg_server: PostgresInstance) -> None:
    clients = 5 * POOL_SIZE
    conns = await asyncio.gather(*(connect(proxy, "tok", issuer.service_account_token(NAMESPACE, ACCOUNT))
                                   for _ in range(clients)))
    try:
        async def work(number: int, conn: asyncpg.Connection) -> list[int]:
            seen = []
            for step in range(20):
                async with conn.transaction():
                    seen.append(await conn.fetchval("SELECT $1::int + $2::int", number, step))
            return seen

        results = await asyncio.gather(*(work(n, conn) for n, conn in enumerate(conns)))
        assert results == [[n + step for step in range(20)] for n in range(clients)]
        assert backend_connections(pg_server) <= 3 * POOL_SIZE  # one pool of POOL_SIZE per endpoint at most
    finally:
        await asyncio.gather(*(conn.close() for conn in conns))


async def test_reload_replaces_the_verifier(proxy: ProxyProcess, issuer: Issuer, keys: Path,
                                            jwks: JwksServer) -> None:
    newcomer = issuer.service_account_token(NAMESPACE, "billing")
    assert (await refused(proxy, "tok", newcomer)).sqlstate == "28P01"
    reload_proxy(proxy, tokens_section(keys, jwks.url, "app", [(NAMESPACE, ACCOUNT), (NAMESPACE, "billing")]))
    assert await current_user(proxy, "tok", newcomer) == "app"


def test_no_token_in_the_log(proxy: ProxyProcess, issuer: Issuer, keys: Path) -> None:
    tokens = [generate_token(keys, "app", "tok"), issuer.service_account_token("elsewhere", ACCOUNT),
              *bad_tokens(issuer, NAMESPACE, ACCOUNT).values()]
    for token in tokens:
        psql(proxy, "tok", token, "require")
    log = proxy.log()
    assert "token authentication failed" in log
    for token in tokens:
        for part in token.split("."):
            assert not part or part not in log


def test_token_auth_without_a_key_source_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('[postgresql]\nport = 0\ntoken_auth = "required"\n')
    done = subprocess.run([sys.executable, "-m", "proxy", "run", "--check", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "endpoint postgresql: token_auth is on but [tokens] gives no key source" in done.stderr


async def test_workers_verify_tokens_and_a_reload_without_keys_is_refused(
        tmp_path: Path, pg_server: PostgresInstance, keys: Path) -> None:
    sections: dict[str, dict[str, Any]] = {
        "server": {"log_level": "info", "workers": 2},
        "secrets": {"file": "secrets.toml"},
        "postgresql": {"port": free_port(), "backend_port": pg_server.port, "token_auth": "required"},
        "mysql": {"enabled": False},
    }
    with token_proxy(tmp_path, sections, f'\n[tokens]\nkeys_dir = "{keys}"\n') as workers:
        token = generate_token(keys, "app", "postgresql")
        names = await asyncio.gather(*(current_user(workers, "postgresql", token) for _ in range(8)))
        assert names == ["app"] * 8
        workers.config.write_text(workers.config.read_text().replace(f'keys_dir = "{keys}"', ""))
        os.kill(workers.pid, signal.SIGHUP)
        workers.wait_for_log("reload refused, the running configuration stays: .*endpoint postgresql: token_auth is "
                             r"on but \[tokens\] gives no key source")
        assert await current_user(workers, "postgresql", token) == "app"


def test_a_keys_folder_without_keys_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    config = tmp_path / "proxy.toml"
    config.write_text('[postgresql]\nport = 0\ntoken_auth = "required"\n[tokens]\nkeys_dir = "keys"\n')
    done = subprocess.run([sys.executable, "-m", "proxy", "run", "--check", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "'tokens.keys_dir':" in done.stderr and "holds no usable public key" in done.stderr
