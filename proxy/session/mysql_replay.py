"""What a client sent in its current transaction and what it was answered, kept to replay it after a failover."""

from __future__ import annotations

import hashlib

# Replies of one transaction hashed at most, per byte of `limit`: past that, hashing a bulk read would cost more
# than replaying it could save (the transaction is then not replayable).
REPLY_FACTOR = 16


class ReplayLog:
    """The client's messages of the transaction in progress (up to `limit` bytes) and a running SHA-256 and byte
    count of the replies forwarded to it (hashed up to REPLY_FACTOR * `limit` bytes); a replay on another server
    compares its replies with these."""

    __slots__ = ("_hash", "last", "limit", "messages", "replayable", "reply_limit", "sent_bytes", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reply_limit = limit * REPLY_FACTOR
        self.messages: list[bytes] = []
        self.last = b""  # the last message recorded (kept when the transaction is too large to replay)
        self.size = 0
        self.replayable = True
        self.sent_bytes = 0
        self._hash = hashlib.sha256()

    def record(self, data: bytes) -> None:
        """A client message of the current transaction; past `limit` bytes the transaction cannot be replayed."""
        self.last = data
        if not self.replayable:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.replayable = False
            self.messages.clear()
            return
        self.messages.append(data)

    def sent(self, data: bytes) -> None:
        """Reply bytes forwarded to the client."""
        self.sent_bytes += len(data)
        if self.replayable:  # (never compared otherwise)
            if self.sent_bytes > self.reply_limit:
                self.replayable = False
                self.messages.clear()
                return
            self._hash.update(data)

    def sent_digest(self) -> bytes:
        return self._hash.digest()

    def reset(self) -> None:
        """The transaction ended: nothing of it needs replaying."""
        self.messages = []
        self.last = b""
        self.size = 0
        self.replayable = True
        self.sent_bytes = 0
        self._hash = hashlib.sha256()

    @property
    def empty(self) -> bool:
        return not self.messages and not self.sent_bytes and self.replayable


class ReplayCheck:
    """Replies of a replay, checked against what the client already received: the first `expected_bytes` must hash
    to `expected_digest`; what comes after is new to the client (`feed` returns it)."""

    __slots__ = ("_hash", "expected_bytes", "expected_digest", "seen", "verdict")

    def __init__(self, expected_bytes: int, expected_digest: bytes) -> None:
        self.expected_bytes = expected_bytes
        self.expected_digest = expected_digest
        self.seen = 0
        self._hash = hashlib.sha256()
        self.verdict: bool | None = None  # None: not decided yet; True: the same replies; False: they differ
        if expected_bytes == 0:
            self.verdict = expected_digest == self._hash.digest()

    def feed(self, data: bytes) -> bytes:
        """Replay reply bytes in; the part the client has not seen yet once the replies so far proved identical."""
        if self.verdict is not None:
            return data if self.verdict else b""
        need = self.expected_bytes - self.seen
        head = data if len(data) <= need else data[:need]
        self._hash.update(head)
        self.seen += len(head)
        if self.seen < self.expected_bytes:
            return b""
        self.verdict = self._hash.digest() == self.expected_digest
        return data[need:] if self.verdict else b""
