"""The failed-login throttle: an address with too many failed logins is refused before any password check
(PostgreSQL 28000, MySQL 1129) until its lockout ends; other addresses log in meanwhile."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pymysql

from devtools.servers import MariaDBInstance, PostgresInstance
from loadtest.source_logins import mysql_login, pg_login
from proxy.auth.throttle import LoginThrottle
from proxy.config import parse_config
from support import metric_value, running_proxy, scrape

LIMIT, LOCKOUT = 5, 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_counts_within_the_window_and_forgets_the_oldest_address() -> None:
    clock = Clock()
    throttle = LoginThrottle(3, window=10.0, lockout=30.0, max_addresses=2, clock=clock)
    assert [throttle.failed("a") for _ in range(2)] == [False, False]
    clock.now += 11  # the first two fall out of the window
    assert [throttle.failed("a") for _ in range(2)] == [False, False]
    assert throttle.locked_for("a") == 0.0
    assert throttle.failed("a") is True  # three within 10 s
    assert throttle.locked_for("a") == 30.0
    clock.now += 29.5
    assert throttle.locked_for("a") == 0.5 and throttle.locked_for("b") == 0.0
    clock.now += 1
    assert throttle.locked_for("a") == 0.0
    assert throttle.failed("a") is False  # a fresh count after a lockout
    throttle.failed("b")
    throttle.failed("c")  # a third address: "a" (oldest latest failure) is forgotten
    assert len(throttle) == 2 and throttle.failed("a") is False
    off = LoginThrottle(0, window=10.0, lockout=30.0, clock=clock)
    assert not any(off.failed("a") for _ in range(100)) and len(off) == 0
    defaults = parse_config({}).auth
    assert (defaults.failed_login_limit, defaults.failed_login_window, defaults.failed_login_lockout,
            defaults.audit_file) == (20, 60.0, 60.0, None)
    assert parse_config({"auth": {"audit_file": ""}}).auth.audit_file is None


async def _lock_out(login: object, source: str, failed_code: str) -> None:
    for _ in range(LIMIT):
        outcome = await login(source)  # type: ignore[operator]
        assert not outcome.ok and outcome.code == failed_code, outcome


def test_an_address_with_too_many_failed_logins_is_locked_out_for_a_while(
        tmp_path: Path, pg_server: PostgresInstance, mariadb_server: MariaDBInstance) -> None:
    auth = {"failed_login_limit": LIMIT, "failed_login_window": 60.0, "failed_login_lockout": LOCKOUT}
    with running_proxy(tmp_path, pg_server, mariadb_server, server={"metrics_port": 0}, auth=auth) as proxy:
        pg_port, my_port = proxy.ports["postgresql"], proxy.ports["mysql"]

        async def pg_wrong(source: str) -> object:
            return await pg_login(pg_port, "app", None, source=source)

        async def my_wrong(source: str) -> object:
            return await mysql_login(my_port, "app", "wrong", source=source, database="app")

        async def run() -> None:
            await _lock_out(pg_wrong, "127.0.0.2", "28P01")
            await _lock_out(my_wrong, "127.0.0.3", "1045")
            # The right password from a locked-out address: refused at once, before any authentication request.
            refused = await pg_login(pg_port, "app", "app-secret", source="127.0.0.2")
            assert (refused.ok, refused.code, refused.before_auth) == (False, "28000", True)
            assert refused.message == f"too many failed logins from this address; try again in {LOCKOUT:.0f} s"
            refused = await mysql_login(my_port, "app", "app-secret", source="127.0.0.3", database="app")
            assert (refused.ok, refused.code) == (False, "1129")
            assert refused.message == (f"Host '127.0.0.3' is blocked because of too many failed logins; try again "
                                       f"in {LOCKOUT:.0f} s")
            # A lockout holds for every endpoint of the process; other addresses log in meanwhile.
            assert (await pg_login(pg_port, "app", "app-secret", source="127.0.0.3")).code == "28000"
            assert (await mysql_login(my_port, "app", "app-secret", source="127.0.0.2", database="app")).code == "1129"
            assert (await pg_login(pg_port, "app", "app-secret", source="127.0.0.4")).ok
            assert (await mysql_login(my_port, "app", "app-secret", source="127.0.0.4", database="app")).ok

        asyncio.run(run())

        async def burst() -> None:  # logins opened at once all pass the first check: their answers are not told
            outcomes = await asyncio.gather(*(pg_login(pg_port, "app", None, source="127.0.0.5") for _ in range(30)))
            codes = [outcome.code for outcome in outcomes]
            assert codes.count("28P01") == LIMIT and codes.count("28000") == 30 - LIMIT, codes
            outcomes = await asyncio.gather(*(mysql_login(my_port, "app", "wrong", source="127.0.0.6",
                                                          database="app") for _ in range(30)))
            codes = [outcome.code for outcome in outcomes]
            assert codes.count("1045") == LIMIT and codes.count("1129") == 30 - LIMIT, codes

        asyncio.run(burst())
        with psycopg.connect(host="127.0.0.1", port=pg_port, user="app", password="app-secret", dbname="app") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        pymysql.connect(host="127.0.0.1", port=my_port, user="app", password="app-secret", database="app").close()
        metrics = scrape(proxy)
        throttled = 2 + 30 - LIMIT
        assert metric_value(metrics, "dbproxy_client_connections_throttled_total", engine="postgresql") == throttled
        assert metric_value(metrics, "dbproxy_client_connections_throttled_total", engine="mysql") == throttled
        assert metric_value(metrics, "dbproxy_client_connections_setup_failed_auth_total") == 4 * LIMIT
        log = proxy.log()
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.5", "127.0.0.6"):
            assert log.count(f"client address {source}: {LIMIT} failed logins within 60 s: its logins are refused "
                             f"for the next {LOCKOUT:g} s") == 1
        # After the lockout: the right password from the same address logs in.
        time.sleep(LOCKOUT + 0.2)

        async def after() -> None:
            assert (await pg_login(pg_port, "app", "app-secret", source="127.0.0.2")).ok
            assert (await mysql_login(my_port, "app", "app-secret", source="127.0.0.3", database="app")).ok

        asyncio.run(after())
