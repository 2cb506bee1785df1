"""`dbproxy demo`: throwaway PostgreSQL and MariaDB on free ports, and the proxy in front of them on fixed ports."""

from __future__ import annotations

import logging
import secrets as random_source
import shutil
from pathlib import Path

import uvloop

from proxy.config import parse_config
from proxy.devservers import start_mariadb, start_postgres

log = logging.getLogger(__name__)


def run_demo(folder: Path, port: int, mysql_port: int = 6033) -> None:
    """Start the databases, write a config and a secrets file into `folder`, serve until Ctrl-C."""
    from proxy.cli import serve, setup_logging

    setup_logging("info", "text")
    folder = folder.resolve()
    for name in ("db", "mariadb"):
        shutil.rmtree(folder / name, ignore_errors=True)
        (folder / name).mkdir(parents=True)
    password = random_source.token_urlsafe(12)
    print("starting a throwaway PostgreSQL and MariaDB for the demo ...", flush=True)
    database = start_postgres(folder / "db", users={"app": password})
    try:
        mariadb = start_mariadb(folder / "mariadb", users={"app": password})
    except BaseException:
        database.stop()
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
        "Press Ctrl-C to stop (the throwaway databases go with it)."
    )
    try:
        uvloop.run(serve(config, banner))
    finally:
        mariadb.stop()
        database.stop()
