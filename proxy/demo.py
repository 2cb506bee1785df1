"""`dbproxy demo`: throwaway PostgreSQL and MariaDB on free ports, and the proxy in front of them on fixed ports."""

from __future__ import annotations

import logging
import secrets as random_source
import shlex
import shutil
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

from proxy.config import Config, parse_config
from proxy.devservers import DevServerError, start_mariadb, start_postgres
from proxy.startup import StartupError

log = logging.getLogger(__name__)

NEEDS = (" (the demo needs the PostgreSQL and MariaDB server packages;"
         " Debian: apt-get install postgresql mariadb-server)")


Serve = Callable[[Config, str], Coroutine[Any, Any, None]]


def run_demo(folder: Path, port: int, mysql_port: int, serve: Serve) -> None:
    """Start the databases, write a config and a secrets file into `folder`, then `serve` them until Ctrl-C."""
    folder = folder.resolve()
    for name in ("db", "mariadb"):
        shutil.rmtree(folder / name, ignore_errors=True)
        (folder / name).mkdir(parents=True)
    password = random_source.token_urlsafe(12)
    admin_password = random_source.token_urlsafe(12)
    print("starting a throwaway PostgreSQL and MariaDB for the demo ...", flush=True)
    try:
        database = start_postgres(folder / "db", users={"app": password}, superuser_password=admin_password)
    except DevServerError as exc:
        raise StartupError(f"the demo's PostgreSQL did not start{NEEDS}: {exc}") from None
    try:
        mariadb = start_mariadb(folder / "mariadb", users={"app": password}, root_password=admin_password)
    except BaseException as exc:
        database.stop()
        if isinstance(exc, DevServerError):
            raise StartupError(f"the demo's MariaDB did not start{NEEDS}: {exc}") from None
        raise
    secrets_file = folder / "secrets.toml"
    secrets_file.touch(mode=0o600)
    secrets_file.write_text(f'[users]\napp = "{password}"\n')
    config = parse_config({
        "secrets": {"file": str(secrets_file)},
        "postgresql": {"port": port, "backend_port": database.port, "pool": {"max_connections": 10}},
        "mysql": {"enabled": True, "port": mysql_port, "backend_port": mariadb.port, "pool": {"max_connections": 10}},
    }, "demo")
    banner = (
        "\ndbproxy is running: PostgreSQL clients connect to 127.0.0.1:{postgresql}, and their sessions share\n"
        f"at most 10 connections to the throwaway PostgreSQL on 127.0.0.1:{database.port}.\n\n"
        f"  psql \"host=127.0.0.1 port={{postgresql}} user=app dbname=app password={password}\"\n"
        f"  PGPASSWORD={password} pgbench -i -h 127.0.0.1 -p {{postgresql}} -U app app\n"
        f"  PGPASSWORD={password} pgbench -S -c 50 -T 10 -h 127.0.0.1 -p {{postgresql}} -U app app\n\n"
        "MySQL clients connect to 127.0.0.1:{mysql}, sharing at most 10 connections to the throwaway MariaDB\n"
        f"on 127.0.0.1:{mariadb.port}.\n\n"
        f"  mariadb -h 127.0.0.1 -P {{mysql}} -u app -p{password} app\n\n"
        "Administrators log in to the databases directly, not through the proxy:\n\n"
        f"  psql \"host=127.0.0.1 port={database.port} user={database.superuser} dbname=postgres "
        f"password={admin_password}\"\n"
        f"  mariadb -h 127.0.0.1 -P {mariadb.port} -u root -p{admin_password}\n\n"
        f"Press Ctrl-C to stop dbproxy and both databases. Their data stays in {folder} until the next\n"
        f"`dbproxy demo` starts afresh; remove it with: rm -rf {shlex.quote(str(folder))}"
    )
    try:
        uvloop.run(serve(config, banner))
    finally:
        mariadb.stop()
        database.stop()
