"""A service with an event loop of its own in a thread (the supervisor's main thread only waits for its workers):
started, it raises what stopped it from starting; stopped, its loop runs its own clean-up first."""

from __future__ import annotations

import asyncio
import threading


class LoopThread:
    """Subclasses give `_begin` (run in the thread's loop before start() returns) and `_end` (at stop)."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    async def _begin(self) -> None:
        raise NotImplementedError

    async def _end(self) -> None:
        return None

    def start_thread(self) -> None:
        """Run `_begin` in the thread; raises what it raised."""
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._begin())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._end())
            loop.close()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
