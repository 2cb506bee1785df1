"""Before serving: load everything a start loads (for `--check` and before workers fork), and one-line start errors."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from proxy.api.token import read_token
from proxy.config import Config
from proxy.errors import ConfigError


class StartupError(Exception):
    """The proxy could not start; the message is one line for the user (no traceback)."""


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """Keep the info lines of a trial load out of the log (the real start logs them once)."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


def check_host(config: Config) -> None:
    """The listening address must resolve; ConfigError naming it if not."""
    host = config.server.host
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"[server] host {host!r}: {exc.strerror or exc}") from None


def check_startup(config: Config) -> None:
    """Load the secrets, certificates and keys exactly as a start does, without listening; ConfigError if one fails."""
    from proxy.server import ProxyServer  # the server pulls in every session module; only needed here

    check_host(config)
    if config.api.port >= 0:
        read_token(config.api)
    before = set(threading.enumerate())
    with _quiet_logs():
        server = ProxyServer(config)
        server.close_tokens()
        server.guard.close()
    # The threads that load started (the SCRAM key warm-up) end before anything forks: a worker forked while
    # another thread holds one of OpenSSL's locks would wait for it forever at its first TLS handshake or PBKDF2.
    for thread in set(threading.enumerate()) - before:
        thread.join()


def describe_start_error(exc: BaseException) -> str:
    """One line saying why a start failed (for OSError the system's words, without the errno prefix)."""
    if isinstance(exc, ConfigError | StartupError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror if exc.filename is None else f"{exc.filename}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"
