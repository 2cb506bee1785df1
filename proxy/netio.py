"""A socket as an asyncio Protocol with two modes: awaited whole messages for setup, raw forwarding after."""

from __future__ import annotations

import asyncio
import ssl
from typing import cast

from proxy.errors import BackendUnavailable, ProtocolViolation

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
SHRINK_AFTER = 1 << 20  # reads at least this large replace the buffer rather than trimming it in place


class ConnectionClosed(Exception):
    """The peer closed the connection (or it broke) while a message was awaited."""


class Connection(asyncio.Protocol):
    """Setup phases await messages through `read_*`; hot-path subclasses take over `data_received`."""

    transport: asyncio.Transport

    def __init__(self, max_message: int = 1 << 30) -> None:
        self.loop = asyncio.get_running_loop()
        self.max_message = max_message
        self.closed = False
        self.peer_paused_us = False  # our reading is paused because the peer's write buffer is full
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        # why the connection closed, as text: the exception itself would hold its traceback's frames (and through
        # them this connection) in a reference cycle that only a full garbage collection frees
        self._close_reason = "connection closed"
        self.buffer_limit = 0  # when set: reading pauses while more than this is buffered and nothing awaits it
        self._reading_paused = False

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self.buffer_limit and len(self._buffer) > self.buffer_limit and not self._reading_paused:
            self._reading_paused = True  # a peer sending ahead of the exchange waits (the socket holds its bytes)
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None:
            self._close_reason = str(exc)
        self._wake()
        self.on_closed(exc)

    def on_closed(self, exc: Exception | None) -> None:
        """Hook for subclasses: the socket is gone."""

    # --- backpressure between linked connections ---

    def linked_peer(self) -> Connection | None:
        """The connection whose bytes we write (a client's backend, a backend's client), if any."""
        return None

    def pause_writing(self) -> None:
        """Our write buffer is full: stop reading from the peer that fills it."""
        peer = self.linked_peer()
        if peer is not None and not peer.closed:
            peer.peer_paused_us = True
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.linked_peer()
        if peer is not None and peer.peer_paused_us:
            peer.peer_paused_us = False
            peer.transport.resume_reading()

    # --- awaited reads (setup, internal queries) ---

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _resume_buffering(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if not self.closed:
                self.transport.resume_reading()

    async def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            if self.closed:
                raise ConnectionClosed(self._close_reason)
            self._resume_buffering()
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def read_exact(self, size: int) -> bytes:
        await self._fill(size)
        buffer = self._buffer
        if size == len(buffer):  # the usual case: take the whole buffer, no copy, nothing large left behind
            self._buffer = bytearray()
            return bytes(buffer)
        data = bytes(buffer[:size])
        if size >= SHRINK_AFTER:  # a bytearray keeps its allocation after `del`: copy the rest instead
            self._buffer = buffer[size:]
        else:
            del buffer[:size]
        return data

    async def read_untyped(self) -> bytes:
        """A length-prefixed packet with no type byte (PostgreSQL startup packets); returns the body."""
        await self._fill(4)
        length = int.from_bytes(self._buffer[:4], "big")
        if length < 8 or length > 10_000:
            raise ProtocolViolation(f"invalid startup packet length {length}")
        return (await self.read_exact(length))[4:]

    async def read_typed(self, limit: int = 0) -> tuple[int, bytes]:
        """A PostgreSQL typed message: (type byte, body); a length over `limit` (default max_message) is refused
        at the header, before any of the body is read."""
        await self._fill(5)
        kind = self._buffer[0]
        length = int.from_bytes(self._buffer[1:5], "big")
        if length < 4 or length > (limit or self.max_message):
            raise ProtocolViolation(f"invalid message length {length} for message type {chr(kind)!r}")
        data = await self.read_exact(length + 1)
        return kind, data[5:]

    def take_buffered(self) -> bytes:
        """Hand over whatever arrived but was not read yet (at the switch to forwarding)."""
        data = bytes(self._buffer)
        self._buffer = bytearray()
        self._resume_buffering()
        return data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # --- writing, TLS, closing ---

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    async def start_tls(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        if self._buffer:
            raise ProtocolViolation("unencrypted data received after the TLS request")
        transport = await self.upgrade(context, server_side=server_side, server_hostname=server_hostname)
        if transport is None:
            raise BackendUnavailable("TLS handshake did not complete")
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    async def upgrade(self, context: ssl.SSLContext, *, server_side: bool,
                      server_hostname: str | None = None) -> asyncio.BaseTransport | None:
        """The event loop's start_tls, unless the socket is already closing. Started on a closing socket, the
        TLS protocol would be set up after the socket's end was reported, so nothing would ever stop its
        handshake timer: it and its buffers (about 300 kB) would stay for the loop's 60 s handshake timeout."""
        if self.closed or self.transport.is_closing():
            raise ConnectionClosed(self._close_reason)
        return await self.loop.start_tls(self.transport, self, context, server_side=server_side,
                                         server_hostname=server_hostname)

    @property
    def is_tls(self) -> bool:
        return self.transport.get_extra_info("sslcontext") is not None

    def close(self) -> None:
        if not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if not self.closed:
            self.transport.abort()
