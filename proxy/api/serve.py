"""Serving the API and health apps: on the process's event loop, or (the supervisor, whose main thread only waits
for its workers) on an event loop of their own in a thread."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from aiohttp import web

from proxy.api.app import api_app, health_app
from proxy.api.context import ApiContext
from proxy.api.token import read_token
from proxy.config import ApiSettings

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


class ApiThread:
    """The supervisor's API: an event loop of its own in a thread. `make_context` is called in that loop."""

    def __init__(self, settings: ApiSettings, make_context: Callable[[], ApiContext]) -> None:
        self.settings = settings
        self._make_context = make_context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="dbproxy-api", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._server: ApiServer | None = None
        self.ports: dict[str, int] = {}

    def start(self) -> dict[str, int]:
        """Listen in the thread; raises what stopped it (OSError, ConfigError)."""
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self.ports

    async def _start(self) -> None:
        self._server = ApiServer(self._make_context(), self.settings)
        self.ports = await self._server.start()

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            if self._server is not None:
                loop.run_until_complete(self._server.stop())
            loop.close()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
