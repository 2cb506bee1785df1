"""Audit events: one JSON object per line for every login outcome, appended to [auth] audit_file."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from proxy.errors import ConfigError

log = logging.getLogger(__name__)

AUTH_SUCCESS = "auth_success"
AUTH_FAILURE = "auth_failure"
AUTH_THROTTLED = "auth_throttled"
CONNECTION_REFUSED_NETWORK = "connection_refused_network"


class AuditLog:
    """The audit file, opened once for appending, line-buffered (one write per event: short, never a long stall of
    the event loop); `reopen` (at a reload) lets logrotate move it away. Never given a password or a token."""

    def __init__(self, path: Path | None) -> None:
        self.path: Path | None = None
        self._file: TextIO | None = None
        self._broken = False  # a write failed: said once in the log, not per event
        self.reopen(path)

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def reopen(self, path: Path | None) -> None:
        """Close the file and open `path` (None: auditing off); ConfigError if it cannot be opened."""
        new: TextIO | None = None
        if path is not None:
            try:
                new = path.open("a", buffering=1, encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"[auth] audit_file {str(path)!r}: cannot open: {exc.strerror or exc}") from None
        self.close()
        self.path, self._file, self._broken = path, new, False

    def write(self, event: str, *, engine: str, endpoint: str, user: str, database: str, source: str, method: str,
              tls: bool, reason: str = "") -> None:
        """Append one event (the caller checks `enabled` first, so that no dict is made while auditing is off)."""
        file = self._file
        if file is None:
            return
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                  "event": event, "engine": engine, "endpoint": endpoint, "user": user, "database": database,
                  "source": source, "method": method, "tls": tls}
        if reason:
            record["reason"] = reason
        try:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
        except (OSError, ValueError) as exc:
            if not self._broken:
                self._broken = True
                log.error("audit file %s: cannot write: %s; events are lost until a reload reopens it", self.path,
                          exc)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
