"""Secrets on the command line: `dbproxy secrets master-key|put|get|list|rotate`. Only `get` prints a password."""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from proxy.config import SecretsSettings, load_config
from proxy.errors import ConfigError
from proxy.rotation import RotationError, check_strategy, rotate
from proxy.rundir import looks_like_dbproxy, pid_file_path, read_pid_file
from proxy.secret_crypto import new_master_key
from proxy.secret_sources import locked, read_all, update
from proxy.secrets import SecretStore

USAGE_STATUS = 2  # a configuration or a file that cannot work
FAILED_STATUS = 1  # the database refused, a file that could not be written


def add_secret_commands(sub: Any) -> None:
    secrets = sub.add_parser("secrets", help="secrets: master key, encrypted file entries, password rotation")
    secrets_sub = secrets.add_subparsers(dest="secrets_command", required=True)
    master = secrets_sub.add_parser("master-key", help="create a 256-bit master key file (mode 0600)")
    master.add_argument("--out", required=True, type=Path, help="the key file to create")
    put = secrets_sub.add_parser("put", help="store a user's password (read from the terminal or stdin)")
    put.add_argument("--user", required=True)
    put.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    get = secrets_sub.add_parser("get", help="print a user's password (the only command that shows one)")
    get.add_argument("--user", required=True, help="a user, or an entry such as USER.backend")
    listing = secrets_sub.add_parser("list", help="the stored entries' names (never their values)")
    rotation = secrets_sub.add_parser("rotate", help="set a new database password for a user's backend logins "
                                                     "and store it; running proxies pick it up")
    rotation.add_argument("--user", required=True)
    rotation.add_argument("--strategy", default="single", choices=("single", "alternating"))
    rotation.add_argument("--reload", action="store_true",
                          help="also signal the running proxy (its pid file) to reload now, besides its watch")
    for command in (put, get, listing, rotation):
        command.add_argument("-c", "--config", type=Path, default=None, help="TOML configuration file ([secrets])")
    for command in (put, get, listing):
        command.add_argument("--encrypted-file", type=Path, default=None,
                             help="an encrypted secrets file (instead of the configuration's sources)")
        command.add_argument("--master-key-file", type=Path, default=None,
                             help="its master key (default: DBPROXY_MASTER_KEY)")


def _settings(args: argparse.Namespace) -> SecretsSettings:
    if args.encrypted_file is not None:
        return SecretsSettings(encrypted_file=args.encrypted_file, master_key_file=args.master_key_file)
    if args.config is None:
        raise ConfigError("give -c CONFIG (its [secrets]) or --encrypted-file")
    return load_config(args.config).secrets


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        text = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        text = getpass.getpass("password: ")
        if getpass.getpass("again: ") != text:
            raise ConfigError("the two passwords differ; nothing stored")
    if not text:
        raise ConfigError("an empty password; nothing stored")
    return text


def _run(args: argparse.Namespace) -> str:
    command = args.secrets_command
    if command == "master-key":
        new_master_key(args.out)
        return f"dbproxy: new master key in {args.out} (mode 0600); keep it apart from the encrypted file"
    if command == "rotate":
        check_strategy(args.strategy)
        config = load_config(args.config)
        done = rotate(config, args.user, args.strategy)
        reloaded = f"; {_signal_reload(args.config, config.server.pid_file)}" if args.reload else ""
        return (f"dbproxy: new database password for {done.database_user} (backend logins of {done.user}) set on "
                f"{', '.join(done.servers)} and stored in {done.where}{reloaded}")
    settings = _settings(args)
    if command == "put":
        password = _read_password(args.password_stdin)
        with locked(settings, [args.user]):
            where = update(settings, {args.user: password})
        return f"dbproxy: stored the password of {args.user} in {where}"
    if command == "get":
        store = SecretStore.from_settings(settings, quiet=True)
        secret = store.get(args.user)
        value = secret.password.decode() if secret is not None else read_all(settings).get(args.user)
        if value is None:
            raise ConfigError(f"no stored secret for {args.user}")
        return value
    names = sorted(read_all(settings))
    return "\n".join(names) if names else "dbproxy: no stored secrets"


def _signal_reload(config_path: Path | None, configured: Path | None) -> str:
    path = pid_file_path(config_path, configured)
    try:
        pid = read_pid_file(path)
        if not looks_like_dbproxy(pid):
            return f"no reload sent: process {pid} is not dbproxy"
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return f"no reload sent: no running dbproxy through {path} (its watch picks the change up)"
    return f"reload sent to pid {pid}"


def run_secret_command(args: argparse.Namespace) -> None:
    """Run `secrets ...` and print its output; one line on stderr and a non-zero status when it fails."""
    try:
        print(_run(args), flush=True)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}", USAGE_STATUS)
    except RotationError as exc:
        _fail(f"rotation failed: {exc}", FAILED_STATUS)
    except OSError as exc:
        _fail(f"{exc.filename or 'secrets'}: {exc.strerror or exc}", FAILED_STATUS)


def _fail(message: str, status: int) -> NoReturn:
    print(f"dbproxy: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)
