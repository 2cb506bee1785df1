"""`dbproxy demo`: a throwaway PostgreSQL on a free port, and the proxy in front of it on a fixed port."""

from __future__ import annotations

import logging
import secrets as random_source
import shutil
from pathlib import Path

import uvloop

from proxy.config import parse_config
from proxy.devservers import start_postgres

log = logging.getLogger(__name__)


def run_demo(folder: Path, port: int) -> None:
    """Start the database, write a config and a secrets file into `folder`, serve until Ctrl-C."""
    from proxy.cli import serve, setup_logging

    setup_logging("info", "text")
    folder = folder.resolve()
    shutil.rmtree(folder / "db", ignore_errors=True)
    (folder / "db").mkdir(parents=True)
    password = random_source.token_urlsafe(12)
    print("starting a throwaway PostgreSQL for the demo ...", flush=True)
    database = start_postgres(folder / "db", users={"app": password})
    secrets_file = folder / "secrets.toml"
    secrets_file.touch(mode=0o600)
    secrets_file.write_text(f'[users]\napp = "{password}"\n')
    config = parse_config({
        "secrets": {"file": str(secrets_file)},
        "postgresql": {"port": port, "backend_port": database.port, "pool": {"max_connections": 10}},
    }, "demo")
    banner = (
        "\ndbproxy is running: PostgreSQL clients connect to 127.0.0.1:{postgresql}, and their sessions share\n"
        f"at most 10 connections to the throwaway PostgreSQL on 127.0.0.1:{database.port}.\n\n"
        f"  psql \"host=127.0.0.1 port={{postgresql}} user=app dbname=app password={password}\"\n"
        f"  PGPASSWORD={password} pgbench -i -h 127.0.0.1 -p {{postgresql}} -U app app\n"
        f"  PGPASSWORD={password} pgbench -S -c 50 -T 10 -h 127.0.0.1 -p {{postgresql}} -U app app\n\n"
        "Press Ctrl-C to stop (the throwaway database goes with it)."
    )
    try:
        uvloop.run(serve(config, banner))
    finally:
        database.stop()
