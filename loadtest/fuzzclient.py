"""Running fuzz cases against the proxy (asyncio raw sockets), checked bystander clients, and proxy log scanning."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from loadtest.fuzzgen import CHANGE_USER_SCRAMBLE, PG_SYNC, Case, frame_raw, mutate_mysql, mutate_pg
from proxy.auth.mysql import scramble_native_password
from proxy.auth.scram import MECHANISM, ScramClient
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import HandshakeResponse41, HandshakeV10
from proxy.protocol.pg import messages as pg

USER, PASSWORD, DATABASE = "app", "app-secret", "app"
STALL_SECONDS = 1.0  # a bystander query slower than this is a failure

MY_CAPS = (my.CLIENT_PROTOCOL_41 | my.CLIENT_SECURE_CONNECTION | my.CLIENT_PLUGIN_AUTH | my.CLIENT_CONNECT_WITH_DB
           | my.CLIENT_TRANSACTIONS | my.CLIENT_LONG_PASSWORD | my.CLIENT_MULTI_RESULTS)
MY_OPTIONAL_CAPS = (my.CLIENT_MULTI_STATEMENTS, my.CLIENT_DEPRECATE_EOF, my.CLIENT_SESSION_TRACK,
                    my.CLIENT_CONNECT_ATTRS, my.CLIENT_PS_MULTI_RESULTS, my.CLIENT_FOUND_ROWS, my.CLIENT_LOCAL_FILES,
                    my.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA, my.CLIENT_SSL, my.CLIENT_COMPRESS)


class LoginFailed(Exception):
    """The fuzz client's own valid login was refused (a finding when it happens for a valid login)."""


@dataclass(slots=True)
class Outcome:
    """What happened to one fuzz connection."""

    sent: int = 0  # packets written to the proxy
    answered: bool = False  # the closing sentinel query came back
    closed_by_proxy: bool = False
    received: int = 0  # bytes
    login_error: str = ""


# --- framing readers ---

async def _read_pg(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    length = int.from_bytes(header[1:], "big")
    if length < 4 or length > 1 << 24:
        raise LoginFailed(f"bad message length {length} from the proxy")
    return header[:1], await reader.readexactly(length - 4)


async def _read_my(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = await reader.readexactly(4)
    return header[3], await reader.readexactly(int.from_bytes(header[:3], "little"))


# --- logins ---

async def pg_login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A full, valid SCRAM-SHA-256 login through the proxy, up to ReadyForQuery."""
    writer.write(pg.startup_message({"user": USER, "database": DATABASE}))
    kind, body = await _read_pg(reader)
    if kind != b"R":
        raise LoginFailed(f"{kind!r} {body[:200]!r}")
    scram = ScramClient(PASSWORD.encode())
    writer.write(pg.sasl_initial_response(MECHANISM, scram.client_first()))
    kind, body = await _read_pg(reader)
    if kind != b"R":
        raise LoginFailed(f"{kind!r} {body[:200]!r}")
    writer.write(pg.password_message(scram.client_final(body[4:])))
    while True:
        kind, body = await _read_pg(reader)
        if kind == b"E":
            raise LoginFailed(str(pg.parse_error_fields(body)))
        if kind == b"Z":
            return


def _my_handshake(greeting: HandshakeV10, rng: random.Random | None = None) -> bytes:
    caps = MY_CAPS
    if rng is not None:
        for extra in MY_OPTIONAL_CAPS:
            if rng.random() < 0.2:
                caps |= extra
    scramble = scramble_native_password(PASSWORD.encode(), greeting.auth_plugin_data)
    attrs = {"_client_name": "fuzz"} if caps & my.CLIENT_CONNECT_ATTRS else None
    plugin = my.MYSQL_NATIVE_PASSWORD
    if rng is not None and rng.random() < 0.1:
        plugin = rng.choice((my.CACHING_SHA2_PASSWORD, "mysql_clear_password", "", "nope"))
    return HandshakeResponse41(caps, USER, scramble, DATABASE, plugin, attrs).build()


async def mysql_login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> HandshakeV10:
    """A full, valid mysql_native_password login through the proxy, up to its OK."""
    _, payload = await _read_my(reader)
    greeting = HandshakeV10.parse(payload)
    writer.write(frame_raw(_my_handshake(greeting), 1))
    _, payload = await _read_my(reader)
    if payload[:1] != b"\x00":
        raise LoginFailed(repr(payload[:200]))
    return greeting


# --- one case ---

async def _read_until(reader: asyncio.StreamReader, token: bytes | None, outcome: Outcome, idle: float,
                      total: float) -> None:
    """Read answers until `token` shows up, the proxy closes, nothing arrives for `idle` s, or `total` s pass."""
    deadline = time.monotonic() + total
    tail = b""
    while True:
        remaining = min(idle, deadline - time.monotonic())
        if remaining <= 0:
            return
        try:
            chunk = await asyncio.wait_for(reader.read(65536), remaining)
        except TimeoutError:
            return
        except (ConnectionError, OSError):
            outcome.closed_by_proxy = True
            return
        if not chunk:
            outcome.closed_by_proxy = True
            return
        outcome.received += len(chunk)
        if token is not None:
            tail = tail[-len(token):] + chunk
            if token in tail:
                outcome.answered = True
                return


async def run_case(case: Case, port: int, idle: float = 0.15, total: float = 1.0, linger: bool = True) -> Outcome:
    """Connect, log in as far as `case.stage` says, send its packets pipelined (plus a sentinel query after a
    full login), read answers for a short while (unless not `linger`: then leave at once) and close."""
    outcome = Outcome()
    token: bytes | None = None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        packets = list(case.packets)
        if case.protocol == "postgresql":
            tail = await _pg_prelude(case, reader, writer, packets)
            if case.stage == "session":
                token = f"fz{random.getrandbits(48):x}".encode()
                tail = PG_SYNC + pg.query("SELECT '" + token.decode() + "'")
        else:
            tail = await _my_prelude(case, reader, writer, packets)
            if case.stage == "session":
                token = f"fz{random.getrandbits(48):x}".encode()
                tail = frame_raw(bytes((my.COM_QUERY,)) + b"SELECT '" + token + b"'", 0)
        if writer.transport.is_closing():
            return outcome
        writer.write(b"".join(packets) + tail)
        try:
            await asyncio.wait_for(writer.drain(), total)
        except TimeoutError:
            return outcome
        outcome.sent += len(packets)
        if linger:
            await _read_until(reader, token, outcome, idle, total)
    except LoginFailed as exc:
        outcome.login_error = str(exc)
    except (ConnectionError, OSError, asyncio.IncompleteReadError, TimeoutError):
        outcome.closed_by_proxy = True
    finally:
        writer.transport.abort() if random.random() < 0.5 else writer.close()
    return outcome


async def _pg_prelude(case: Case, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      packets: list[bytes]) -> bytes:
    """The valid part of the login the case asks for; may append the mutated login packet to `packets`."""
    if case.stage == "session":
        await pg_login(reader, writer)
    elif case.stage in ("startup", "sasl_final"):
        writer.write(pg.startup_message({"user": USER, "database": DATABASE}))
        kind, body = await _read_pg(reader)
        if kind != b"R":
            raise LoginFailed(f"{kind!r} {body[:200]!r}")
        if case.stage == "sasl_final":
            scram = ScramClient(PASSWORD.encode())
            writer.write(pg.sasl_initial_response(MECHANISM, scram.client_first()))
            kind, body = await _read_pg(reader)
            if kind != b"R":
                raise LoginFailed(f"{kind!r} {body[:200]!r}")
            final = pg.password_message(scram.client_final(body[4:]))
            packets.insert(0, mutate_pg(random.Random(case.mutation_seed), final))
    return b""


async def _my_prelude(case: Case, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      packets: list[bytes]) -> bytes:
    if case.stage == "session":
        greeting = await mysql_login(reader, writer)
        scramble = scramble_native_password(PASSWORD.encode(), greeting.auth_plugin_data)
        for index, packet in enumerate(packets):
            if CHANGE_USER_SCRAMBLE in packet:
                packets[index] = packet.replace(CHANGE_USER_SCRAMBLE, scramble)
    elif case.stage in ("greeting", "handshake"):
        _, payload = await _read_my(reader)
        if case.stage == "handshake":
            rng = random.Random(case.mutation_seed)
            packet = frame_raw(_my_handshake(HandshakeV10.parse(payload), rng), 1)
            packets.insert(0, mutate_mysql(rng, packet) if rng.random() < 0.9 else packet)
    return b""


def run_case_sync(case: Case, port: int, idle: float = 0.15, total: float = 1.0) -> Outcome:
    return asyncio.run(asyncio.wait_for(run_case(case, port, idle, total), total + 10))


# --- bystanders ---

@dataclass
class BystanderReport:
    name: str
    cycles: int = 0
    errors: list[str] = field(default_factory=list)
    stalls: list[float] = field(default_factory=list)  # latencies over STALL_SECONDS
    max_latency: float = 0.0


class Bystander(threading.Thread):
    """A well-behaved client running a checked query loop: each answer must carry its own fresh value and the
    session settings it started with, within STALL_SECONDS."""

    def __init__(self, name: str, connect: Callable[[], Any], check: Callable[[Any, str], tuple[Any, ...]],
                 pause: float = 0.01) -> None:
        super().__init__(name=f"bystander-{name}", daemon=True)
        self.report = BystanderReport(name)
        self._connect, self._check, self._pause = connect, check, pause
        self._halt = threading.Event()
        self._cycle = threading.Condition()
        self._last_started_done = 0.0  # start time of the latest completed cycle
        self.in_flight_since: float | None = None
        self.baseline: tuple[Any, ...] | None = None

    def run(self) -> None:
        conn = None
        while not self._halt.is_set():
            started = time.monotonic()
            self.in_flight_since = started
            try:
                if conn is None:
                    conn = self._connect()
                token = f"by{random.getrandbits(40):x}"
                seen = self._check(conn, token)
                if seen[0] != token:
                    raise AssertionError(f"got {seen[0]!r} back instead of its own {token!r}")
                if self.baseline is None:
                    self.baseline = seen[1:]
                elif seen[1:] != self.baseline:
                    raise AssertionError(f"session settings changed under it: {seen[1:]!r}, was {self.baseline!r}")
            except Exception as exc:
                self.report.errors.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}"[:500])
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
            latency = time.monotonic() - started
            self.in_flight_since = None
            self.report.max_latency = max(self.report.max_latency, latency)
            if latency > STALL_SECONDS:
                self.report.stalls.append(round(latency, 3))
            with self._cycle:
                self.report.cycles += 1
                self._last_started_done = started
                self._cycle.notify_all()
            self._halt.wait(self._pause)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def wait_cycle_after(self, moment: float, timeout: float) -> bool:
        """Wait until a cycle that started after `moment` has completed; False on timeout."""
        with self._cycle:
            return self._cycle.wait_for(lambda: self._last_started_done > moment, timeout)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def pg_bystander(port: int, name: str = "postgresql") -> Bystander:
    import psycopg

    def connect() -> Any:
        return psycopg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname=DATABASE,
                               sslmode="disable", autocommit=True, prepare_threshold=None, connect_timeout=5,
                               application_name="bystander")

    flip = [False]

    def check(conn: Any, token: str) -> tuple[Any, ...]:
        flip[0] = not flip[0]
        cursor = psycopg.ClientCursor(conn) if flip[0] else conn.cursor()  # simple and extended protocol
        cursor.execute("SELECT %s::text, current_setting('application_name'), current_setting('search_path'), "
                       "current_setting('statement_timeout'), pg_is_in_recovery()", (token,))
        row = cursor.fetchone()
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raise AssertionError(f"left in transaction status {conn.info.transaction_status!r}")
        assert row is not None
        return tuple(row)

    return Bystander(name, connect, check)


def mysql_bystander(port: int, name: str = "mysql") -> Bystander:
    import pymysql

    def connect() -> Any:
        return pymysql.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, database=DATABASE,
                               autocommit=True, connect_timeout=5, read_timeout=10, write_timeout=10)

    def check(conn: Any, token: str) -> tuple[Any, ...]:
        with conn.cursor() as cursor:
            cursor.execute("SELECT %s, @fuzz, @@session.sql_mode, @@session.autocommit, @@in_transaction, "
                           "DATABASE(), @@session.character_set_client", (token,))
            row = cursor.fetchone()
        assert row is not None
        return tuple(row)

    return Bystander(name, connect, check)


# --- the proxy's log and memory ---

_FRAME = re.compile(r'^\s+File "([^"]+)", line (\d+), in (\S+)')
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


def tracebacks_by_kind(text: str) -> Counter[str]:
    """Count Python tracebacks in a log (a chain of them counts once): kind is the last exception's type and
    the deepest frame in the proxy's own code (else the deepest frame) of its traceback."""
    kinds: Counter[str] = Counter()
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        if "Traceback (most recent call last)" not in lines[index]:
            index += 1
            continue
        where = own = ""
        exc_line = "?"
        while index < len(lines):  # one block, then any chained blocks after it
            where = own = ""
            index += 1
            while index < len(lines) and (lines[index].startswith((" ", "\t")) or not lines[index].strip()):
                found = _FRAME.match(lines[index])
                if found:
                    where = f"{os.path.basename(found[1])}:{found[2]} in {found[3]}"
                    if "/proxy/" in found[1]:
                        own = where
                index += 1
            exc_line = lines[index] if index < len(lines) else "?"
            index += 1
            while index < len(lines) and not lines[index].strip():
                index += 1
            if index < len(lines) and lines[index].startswith(_CHAINED):
                index += 1
                while index < len(lines) and "Traceback (most recent call last)" not in lines[index]:
                    index += 1
                continue
            break
        kinds[f"{exc_line.split(':', 1)[0].strip()} at {own or where or '?'}"] += 1
    return kinds


def tree_rss(pid: int) -> int:
    """Resident memory of a process and its children, bytes."""
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


class LogWatcher:
    """Reads a log file incrementally; new text since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_text(self) -> str:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return ""
        self.offset += len(data)
        return data.decode(errors="replace")
