"""Cache keys: the statement with everything of the session that can change its result, hashed."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

IGNORED_SETTINGS = frozenset({"application_name"})  # settings that never change a result


def base_key(engine: str, user: str, database: str, settings: Mapping[str, object], text: bytes) -> str:
    """The key of `text` run by `user` in `database` with these session settings (search_path, role, time zone,
    character set, sql_mode, ...): equal only when every one of them is equal. Generations are added by stores."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{engine}\x00{user}\x00{database}\x00".encode())
    for name in sorted(settings):
        if name not in IGNORED_SETTINGS:
            digest.update(f"{name}\x00{settings[name]!s}\x00".encode("utf-8", "surrogateescape"))
    digest.update(b"\x01")
    digest.update(text)
    return digest.hexdigest()
