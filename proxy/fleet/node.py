"""This proxy's place in a fleet: the listener its peers forward cancels and KILLs to, and the forwards it sends to
the peer owning a client (signed, bounded in time; an unknown or dead peer's forward is dropped with a log line)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from proxy.config import FleetSettings
from proxy.fleet.peers import Address, Peers
from proxy.fleet.wire import Message, Refused, Verifier, encode, load_key, read_message, sign

log = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[Message]]  # applies a peer's forward here, as if it had come in here
FORWARDED_KINDS = ("cancel", "kill")


class ForwardFailed(Exception):
    """The peer could not be reached, did not answer in time, or answered something unsigned."""


class Fleet:
    """The fleet listener and the forwards to peers, for one process (each worker has its own)."""

    def __init__(self, settings: FleetSettings, default_host: str) -> None:
        self.settings = settings
        self.proxy_id = settings.proxy_id
        self.host = settings.host or default_host
        self._key = load_key(settings.key_file)
        self.verifier = Verifier(self._key, settings.max_clock_skew)
        self.peers = Peers(settings, self.proxy_id, self._hello)
        self.handlers: Mapping[str, Handler] = {}  # "cancel" and "kill" (set by the server)
        self.server: asyncio.Server | None = None

    def __repr__(self) -> str:
        return f"Fleet(proxy_id={self.proxy_id}, port={self.settings.port})"

    async def start(self, listen: bool) -> None:
        """Start discovering the peers; with `listen`, listen for them too (one process of the proxy does: the
        nonces it has seen, against replays, live in that process; it passes forwards on to the owning worker)."""
        if listen:
            self.server = await asyncio.start_server(self._serve, self.host, self.settings.port)
            log.info("fleet: proxy %d listening for peers on %s:%d", self.proxy_id, self.host, self.settings.port)
        self.peers.start()

    async def stop(self) -> None:
        await self.peers.stop()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    # --- sending ---

    async def forward(self, proxy_id: int, body: Message, what: str) -> Message | None:
        """Pass `body` (what: how the log names it) to proxy `proxy_id`, which applies it as its own; its answer,
        or None (logged) when no peer took it."""
        try:
            async with asyncio.timeout(self.settings.forward_timeout):
                address = await self.peers.address(proxy_id)
                if address is None:
                    log.warning("fleet: %s for proxy %d dropped: no such peer known", what, proxy_id)
                    return None
                answer = await self._ask(address, {**body, "to": proxy_id})
        except (ForwardFailed, TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
            log.warning("fleet: %s for proxy %d dropped: %s", what, proxy_id, exc or type(exc).__name__)
            self.peers.forget(proxy_id)
            return None
        log.info("fleet: %s passed to proxy %d at %s:%d", what, proxy_id, *address)
        return answer

    async def _ask(self, address: Address, body: Message) -> Message:
        reader, writer = await asyncio.open_connection(*address)
        try:
            request = sign(self._key, body, time.time())
            writer.write(encode(request))
            answer = await read_message(reader)
        finally:
            writer.close()
        if "mac" not in answer:
            raise ForwardFailed(f"the peer at {address[0]}:{address[1]} refused it ({answer.get('error')})")
        try:
            return self.verifier.verify(answer, time.time(), reply_to=request["nonce"])
        except Refused as exc:
            raise ForwardFailed(f"the answer from {address[0]}:{address[1]} was refused: {exc}") from None

    async def _hello(self, address: Address) -> int | None:
        try:
            async with asyncio.timeout(self.settings.forward_timeout):
                answer = await self._ask(address, {"kind": "hello"})
            return int(answer["proxy_id"])
        except (ForwardFailed, TimeoutError, OSError, ValueError, KeyError, TypeError,
                asyncio.IncompleteReadError) as exc:
            log.info("fleet: no proxy id from %s:%d: %s", *address, exc or type(exc).__name__)
            return None

    # --- receiving ---

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        try:
            message = await asyncio.wait_for(read_message(reader), self.settings.forward_timeout)
            try:
                body = self.verifier.verify(message, time.time())
            except Refused as exc:
                log.warning("fleet: refused a message from %s: %s", where, exc)
                answer: Message = {"error": "refused"}
            else:
                answer = sign(self._key, await self._apply(body, where), time.time(), reply_to=message["nonce"])
            writer.write(encode(answer))
            await writer.drain()
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
            log.warning("fleet: a message from %s could not be read or answered (%s)", where, type(exc).__name__)
        finally:
            writer.close()

    async def _apply(self, body: Message, where: str) -> Message:
        kind = body.get("kind")
        if kind == "hello":
            return {"proxy_id": self.proxy_id}
        if body.get("to") != self.proxy_id:
            log.warning("fleet: a %s for proxy %s from %s reached proxy %d; dropped", kind, body.get("to"), where,
                        self.proxy_id)
            return {"error": "not_here", "proxy_id": self.proxy_id}
        handler = self.handlers.get(str(kind)) if kind in FORWARDED_KINDS else None
        if handler is None:
            return {"error": "unknown", "message": "unknown message kind"}
        try:
            return await handler(body)
        except (KeyError, TypeError, ValueError):
            return {"error": "unknown", "message": f"malformed {kind}"}
