"""The README's `dbproxy demo`, run as users run it: four endpoints over two replicated pairs, and a clean stop."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg
import pymysql
import pytest

from devtools.servers import free_port

REPO = Path(__file__).resolve().parent.parent
READY_WITHIN = 90.0  # seconds for the four servers and the proxy (about 6 s on an idle 2-core machine)
STOP_WITHIN = 60.0
REPLICATED_WITHIN = 10.0
FOLLOWED_WITHIN = 20.0  # seconds from the promotion until a write through read_write reaches the new writer
INSTANCE_LINE = re.compile(
    r"^\s+(pg1|pg2|mariadb1|mariadb2)\s+(writer|reader)\s+127\.0\.0\.1:(\d+)\s+pid (\d+)\s+(\S+)")


def readme_demo_command() -> list[str]:
    """The Quick start's first command, without its install step: `dbproxy demo`."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    first = block.strip().splitlines()[0]
    return shlex.split(first.split("&&")[-1])


@dataclass
class Demo:
    process: subprocess.Popen[str]
    output: list[str]
    ports: dict[str, int]
    password: str
    instances: dict[str, tuple[str, int, int]]  # name -> (role, port, pid)
    started_in: float


def _banner(process: subprocess.Popen[str], timeout: float) -> list[str]:
    """The demo's output up to the end of its ready message (the line that says how to stop it)."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("Press Ctrl-C"):
            return lines
    raise AssertionError("the demo printed no ready message:\n" + "\n".join(lines))


@pytest.fixture()
def short_dir() -> Iterator[Path]:
    """Where the demo runs: a short path (its servers' unix sockets must stay under 108 bytes, and pytest's own
    temporary folders can be deep)."""
    folder = Path(tempfile.mkdtemp(prefix="demo-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture()
def demo(short_dir: Path) -> Iterator[Demo]:
    command = readme_demo_command()
    assert command == ["dbproxy", "demo"], command
    program = shutil.which(command[0])
    prefix = [program] if program else [sys.executable, "-m", "proxy"]  # not installed: the same entry point
    ports = {"pg_rw": free_port(), "pg_ro": free_port(), "mysql_rw": free_port(), "mysql_ro": free_port()}
    argv = [*prefix, *command[1:], "--port", str(ports["pg_rw"]), "--read-only-port", str(ports["pg_ro"]),
            "--mysql-port", str(ports["mysql_rw"]), "--mysql-read-only-port", str(ports["mysql_ro"])]
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    began = time.monotonic()
    process = subprocess.Popen(argv, cwd=short_dir, stdout=subprocess.PIPE,
                               stderr=(short_dir / "demo.log").open("w"), text=True, env=env)
    try:
        output = _banner(process, READY_WITHIN)
        started_in = time.monotonic() - began
        ready = next(line for line in output if line.startswith("dbproxy ready:"))
        assert {k: int(v) for k, v in re.findall(r"(\w+) port (\d+)", ready)} == ports, ready
        password = re.findall(r'psql "host=127\.0\.0\.1 port=\d+ user=app dbname=app password=(\S+)"',
                              "\n".join(output))[0]
        instances = {m[1]: (m[2], int(m[3]), int(m[4])) for m in map(INSTANCE_LINE.match, output) if m}
        assert sorted(instances) == ["mariadb1", "mariadb2", "pg1", "pg2"], output
        print(f"demo ready {started_in:.1f} s after `{' '.join(command)}` started")
        yield Demo(process, output, ports, password, instances, started_in)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                process.wait(STOP_WITHIN)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _until(check: object, timeout: float = REPLICATED_WITHIN) -> object:
    """Call `check` until it returns something truthy; return that."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def _pg(demo: Demo, endpoint: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(host="127.0.0.1", port=demo.ports[endpoint], user="app", password=demo.password,
                           dbname="app", sslmode="require", connect_timeout=10, autocommit=True)


def _my(demo: Demo, endpoint: str) -> pymysql.connections.Connection[pymysql.cursors.Cursor]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the demo's certificate is self-signed
    return pymysql.connect(host="127.0.0.1", port=demo.ports[endpoint], user="app", password=demo.password,
                           database="app", ssl=context, connect_timeout=10, autocommit=True)


def _failover_commands(output: list[str], engine: str) -> tuple[str, str]:
    """The kill and the promote command the demo printed for `engine`."""
    start = next(n for n, line in enumerate(output) if re.match(rf"\s*{engine}:\s+kill -9 ", line))
    kill = output[start].split(":", 1)[1].split("    #")[0].strip()
    promote = output[start + 1].split("    #")[0].strip()
    return kill, promote


def _writes_to(demo: Demo, endpoint: str) -> int | None:
    """The port of the server a write through `endpoint` went to; None when it failed."""
    try:
        if endpoint.startswith("pg"):
            with _pg(demo, endpoint) as conn:
                row = conn.execute("INSERT INTO notes VALUES (3, 'after the failover') "
                                   "ON CONFLICT (id) DO NOTHING RETURNING inet_server_port()").fetchone()
                return None if row is None else int(row[0])  # type: ignore[call-overload]
        with _my(demo, endpoint) as my, my.cursor() as cursor:
            cursor.execute("INSERT INTO notes VALUES (3, 'after the failover')")
            cursor.execute("SELECT @@port")
            answer = cursor.fetchone()
            return None if answer is None else int(answer[0])
    except (psycopg.Error, pymysql.Error):
        return None


def test_demo_serves_four_endpoints_and_stops_everything(demo: Demo, short_dir: Path) -> None:
    assert demo.instances["pg1"][0] == "writer" and demo.instances["pg2"][0] == "reader"
    assert any("kill -9" in line and str(demo.instances["pg1"][2]) in line for line in demo.output)
    pids = [pid for _, _, pid in demo.instances.values()]
    assert all(psutil.pid_exists(pid) for pid in pids), pids

    with _pg(demo, "pg_rw") as writer, _pg(demo, "pg_ro") as reader:
        assert writer.info.pgconn.ssl_in_use and reader.info.pgconn.ssl_in_use
        writer.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        writer.execute("INSERT INTO notes VALUES (1, 'through read_write')")
        assert writer.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)

        def replicated() -> object:
            try:
                return reader.execute("SELECT body FROM notes WHERE id = 1").fetchone()
            except psycopg.errors.UndefinedTable:
                return None

        assert _until(replicated) == ("through read_write",)
        assert reader.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            reader.execute("INSERT INTO notes VALUES (2, 'through read_only')")

    with _my(demo, "mysql_rw") as writer_my, _my(demo, "mysql_ro") as reader_my:
        with writer_my.cursor() as cursor:
            cursor.execute("CREATE TABLE notes (id INT PRIMARY KEY, body TEXT)")
            cursor.execute("INSERT INTO notes VALUES (1, 'through read_write')")
            cursor.execute("SELECT @@read_only, @@port")
            assert cursor.fetchone() == (0, demo.instances["mariadb1"][1])
        with reader_my.cursor() as cursor:

            def replicated_my() -> object:
                try:
                    cursor.execute("SELECT body FROM notes WHERE id = 1")
                except pymysql.err.ProgrammingError:  # the table has not arrived yet
                    return None
                return cursor.fetchone()

            assert _until(replicated_my) == ("through read_write",)
            cursor.execute("SELECT @@read_only, @@port")
            assert cursor.fetchone() == (1, demo.instances["mariadb2"][1])
            with pytest.raises(pymysql.err.OperationalError, match="read-only"):
                cursor.execute("INSERT INTO notes VALUES (2, 'through read_only')")
        assert all(isinstance(conn._sock, ssl.SSLSocket) for conn in (writer_my, reader_my))

    # The failover the demo suggests, with the commands it printed: each read_write endpoint follows.
    for engine, endpoint, promoted in (("PostgreSQL", "pg_rw", "pg2"), ("MariaDB", "mysql_rw", "mariadb2")):
        kill, promote = _failover_commands(demo.output, engine)
        subprocess.run(["bash", "-c", kill], check=True, timeout=10)
        subprocess.run(["bash", "-c", promote], check=True, timeout=30, capture_output=True)
        assert _until(lambda endpoint=endpoint: _writes_to(demo, endpoint), FOLLOWED_WITHIN) \
            == demo.instances[promoted][1], engine

    demo.process.send_signal(signal.SIGINT)  # Ctrl-C
    assert demo.process.wait(STOP_WITHIN) == 0
    left = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"servers still running after the demo stopped: {left}"
    folder = str(short_dir)
    strays = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any(folder in part for part in process.info["cmdline"] or ()):
            strays.append((process.info["pid"], process.info["cmdline"]))
    assert not strays, strays
