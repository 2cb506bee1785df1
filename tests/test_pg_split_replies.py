"""A server whose replies reach the proxy a byte at a time: every client still gets exactly the server's answers."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import errors

from devtools.servers import PostgresInstance, free_port
from support import ProxyProcess, running_proxy

DRIP_PAUSE = 0.0002  # seconds between the bytes: enough for the proxy to read each one on its own


class DrippingRelay:
    """A TCP relay in front of PostgreSQL: the proxy's bytes pass as they come, the server's go one per send."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                proxy_side, _ = self._listener.accept()
            except OSError:
                return
            server_side = socket.create_connection(("127.0.0.1", self.backend_port))
            for sock in (proxy_side, server_side):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.append(sock)
            threading.Thread(target=self._pass, args=(proxy_side, server_side, False), daemon=True).start()
            threading.Thread(target=self._pass, args=(server_side, proxy_side, True), daemon=True).start()

    def _pass(self, source: socket.socket, sink: socket.socket, drip: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not drip:
                    sink.sendall(data)
                    continue
                for i in range(len(data)):
                    sink.sendall(data[i : i + 1])
                    time.sleep(DRIP_PAUSE)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture(scope="module")
def drip_proxy(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance) -> Iterator[ProxyProcess]:
    pg_server.psql("CREATE TABLE IF NOT EXISTS drip_t (id serial PRIMARY KEY, who int NOT NULL)", user="app",
                   db="app")
    relay = DrippingRelay(pg_server.port)
    try:
        with running_proxy(Path(tmp_path_factory.mktemp("drip")), pg_server,
                           postgresql={"backend_port": relay.port},
                           postgresql__pool={"max_connections": 1}) as proxy:
            yield proxy
    finally:
        relay.close()


def connect(proxy: ProxyProcess) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                           dbname="app", sslmode="disable", autocommit=True)


def test_proxy_discard_sequences_reply_never_reaches_the_client(drip_proxy: ProxyProcess) -> None:
    """One backend, two clients: before the second client's lastval() the proxy sends DISCARD SEQUENCES and drops
    its reply, which arrives in many reads; the client sees only its own answer (not yet defined)."""
    with connect(drip_proxy) as writer, connect(drip_proxy) as reader:
        for _ in range(3):
            writer.execute("INSERT INTO drip_t (who) VALUES (1)")
            with pytest.raises(errors.ObjectNotInPrerequisiteState):
                reader.execute("SELECT lastval()")
            row = reader.execute("SELECT 41 + 1").fetchone()
            assert row == (42,)


def test_copy_in_and_out(drip_proxy: ProxyProcess) -> None:
    with connect(drip_proxy) as conn:
        with conn.cursor().copy("COPY drip_t (id, who) FROM STDIN") as copy:
            copy.write_row((1000, 7))
            copy.write_row((1001, 7))
        out = bytearray()
        with conn.cursor().copy("COPY (SELECT id FROM drip_t WHERE who = 7 ORDER BY id) TO STDOUT") as copy:
            for data in copy:
                out += data
        assert out == b"1000\n1001\n"
        with pytest.raises(errors.UniqueViolation), conn.cursor().copy("COPY drip_t (id, who) FROM STDIN") as copy:
            copy.write_row((1000, 8))
        assert conn.execute("SELECT count(*) FROM drip_t WHERE who = 8").fetchone() == (0,)


async def test_shared_statements_errors_and_copy(drip_proxy: ProxyProcess) -> None:
    """Prepared statements shared by two clients (the proxy's own Close/Parse/Describe replies dropped), an
    error in the middle of a pipeline and the client's own notification: all as the server gave them."""
    port = drip_proxy.ports["postgresql"]
    first = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret", database="app",
                                  ssl=False)
    second = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                   database="app", ssl=False)
    try:
        for conn in (first, second, first):
            assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
            assert await conn.fetch("SELECT g FROM generate_series(1, 3) g WHERE g > $1", 1) == [(2,), (3,)]
        with pytest.raises(asyncpg.DivisionByZeroError):
            await first.executemany("INSERT INTO drip_t (who) VALUES (10 / $1)", [(1,), (0,), (2,)])
        assert await second.fetchval("SELECT count(*) FROM drip_t WHERE who = 5") == 0
        received: list[tuple[int, str]] = []
        await first.add_listener("drip", lambda _conn, pid, _channel, payload: received.append((pid, payload)))
        await first.execute("NOTIFY drip, 'hello'")  # (LISTEN keeps the one backend for this client)
        await first.execute("SELECT 1")
        assert received == [(first.get_server_pid(), "hello")]
    finally:
        await first.close()
        await second.close()
