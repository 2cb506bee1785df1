"""The audit file: one JSON line per login outcome on both engines (success, failure with its reason, throttled,
refused by the allow-list), never a password or a token; a reload reopens it (logrotate)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pymysql
import pytest
from token_support import Issuer, JwksServer, bad_tokens, init_keys, token_proxy, tokens_section

from devtools.servers import MariaDBInstance, PostgresInstance, free_port
from loadtest.source_logins import mysql_login, pg_login
from support import ProxyProcess, running_proxy

WRONG = "Wr0ng-Pa55word-xyz"
NAMESPACE, ACCOUNT = "shop", "orders"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for_events(path: Path, count: int, proxy: ProxyProcess) -> list[dict[str, Any]]:
    """The file's events once it holds `count` (a refused client may get its error before the line is written)."""
    for _ in range(100):
        if path.exists() and len(found := events(path)) >= count:
            return found
        asyncio.run(asyncio.sleep(0.05))
    raise AssertionError(f"{path}: fewer than {count} events:\n{path.read_text() if path.exists() else ''}"
                         f"\n{proxy.log()[-2000:]}")


def pg_refused(port: int, user: str, password: str) -> None:
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=port, user=user, password=password, dbname="app", sslmode="disable")


def my_refused(port: int, user: str, password: str) -> None:
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(host="127.0.0.1", port=port, user=user, password=password, database="app",
                        ssl_disabled=True)


def test_every_login_outcome_is_a_json_line(tmp_path: Path, pg_server: PostgresInstance,
                                            mariadb_server: MariaDBInstance) -> None:
    auth = {"audit_file": "audit.jsonl", "failed_login_limit": 3, "failed_login_lockout": 30.0}
    with running_proxy(tmp_path, pg_server, mariadb_server, auth=auth,
                       postgresql={"allowed_cidrs": ["127.0.0.0/30"]}) as proxy:
        audit = tmp_path / "audit.jsonl"
        pg_port, my_port = proxy.ports["postgresql"], proxy.ports["mysql"]
        with psycopg.connect(host="127.0.0.1", port=pg_port, user="app", password="app-secret", dbname="app",
                             sslmode="require") as conn:
            conn.execute("SELECT 1")
        pg_refused(pg_port, "app", WRONG)
        pg_refused(pg_port, "nobody", WRONG)
        with pymysql.connect(host="127.0.0.1", port=my_port, user="app", password="app-secret", database="app",
                             ssl_disabled=True) as conn2, conn2.cursor() as cursor:
            cursor.execute("SELECT 1")
        my_refused(my_port, "app", WRONG)  # the third failed login of 127.0.0.1 within the window: locked out
        my_refused(my_port, "nobody", WRONG)  # refused before its password is looked at

        async def elsewhere() -> None:
            assert not (await mysql_login(my_port, "nobody", WRONG, source="127.0.0.2")).ok
            with socket.create_connection(("127.0.0.1", pg_port), timeout=5, source_address=("127.0.0.9", 0)) as sock:
                assert sock.recv(16) == b""

        asyncio.run(elsewhere())
        found = wait_for_events(audit, 8, proxy)
        assert all(ISO_UTC.match(event.pop("time")) for event in found)
        sources = [event.pop("source") for event in found]
        assert all(re.match(r"^127\.0\.0\.(1|2|9):\d+$", source) for source in sources), sources
        pg = {"engine": "postgresql", "endpoint": "postgresql", "database": "app", "method": "scram-sha-256"}
        my = {"engine": "mysql", "endpoint": "mysql", "database": "app", "method": "mysql_native_password",
              "tls": False}
        assert found == [
            {**pg, "event": "auth_success", "user": "app", "tls": True},
            {**pg, "event": "auth_failure", "user": "app", "tls": False, "reason": "wrong_password"},
            {**pg, "event": "auth_failure", "user": "nobody", "database": "app", "tls": False,
             "reason": "unknown_user"},
            {**my, "event": "auth_success", "user": "app"},
            {**my, "event": "auth_failure", "user": "app", "reason": "wrong_password"},
            {**my, "event": "auth_throttled", "user": "nobody", "method": ""},
            {**my, "event": "auth_failure", "user": "nobody", "database": "", "reason": "unknown_user"},
            {"event": "connection_refused_network", "engine": "postgresql", "endpoint": "postgresql", "user": "",
             "database": "", "method": "", "tls": False},
        ]
        assert sources[-1].startswith("127.0.0.9:") and sources[-2].startswith("127.0.0.2:")

        # logrotate: the file is moved away, a reload opens a new one.
        audit.rename(tmp_path / "audit.jsonl.1")
        os.kill(proxy.pid, signal.SIGHUP)
        proxy.wait_for_log("reload: serving")
        asyncio.run(pg_login(pg_port, "app", "app-secret", source="127.0.0.3"))
        assert [event["event"] for event in wait_for_events(audit, 1, proxy)] == ["auth_success"]
        for text in (audit.read_text(), (tmp_path / "audit.jsonl.1").read_text(), proxy.log()):
            assert "app-secret" not in text and WRONG not in text


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


def test_bad_tokens_are_audited_with_their_reason(tmp_path: Path, pg_server: PostgresInstance,
                                                  mariadb_server: MariaDBInstance, issuer: Issuer) -> None:
    keys = init_keys(tmp_path / "keys")
    sections: dict[str, dict[str, Any]] = {
        "server": {"log_level": "info", "client_login_timeout": 5.0, "workers": 1},
        "secrets": {"file": "secrets.toml"},
        "auth": {"audit_file": "audit.jsonl"},
        "postgresql.clusters.main": {"instances": [{"host": "127.0.0.1", "port": pg_server.port}]},
        "postgresql.endpoints.pgtok": {"port": free_port(), "cluster": "main", "token_auth": "required"},
        "mysql.clusters.main": {"instances": [{"host": "127.0.0.1", "port": mariadb_server.port}]},
        "mysql.endpoints.mytok": {"port": free_port(), "cluster": "main", "token_auth": "required"},
    }
    kinds = {"expired": "token_expired", "wrong audience": "token_wrong_audience",
             "alg none": "token_algorithm_not_allowed", "tampered": "token_bad_signature"}
    with JwksServer([issuer]) as jwks, token_proxy(
            tmp_path, sections, tokens_section(keys, jwks.url, "app", [(NAMESPACE, ACCOUNT)])) as proxy:
        bad = bad_tokens(issuer, NAMESPACE, ACCOUNT)
        good = issuer.service_account_token(NAMESPACE, ACCOUNT)
        intruder = issuer.service_account_token(NAMESPACE, "intruder")

        async def pg(token: str, tls: bool = True) -> None:
            conn = await asyncpg.connect(host="127.0.0.1", port=proxy.ports["pgtok"], user="app", password=token,
                                         database="app", ssl="require" if tls else False)
            await conn.close()

        async def run_pg() -> None:
            await pg(good)
            for kind in kinds:
                with pytest.raises(asyncpg.InvalidPasswordError):
                    await pg(bad[kind])
            with pytest.raises(asyncpg.InvalidPasswordError):
                await pg(intruder)
            with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
                await pg(good, tls=False)

        asyncio.run(run_pg())
        for token in (good, bad["expired"], bad["tampered"], intruder):
            try:
                pymysql.connect(host="127.0.0.1", port=proxy.ports["mytok"], user="app", password=token,
                                database="app", ssl_disabled=False).close()
            except pymysql.err.OperationalError as exc:
                assert exc.args[0] == 1045 and token != good
        found = wait_for_events(tmp_path / "audit.jsonl", 11, proxy)
        outcomes = [(e["engine"], e["event"], e.get("reason", ""), e["method"], e["tls"]) for e in found]
        assert outcomes == [
            ("postgresql", "auth_success", "", "token", True),
            *[("postgresql", "auth_failure", reason, "token", True) for reason in kinds.values()],
            ("postgresql", "auth_failure", "policy_denied", "token", True),
            ("postgresql", "auth_failure", "token_without_tls", "token", False),
            ("mysql", "auth_success", "", "token", True),
            ("mysql", "auth_failure", "token_expired", "token", True),
            ("mysql", "auth_failure", "token_bad_signature", "token", True),
            ("mysql", "auth_failure", "policy_denied", "token", True),
        ]
        assert {e["user"] for e in found} == {"app"}
        tokens = [good, intruder, *bad.values()]
        for text in ((tmp_path / "audit.jsonl").read_text(), proxy.log()):
            for token in tokens:
                signature = token.split(".")[2]  # (empty for alg none)
                assert token not in text and (not signature or signature not in text)
