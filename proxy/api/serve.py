"""Serving the API and health apps: on the process's event loop, or (the supervisor, whose main thread only waits
for its workers) on an event loop of their own in a thread."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.api.context import ApiContext
from proxy.api.token import read_token
from proxy.config import ApiSettings
from proxy.loop_thread import LoopThread

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)


class ApiServer:
    """The API port (bearer token) and the health port, as [api] asks; `ports` once listening."""

    def __init__(self, context: ApiContext, settings: ApiSettings) -> None:
        self.context = context
        self.settings = settings
        self.runners: list[web.AppRunner] = []
        self.ports: dict[str, int] = {}

    @property
    def wanted(self) -> bool:
        return self.settings.port >= 0 or self.settings.health_port >= 0

    async def start(self) -> dict[str, int]:
        """Listen; OSError (a port taken) or ConfigError (the token file) if it cannot."""
        from proxy.api.app import api_app, health_app  # (aiohttp: imported only by a process that serves it)

        settings = self.settings
        try:
            if settings.port >= 0:
                self.ports["api"] = await self._serve(api_app(self.context, read_token(settings)), settings.port)
                log.info("control API on http://%s:%d/v1", settings.host, self.ports["api"])
            if settings.health_port >= 0:
                self.ports["health"] = await self._serve(health_app(self.context), settings.health_port)
                log.info("health endpoints on http://%s:%d/healthz, /readyz, /metrics", settings.host,
                         self.ports["health"])
        except BaseException:
            await self.stop()
            raise
        self.context.ports.update(self.ports)
        return dict(self.ports)

    async def _serve(self, app: web.Application, port: int) -> int:
        from aiohttp import web

        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self.runners.append(runner)
        site = web.TCPSite(runner, self.settings.host, port, reuse_address=True)
        await site.start()
        return int(runner.addresses[-1][1])

    async def stop(self) -> None:
        runners, self.runners = self.runners, []
        for runner in runners:
            await runner.cleanup()


class ApiThread(LoopThread):
    """The supervisor's API: an event loop of its own in a thread. `make_context` is called in that loop."""

    def __init__(self, settings: ApiSettings, make_context: Callable[[], ApiContext]) -> None:
        super().__init__("dbproxy-api")
        self.settings = settings
        self._make_context = make_context
        self._server: ApiServer | None = None
        self.ports: dict[str, int] = {}

    def start(self) -> dict[str, int]:
        """Listen in the thread; raises what stopped it (OSError, ConfigError)."""
        self.start_thread()
        return self.ports

    async def _begin(self) -> None:
        self._server = ApiServer(self._make_context(), self.settings)
        self.ports = await self._server.start()

    async def _end(self) -> None:
        if self._server is not None:
            await self._server.stop()

    def stop(self) -> None:
        super().stop()
        if self._error is not None:
            raise self._error
