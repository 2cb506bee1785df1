"""Changed secrets picked up by the running proxy: a Kubernetes-style folder swapped after ALTER ROLE, seen by the
watch (or a reload); new clients and new backend connections use the new password, connected clients carry on."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.servers import PostgresInstance
from secret_support import kubelet_write
from support import ProxyProcess, backend_connections, running_proxy

USER = "live_rotated"


@pytest.fixture
def live_role(pg_server: PostgresInstance) -> Iterator[str]:
    pg_server.psql(f"DROP ROLE IF EXISTS {USER}; CREATE ROLE {USER} LOGIN PASSWORD 'live-pw-1'")
    yield USER
    pg_server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{USER}'")
    pg_server.psql(f"DROP ROLE IF EXISTS {USER}")


def connect(proxy: ProxyProcess, password: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user=USER, password=password,
                           dbname="app", sslmode="disable", connect_timeout=5, autocommit=True)


def current_user(conn: psycopg.Connection[tuple[object, ...]]) -> object:
    row = conn.execute("SELECT current_user").fetchone()
    assert row is not None
    return row[0]


def wait_reloaded(proxy: ProxyProcess, times: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while proxy.log().count("secrets reloaded (") < times:
        assert time.monotonic() < deadline, proxy.log()[-2000:]
        time.sleep(0.05)


def test_folder_swap_is_picked_up_without_restart(tmp_path: Path, pg_server: PostgresInstance,
                                                  live_role: str) -> None:
    folder = tmp_path / "mounted"
    kubelet_write(folder, {USER: "live-pw-1"})
    with running_proxy(tmp_path / "proxy", pg_server, secrets={"dir": str(folder), "watch_interval": 0.2}) as proxy:
        old = connect(proxy, "live-pw-1")
        assert current_user(old) == USER
        old.execute("BEGIN")  # holds its backend connection: the next client needs a new one
        old.execute("SELECT 1")
        pg_server.psql(f"ALTER ROLE {USER} PASSWORD 'live-pw-2'")
        kubelet_write(folder, {USER: "live-pw-2"})
        wait_reloaded(proxy, 1)
        assert "secrets reloaded (3 users)" in proxy.log()  # app and bench from the file, and the folder's user
        with connect(proxy, "live-pw-2") as new:
            assert current_user(new) == USER
            assert backend_connections(pg_server, USER) == 2  # a new backend connection, logged in with the new one
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            connect(proxy, "live-pw-1")
        old.execute("SELECT 2")  # the old client carries on, in its transaction
        old.execute("COMMIT")
        assert current_user(old) == USER
        old.close()
        log = proxy.log()
    assert "live-pw-" not in log


def test_failed_backend_login_then_reload_by_signal(tmp_path: Path, pg_server: PostgresInstance,
                                                     live_role: str) -> None:
    """watch_interval 0: only a reload picks the change up; a backend login refused meanwhile leaves the pool
    usable (nothing wedged) once the secrets follow."""
    folder = tmp_path / "mounted"
    kubelet_write(folder, {USER: "live-pw-1"})
    pool: dict[str, Any] = {"postgresql.pool": {"max_connections": 1, "connection_borrow_timeout": 5.0}}
    with running_proxy(tmp_path / "proxy", pg_server, secrets={"dir": str(folder), "watch_interval": 0},
                       **pool) as proxy:
        with connect(proxy, "live-pw-1") as first:
            assert current_user(first) == USER
        pg_server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{USER}'")
        pg_server.psql(f"ALTER ROLE {USER} PASSWORD 'live-pw-2'")
        for _ in range(3):  # the database refuses the stored password: an error each time, the slot given back
            with connect(proxy, "live-pw-1") as client, pytest.raises(psycopg.Error, match="password"):
                client.execute("SELECT 1")
        kubelet_write(folder, {USER: "live-pw-2"})
        time.sleep(0.5)
        assert "secrets reloaded" not in proxy.log()  # no watch
        os.kill(proxy.pid, signal.SIGHUP)
        wait_reloaded(proxy, 1)
        with connect(proxy, "live-pw-2") as client:
            assert current_user(client) == USER
        log = proxy.log()
    assert "live-pw-" not in log


def test_pending_password_is_tried_when_the_stored_one_is_refused(tmp_path: Path, pg_server: PostgresInstance,
                                                                  live_role: str) -> None:
    """A rotation in flight: the database has the new password, the secrets hold it as pending only, no watch. A new
    backend login is refused with the current password, then made with the pending one read from the folder."""
    folder = tmp_path / "mounted"
    kubelet_write(folder, {USER: "live-pw-1"})
    with running_proxy(tmp_path / "proxy", pg_server, secrets={"dir": str(folder), "watch_interval": 0}) as proxy:
        kubelet_write(folder, {USER: "live-pw-1", f"{USER}.pending": "live-pw-2"})
        pg_server.psql(f"ALTER ROLE {USER} PASSWORD 'live-pw-2'")
        with connect(proxy, "live-pw-1") as client:  # the client-facing password is unchanged
            assert current_user(client) == USER
        assert "the database refused the stored password; trying the secrets read again" in proxy.log()
        assert "secrets reloaded" not in proxy.log()
        log = proxy.log()
    assert "live-pw-" not in log


def test_every_worker_picks_the_change_up(tmp_path: Path, pg_server: PostgresInstance, live_role: str) -> None:
    folder = tmp_path / "mounted"
    kubelet_write(folder, {USER: "live-pw-1"})
    with running_proxy(tmp_path / "proxy", pg_server, server={"workers": 2},
                       secrets={"dir": str(folder), "watch_interval": 0.2}) as proxy:
        pg_server.psql(f"ALTER ROLE {USER} PASSWORD 'live-pw-2'")
        kubelet_write(folder, {USER: "live-pw-2"})
        wait_reloaded(proxy, 2)  # one line per worker
        for _ in range(6):  # whichever worker the kernel hands the connection to
            with connect(proxy, "live-pw-2") as client:
                assert current_user(client) == USER
        log = proxy.log()
    assert "live-pw-" not in log
