"""Command line: `dbproxy run` serves a config file; `dbproxy demo` starts a throwaway database and serves it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import uvloop

from proxy.config import Config, load_config
from proxy.errors import ConfigError
from proxy.server import ProxyServer

log = logging.getLogger("proxy")
READY_MESSAGE = "dbproxy ready: {listeners}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


async def serve(config: Config, ready_message: str | None = None) -> None:
    """Run the proxy until SIGINT/SIGTERM."""
    server = ProxyServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready_message:
        listeners = " ".join(f"{name} port {port}" for name, port in server.ports.items())
        print(ready_message.format(**server.ports, listeners=listeners), flush=True)
    await stop.wait()
    log.info("shutting down")
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dbproxy", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="serve the configuration file")
    run.add_argument("-c", "--config", type=Path, default=None, help="TOML configuration file")
    run.add_argument("--check", action="store_true", help="validate the configuration and exit")
    run.add_argument("--workers", type=int, default=None,
                     help="worker processes sharing the ports with SO_REUSEPORT (default: [server] workers; 0: cores)")
    demo = sub.add_parser("demo", help="start a throwaway PostgreSQL and MariaDB and serve them on "
                                       "127.0.0.1:6432 and 127.0.0.1:6033")
    demo.add_argument("--port", type=int, default=6432)
    demo.add_argument("--mysql-port", type=int, default=6033)
    demo.add_argument("--dir", type=Path, default=Path(".demo"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        from proxy.demo import run_demo

        run_demo(args.dir, args.port, args.mysql_port)
        return
    config_path = getattr(args, "config", None)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"dbproxy: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if getattr(args, "check", False):
        print(f"{config_path}: OK")
        return
    setup_logging(config.server.log_level, config.server.log_format)
    workers = args.workers if args.workers is not None else config.server.workers
    workers = workers or os.cpu_count() or 1
    if workers > 1:
        from proxy.workers import run_supervisor

        run_supervisor(config, workers, READY_MESSAGE)
        return
    uvloop.run(serve(config, READY_MESSAGE))
