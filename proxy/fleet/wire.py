"""Signed messages between the proxies of a fleet: one JSON object behind a 4-byte length, with a timestamp, a
nonce and an HMAC-SHA256 under the fleet's shared key; an answer is bound to the nonce of its request.

A message that is unsigned, signed with another key, older or newer than the allowed clock skew, or seen before
(its nonce is remembered while it would still be fresh) is refused. Messages hold cancel keys: never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import secrets
import struct
from collections import deque
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError

Message = dict[str, Any]

HEADER = struct.Struct("!I")
MAX_MESSAGE = 16 * 1024  # forwards are small; anything larger is refused unread
MIN_KEY_BYTES = 16
SIGNED_FIELDS = ("body", "ts", "nonce", "reply_to")


class Refused(Exception):
    """A message that does not prove it comes from the fleet, or comes too late or a second time."""


def load_key(path: Path | None) -> bytes:
    """The fleet's shared key: the file's content without surrounding white space; ConfigError if unusable."""
    if path is None:
        raise ConfigError("[fleet] port is set: give key_file")
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"[fleet] key_file {path}: cannot read: {exc.strerror or exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"[fleet] key_file {path}: the key must have at least {MIN_KEY_BYTES} bytes")
    return key


def _mac(key: bytes, fields: Message) -> str:
    text = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, text, hashlib.sha256).hexdigest()


def sign(key: bytes, body: Message, now: float, reply_to: str = "") -> Message:
    """`body` as a signed message sent at `now` (wall clock); `reply_to`: the nonce of the request it answers."""
    fields: Message = {"body": body, "ts": now, "nonce": secrets.token_hex(16), "reply_to": reply_to}
    return {**fields, "mac": _mac(key, fields)}


class Verifier:
    """Checks signed messages against the key, the clock and the nonces seen lately."""

    def __init__(self, key: bytes, max_skew: float) -> None:
        self._key = key
        self.max_skew = max_skew
        self._seen: set[str] = set()
        self._expiry: deque[tuple[float, str]] = deque()  # (when a nonce may be forgotten, nonce), oldest first

    def __repr__(self) -> str:
        return f"Verifier(max_skew={self.max_skew}, seen={len(self._seen)})"

    def verify(self, message: Message, now: float, reply_to: str = "") -> Message:
        """The body of a message signed with the key, fresh and never seen; Refused if it is not all that."""
        try:
            fields = {name: message[name] for name in SIGNED_FIELDS}
            mac = message["mac"]
        except (KeyError, TypeError):
            raise Refused("not a signed message") from None
        if not isinstance(mac, str) or not hmac.compare_digest(mac.encode(), _mac(self._key, fields).encode()):
            raise Refused("bad signature")
        sent, nonce, body = fields["ts"], fields["nonce"], fields["body"]
        if not isinstance(sent, int | float) or not math.isfinite(sent) or abs(now - sent) > self.max_skew:
            raise Refused("outside the allowed clock skew")
        if fields["reply_to"] != reply_to:
            raise Refused("answers another request")
        if not isinstance(nonce, str) or not isinstance(body, dict):
            raise Refused("malformed")
        self._forget(now)
        if nonce in self._seen:
            raise Refused("replayed")
        self._seen.add(nonce)
        self._expiry.append((now + 2 * self.max_skew, nonce))
        return body

    def _forget(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            self._seen.discard(self._expiry.popleft()[1])


def encode(message: Message) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> Message:
    """One message from the stream (ValueError if it is too large or not a JSON object)."""
    size = int(HEADER.unpack(await reader.readexactly(HEADER.size))[0])
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is too large")
    try:
        message = json.loads(await reader.readexactly(size))
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(message, dict):
        raise ValueError("a message is a JSON object")
    return message
