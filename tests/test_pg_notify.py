"""LISTEN/NOTIFY through the proxy: every notification reaches its listener, with the process id it can compare."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest

from devtools.servers import PostgresInstance
from support import ProxyProcess, running_proxy


def connect(proxy: ProxyProcess) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                           dbname="app", sslmode="disable", autocommit=True)


@pytest.fixture(scope="module")
def notify_proxy(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance) -> Iterator[ProxyProcess]:
    with running_proxy(tmp_path_factory.mktemp("notify"), pg_server,
                       postgresql__pool={"max_connections": 3}) as proxy:
        yield proxy


class BusyClients:
    """Clients that keep the pool's backends changing hands while a test runs."""

    def __init__(self, proxy: ProxyProcess, count: int = 3) -> None:
        self.proxy = proxy
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]

    def _run(self) -> None:
        with connect(self.proxy) as conn:
            while not self.stop.is_set():
                conn.execute("SELECT pg_sleep(0.002)")

    def __enter__(self) -> BusyClients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def _drain(conn: psycopg.Connection, wanted: int, timeout: float = 3.0) -> list[psycopg.Notify]:
    got: list[psycopg.Notify] = []
    deadline = time.monotonic() + timeout
    while len(got) < wanted and time.monotonic() < deadline:
        got.extend(conn.notifies(timeout=max(0.01, deadline - time.monotonic()), stop_after=wanted - len(got)))
    return got


def test_notify_right_after_listen_is_delivered(notify_proxy: ProxyProcess) -> None:
    """The repro: B notifies as soon as A's LISTEN returns; 10 of 10 arrive while others keep the pool busy."""
    delivered = 0
    with BusyClients(notify_proxy), connect(notify_proxy) as sender:
        for attempt in range(10):
            with connect(notify_proxy) as listener:
                listener.execute("LISTEN repro_ch")
                sender.execute("SELECT pg_notify('repro_ch', %s)", (str(attempt),))
                got = _drain(listener, 1)
                delivered += sum(1 for n in got if n.payload == str(attempt))
    assert delivered == 10


def test_self_notification_carries_the_client_pid(notify_proxy: ProxyProcess) -> None:
    """A client's own NOTIFY comes back with its BackendKeyData pid; another client's with a different one."""
    with connect(notify_proxy) as listener, connect(notify_proxy) as other:
        listener.execute("LISTEN self_ch")
        listener.execute("NOTIFY self_ch, 'mine'")
        listener.execute("SELECT 1")
        other.execute("NOTIFY self_ch, 'theirs'")
        got = {n.payload: n.pid for n in _drain(listener, 2)}
        assert got["mine"] == listener.info.backend_pid
        assert got["theirs"] != listener.info.backend_pid
        # In one transaction, LISTEN and NOTIFY together: delivered at commit, before ReadyForQuery.
        with listener.transaction():
            listener.execute("LISTEN self_ch2")
            listener.execute("NOTIFY self_ch2, 'commit'")
        (note,) = _drain(listener, 1)
        assert (note.channel, note.payload, note.pid) == ("self_ch2", "commit", listener.info.backend_pid)


def test_notifications_during_the_proxys_read_back(notify_proxy: ProxyProcess) -> None:
    """A pinned listener keeps running statements the proxy reads back after; no notification is lost meanwhile."""
    count = 60
    with connect(notify_proxy) as listener:
        listener.execute("LISTEN readback_ch")
        stop = threading.Event()

        def keep_reading_back() -> None:
            with connect(notify_proxy) as driver:
                driver.execute("SELECT 1")
            while not stop.is_set():
                # set_config is a session word: the proxy reads the session back after each of these
                listener.execute("SELECT set_config('application_name', 'x', false)")

        worker = threading.Thread(target=keep_reading_back, daemon=True)
        with connect(notify_proxy) as sender:
            worker.start()
            for i in range(count):
                sender.execute("SELECT pg_notify('readback_ch', %s)", (str(i),))
                time.sleep(0.002)
            stop.set()
            worker.join(10)
        got = _drain(listener, count, timeout=5.0)
    assert sorted(int(n.payload) for n in got) == list(range(count))


async def test_asyncpg_listener_gets_every_notification(notify_proxy: ProxyProcess) -> None:
    port = notify_proxy.ports["postgresql"]

    async def connect_async() -> asyncpg.Connection:
        return await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                     database="app", ssl=False)

    listener, sender = await connect_async(), await connect_async()
    received: list[tuple[int, str]] = []
    try:
        await listener.add_listener("apg_ch", lambda _c, pid, _ch, payload: received.append((pid, payload)))
        for i in range(10):
            await sender.execute(f"NOTIFY apg_ch, 'n{i}'")
        await listener.execute("NOTIFY apg_ch, 'self'")
        deadline = time.monotonic() + 5
        while len(received) < 11 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        own_pid = listener.get_server_pid()
        assert sorted(p for _, p in received) == sorted([f"n{i}" for i in range(10)] + ["self"])
        assert [pid for pid, p in received if p == "self"] == [own_pid]
        assert all(pid != own_pid for pid, p in received if p != "self")
    finally:
        await listener.close()
        await sender.close()


def test_listening_backend_is_not_reused_after_its_client_leaves(notify_proxy: ProxyProcess) -> None:
    """A client that leaves while listening: its backend must not carry the LISTEN to another client."""
    with connect(notify_proxy) as leaver:
        leaver.execute("LISTEN leftover_ch")
    with connect(notify_proxy) as checker:
        for _ in range(6):  # every backend of the pool comes round
            with checker.transaction():
                rows = checker.execute("SELECT count(*) FROM pg_listening_channels()").fetchall()
                assert rows == [(0,)]
