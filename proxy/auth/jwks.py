"""Public keys that verify login tokens: a keys folder, a JWKS file or URL; cached, refreshed on an unknown kid."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

log = logging.getLogger("proxy.tokens")

MAX_DOCUMENT_SIZE = 256 * 1024  # bytes of a JWKS document
MAX_KEYS = 100  # keys in one document (or folder)
FETCH_TIMEOUT = 10.0  # seconds for one JWKS fetch
MIN_RSA_BITS = 2048
PUBLIC_SUFFIX = ".pub.pem"  # <kid>.pub.pem in a keys folder
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class KeySourceError(Exception):
    """A key source that could not be read (the message names it, never a key)."""


@dataclass(frozen=True)
class VerificationKey:
    """A public key, its id, and the signature algorithms it may verify (its type, and the JWK's `alg` if any)."""

    kid: str
    key: PublicKey
    algorithms: frozenset[str]

    def __repr__(self) -> str:
        return f"VerificationKey(kid={self.kid!r}, algorithms={sorted(self.algorithms)})"


def key_algorithms(key: object) -> frozenset[str]:
    """The algorithms a public key's type allows: its curve's ES* for EC, RS*/PS* for RSA of at least 2048 bits."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        found = EC_ALGORITHMS.get(key.curve.name)
        return frozenset({found}) if found else frozenset()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return RSA_ALGORITHMS
    return frozenset()


def key_from_jwk(jwk: object) -> VerificationKey:
    """One JWK (EC P-256/P-384/P-521 or RSA, `use` sig if given) as a key; ValueError says why it is not usable."""
    if not isinstance(jwk, dict):
        raise ValueError("not a JSON object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ValueError("no kid")
    if jwk.get("use", "sig") != "sig":
        raise ValueError(f"key {kid!r}: use is not 'sig'")
    kty = jwk.get("kty")
    try:
        if kty == "EC":
            key: object = ECAlgorithm.from_jwk(jwk)
        elif kty == "RSA":
            key = RSAAlgorithm.from_jwk(jwk)
        else:
            raise ValueError(f"key {kid!r}: key type {kty!r} is not EC or RSA")
    except (InvalidKeyError, KeyError, TypeError) as exc:
        raise ValueError(f"key {kid!r}: not a valid {kty} key ({type(exc).__name__})") from None
    if not isinstance(key, PublicKey):
        raise ValueError(f"key {kid!r}: a private key (a JWKS holds public keys only)")
    allowed = key_algorithms(key)
    alg = jwk.get("alg")
    if alg is not None:
        allowed = allowed & {alg}
    if not allowed:
        raise ValueError(f"key {kid!r}: no usable algorithm (curve, RSA size under {MIN_RSA_BITS} bits or alg)")
    return VerificationKey(kid, key, allowed)


def keys_from_document(raw: bytes, where: str) -> dict[str, VerificationKey]:
    """The keys of a JWKS document; unusable keys are skipped with a log line, a bad document raises."""
    if len(raw) > MAX_DOCUMENT_SIZE:
        raise KeySourceError(f"{where}: JWKS document larger than {MAX_DOCUMENT_SIZE} bytes")
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise KeySourceError(f"{where}: not a JSON document") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise KeySourceError(f"{where}: no 'keys' list (not a JWKS document)")
    if len(entries) > MAX_KEYS:
        raise KeySourceError(f"{where}: {len(entries)} keys, more than {MAX_KEYS}")
    keys: dict[str, VerificationKey] = {}
    for entry in entries:
        try:
            key = key_from_jwk(entry)
        except ValueError as exc:
            for_encryption = isinstance(entry, dict) and entry.get("use", "sig") != "sig"  # common beside sig keys
            log.log(logging.DEBUG if for_encryption else logging.WARNING, "token keys: %s: key skipped: %s", where,
                    exc)
            continue
        keys[key.kid] = key
    return keys


class KeySource(Protocol):
    """Somewhere public keys come from."""

    name: str

    async def load(self) -> dict[str, VerificationKey]: ...

    def changed(self) -> bool:
        """Whether the source changed since it was loaded, as far as it can tell cheaply (a local file's stat)."""
        ...


FileStamp = tuple[int, int, int] | None


def file_stamp(path: Path) -> FileStamp:
    """What tells a file or folder changed: modification time, size, inode (None when missing)."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


class KeysFolder:
    """A folder written by `dbproxy keys init`: <kid>.pub.pem public keys (private keys beside them are not read)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.name = f"keys folder {folder}"
        self.stamp: FileStamp = None

    def changed(self) -> bool:
        return file_stamp(self.folder) != self.stamp  # a key added or retired changes the folder

    def read(self) -> dict[str, VerificationKey]:
        self.stamp = file_stamp(self.folder)
        if not self.folder.is_dir():
            raise KeySourceError(f"{self.name}: not a folder")
        try:
            files = sorted(self.folder.glob(f"*{PUBLIC_SUFFIX}"))
        except OSError as exc:
            raise KeySourceError(f"{self.name}: {exc.strerror}") from None
        if len(files) > MAX_KEYS:
            raise KeySourceError(f"{self.name}: {len(files)} keys, more than {MAX_KEYS}")
        keys: dict[str, VerificationKey] = {}
        for path in files:
            kid = path.name[: -len(PUBLIC_SUFFIX)]
            try:
                key = load_pem_public_key(path.read_bytes())
            except (OSError, ValueError) as exc:
                log.warning("token keys: %s: not a public key, skipped (%s)", path, type(exc).__name__)
                continue
            allowed = key_algorithms(key)
            if allowed and isinstance(key, PublicKey):
                keys[kid] = VerificationKey(kid, key, allowed)
            else:
                log.warning("token keys: %s: not an EC or RSA (at least %d bits) key, skipped", path, MIN_RSA_BITS)
        return keys

    async def load(self) -> dict[str, VerificationKey]:
        return self.read()


class JwksFile:
    """A JWKS document in a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"JWKS file {path}"
        self.stamp: FileStamp = None

    def changed(self) -> bool:
        return file_stamp(self.path) != self.stamp  # rewritten, or replaced (a Kubernetes ConfigMap's swap)

    def read(self) -> dict[str, VerificationKey]:
        self.stamp = file_stamp(self.path)
        try:
            with self.path.open("rb") as file:
                raw = file.read(MAX_DOCUMENT_SIZE + 1)
        except OSError as exc:
            raise KeySourceError(f"{self.name}: {exc.strerror}") from None
        return keys_from_document(raw, self.name)

    async def load(self) -> dict[str, VerificationKey]:
        return self.read()


class JwksUrl:
    """A JWKS document fetched over HTTP(S): bounded in time and size, no redirects followed."""

    def __init__(self, url: str, ca_file: Path | None = None, timeout: float = FETCH_TIMEOUT) -> None:
        self.url = url
        self.ca_file = ca_file
        self.timeout = timeout
        parts = urlsplit(url)  # the name shown in logs: no user info, no query (either may hold a credential)
        self.name = f"JWKS URL {parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"

    def changed(self) -> bool:
        return False  # known only by fetching it

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.url.startswith("https:"):
            return False
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    async def load(self) -> dict[str, VerificationKey]:
        import aiohttp  # only when a URL is configured (half a second of start time otherwise)

        try:
            raw = await self._fetch()
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError, ValueError) as exc:
            raise KeySourceError(f"{self.name}: {type(exc).__name__}: {exc}") from None
        return keys_from_document(raw, self.name)

    async def _fetch(self) -> bytes:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(self.url, ssl=self._ssl(), allow_redirects=False,
                                   headers={"Accept": "application/json"}) as response:
                if response.status != 200:
                    raise KeySourceError(f"{self.name}: HTTP status {response.status}")
                too_large = KeySourceError(f"{self.name}: JWKS document larger than {MAX_DOCUMENT_SIZE} bytes")
                if (response.content_length or 0) > MAX_DOCUMENT_SIZE:
                    raise too_large
                chunks, size = [], 0
                async for chunk in response.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > MAX_DOCUMENT_SIZE:
                        raise too_large
                    chunks.append(chunk)
                return b"".join(chunks)


class KeyRing:
    """The keys of every source, by kid. Loaded at first use; refetched when older than `cache_ttl` (in the
    background) or when an unknown kid arrives, at most once per `refresh_interval`; a local file or folder that
    changed (a key added or retired) is read again at once. A source that fails keeps its previous keys and logs
    one line."""

    def __init__(self, sources: Sequence[KeySource], *, cache_ttl: float = 3600.0, refresh_interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sources = list(sources)
        self.cache_ttl = cache_ttl
        self.refresh_interval = refresh_interval
        self.clock = clock
        self.refreshes = 0  # loads attempted (for tests and metrics)
        self._by_source: dict[str, dict[str, VerificationKey]] = {}
        self._keys: dict[str, VerificationKey] = {}
        self._loaded_at: float | None = None  # last refresh with every source answering
        self._tried_at: float | None = None
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    @property
    def kids(self) -> list[str]:
        return sorted(self._keys)

    async def get(self, kid: str) -> VerificationKey | None:
        """The key `kid`; an unknown kid (or the first use) refetches the sources unless that was done lately."""
        now = self.clock()
        if self._tried_at is not None and any(source.changed() for source in self.sources):
            await self._reload_changed()
        if self._tried_at is None or (kid not in self._keys and self._may_refresh(now)):
            await self.refresh()
        elif self._loaded_at is None or now - self._loaded_at >= self.cache_ttl:
            self._refresh_in_background(now)
        return self._keys.get(kid)

    def _may_refresh(self, now: float) -> bool:
        return self._tried_at is None or now - self._tried_at >= self.refresh_interval

    def _refresh_in_background(self, now: float) -> None:
        if self._may_refresh(now) and (self._background is None or self._background.done()):
            self._background = asyncio.get_running_loop().create_task(self.refresh())

    async def refresh(self) -> None:
        """Reload every source now (one at a time: callers that wait on a refresh share it)."""
        seen = self.refreshes
        async with self._lock:
            if self.refreshes != seen:
                return  # another caller refreshed while this one waited
            self._tried_at = self.clock()
            self.refreshes += 1
            loaded = [await self._load(source) for source in self.sources]
            if all(loaded):
                self._loaded_at = self._tried_at

    async def _reload_changed(self) -> None:
        async with self._lock:
            for source in self.sources:
                if source.changed():
                    await self._load(source)

    async def _load(self, source: KeySource) -> bool:
        """Load one source into the ring (under the lock); False, one log line and its old keys kept on failure."""
        try:
            self._by_source[source.name] = await source.load()
        except KeySourceError as exc:
            kept = len(self._by_source.get(source.name, {}))
            log.warning("token keys: %s; keeping the %d keys loaded before", exc, kept)
            return False
        finally:
            self._keys = {kid: key for keys in self._by_source.values() for kid, key in keys.items()}
        return True

    async def settled(self) -> None:
        """Wait for a background refresh under way, if any."""
        if self._background is not None:
            await asyncio.shield(self._background)

    def close(self) -> None:
        if self._background is not None:
            self._background.cancel()
            self._background = None
