"""Auth passthrough on PostgreSQL: roles the proxy has no secret for log in with their own database password."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from passthrough_support import memory_holds, passthrough_proxy

from devtools.servers import PostgresInstance, start_postgres
from proxy.auth.pg_passthrough import ScramCredential, parse_verifier
from proxy.auth.scram import ScramKeys
from proxy.config import PostgresSettings, parse_config
from proxy.endpoints import resolve_endpoints
from support import ProxyProcess

TTL = 1.0
BACKENDS = 2  # the pool's max_connections: fewer than the concurrent clients below


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresInstance]:
    instance = start_postgres(tmp_path_factory.mktemp("pg"), users={"app": "app-secret", "bench": "bench-secret"})
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, server: PostgresInstance) -> Iterator[ProxyProcess]:
    settings = {"auth_passthrough": True, "auth_user": "postgres", "auth_cache_ttl": TTL}
    with passthrough_proxy(tmp_path_factory.mktemp("proxy"), {"postgres": server.superuser_password}, server,
                           postgresql=settings, postgresql__pool={"max_connections": BACKENDS}) as running:
        yield running


def create_role(server: PostgresInstance, name: str, password: str) -> None:
    server.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'; GRANT ALL ON SCHEMA public TO {name}", db="app")


def drop_role(server: PostgresInstance, name: str) -> None:
    server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'; "
                f"DROP OWNED BY {name}; DROP ROLE {name}", db="app")


def psql(proxy: ProxyProcess, user: str, password: str, sql: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PGPASSWORD=password, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
    return subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(proxy.ports["postgresql"]), "-U", user,
                           "-d", "app", "-c", sql], env=env, capture_output=True, text=True, timeout=30)


async def connect(proxy: ProxyProcess, user: str, password: str) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user=user, password=password,
                                 database="app", ssl=False, statement_cache_size=0)


async def test_role_created_after_start_logs_in(proxy: ProxyProcess, server: PostgresInstance) -> None:
    create_role(server, "late_pg", "late-pg-password-1")
    done = psql(proxy, "late_pg", "late-pg-password-1", "SELECT current_user, 40 + 2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "late_pg|42"
    conn = await connect(proxy, "late_pg", "late-pg-password-1")
    try:
        await conn.execute("CREATE TABLE late_pg_rows (n int)")
        await conn.execute("INSERT INTO late_pg_rows SELECT generate_series(1, 10)")
        assert await conn.fetchval("SELECT sum(n) FROM late_pg_rows") == 55
        assert await conn.fetchval("SELECT session_user") == "late_pg"  # the backend logged in as the role itself
    finally:
        await conn.close()
    assert "late-pg-password-1" not in proxy.log()


async def test_more_clients_than_backends(proxy: ProxyProcess, server: PostgresInstance) -> None:
    create_role(server, "many_pg", "many-pg-password-2")

    async def client(number: int) -> int:
        conn = await connect(proxy, "many_pg", "many-pg-password-2")
        try:
            total = 0
            for step in range(20):
                async with conn.transaction():
                    total += await conn.fetchval("SELECT $1::int + $2::int", number, step)
            return total
        finally:
            await conn.close()

    totals = await asyncio.gather(*(client(number) for number in range(8)))
    assert totals == [20 * number + sum(range(20)) for number in range(8)]
    on_server = int(server.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'many_pg'"))
    assert 1 <= on_server <= BACKENDS


async def test_wrong_password_is_refused(proxy: ProxyProcess, server: PostgresInstance) -> None:
    create_role(server, "guarded_pg", "guarded-pg-password-3")
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await connect(proxy, "guarded_pg", "not-the-password")
    assert info.value.sqlstate == "28P01"
    done = psql(proxy, "guarded_pg", "not-the-password", "SELECT 1")
    assert done.returncode != 0 and 'password authentication failed for user "guarded_pg"' in done.stderr
    with pytest.raises(asyncpg.InvalidPasswordError):
        await connect(proxy, "nobody_at_all", "whatever")
    conn = await connect(proxy, "guarded_pg", "guarded-pg-password-3")  # a refusal left nothing behind
    assert await conn.fetchval("SELECT current_user") == "guarded_pg"
    await conn.close()


async def test_dropped_role_refused_after_ttl(proxy: ProxyProcess, server: PostgresInstance) -> None:
    create_role(server, "gone_pg", "gone-pg-password-4")
    conn = await connect(proxy, "gone_pg", "gone-pg-password-4")
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()
    drop_role(server, "gone_pg")
    time.sleep(TTL + 0.2)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await connect(proxy, "gone_pg", "gone-pg-password-4")


async def test_password_change_seen_after_ttl(proxy: ProxyProcess, server: PostgresInstance) -> None:
    create_role(server, "moved_pg", "moved-pg-password-5")
    conn = await connect(proxy, "moved_pg", "moved-pg-password-5")
    await conn.close()
    server.psql("ALTER ROLE moved_pg PASSWORD 'moved-pg-password-6'; "
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'moved_pg'")
    time.sleep(TTL + 0.2)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await connect(proxy, "moved_pg", "moved-pg-password-5")
    conn = await connect(proxy, "moved_pg", "moved-pg-password-6")  # new backends log in with the new keys
    assert await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = 'moved_pg'") >= 1
    await conn.close()


async def test_stored_secret_users_unchanged(proxy: ProxyProcess) -> None:
    conn = await connect(proxy, "app", "app-secret")
    assert await conn.fetchval("SELECT current_user") == "app"
    await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await connect(proxy, "app", "app-password-of-the-database-is-not-asked")


async def test_no_copy_of_the_password_in_log_or_memory(proxy: ProxyProcess, server: PostgresInstance) -> None:
    password = "secret-in-memory-" + os.urandom(8).hex()
    create_role(server, "hidden_pg", password)
    for _ in range(3):
        assert psql(proxy, "hidden_pg", password, "SELECT 1").stdout.strip() == "1"
        conn = await connect(proxy, "hidden_pg", password)
        assert await conn.fetchval("SELECT current_user") == "hidden_pg"
        await conn.close()
    assert "hidden_pg" in server.psql("SELECT usename FROM pg_stat_activity WHERE usename = 'hidden_pg'")
    assert password not in proxy.log()
    assert memory_holds(proxy.pid, password.encode()) == []
    assert memory_holds(os.getpid(), password.encode()) != []  # the search finds it where it is (this process)


async def test_lookup_failure_is_a_clear_error(tmp_path: Path, server: PostgresInstance) -> None:
    settings = {"auth_passthrough": True, "auth_user": "postgres", "auth_cache_ttl": TTL}
    with passthrough_proxy(tmp_path, {"postgres": "not-the-superuser-password"}, server,
                           postgresql=settings) as broken:
        create_role(server, "stuck_pg", "stuck-pg-password-7")
        started = time.monotonic()
        with pytest.raises(asyncpg.PostgresError, match="auth passthrough: the database could not check user"):
            await connect(broken, "stuck_pg", "stuck-pg-password-7")
        assert time.monotonic() - started < 5
        conn = await connect(broken, "app", "app-secret")  # users with a secret go on
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        assert "not-the-superuser-password" not in broken.log()


async def test_lookup_connection_reopened_when_lost(proxy: ProxyProcess, server: PostgresInstance) -> None:
    create_role(server, "before_pg", "before-pg-password-8")
    conn = await connect(proxy, "before_pg", "before-pg-password-8")
    await conn.close()
    killed = server.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                         "WHERE usename = 'postgres' AND datname = 'postgres' AND pid <> pg_backend_pid()")
    assert int(killed) == 1  # the proxy's one lookup connection
    create_role(server, "after_pg", "after-pg-password-9")
    conn = await connect(proxy, "after_pg", "after-pg-password-9")
    assert await conn.fetchval("SELECT current_user") == "after_pg"
    await conn.close()
    proxy.wait_for_log(r"auth passthrough: the lookup connection to .* failed .*; opening another")


def test_credentials_never_show_their_keys() -> None:
    keys = ScramKeys.derive(b"a password", b"0123456789abcdef")
    credential = ScramCredential(keys.salt, keys.iterations, b"\x01" * 32, keys.server_key)
    for text in (repr(credential), str(credential), f"{credential}", repr([credential])):
        assert text == "ScramCredential(iterations=4096)" or text == "[ScramCredential(iterations=4096)]"
    verifier = ("SCRAM-SHA-256$4096:" + base64.b64encode(keys.salt).decode() + "$"
                + base64.b64encode(keys.stored_key).decode() + ":" + base64.b64encode(keys.server_key).decode())
    assert parse_verifier(verifier) == keys
    assert parse_verifier("md5" + "0" * 32) is None
    assert parse_verifier("SCRAM-SHA-256$4096:not base64$x:y") is None


def test_endpoints_and_clusters_override_the_engine_settings() -> None:
    config = parse_config({"postgresql": {
        "auth_passthrough": True, "auth_user": "lookup",
        "clusters": {"main": {"instances": [{"host": "127.0.0.1", "port": 5999}], "auth_cache_ttl": 5.0}},
        "endpoints": {"open": {"port": 0, "cluster": "main"},
                      "closed": {"port": 0, "cluster": "main", "auth_passthrough": False,
                                 "auth_query": "SELECT lookup_verifier($1)"}},
    }})
    found = {endpoint.name: endpoint.settings for endpoint in resolve_endpoints(config)}
    assert isinstance(found["open"], PostgresSettings) and isinstance(found["closed"], PostgresSettings)
    opened = found["open"]
    assert (opened.auth_passthrough, opened.auth_user, opened.auth_cache_ttl) == (True, "lookup", 5)
    assert found["open"].auth_query == "SELECT passwd FROM pg_catalog.pg_shadow WHERE usename = $1"
    assert (found["closed"].auth_passthrough, found["closed"].auth_query) == (False, "SELECT lookup_verifier($1)")
    assert PostgresSettings().auth_passthrough is False and PostgresSettings().auth_cache_ttl == 60


async def test_md5_verifiers_with_auth_method_md5(tmp_path: Path) -> None:
    md5_server = start_postgres(tmp_path / "pg", users={"app": "app-secret"}, auth="md5")
    try:
        settings = {"auth_passthrough": True, "auth_user": "postgres", "auth_method": "md5"}
        with passthrough_proxy(tmp_path / "proxy", {"postgres": md5_server.superuser_password}, md5_server,
                               postgresql=settings) as md5_proxy:
            md5_server.psql("CREATE ROLE old_md5 LOGIN PASSWORD 'old-md5-password-10'; SET password_encryption = "
                            "'scram-sha-256'; CREATE ROLE new_scram LOGIN PASSWORD 'new-scram-password-11'")
            assert md5_server.psql("SELECT left(passwd, 3) FROM pg_shadow WHERE usename = 'old_md5'") == "md5"
            done = psql(md5_proxy, "old_md5", "old-md5-password-10", "SELECT current_user")
            assert done.returncode == 0 and done.stdout.strip() == "old_md5", done.stderr
            for user, password in (("old_md5", "old-md5-password-10"), ("new_scram", "new-scram-password-11")):
                conn = await connect(md5_proxy, user, password)  # an md5 one answers md5, a SCRAM one SCRAM
                assert await conn.fetchval("SELECT session_user") == user
                await conn.close()
                with pytest.raises(asyncpg.InvalidPasswordError):
                    await connect(md5_proxy, user, password + "-wrong")
            assert memory_holds(md5_proxy.pid, b"old-md5-password-10") == []
    finally:
        md5_server.stop()


async def test_unprivileged_auth_user_through_a_security_definer_function(tmp_path: Path,
                                                                          server: PostgresInstance) -> None:
    server.psql("CREATE ROLE lookup LOGIN PASSWORD 'lookup-secret';"
                "CREATE FUNCTION public.user_lookup(name text, OUT usename name, OUT passwd text) RETURNS record "
                "LANGUAGE sql SECURITY DEFINER AS "
                "$$ SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = name $$;"
                "REVOKE ALL ON FUNCTION public.user_lookup(text) FROM public;"
                "GRANT EXECUTE ON FUNCTION public.user_lookup(text) TO lookup")
    settings = {"auth_passthrough": True, "auth_user": "lookup",
                "auth_query": "SELECT usename, passwd FROM public.user_lookup($1)"}  # PgBouncer's form
    with passthrough_proxy(tmp_path, {"lookup": "lookup-secret"}, server, postgresql=settings) as lookup_proxy:
        create_role(server, "via_function", "via-function-password-12")
        conn = await connect(lookup_proxy, "via_function", "via-function-password-12")
        assert await conn.fetchval("SELECT current_user") == "via_function"
        await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await connect(lookup_proxy, "via_function", "wrong")


async def test_a_lookup_that_hangs_ends_in_a_clear_error(tmp_path: Path, server: PostgresInstance) -> None:
    settings = {"auth_passthrough": True, "auth_user": "postgres", "backend_connect_timeout": 1.0,
                "auth_query": "SELECT passwd FROM pg_catalog.pg_shadow, pg_sleep(30) WHERE usename = $1"}
    with passthrough_proxy(tmp_path, {"postgres": server.superuser_password}, server,
                           postgresql=settings) as slow:
        create_role(server, "slow_pg", "slow-pg-password-13")
        started = time.monotonic()
        with pytest.raises(asyncpg.PostgresError, match="the database did not answer in time"):
            await connect(slow, "slow_pg", "slow-pg-password-13")
        assert time.monotonic() - started < 5
        conn = await connect(slow, "app", "app-secret")
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
