"""A closed PostgreSQL client is freed at once (by reference counting), not at the next full garbage collection.

Runs the proxy in this process, with the garbage collector off, so an object kept by a reference cycle stays
visible: after clients that logged in and left, failed their password, left mid-login or left while waiting for a
backend, no PostgresClient may remain. Each such client used to stay in a cycle (its statement book, a cancelled
login or borrow task, the login timeout's inner task) with its transport and buffers until a full collection,
which under a stream of short connections held thousands of them at a time.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable

import uvloop

from devtools.servers import PostgresInstance, free_port
from loadtest.fuzzclient import pg_login
from proxy.auth.scram import MECHANISM, ScramClient
from proxy.config import parse_config
from proxy.protocol.pg import messages as pg
from proxy.secrets import SecretStore
from proxy.server import ProxyServer
from proxy.session.pg_client import PostgresClient

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    return header[:1], await reader.readexactly(int.from_bytes(header[1:], "big") - 4)


async def until(reader: asyncio.StreamReader, kind: bytes) -> None:
    while (await read_message(reader))[0] != kind:
        pass


async def logged_in(port: int) -> Streams:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await pg_login(reader, writer)
    return reader, writer


async def query_and_leave(port: int) -> None:
    reader, writer = await logged_in(port)
    writer.write(pg.query("SELECT 1"))
    await until(reader, b"Z")
    writer.write(pg.message(b"X"))
    writer.close()


async def wrong_password(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(pg.startup_message({"user": "app", "database": "app"}))
    await read_message(reader)
    scram = ScramClient(b"not-the-password")
    writer.write(pg.sasl_initial_response(MECHANISM, scram.client_first()))
    _, body = await read_message(reader)
    writer.write(pg.password_message(scram.client_final(body[4:])))
    assert (await read_message(reader))[0] == b"E"
    writer.close()


async def leave_mid_login(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(pg.startup_message({"user": "app", "database": "app"}))
    await read_message(reader)  # the SASL challenge: the login task now waits for the client
    writer.transport.abort()


async def leave_while_waiting(port: int) -> None:
    """With the only backend held in a transaction, a client's query waits for a backend; the client leaves."""
    _, writer = await logged_in(port)
    writer.write(pg.query("SELECT 1"))
    await asyncio.sleep(0.2)
    writer.transport.abort()


async def run(port: int, server: ProxyServer) -> int:
    holder_reader, holder_writer = await logged_in(port)
    cases: list[Callable[[], Awaitable[None]]] = [
        lambda: query_and_leave(port), lambda: wrong_password(port), lambda: leave_mid_login(port)]
    for _ in range(5):
        for case in cases:
            await case()
    holder_writer.write(pg.query("BEGIN"))
    await until(holder_reader, b"Z")
    await asyncio.gather(*(leave_while_waiting(port) for _ in range(3)))
    holder_writer.write(pg.query("COMMIT"))
    await until(holder_reader, b"Z")
    holder_writer.write(pg.message(b"X"))
    holder_writer.close()
    # One client stays: after two passes of the janitor (each second; it forgets closed clients), the last client
    # its loop looked at is this one, not a closed one.
    _, last_writer = await logged_in(port)
    await asyncio.sleep(2.5)
    left = sum(1 for o in gc.get_objects() if isinstance(o, PostgresClient) and o.closed)
    last_writer.close()
    await server.stop()
    return left


def test_closed_clients_are_freed_without_a_garbage_collection(pg_server: PostgresInstance) -> None:
    config = parse_config({"server": {"client_login_timeout": 3.0, "workers": 1},
                           "postgresql": {"port": free_port(), "backend_port": pg_server.port,
                                          "pool": {"max_connections": 1, "connection_borrow_timeout": 30.0}},
                           "mysql": {"enabled": False}})

    async def main() -> int:
        server = ProxyServer(config, SecretStore({"app": "app-secret"}))
        await server.start()
        return await run(server.ports["postgresql"], server)

    gc.collect()
    gc.disable()
    try:
        left = uvloop.run(main())
    finally:
        gc.enable()
    assert left == 0, f"{left} closed PostgresClient objects still in memory (held by reference cycles)"
