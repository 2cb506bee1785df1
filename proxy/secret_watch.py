"""Live pickup of changed secrets: the sources' fingerprint is checked every watch_interval seconds and a changed
one loads a new SecretStore, handed over for new logins (connected clients and backends carry on)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from proxy.config import SecretsSettings
from proxy.errors import ConfigError
from proxy.secret_sources import fingerprint
from proxy.secrets import SecretStore

log = logging.getLogger(__name__)


class SecretsWatch:
    """Polls the secrets' sources of `settings()`; `use` receives each store that loads after a change."""

    def __init__(self, settings: Callable[[], SecretsSettings], use: Callable[[SecretStore], None],
                 seen: tuple[object, ...]) -> None:
        self.settings = settings
        self.use = use
        self.seen = seen  # the fingerprint taken before the running store was read
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def loaded(self, seen: tuple[object, ...]) -> None:
        """A store was loaded elsewhere (a reload) after the sources showed `seen`: changes count from there."""
        self.seen = seen

    def check(self) -> bool:
        """Load the secrets if their sources changed since last seen; whether a new store was handed over."""
        settings = self.settings()
        now = fingerprint(settings)
        if now == self.seen:
            return False
        self.seen = now
        try:
            store = SecretStore.from_settings(settings, quiet=True)
        except ConfigError as exc:
            log.error("secrets changed but cannot be loaded; the previous ones stay in use: %s", exc)
            return False
        self.use(store)
        log.info("secrets reloaded (%d users)", len(store.users))
        return True

    async def _run(self) -> None:
        while True:
            interval = self.settings().watch_interval
            await asyncio.sleep(interval if interval > 0 else 5.0)
            if interval <= 0:
                continue
            try:
                self.check()
            except Exception:
                log.exception("secrets check failed")
