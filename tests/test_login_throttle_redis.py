"""The failed-login throttle shared through Redis: failed logins spread over two proxies (one with two workers)
lock the address out of both, the lockout ends for both, only addresses are stored in Redis, and a Redis that does
not answer leaves each process counting on its own."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import asyncpg
import psycopg
import pymysql
import pytest
import redis
import test_query_cache_redis_tls as tls_case

from devtools.servers import MariaDBInstance, PostgresInstance, free_port
from loadtest.source_logins import mysql_login, pg_login
from proxy.auth.guard import LoginGuard
from proxy.auth.shared_throttle import SharedThrottle
from proxy.auth.throttle import Failure, LoginThrottle, throttle_key
from proxy.config import AuthSettings, parse_config
from support import ProxyProcess, running_proxy

REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_PASSWORD = tls_case.REDIS_PASSWORD
tls_redis = tls_case.tls_redis  # (the fixture: a TLS-only redis-server with a password)
LIMIT, LOCKOUT = 6, 2.0
PG_TEXT = "too many failed logins from this address; try again in"


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    name = f"dbproxy-test:{uuid.uuid4().hex}:"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=name + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def auth(prefix: str, url: str = REDIS_URL) -> dict[str, object]:
    return {"failed_login_limit": LIMIT, "failed_login_window": 60.0, "failed_login_lockout": LOCKOUT,
            "throttle_store": "redis", "redis_url": url, "redis_key_prefix": prefix}


@pytest.fixture
def proxies(tmp_path: Path, pg_server: PostgresInstance, mariadb_server: MariaDBInstance,
            prefix: str) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    """Two proxies sharing one Redis; the first runs two workers."""
    with ExitStack() as stack:
        first, second = (stack.enter_context(running_proxy(tmp_path / f"proxy{n}", pg_server, mariadb_server,
                                                           server={"workers": workers}, auth=auth(prefix)))
                         for n, workers in ((1, 2), (2, 1)))
        yield first, second


def pg_connect(proxy: ProxyProcess, password: str) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password=password,
                           dbname="app", connect_timeout=5, sslmode="disable")


def pg_refusal(proxy: ProxyProcess, password: str) -> psycopg.OperationalError:
    with pytest.raises(psycopg.OperationalError) as caught:
        pg_connect(proxy, password).close()
    return caught.value


async def asyncpg_refusal(proxy: ProxyProcess) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as caught:
        await asyncpg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                              database="app", ssl=False, timeout=5)
    return caught.value


def my_refusal(proxy: ProxyProcess, password: str, source: str) -> tuple[int, str]:
    with pytest.raises(pymysql.err.OperationalError) as caught:
        pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="app", password=password,
                        database="app", bind_address=source, connect_timeout=5).close()
    return caught.value.args[0], caught.value.args[1]


def test_failed_logins_over_two_proxies_lock_the_address_out_of_both(
        proxies: tuple[ProxyProcess, ProxyProcess], prefix: str) -> None:
    first, second = proxies
    # PostgreSQL (psycopg, from 127.0.0.1): LIMIT wrong passwords, alternating between the proxies, are all told.
    for n in range(LIMIT):
        error = pg_refusal(proxies[n % 2], "wrong")
        assert 'password authentication failed for user "app"' in str(error), error
    for proxy in proxies:  # the right password: refused by both, as throttled
        error = pg_refusal(proxy, "app-secret")
        assert f"FATAL:  {PG_TEXT} {LOCKOUT:.0f} s" in str(error), error  # (psycopg keeps no SQLSTATE here)
        refused = asyncio.run(asyncpg_refusal(proxy))
        assert refused.sqlstate == "28000" and str(refused).startswith(PG_TEXT), refused
    # The lockout is the address's: MySQL from 127.0.0.1 is refused too (1129), on both.
    for proxy in proxies:
        assert my_refusal(proxy, "app-secret", "127.0.0.1")[0] == 1129
    # MySQL (PyMySQL, from 127.0.0.3): the same over the MySQL listeners.
    for n in range(LIMIT):
        assert my_refusal(proxies[n % 2], "wrong", "127.0.0.3")[0] == 1045
    for proxy in proxies:
        code, message = my_refusal(proxy, "app-secret", "127.0.0.3")
        assert code == 1129 and message.startswith("Host '127.0.0.3' is blocked because of too many failed logins")
    assert_only_addresses_stored(prefix)
    logs = first.log() + second.log()
    for source in ("127.0.0.1", "127.0.0.3"):  # logged once, by the process whose failure reached the limit
        assert logs.count(f"client address {source}: {LIMIT} failed logins within 60 s") == 1

    async def elsewhere() -> None:
        # Failures on the first proxy only: the second, which saw none, refuses the address (the first time as soon
        # as the look-up in Redis started at connect has answered: before or after the password exchange; before
        # any password check afterwards).
        for _ in range(LIMIT):
            assert (await pg_login(first.ports["postgresql"], "app", None, source="127.0.0.4")).code == "28P01"
        refused = await pg_login(second.ports["postgresql"], "app", "app-secret", source="127.0.0.4")
        assert refused.code == "28000"
        refused = await pg_login(second.ports["postgresql"], "app", "app-secret", source="127.0.0.4")
        assert (refused.code, refused.before_auth) == ("28000", True)
        # A burst over both proxies at once: exactly LIMIT answers are told, the rest are refused as throttled.
        outcomes = await asyncio.gather(*(pg_login(proxies[n % 2].ports["postgresql"], "app", None,
                                                   source="127.0.0.5") for n in range(24)))
        codes = [outcome.code for outcome in outcomes]
        assert codes.count("28P01") == LIMIT and codes.count("28000") == 24 - LIMIT, codes
        # Other addresses log in meanwhile.
        assert (await pg_login(second.ports["postgresql"], "app", "app-secret", source="127.0.0.6")).ok
        assert (await mysql_login(first.ports["mysql"], "app", "app-secret", source="127.0.0.6",
                                  database="app")).ok

    asyncio.run(elsewhere())
    time.sleep(LOCKOUT + 0.3)  # the lockout ends, for both proxies
    for proxy in proxies:
        with pg_connect(proxy, "app-secret") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="app", password="app-secret",
                        database="app", bind_address="127.0.0.3").close()


def assert_only_addresses_stored(prefix: str) -> None:
    """The keys name addresses (a count or a lockout), the values are numbers: no user name, password or token."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [key.decode() for key in client.scan_iter(match=prefix + "*", count=1000)]
        assert f"{prefix}l:{{127.0.0.3}}" in keys, keys
        for key in keys:
            kind, _, address = key[len(prefix):].partition(":")
            assert kind in ("f", "l") and address.strip("{}").startswith("127.0.0."), key
            value = client.get(key)
            assert value is not None and value.isdigit(), (key, value)
            assert 0 < client.pttl(key) <= 60_000
        everything = " ".join(keys) + " ".join(str(client.get(key)) for key in keys)
        for secret in ("app", "wrong", "secret"):
            assert secret not in everything
    finally:
        client.close()


def test_a_redis_that_does_not_answer_leaves_each_process_counting(
        tmp_path: Path, pg_server: PostgresInstance, mariadb_server: MariaDBInstance, prefix: str) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    with running_proxy(tmp_path, pg_server, mariadb_server, auth=auth(prefix, closed)) as proxy:
        port = proxy.ports["postgresql"]

        async def run() -> None:
            for _ in range(LIMIT):
                assert (await pg_login(port, "app", None, source="127.0.0.7")).code == "28P01"
            refused = await pg_login(port, "app", "app-secret", source="127.0.0.7")
            assert (refused.code, refused.before_auth) == ("28000", True)  # counted in the process
            assert (await mysql_login(proxy.ports["mysql"], "app", "wrong", source="127.0.0.8",
                                      database="app")).code == "1045"
            good = await pg_login(port, "app", "app-secret", source="127.0.0.8")
            assert good.ok and good.seconds < 1.0, good

        asyncio.run(run())
        log = proxy.log()
        assert log.count("failed-login throttle: Redis did not answer the") == 1
        assert "counting failed logins in this process meanwhile" in log
        assert log.count(f"client address 127.0.0.7: {LIMIT} failed logins within 60 s") == 1


def test_the_count_expires_a_window_after_its_first_failure(prefix: str) -> None:
    """The script in Redis: a count expires with its window; the limit within it locks the address out; a
    failure during the lockout is reported as such and not counted."""
    settings = parse_config({"auth": {**auth(prefix), "failed_login_limit": 3, "failed_login_window": 0.3,
                                      "failed_login_lockout": 0.5}}).auth

    async def run() -> None:
        local = LoginThrottle(3, 0.3, 0.5)
        shared = SharedThrottle(settings, local)
        try:
            assert [await shared.failed("10.0.0.1") for _ in range(2)] == [Failure.COUNTED] * 2
            await asyncio.sleep(0.4)  # the window has passed: a fresh count
            assert [await shared.failed("10.0.0.1") for _ in range(2)] == [Failure.COUNTED] * 2
            assert await shared.failed("10.0.0.1") is Failure.LOCKED_NOW
            assert local.locked_for("10.0.0.1") > 0
            other = LoginThrottle(3, 0.3, 0.5)  # another process: it learns the lockout from its look-up
            elsewhere = SharedThrottle(settings, other)
            probe = elsewhere.probe("10.0.0.1")
            assert probe is not None
            await probe
            assert 0 < other.locked_for("10.0.0.1") <= 0.5
            assert await elsewhere.failed("10.0.0.1") is Failure.LOCKED_BEFORE
            await elsewhere.close()
            await asyncio.sleep(0.6)
            assert await shared.failed("10.0.0.1") is Failure.COUNTED
        finally:
            await shared.close()

    asyncio.run(run())


def test_over_tls_with_a_password_and_with_a_wrong_one(tls_redis: tuple[int, Path],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """rediss:// with redis_ca_file and redis_password (as for the query cache): counted there; a wrong password
    is a Redis that does not answer: counted in the process, one warning line, the password in no line."""
    port, ca_file = tls_redis

    def settings(password: str) -> AuthSettings:
        return parse_config({"auth": {**auth("t:"), "failed_login_limit": 2, "redis_url": f"rediss://127.0.0.1:{port}/0",
                                      "redis_password": password, "redis_ca_file": str(ca_file)}}).auth

    async def run() -> None:
        shared = SharedThrottle(settings(REDIS_PASSWORD), LoginThrottle(2, 60.0, 2.0))
        wrong = SharedThrottle(settings("not-the-token"), LoginThrottle(2, 60.0, 2.0))
        try:
            assert [await shared.failed("10.0.0.2") for _ in range(2)] == [Failure.COUNTED, Failure.LOCKED_NOW]
            assert await shared.redis.pttl("t:l:{10.0.0.2}") > 0
            assert [await wrong.failed("10.0.0.2") for _ in range(2)] == [Failure.COUNTED, Failure.LOCKED_NOW]
            assert wrong.local.locked_for("10.0.0.2") > 0
        finally:
            await shared.close()
            await wrong.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    warnings = [r.getMessage() for r in caplog.records if "failed-login throttle" in r.getMessage()]
    assert len(warnings) == 1 and "AuthenticationError" in warnings[0], warnings
    assert "not-the-token" not in caplog.text and REDIS_PASSWORD not in caplog.text


def test_a_reload_keeps_the_running_store(prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """The limits apply at a reload; the store and its Redis only with a restart (a warning says so)."""
    guard = LoginGuard(parse_config({"auth": auth(prefix)}).auth)
    assert guard.shared is not None
    guard.configure(parse_config({"auth": {**auth(prefix), "failed_login_limit": 3}}).auth)
    assert guard.throttle.limit == 3 and "change only with a restart" not in caplog.text
    guard.configure(parse_config({"auth": {**auth(prefix), "throttle_store": "local"}}).auth)
    assert "reload: [auth] throttle_store and redis_* change only with a restart" in caplog.text
    assert guard.shared is not None
    asyncio.run(guard.aclose())
    guard.close()
    local = LoginGuard(parse_config({}).auth)
    assert local.shared is None and local.probe("10.0.0.3") is None


def test_per_user_scope_locks_out_one_user_of_an_address_on_both_proxies(
        tmp_path: Path, pg_server: PostgresInstance, mariadb_server: MariaDBInstance, prefix: str) -> None:
    """failed_login_scope = "user": one user's failures over two proxies lock that user out of the address on
    both; another user from the same address logs in; Redis holds a hash of the user name, not the name."""
    per_user = {**auth(prefix), "failed_login_scope": "user"}
    with ExitStack() as stack:
        first, second = (stack.enter_context(running_proxy(tmp_path / f"proxy{n}", pg_server, mariadb_server,
                                                           auth=per_user)) for n in (1, 2))

        async def run() -> None:
            for n in range(LIMIT):
                proxy = (first, second)[n % 2]
                assert (await pg_login(proxy.ports["postgresql"], "app", None, source="127.0.0.11")).code == "28P01"
            for proxy in (first, second):
                refused = await pg_login(proxy.ports["postgresql"], "app", "app-secret", source="127.0.0.11")
                assert refused.code == "28000", refused
                assert (await mysql_login(proxy.ports["mysql"], "app", "app-secret", source="127.0.0.11",
                                          database="app")).code == "1129"
                assert (await pg_login(proxy.ports["postgresql"], "bench", "bench-secret", source="127.0.0.11")).ok
                assert (await mysql_login(proxy.ports["mysql"], "bench", "bench-secret", source="127.0.0.11",
                                          database="bench")).ok

        asyncio.run(run())
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = [key.decode() for key in client.scan_iter(match=prefix + "*", count=1000)]
        finally:
            client.close()
        assert keys == [f"{prefix}l:{{{throttle_key('127.0.0.11', 'app', True)}}}"], keys
        assert "app" not in keys[0][len(prefix):]
        logs = first.log() + second.log()
        assert logs.count(f"client address 127.0.0.11, user 'app': {LIMIT} failed logins within 60 s") == 1
