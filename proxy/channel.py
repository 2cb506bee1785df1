"""The internal channel between processes: one unix socket per worker, one message format for cancel, kill and stats.

A message is one JSON object ({"kind": "cancel" | "kill" | "stats", ...}) behind a 4-byte big-endian length; every
request gets exactly one answer in the same form, then the connection closes. Messages may hold secrets (a cancel
key): they are never logged, and the sockets live in the supervisor's private run folder.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HEADER = struct.Struct("!I")
MAX_MESSAGE = 64 * 1024 * 1024  # a stats snapshot of many pools is the largest message
REQUEST_TIMEOUT = 10.0  # seconds a peer has to send its whole request

Message = dict[str, Any]
Handler = Callable[[Message], Awaitable[Message]]


class ChannelError(Exception):
    """The peer did not answer, or answered something that is not a message."""


def encode(message: Message) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def _decode(body: bytes) -> Message:
    message = json.loads(body)
    if not isinstance(message, dict):
        raise ValueError("a message is a JSON object")
    return message


def _length(header: bytes) -> int:
    size = int(HEADER.unpack(header)[0])
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is too large")
    return size


async def _read(reader: asyncio.StreamReader) -> Message:
    size = _length(await reader.readexactly(HEADER.size))
    return _decode(await reader.readexactly(size))


async def ask(path: Path, message: Message, timeout: float) -> Message:
    """Send one message to the process listening at `path` and return its answer (ChannelError if none)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(encode(message))
                return await _read(reader)
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
        raise ChannelError(str(exc) or type(exc).__name__) from None


def ask_blocking(path: Path, message: Message, timeout: float) -> Message:
    """`ask` for a thread without an event loop (the supervisor's metrics endpoint)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(encode(message))
            with sock.makefile("rb") as stream:
                header = stream.read(HEADER.size)
                if len(header) < HEADER.size:
                    raise ValueError("no answer")
                size = _length(header)
                body = stream.read(size)
                if len(body) < size:
                    raise ValueError("answer cut short")
        return _decode(body)
    except (OSError, ValueError) as exc:
        raise ChannelError(str(exc) or type(exc).__name__) from None


async def serve(path: Path, handlers: Mapping[str, Handler]) -> asyncio.Server:
    """Answer each message at `path` with the handler of its kind."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            message = await asyncio.wait_for(_read(reader), REQUEST_TIMEOUT)
            handler = handlers.get(str(message.get("kind")))
            if handler is None:
                answer: Message = {"error": "unknown", "message": "unknown message kind"}
            else:
                answer = await handler(message)
            writer.write(encode(answer))
            await writer.drain()
        except (OSError, TimeoutError, ValueError, KeyError, TypeError, asyncio.IncompleteReadError) as exc:
            log.warning("internal channel: a message could not be read or answered (%s)", type(exc).__name__)
        finally:
            writer.close()

    return await asyncio.start_unix_server(on_connection, str(path))
