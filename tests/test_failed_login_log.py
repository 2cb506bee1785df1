"""Failed logins stay visible in the log without a line each during a burst: the first ten per client address in
full, the rest as one summary line per address with counts per user."""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.request
from pathlib import Path

import pymysql
import pytest

from devtools.servers import MariaDBInstance, PostgresInstance
from proxy.auth.failures import FULL_LINES, FailedLogins
from rawpg import RawClient
from support import ProxyProcess, metric_value, running_proxy

PG_LINE = re.compile(r"client 127\.0\.0\.1:\d+ \(user '(\w+)'\): password authentication failed for user \"\1\" "
                     r"\[28P01\]")
MY_LINE = re.compile(r"client 127\.0\.0\.1:\d+ \(user '(\w+)'\): Access denied for user '\1'@'127\.0\.0\.1' "
                     r"\(using password: YES\) \[1045 28000\]")


def metric(proxy: ProxyProcess, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{proxy.ports['metrics']}/metrics").read().decode()
    return metric_value(text, name)


def pg_fail(port: int, user: str) -> None:
    client = RawClient(port)
    try:
        with pytest.raises(PermissionError, match="password authentication failed"):
            client.login(user=user, password="wrong")
    finally:
        client.close()


def test_a_burst_of_failed_pg_logins_is_summed_up_per_address(tmp_path: Path, pg_server: PostgresInstance) -> None:
    users = ["app"] * 12 + ["nobody"] * 6 + ["ghost"] * 2  # 20 failed logins from one address
    with running_proxy(tmp_path, pg_server, server={"metrics_port": 0}) as proxy:
        port = proxy.ports["postgresql"]
        for user in users:
            pg_fail(port, user)
        proxy.wait_for_log(r"\(user 'app'\): password authentication failed")
        assert metric(proxy, "dbproxy_client_connections_setup_failed_auth_total") == len(users)
        client = RawClient(port)
        client.login()  # the proxy still lets the right password in
        client.close()
    lines = proxy.log().splitlines()
    full = [match.group(1) for line in lines if (match := PG_LINE.search(line))]
    assert full == users[:FULL_LINES]
    summary = [line for line in lines if "not logged one by one" in line]
    assert len(summary) == 1, summary  # logged at shutdown, before its interval was over
    assert summary[0].endswith(
        "WARNING proxy.session.pg_client: client 127.0.0.1: 10 more failed login(s) within 10 s, not logged one by "
        "one: 'nobody' x6, 'app' x2, 'ghost' x2"
    ), summary[0]


def test_a_burst_of_failed_mysql_logins_is_summed_up_per_address(tmp_path: Path,
                                                                    mariadb_server: MariaDBInstance) -> None:
    users = ["app"] * 8 + ["nobody"] * 5
    with running_proxy(tmp_path, mariadb=mariadb_server, server={"metrics_port": 0}) as proxy:
        for user in users:
            with pytest.raises(pymysql.err.OperationalError) as info:
                pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user=user, password="wrong")
            assert info.value.args[0] == 1045
        assert metric(proxy, "dbproxy_client_connections_setup_failed_auth_total") == len(users)
    lines = proxy.log().splitlines()
    full = [match.group(1) for line in lines if (match := MY_LINE.search(line))]
    assert full == users[:FULL_LINES]
    summary = [line for line in lines if "not logged one by one" in line]
    assert len(summary) == 1 and summary[0].endswith(
        "WARNING proxy.session.mysql_client: client 127.0.0.1: 3 more failed login(s) within 10 s, not logged one "
        "by one: 'nobody' x3"
    ), summary


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_the_summary_comes_at_the_end_of_its_interval_and_a_new_interval_logs_in_full_again() -> None:
    logger = logging.getLogger("test.failed_logins")
    logger.propagate = False
    handler = Lines()
    logger.addHandler(handler)
    try:
        failed = FailedLogins(logger, interval=0.2, full_lines=2)
        for user in ("a", "b", "c", "c", "d"):
            failed.record("10.0.0.1", user, "failed login of %s", user)
        failed.record("10.0.0.2", "e", "failed login of %s", "e")
        assert handler.lines == ["failed login of a", "failed login of b", "failed login of e"]
        while len(handler.lines) < 4:  # the interval's timer, not a shutdown, brings the summary
            await asyncio.sleep(0.05)
        assert handler.lines[3] == ("client 10.0.0.1: 3 more failed login(s) within 0.2 s, not logged one by one: "
                                    "'c' x2, 'd' x1")
        failed.record("10.0.0.1", "f", "failed login of %s", "f")
        assert handler.lines[4:] == ["failed login of f"]
    finally:
        logger.removeHandler(handler)
