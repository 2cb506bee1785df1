"""A client's current transaction as sent and as answered, kept so that it can be replayed on another server.

Engine-neutral: the engine decides when a transaction starts and ends and what may be replayed.

`ReplayLog(limit)` keeps, between two `reset()` calls (a transaction's end):
  - `record(data)`: the client's bytes in the order they arrived (the slices in hand are kept, never copied), up to
    `limit` bytes; beyond it recording stops and `replayable` is False until the next `reset()` (`spoil()` says the
    same for another reason); `last` is the latest piece recorded, kept even then;
  - `sent(data)`: every byte given to the client, as a running SHA-256 (`sent_digest()`) and a count
    (`sent_bytes`); hashed up to REPLY_FACTOR x `limit` bytes (past that, hashing a bulk read would cost more than
    a replay could save: the transaction is then not replayable). The replies are hashed lazily: up to
    UNHASHED_LIMIT bytes are kept as given (no copy) and hashed only when a digest is asked for or the limit is
    passed, so a short transaction that ends normally is never hashed at all.
`chunks` are the pieces recorded (an engine that records one command per piece replays them one by one),
`messages` the same joined. `replay_check()` gives a `ReplayCheck` of what was sent so far and starts
the digest again (the replay's replies are what the client is given from then on).

`ReplayCheck(digest, size)` compares the replies of a replay with what the client was given before: `feed(data)`
hashes the first `size` bytes and returns what comes after them; once `done`, `matches` says whether the hashes
agree (the caller passes the returned bytes to the client only then).
"""

from __future__ import annotations

import hashlib

# An empty transaction's digest: a check of zero bytes is done (and matches) at once.
EMPTY_DIGEST = hashlib.sha256().digest()
# Reply bytes of one transaction hashed at most, per byte of `limit`.
REPLY_FACTOR = 16
# Reply bytes kept unhashed (references to what was given, not copies) before they are folded into the digest.
UNHASHED_LIMIT = 64 * 1024


class ReplayLog:
    """The client's messages of the current transaction (at most `limit` bytes) and a digest of its replies."""

    __slots__ = ("_hash", "_unhashed", "_unhashed_bytes", "chunks", "last", "limit", "replayable", "reply_limit",
                 "sent_bytes", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reply_limit = limit * REPLY_FACTOR
        self.chunks: list[bytes] = []
        self.last = b""  # the latest piece recorded (kept when the transaction is too large to replay)
        self.size = 0  # bytes recorded
        self.replayable = True
        self._hash: hashlib._Hash | None = None  # made when the first replies are folded in
        self._unhashed: list[bytes] = []  # replies given and not yet hashed, in order
        self._unhashed_bytes = 0
        self.sent_bytes = 0

    def record(self, data: bytes) -> None:
        """The client sent `data` (kept as is: the caller never changes it afterwards)."""
        self.last = data
        if self.replayable:
            size = self.size + len(data)
            if size > self.limit:
                self.spoil()
                return
            self.chunks.append(data)
            self.size = size

    def spoil(self) -> None:
        """The transaction can no longer be replayed: what was recorded is let go until the next reset()."""
        self.replayable = False
        self.chunks.clear()
        self.size = 0
        self._unhashed.clear()
        self._unhashed_bytes = 0

    def sent(self, data: bytes) -> None:
        """`data` was given to the client (bytes that nobody changes afterwards)."""
        size = len(data)
        self.sent_bytes += size
        if self.replayable:  # (never compared otherwise)
            if self.sent_bytes > self.reply_limit:
                self.spoil()
                return
            self._unhashed.append(data)
            self._unhashed_bytes += size
            if self._unhashed_bytes > UNHASHED_LIMIT:
                self._fold()

    def _fold(self) -> hashlib._Hash:
        """The digest so far, with the replies kept unhashed added to it."""
        digest = self._hash
        if digest is None:
            digest = self._hash = hashlib.sha256()
        for data in self._unhashed:
            digest.update(data)
        self._unhashed.clear()
        self._unhashed_bytes = 0
        return digest

    def reset(self) -> None:
        """The transaction ended: start empty (cheap when nothing was kept)."""
        self.last = b""
        if self.size or self.sent_bytes or not self.replayable:
            self.chunks.clear()
            self.size = 0
            self.replayable = True
            self.restart_sent()

    @property
    def empty(self) -> bool:
        """Nothing recorded, nothing sent, still replayable: a transaction that has not started."""
        return not self.chunks and not self.sent_bytes and self.replayable

    def replay_check(self) -> ReplayCheck:
        """A check of the bytes sent so far; the digest and count start again for the replay's replies."""
        check = ReplayCheck(self.sent_digest(), self.sent_bytes)
        self.restart_sent()
        return check

    def restart_sent(self) -> None:
        """The digest and count of sent bytes start again (a replay is being given to the client)."""
        self._hash = None
        self._unhashed.clear()
        self._unhashed_bytes = 0
        self.sent_bytes = 0

    @property
    def messages(self) -> bytes:
        """The client's bytes of the current transaction, joined (only while `replayable`)."""
        return b"".join(self.chunks)

    def sent_digest(self) -> bytes:
        """The SHA-256 of the bytes given to the client in the current transaction."""
        return self._fold().digest()

    def __repr__(self) -> str:  # never the client's bytes: they may hold secrets
        return f"ReplayLog(recorded={self.size}, sent={self.sent_bytes}, replayable={self.replayable})"


class ReplayCheck:
    """The replies of a replay against the digest and size of what the client was given before the server was lost."""

    __slots__ = ("_hash", "digest", "done", "matches", "remaining")

    def __init__(self, digest: bytes, size: int) -> None:
        self.digest = digest
        self.remaining = size
        self._hash = hashlib.sha256()
        self.done = size == 0
        self.matches = self.done and digest == EMPTY_DIGEST

    def feed(self, data: bytes) -> bytes:
        """Replayed replies: hashed up to the expected size; returns the bytes beyond it (b"" until `done`)."""
        if self.done:
            return data
        remaining = self.remaining
        if len(data) < remaining:
            self._hash.update(data)
            self.remaining = remaining - len(data)
            return b""
        self._hash.update(data[:remaining] if len(data) > remaining else data)
        self.remaining = 0
        self.done = True
        self.matches = self._hash.digest() == self.digest
        return data[remaining:]
