"""Where the secrets' entries are kept: a TOML file, a folder (a mounted Kubernetes Secret), an encrypted file;
reading, writing (atomically) and a cheap fingerprint that changes when any of them does."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

from proxy.config import SecretsSettings
from proxy.errors import ConfigError
from proxy.secret_crypto import load_master_key, seal, unseal

DATA_LINK = "..data"  # Kubernetes: the symlink to the current timestamped folder, swapped atomically
MAX_ENTRY_BYTES = 64 * 1024


def read_toml(path: Path) -> dict[str, str]:
    try:
        data = tomllib.loads(Path(path).read_bytes().decode())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read secrets file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: secrets file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: secrets file is not valid TOML: {exc}") from None
    users = data.get("users", data)
    if not isinstance(users, dict):
        raise ConfigError(f"{path}: [users] must be a table of user = \"password\" lines")
    for user, password in users.items():
        if not isinstance(password, str):
            raise ConfigError(f"{path}: the secret for '{user}' must be a string")
    return dict(users)


def read_dir(path: Path) -> dict[str, str]:
    """One entry per regular file (symlinks followed), named after the user, holding the password with its
    trailing newline stripped; hidden entries (Kubernetes' ..data and timestamped folders) are skipped."""
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read secrets folder: {exc.strerror}") from None
    entries: dict[str, str] = {}
    for name in names:
        if name.startswith("."):
            continue
        file = Path(path) / name
        try:
            if not file.is_file():
                continue
            data = file.read_bytes()[: MAX_ENTRY_BYTES + 1]
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read secret: {exc.strerror}") from None
        if len(data) > MAX_ENTRY_BYTES:
            raise ConfigError(f"{file}: a secret longer than {MAX_ENTRY_BYTES} bytes")
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise ConfigError(f"{file}: the secret is not UTF-8 text") from None
        entries[name] = text.removesuffix("\n").removesuffix("\r")
    return entries


def read_encrypted(path: Path, master_key_file: Path | None) -> dict[str, str]:
    key = load_master_key(master_key_file)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read encrypted secrets file: {exc.strerror}") from None
    return unseal(data, key, str(path))


def read_all(settings: SecretsSettings) -> dict[str, str]:
    """Every entry of the configured sources: the folder over the encrypted file over the TOML file."""
    entries: dict[str, str] = {}
    if settings.file is not None:
        entries.update(read_toml(settings.file))
    if settings.encrypted_file is not None:
        entries.update(read_encrypted(settings.encrypted_file, settings.master_key_file))
    if settings.dir is not None:
        entries.update(read_dir(settings.dir))
    return entries


def describe(settings: SecretsSettings) -> str:
    sources = [str(path) for path in (settings.dir, settings.encrypted_file, settings.file) if path is not None]
    return ", ".join(sources) or "the environment only"


def fingerprint(settings: SecretsSettings) -> tuple[object, ...]:
    """What changes when a source does: inode, size and mtime of each file (symlinks resolved, so an atomic swap of
    Kubernetes' ..data shows); cheap enough to be taken every few seconds."""
    marks: list[object] = []
    for path in (settings.file, settings.encrypted_file, settings.master_key_file, settings.dir):
        if path is not None:
            marks.append(_stat(path))
    if settings.dir is not None:
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(settings.dir)):
                if not name.startswith(".") or name == DATA_LINK:
                    marks.append((name, _stat(Path(settings.dir) / name)))
    return tuple(marks)


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_ino, found.st_size, found.st_mtime_ns


# --- writing ---


SOURCE_ORDER = ("dir", "encrypted_file", "file")  # the one that wins first


def _writable(kind: str, path: Path) -> bool:
    if kind == "dir":
        return os.access(path, os.W_OK | os.X_OK)
    return os.access(path.parent, os.W_OK | os.X_OK) and (not path.exists() or os.access(path, os.W_OK))


def writable_source(settings: SecretsSettings, names: Iterable[str] = ()) -> str:
    """The source changes go to: the first configured one (in the order they win) that can be written; a source
    before it that cannot be written must not hold any of `names` (it would hide the change)."""
    configured = [(kind, Path(path)) for kind in SOURCE_ORDER if (path := getattr(settings, kind)) is not None]
    if not configured:
        raise ConfigError("[secrets] names no dir, encrypted_file or file to store secrets in")
    for kind, path in configured:
        if _writable(kind, path):
            return kind
        hiding = sorted(set(names) & set(_read(kind, path, settings)))
        if hiding:
            raise ConfigError(f"{path} cannot be written and holds {', '.join(hiding)}, which would hide the change")
    kind, path = configured[0]
    raise ConfigError(f"cannot write the secrets: {path} is not writable")


@contextlib.contextmanager
def locked(settings: SecretsSettings, names: Iterable[str] = ()) -> Iterator[None]:
    """Hold the lock of the source changes go to (a hidden file beside it), so that two commands changing the
    secrets (two rotations) run one after the other."""
    kind = writable_source(settings, names)
    path = Path(getattr(settings, kind))
    lock = path / ".dbproxy-secrets.lock" if kind == "dir" else path.with_name(f".{path.name}.lock")
    try:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"{lock}: cannot lock the secrets: {exc.strerror}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _read(kind: str, path: Path, settings: SecretsSettings) -> dict[str, str]:
    if kind == "dir":
        return read_dir(path)
    if kind == "encrypted_file":
        return read_encrypted(path, settings.master_key_file) if path.exists() else {}
    return read_toml(path) if path.exists() else {}


def update(settings: SecretsSettings, changes: dict[str, str | None]) -> str:
    """Set (or, for None, remove) entries in the source changes go to, atomically; returns where they went."""
    source = writable_source(settings, changes)
    try:
        if source == "dir":
            assert settings.dir is not None
            _update_dir(Path(settings.dir), changes)
            return str(settings.dir)
        if source == "encrypted_file":
            assert settings.encrypted_file is not None
            path = Path(settings.encrypted_file)
            key = load_master_key(settings.master_key_file)
            entries = unseal(path.read_bytes(), key, str(path)) if path.exists() else {}
            _write_atomically(path, seal(_changed(entries, changes), key))
            return str(path)
        assert settings.file is not None
        path = Path(settings.file)
        entries = read_toml(path) if path.exists() else {}
        _write_atomically(path, _toml(_changed(entries, changes)).encode())
        return str(path)
    except OSError as exc:
        raise ConfigError(f"cannot write the secrets ({source}): {exc.strerror or exc}") from None


def _changed(entries: dict[str, str], changes: dict[str, str | None]) -> dict[str, str]:
    result = dict(entries)
    for name, value in changes.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def _toml(entries: dict[str, str]) -> str:
    def quoted(text: str) -> str:
        return '"' + "".join(c if c not in '"\\' and c.isprintable() else f"\\u{ord(c):04x}" for c in text) + '"'
    lines = ["# written by dbproxy secrets: user = password", "[users]"]
    lines += [f"{quoted(name)} = {quoted(value)}" for name, value in sorted(entries.items())]
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, data: bytes) -> None:
    """Write beside `path` (mode 0600) and rename over it: a reader sees the old or the new content, never half."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\x00" in name:
        raise ConfigError(f"{name!r} cannot name a file in the secrets folder")


def _update_dir(folder: Path, changes: dict[str, str | None]) -> None:
    """A folder laid out as Kubernetes mounts a Secret (..data -> a timestamped folder) gets a new timestamped
    folder and ..data swapped to it; a plain folder gets each file replaced atomically."""
    for name in changes:
        _check_name(name)
    if (folder / DATA_LINK).is_symlink():
        _swap_data(folder, _changed(read_dir(folder), changes))
        return
    for name, value in changes.items():
        if value is None:
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
        else:
            _write_atomically(folder / name, value.encode())


def _swap_data(folder: Path, entries: dict[str, str]) -> None:
    old = os.readlink(folder / DATA_LINK)
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + f"{time.time_ns() % 10**9:09d}"
    fresh = folder / stamp
    fresh.mkdir(mode=0o700)
    for name, value in entries.items():
        descriptor = os.open(fresh / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(value.encode())
    link = folder / "..data_tmp"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    os.symlink(stamp, link)
    os.replace(link, folder / DATA_LINK)
    for name in os.listdir(folder):
        if name.startswith("."):
            continue
        if (folder / name).is_symlink() and name not in entries:
            (folder / name).unlink()
    for name in entries:
        if not (folder / name).is_symlink() and not (folder / name).exists():
            os.symlink(f"{DATA_LINK}/{name}", folder / name)
    if not os.path.isabs(old) and old.startswith("..") and "/" not in old:
        shutil.rmtree(folder / old, ignore_errors=True)
