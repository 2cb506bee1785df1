"""Memory under bad pre-login MySQL connections: a failed login must free the client (and its TLS state) at once."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

from devtools.servers import MariaDBInstance
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import frame
from support import ProxyProcess, running_proxy

MB = 1 << 20
SSL_REQUEST = frame((my.CLIENT_SSL | my.CLIENT_PROTOCOL_41).to_bytes(4, "little") + b"\0" * 28, 1)
KINDS = ("ssl_then_plain", "ssl_then_plain_later", "ssl_then_plain_leaves", "garbage", "claims_16mb", "bad_login",
         "leaves")
CONCURRENCY = 20


async def bad_connection(port: int, kind: str, rng: random.Random) -> None:
    """One connection that fails before logging in, in the way `kind` says; reads the answer briefly, leaves."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        header = await asyncio.wait_for(reader.readexactly(4), 5)
        await asyncio.wait_for(reader.readexactly(int.from_bytes(header[:3], "little")), 5)  # the greeting
        if kind in ("ssl_then_plain", "ssl_then_plain_leaves"):  # SSLRequest and non-TLS bytes in one write
            writer.write(SSL_REQUEST + os.urandom(rng.randint(1, 40)))  # (the early-data path)
            if kind == "ssl_then_plain_leaves":  # and gone before the proxy starts TLS
                return
        elif kind == "ssl_then_plain_later":
            writer.write(SSL_REQUEST)
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(os.urandom(rng.randint(1, 40)))
        elif kind == "garbage":
            writer.write(os.urandom(rng.randint(1, 200)))
        elif kind == "claims_16mb":
            writer.write(b"\xff\xff\xff\x01" + os.urandom(4096))
        elif kind == "bad_login":
            writer.write(frame(os.urandom(rng.randint(1, 120)), 1))
        await writer.drain()
        await asyncio.wait_for(reader.read(65536), 0.5)
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        pass
    finally:
        if rng.random() < 0.5:
            writer.transport.abort()
        else:
            writer.close()


async def bad_connections(port: int, count: int, seed: int) -> None:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(index: int) -> None:
        async with gate:
            await bad_connection(port, KINDS[index % len(KINDS)], rng)

    await asyncio.gather(*(one(index) for index in range(count)))


def settled_rss(proxy: ProxyProcess) -> int:
    time.sleep(1.0)  # the proxy finishes its side of the last connections
    return proxy.rss()


def test_failed_logins_do_not_grow_memory(tmp_path: Path, mariadb_server: MariaDBInstance) -> None:
    """Thousands of connections failing before login (TLS requested then plain bytes, garbage, a login packet
    claiming 16 MB, malformed logins, clients leaving) leave RSS flat after a warm-up. Each used to stay in a
    reference cycle with its failed TLS state (about 50 kB of OpenSSL memory) until a rare full collection; and a
    client gone before TLS started left the TLS protocol (with its 256 kB read buffer) to the event loop's 60 s
    handshake timer."""
    with running_proxy(tmp_path, mariadb=mariadb_server) as proxy:
        port = proxy.ports["mysql"]
        started = time.monotonic()
        asyncio.run(asyncio.wait_for(bad_connections(port, 600, 1), 60))
        warm = settled_rss(proxy)
        asyncio.run(asyncio.wait_for(bad_connections(port, 3000, 2), 90))
        after = settled_rss(proxy)
        elapsed = time.monotonic() - started
        assert proxy.alive
        assert after - warm < 8 * MB, (f"RSS grew {(after - warm) / MB:.1f} MiB over 3000 failed logins "
                                       f"({warm / MB:.1f} -> {after / MB:.1f} MiB, {elapsed:.0f} s)")
        assert "login failed unexpectedly" not in proxy.log()
