"""Which address answers for which proxy of the fleet: the configured peers resolved (a name with several addresses,
such as a Kubernetes headless Service, gives each of them) and asked for their proxy ids, again every
discovery_interval and at once when a forward names an id not known."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

from proxy.config import FleetSettings

log = logging.getLogger(__name__)

Address = tuple[str, int]
Hello = Callable[[Address], Awaitable[int | None]]  # the proxy id answering at an address (None: no answer)


def split_address(peer: str) -> Address:
    """("host", port) from "host:port" or "[v6]:port"."""
    host, _, port = peer.rpartition(":")
    return host.strip("[]"), int(port)


class Peers:
    """The fleet as this proxy knows it: proxy id -> address of its fleet listener."""

    def __init__(self, settings: FleetSettings, own_id: int, hello: Hello) -> None:
        self.settings = settings
        self.own_id = own_id
        self.hello = hello
        self.addresses: dict[int, Address] = {}
        self._refresh: asyncio.Task[None] | None = None
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.settings.peers:
            self._loop = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        for task in (self._loop, self._refresh):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def address(self, proxy_id: int) -> Address | None:
        """Where proxy `proxy_id` listens; the peers are asked again first when it is not known."""
        if proxy_id not in self.addresses:
            await self.refresh()
        return self.addresses.get(proxy_id)

    def forget(self, proxy_id: int) -> None:
        """The peer did not answer there: ask again before the next forward to it."""
        self.addresses.pop(proxy_id, None)

    async def refresh(self) -> None:
        """Resolve and ask the peers now (one round at a time: callers meanwhile wait for the running one)."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._discover())
        await asyncio.shield(self._refresh)

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("fleet: peer discovery failed")
            await asyncio.sleep(self.settings.discovery_interval)

    async def _resolve(self) -> list[Address]:
        loop = asyncio.get_running_loop()
        found: list[Address] = []
        for peer in self.settings.peers:
            host, port = split_address(peer)
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("fleet: peer %s does not resolve: %s", peer, exc)
                continue
            for info in infos:
                address = (str(info[4][0]), int(info[4][1]))
                if address not in found:
                    found.append(address)
        return found

    async def _discover(self) -> None:
        addresses = await self._resolve()
        answers = await asyncio.gather(*(self.hello(address) for address in addresses))
        known: dict[int, Address] = {}
        for address, proxy_id in zip(addresses, answers, strict=True):
            if proxy_id is None or proxy_id == self.own_id:
                if proxy_id == self.own_id and address[1] != self.settings.port:
                    log.error("fleet: %s:%d answers with this proxy's id %d", *address, proxy_id)
                continue
            if proxy_id in known:
                log.error("fleet: proxy id %d answers at %s:%d and at %s:%d; the first is used", proxy_id,
                          *known[proxy_id], *address)
                continue
            known[proxy_id] = address
        if known != self.addresses:
            log.info("fleet: peers %s", ", ".join(f"{proxy_id}={host}:{port}"
                                                  for proxy_id, (host, port) in sorted(known.items())) or "none")
        self.addresses = known
