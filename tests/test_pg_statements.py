"""PostgreSQL prepared statements through a pool smaller than its clients: what a direct connection guarantees."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from devtools.servers import PostgresInstance
from proxy.protocol.pg import messages as pg
from rawpg import RawClient
from support import ProxyProcess, running_proxy

_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}_{next(_names)}"


# --- raw extended-protocol messages ---


def parse(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    body = pg.cstring(name) + pg.cstring(sql) + struct.pack("!h", len(types)) + b"".join(
        struct.pack("!I", t) for t in types)
    return pg.message(b"P", body)


def bind(statement: str, params: tuple[bytes, ...] = (), binary_results: bool = False, portal: str = "") -> bytes:
    body = pg.cstring(portal) + pg.cstring(statement) + struct.pack("!h", 0) + struct.pack("!h", len(params))
    for value in params:
        body += struct.pack("!i", len(value)) + value
    body += struct.pack("!hh", 1, 1) if binary_results else struct.pack("!h", 0)
    return pg.message(b"B", body)


def describe(target: str, name: str) -> bytes:
    return pg.message(b"D", target.encode() + pg.cstring(name))


def close(target: str, name: str) -> bytes:
    return pg.message(b"C", target.encode() + pg.cstring(name))


EXECUTE = pg.message(b"E", pg.cstring("") + struct.pack("!i", 0))
SYNC = pg.message(b"S")


def kinds(messages: list[tuple[str, bytes]]) -> str:
    return "".join(kind for kind, _ in messages)


def row_values(messages: list[tuple[str, bytes]]) -> list[bytes | None]:
    """The first column of every DataRow."""
    values: list[bytes | None] = []
    for kind, body in messages:
        if kind == "D":
            length = struct.unpack_from("!i", body, 2)[0]
            values.append(None if length < 0 else body[6 : 6 + length])
    return values


def error_of(messages: list[tuple[str, bytes]]) -> dict[str, str] | None:
    for kind, body in messages:
        if kind == "E":
            return pg.parse_error_fields(body)
    return None


def raw(proxy: ProxyProcess) -> RawClient:
    client = RawClient(proxy.ports["postgresql"])
    client.login()
    return client


def connect(proxy: ProxyProcess, **extra: object) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                           dbname="app", sslmode="disable", autocommit=True, **extra)


def superuser(pg_server: PostgresInstance, sql: str) -> str:
    return pg_server.psql(sql, db="app")


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance) -> Iterator[ProxyProcess]:
    """A proxy whose pool has two backends (every test here uses more clients than that)."""
    with running_proxy(tmp_path_factory.mktemp("stmts2"), pg_server,
                       postgresql__pool={"max_connections": 2, "connection_borrow_timeout": 10.0}) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance) -> Iterator[ProxyProcess]:
    """A proxy whose pool has one backend: every client shares it."""
    with running_proxy(tmp_path_factory.mktemp("stmts1"), pg_server,
                       postgresql__pool={"max_connections": 1, "connection_borrow_timeout": 10.0}) as proxy:
        yield proxy


@pytest.fixture
def int_table(pg_server: PostgresInstance) -> Iterator[str]:
    name = unique("t")
    superuser(pg_server, f"CREATE TABLE {name}(v int); INSERT INTO {name} VALUES (2); GRANT ALL ON {name} TO app")
    yield name
    superuser(pg_server, f"DROP TABLE IF EXISTS {name}")


def psql_pid(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


class Mover:
    """Two sessions that steer a client onto the other backend of a two-backend pool (deterministically)."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.first = connect(proxy, prepare_threshold=None)
        self.second = connect(proxy, prepare_threshold=None)

    def hold_other(self) -> None:
        """Call while the client is inside a transaction: `first` takes the other backend."""
        self.first.execute("BEGIN")
        self.first.execute("SELECT 1")

    def swap(self) -> None:
        """Call after the client committed: `second` takes the client's old backend, `first` frees the other."""
        self.second.execute("BEGIN")
        self.second.execute("SELECT 1")
        self.first.execute("COMMIT")

    def done(self) -> None:
        self.second.execute("COMMIT")

    def close(self) -> None:
        self.first.close()
        self.second.close()


# --- issue: a statement prepared for one client is reused after the schema changed ---


async def test_asyncpg_alter_type_on_another_backend(two: ProxyProcess, pg_server: PostgresInstance,
                                                     int_table: str) -> None:
    conn = await asyncpg.connect(host="127.0.0.1", port=two.ports["postgresql"], user="app", password="app-secret",
                                 database="app", ssl=False)
    mover = Mover(two)
    try:
        sql = f"SELECT v FROM {int_table}"
        async with conn.transaction():
            assert await conn.fetchval(sql) == 2
            assert await conn.fetchval(sql) == 2
            await asyncio.to_thread(mover.hold_other)
        await asyncio.to_thread(mover.swap)
        superuser(pg_server, f"ALTER TABLE {int_table} ALTER COLUMN v TYPE real")
        value = await conn.fetchval(sql)  # asyncpg re-prepares on 0A000, as it does directly
        assert value == 2.0 and isinstance(value, float), value
        await asyncio.to_thread(mover.done)
        assert await conn.fetchval(sql) == 2.0
    finally:
        mover.close()
        await conn.close()


JDBC_JAR = Path("/usr/share/java/postgresql.jar")
JAVA_DRIVER = Path(__file__).parent / "java" / "StatementDriver.java"


@pytest.mark.skipif(shutil.which("java") is None or not JDBC_JAR.exists(),
                    reason="needs java and PgJDBC (apt-get install libpostgresql-jdbc-java)")
def test_pgjdbc_prepare_threshold_after_alter_type(two: ProxyProcess, pg_server: PostgresInstance,
                                                   int_table: str) -> None:
    url = f"jdbc:postgresql://127.0.0.1:{two.ports['postgresql']}/app?prepareThreshold=1&sslmode=disable"
    java = subprocess.Popen(["java", "-cp", str(JDBC_JAR), str(JAVA_DRIVER), url, "app", "app-secret",
                             f"SELECT v FROM {int_table}"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert java.stdin is not None and java.stdout is not None
    mover = Mover(two)

    def say(command: str) -> str:
        assert java.stdin is not None and java.stdout is not None
        java.stdin.write(command + "\n")
        java.stdin.flush()
        return java.stdout.readline().strip()

    try:
        assert java.stdout.readline().strip() == "ready"
        assert say("begin") == "ok"
        assert say("query") == "value Integer 2"
        assert say("query") == "value Integer 2"  # a named server-side statement from here on, binary results
        mover.hold_other()
        assert say("commit") == "ok"
        mover.swap()
        superuser(pg_server, f"ALTER TABLE {int_table} ALTER COLUMN v TYPE real")
        first = say("query")
        assert first in ("value Float 2.0", "error 0A000 ERROR: cached plan must not change result type"), first
        assert say("query") == "value Float 2.0"  # PgJDBC re-prepares, as it does directly
        mover.done()
    finally:
        mover.close()
        java.stdin.close()
        java.wait(30)


def test_raw_alter_type_gets_cached_plan_error(two: ProxyProcess, pg_server: PostgresInstance,
                                               int_table: str) -> None:
    client = raw(two)
    mover = Mover(two)
    try:
        client.query("BEGIN")
        client.send(parse("s1", f"SELECT v FROM {int_table}") + describe("S", "s1") + SYNC)
        described = client.until("Z")
        assert kinds(described) == "1tTZ"
        client.send(bind("s1", binary_results=True) + EXECUTE + SYNC)
        assert row_values(client.until("Z")) == [struct.pack("!i", 2)]
        mover.hold_other()
        client.query("COMMIT")
        mover.swap()
        superuser(pg_server, f"ALTER TABLE {int_table} ALTER COLUMN v TYPE real")
        client.send(bind("s1", binary_results=True) + EXECUTE + SYNC)
        replies = client.until("Z")
        assert row_values(replies) == []  # never b"@\x00\x00\x00" decoded as int4 1073741824
        error = error_of(replies)
        assert error is not None and error["C"] == "0A000", replies
        assert error["M"] == "cached plan must not change result type"
        assert replies[-1] == ("Z", b"I")
        # inside a transaction block the error aborts it, as directly
        client.query("BEGIN")
        client.send(bind("s1", binary_results=True) + EXECUTE + SYNC)
        replies = client.until("Z")
        assert error_of(replies)["C"] == "0A000" and replies[-1] == ("Z", b"E")  # type: ignore[index]
        assert error_of(client.query("SELECT 1"))["C"] == "25P02"  # type: ignore[index]
        client.query("ROLLBACK")
        # the client re-prepares under a new name, as drivers do, and gets the new type
        client.send(close("S", "s1") + parse("s1", f"SELECT v FROM {int_table}") + describe("S", "s1")
                    + bind("s1", binary_results=True) + EXECUTE + SYNC)
        replies = client.until("Z")
        assert error_of(replies) is None, replies
        assert row_values(replies) == [struct.pack("!f", 2.0)]
        mover.done()
    finally:
        mover.close()
        client.close()


def test_psycopg_prepared_alter_type(two: ProxyProcess, pg_server: PostgresInstance, int_table: str) -> None:
    conn = connect(two, prepare_threshold=0)
    mover = Mover(two)
    try:
        sql = f"SELECT v FROM {int_table}"
        with conn.transaction():
            with conn.cursor(binary=True) as cur:
                assert cur.execute(sql, prepare=True).fetchone() == (2,)
                assert cur.execute(sql, prepare=True).fetchone() == (2,)
            mover.hold_other()
        mover.swap()
        superuser(pg_server, f"ALTER TABLE {int_table} ALTER COLUMN v TYPE real")
        for _ in range(3):
            with conn.cursor(binary=True) as cur:
                try:
                    value = cur.execute(sql, prepare=True).fetchone()
                except psycopg.errors.FeatureNotSupported as exc:
                    assert "cached plan must not change result type" in str(exc)
                    continue
                assert value == (2.0,)
        mover.done()
    finally:
        mover.close()
        conn.close()


def test_search_path_schemas_get_their_own_statements(one: ProxyProcess, pg_server: PostgresInstance) -> None:
    a_schema, b_schema = unique("sa"), unique("sb")
    superuser(pg_server, f"CREATE SCHEMA {a_schema} AUTHORIZATION app; CREATE SCHEMA {b_schema} AUTHORIZATION app;"
                         f"CREATE TABLE {a_schema}.t(v int); INSERT INTO {a_schema}.t VALUES (1);"
                         f"CREATE TABLE {b_schema}.t(v text); INSERT INTO {b_schema}.t VALUES ('b');"
                         f"GRANT ALL ON {a_schema}.t, {b_schema}.t TO app")
    try:
        a = connect(one, prepare_threshold=0, options=f"-c search_path={a_schema}")
        b = connect(one, prepare_threshold=0)
        b.execute(f"SET search_path = {b_schema}")
        with a, b:
            for _ in range(4):
                assert a.execute("SELECT v FROM t", prepare=True).fetchone() == (1,)
                assert b.execute("SELECT v FROM t", prepare=True).fetchone() == ("b",)
    finally:
        superuser(pg_server, f"DROP SCHEMA {a_schema} CASCADE; DROP SCHEMA {b_schema} CASCADE")


async def test_drop_and_recreate_custom_type(one: ProxyProcess, pg_server: PostgresInstance) -> None:
    typ, table = unique("mood"), unique("m")
    create = (f"CREATE TYPE {typ} AS ENUM ('sad', 'happy'); CREATE TABLE {table}(x {typ});"
              f"INSERT INTO {table} VALUES ('happy'); GRANT ALL ON {table} TO app")
    superuser(pg_server, create)
    port = one.ports["postgresql"]
    first = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret", database="app",
                                  ssl=False)
    try:
        assert await first.fetchval(f"SELECT x FROM {table}") == "happy"
        superuser(pg_server, f"DROP TABLE {table}; DROP TYPE {typ}; " + create)
        second = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                       database="app", ssl=False)
        try:  # a new client prepares the same text: it must see the new type, like a direct connection
            assert await second.fetchval(f"SELECT x FROM {table}") == "happy"
            assert await second.fetchval(f"SELECT x FROM {table}") == "happy"
        finally:
            await second.close()
        first.terminate()
        first = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                      database="app", ssl=False)
        assert await first.fetchval(f"SELECT x FROM {table}") == "happy"
    finally:
        await first.close()
        superuser(pg_server, f"DROP TABLE IF EXISTS {table}; DROP TYPE IF EXISTS {typ}")


async def test_new_client_after_alter_type_is_not_told_plan_invalid(one: ProxyProcess, pg_server: PostgresInstance,
                                                                    int_table: str) -> None:
    port = one.ports["postgresql"]
    old = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret", database="app",
                                ssl=False)
    try:
        assert await old.fetchval(f"SELECT v FROM {int_table}") == 2
        superuser(pg_server, f"ALTER TABLE {int_table} ALTER COLUMN v TYPE bigint")
        new = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                    database="app", ssl=False, statement_cache_size=0)
        try:
            stmt = await new.prepare(f"SELECT v FROM {int_table}")  # no retry here: any error would surface
            assert await stmt.fetchval() == 2
        finally:
            await new.close()
        assert await old.fetchval(f"SELECT v FROM {int_table}") == 2  # asyncpg re-prepares, as directly
    finally:
        await old.close()


def test_statement_whose_table_is_gone_on_the_other_backend(two: ProxyProcess, pg_server: PostgresInstance,
                                                             int_table: str) -> None:
    client = raw(two)
    mover = Mover(two)
    try:
        client.query("BEGIN")
        client.send(parse("s1", f"SELECT v FROM {int_table}") + parse("s2", "SELECT 7") + SYNC)
        assert kinds(client.until("Z")) == "11Z"
        mover.hold_other()
        client.query("COMMIT")
        mover.swap()
        superuser(pg_server, f"DROP TABLE {int_table}")
        client.send(bind("s1"))  # the rest comes later: held while the proxy checks s1 on this backend
        client.send(EXECUTE + bind("s2") + EXECUTE)
        client.send(SYNC)
        replies = client.until("Z")
        error = error_of(replies)
        assert error is not None and error["C"] == "42P01", replies  # as a direct revalidation reports it
        assert kinds(replies) == "EZ" and replies[-1] == ("Z", b"I")
        client.send(bind("s2") + EXECUTE + SYNC)
        assert row_values(client.until("Z")) == [b"7"]
        mover.done()
    finally:
        mover.close()
        client.close()


def test_table_recreated_with_the_same_shape_keeps_working(two: ProxyProcess, pg_server: PostgresInstance,
                                                            int_table: str) -> None:
    """The server compares result types, not which table they come from: neither does the proxy."""
    client = raw(two)
    mover = Mover(two)
    try:
        client.query("BEGIN")
        client.send(parse("s1", f"SELECT v FROM {int_table}") + describe("S", "s1") + SYNC)
        assert kinds(client.until("Z")) == "1tTZ"
        mover.hold_other()
        client.query("COMMIT")
        mover.swap()
        superuser(pg_server, f"DROP TABLE {int_table}; CREATE TABLE {int_table}(v int); "
                             f"INSERT INTO {int_table} VALUES (5); GRANT ALL ON {int_table} TO app")
        client.send(bind("s1", binary_results=True) + EXECUTE + SYNC)
        replies = client.until("Z")
        assert error_of(replies) is None, replies
        assert row_values(replies) == [struct.pack("!i", 5)]
        mover.done()
    finally:
        mover.close()
        client.close()


def test_described_unnamed_statement_after_alter_on_the_other_backend(two: ProxyProcess, pg_server: PostgresInstance,
                                                                      int_table: str) -> None:
    client = raw(two)
    mover = Mover(two)
    try:
        client.send(parse("", f"SELECT v FROM {int_table}") + describe("S", "") + SYNC)
        assert kinds(client.until("Z")) == "1tTZ"
        client.send(bind("", binary_results=True) + EXECUTE + SYNC)  # same round trip pattern, another trip
        assert row_values(client.until("Z")) == [struct.pack("!i", 2)]
        client.query("BEGIN")
        mover.hold_other()
        client.query("COMMIT")  # a simple query ends the unnamed statement: prepare it again
        client.send(parse("", f"SELECT v FROM {int_table}") + describe("S", "") + SYNC)
        assert kinds(client.until("Z")) == "1tTZ"
        mover.swap()
        superuser(pg_server, f"ALTER TABLE {int_table} ALTER COLUMN v TYPE real")
        client.send(bind("", binary_results=True) + EXECUTE + SYNC)
        replies = client.until("Z")
        assert row_values(replies) == []
        error = error_of(replies)
        assert error is not None and error["C"] == "0A000", replies
        mover.done()
    finally:
        mover.close()
        client.close()


def test_two_names_for_one_text_and_sql_deallocate_elsewhere(two: ProxyProcess) -> None:
    client = raw(two)
    mover = Mover(two)
    try:
        client.query("BEGIN")
        client.send(parse("a", "SELECT 1 + $1::int") + parse("b", "SELECT 1 + $1::int") + SYNC)
        assert kinds(client.until("Z")) == "11Z"
        error = error_of([*client.query("SELECT 1")])
        assert error is None
        client.send(parse("a", "SELECT 2") + SYNC)
        error = error_of(client.until("Z"))
        assert error is not None and error["C"] == "42P05" and '"a"' in error["M"]
        client.query("ROLLBACK")
        client.query("BEGIN")
        client.query("SELECT 1")
        mover.hold_other()
        client.query("COMMIT")
        mover.swap()
        assert kinds(client.query("DEALLOCATE a"))[-2:] == "CZ"  # on a backend that never had it
        client.send(bind("a", (b"1",)) + EXECUTE + SYNC)
        assert error_of(client.until("Z"))["C"] == "26000"  # type: ignore[index]
        client.send(bind("b", (b"1",)) + EXECUTE + SYNC)
        assert row_values(client.until("Z")) == [b"2"]
        mover.done()
    finally:
        mover.close()
        client.close()


def test_sql_execute_after_alter_on_the_other_backend(two: ProxyProcess, pg_server: PostgresInstance,
                                                      int_table: str) -> None:
    client = raw(two)
    mover = Mover(two)
    try:
        client.query("BEGIN")
        client.send(parse("p", f"SELECT v FROM {int_table}") + SYNC)
        assert kinds(client.until("Z")) == "1Z"
        assert row_values(client.query("EXECUTE p")) == [b"2"]
        mover.hold_other()
        client.query("COMMIT")
        mover.swap()
        superuser(pg_server, f"ALTER TABLE {int_table} ALTER COLUMN v TYPE text")
        client.query("BEGIN")
        replies = client.query("EXECUTE p")
        error = error_of(replies)
        assert error is not None and error["C"] == "0A000" and replies[-1] == ("Z", b"E"), replies
        client.query("ROLLBACK")
        superuser(pg_server, f"DROP TABLE {int_table}")
        mover.done()
        mover.hold_other()  # whichever backend the client gets, p must be checked there
        replies = client.query("EXECUTE p")
        error = error_of(replies)
        assert error is not None and error["C"] in ("0A000", "42P01") and replies[-1] == ("Z", b"I"), replies
        mover.first.execute("COMMIT")
    finally:
        mover.close()
        client.close()


# --- unnamed statements ---


def test_unnamed_statement_survives_round_trips(one: ProxyProcess) -> None:
    client, other = raw(one), raw(one)
    try:
        client.send(parse("", "SELECT $1::int + 1") + describe("S", "") + SYNC)
        assert kinds(client.until("Z")) == "1tTZ"
        other.query("SELECT 'the other client used the only backend'")
        other.send(parse("", "SELECT 'not yours'") + SYNC)
        assert kinds(other.until("Z")) == "1Z"
        client.send(bind("", (b"41",)) + EXECUTE + SYNC)
        replies = client.until("Z")
        assert error_of(replies) is None, replies
        assert row_values(replies) == [b"42"]
        client.send(bind("", (b"1",)) + EXECUTE + SYNC)
        assert row_values(client.until("Z")) == [b"2"]
        # a simple query ends the unnamed statement, as directly
        client.query("SELECT 1")
        client.send(bind("", (b"1",)) + EXECUTE + SYNC)
        error = error_of(client.until("Z"))
        assert error is not None and error["C"] == "26000", error
    finally:
        client.close()
        other.close()


def test_another_clients_leftover_unnamed_statement_is_not_bound(one: ProxyProcess) -> None:
    owner, stranger = raw(one), raw(one)
    try:
        owner.send(parse("", "SELECT 'owner secret'") + SYNC)
        assert kinds(owner.until("Z")) == "1Z"
        stranger.send(bind("") + EXECUTE + SYNC)
        replies = stranger.until("Z")
        assert row_values(replies) == []
        error = error_of(replies)
        assert error is not None and error["C"] == "26000"
        assert error["M"] == "unnamed prepared statement does not exist"
        stranger.send(describe("S", "") + SYNC)
        error = error_of(stranger.until("Z"))
        assert error is not None and error["C"] == "26000"
        owner.send(bind("") + EXECUTE + SYNC)
        assert row_values(owner.until("Z")) == [b"owner secret"]
    finally:
        owner.close()
        stranger.close()


# --- SQL EXECUTE / DEALLOCATE of protocol-level names ---


def test_sql_execute_of_a_protocol_prepared_statement(two: ProxyProcess) -> None:
    client = raw(two)
    mover = Mover(two)
    try:
        client.send(parse("Doubler", "SELECT $1::int * 2") + SYNC)
        assert kinds(client.until("Z")) == "1Z"
        assert row_values(client.query('EXECUTE "Doubler"(21)')) == [b"42"]
        error = error_of(client.query("EXECUTE doubler(21)"))  # unquoted names fold to lower case
        assert error is not None and error["C"] == "26000"
        client.query("BEGIN")
        assert row_values(client.query('EXECUTE "Doubler"(1)')) == [b"2"]
        mover.hold_other()
        client.query("COMMIT")
        mover.swap()
        assert row_values(client.query('EXECUTE "Doubler"(5)')) == [b"10"]  # on the other backend
        assert kinds(client.query('DEALLOCATE "Doubler"'))[-2:] == "CZ"
        error = error_of(client.query('EXECUTE "Doubler"(5)'))
        assert error is not None and error["C"] == "26000"
        mover.done()
    finally:
        mover.close()
        client.close()


# --- malformed extended-query messages ---


@pytest.mark.parametrize("message", [
    pg.message(b"D", b"X" + pg.cstring("name")),
    pg.message(b"D", b"S"),
    pg.message(b"C", b"S" + b"a\x00b\x00"),
    pg.message(b"P", b"no-terminator"),
    pg.message(b"P", pg.cstring("") + pg.cstring("SELECT 1") + struct.pack("!h", 3)),
    pg.message(b"B", pg.cstring("") + b"statement-without-nul"),
])
def test_malformed_extended_message_gets_08p01(two: ProxyProcess, message: bytes) -> None:
    bystander = connect(two, prepare_threshold=0)
    bystander.execute("BEGIN")
    bystander.execute("SELECT 1", prepare=True)
    client = raw(two)
    try:
        client.query("BEGIN")
        client.send(parse("ok", "SELECT 1") + message + bind("ok") + EXECUTE + SYNC)
        replies = client.until("Z")
        assert kinds(replies) == "1EZ", replies  # as PostgreSQL: an ERROR, the rest skipped up to Sync
        fields = error_of(replies)
        assert fields is not None and fields["C"] == "08P01" and fields["S"] == "ERROR", fields
        assert "malformed" in fields["M"] or "NUL" in fields["M"], fields
        assert replies[-1] == ("Z", b"E")  # the transaction block failed, as directly
        client.query("ROLLBACK")
        assert row_values(client.query("SELECT 'still here'")) == [b"still here"]
        two.wait_for_log(r"WARNING.*(malformed|NUL).*\[08P01\]")
        assert bystander.execute("SELECT 'fine'", prepare=True).fetchone() == ("fine",)
        bystander.execute("COMMIT")
        assert "Traceback" not in two.log()
    finally:
        client.close()
        bystander.close()


def test_many_clients_share_few_backends_with_prepared_statements(two: ProxyProcess) -> None:
    async def run() -> None:
        async def client(n: int) -> None:
            conn = await asyncpg.connect(host="127.0.0.1", port=two.ports["postgresql"], user="app",
                                         password="app-secret", database="app", ssl=False)
            try:
                for i in range(15):
                    assert await conn.fetchval("SELECT $1::int + $2::int", n, i) == n + i
                    assert await conn.fetchval("SELECT $1::text || 'x'", str(n)) == f"{n}x"
            finally:
                await conn.close()

        await asyncio.gather(*(client(n) for n in range(6)))

    asyncio.run(run())
    assert "Traceback" not in two.log()


async def test_concurrent_clients_through_repeated_type_changes(two: ProxyProcess, pg_server: PostgresInstance,
                                                               int_table: str) -> None:
    """Six asyncpg clients on two backends while the column's type keeps changing: a value is 2 in whatever type
    the column has, or the driver's cached-plan error; never the bytes of one type read as another."""
    port = two.ports["postgresql"]
    stop = asyncio.Event()
    seen: list[object] = []

    async def client() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                     database="app", ssl=False)
        try:
            while not stop.is_set():  # until the last type has been read a while (alter() ends it)
                try:
                    seen.append(await conn.fetchval(f"SELECT v FROM {int_table}"))
                except (asyncpg.exceptions.InvalidCachedStatementError,
                        asyncpg.exceptions.FeatureNotSupportedError) as exc:
                    assert "cached" in str(exc)
        finally:
            await conn.close()

    async def alter() -> None:
        for kind in ("real", "bigint", "double precision", "int", "numeric", "smallint", "real"):
            await asyncio.sleep(0.15)
            await asyncio.to_thread(superuser, pg_server, f"ALTER TABLE {int_table} ALTER COLUMN v TYPE {kind}")
        await asyncio.sleep(0.5)  # the last type (real) for a while: every client reads floats
        stop.set()

    await asyncio.gather(alter(), *(client() for _ in range(6)))
    assert seen and all(value == 2 for value in seen), [v for v in seen if v != 2][:5]
    assert {type(value).__name__ for value in seen} >= {"int", "float"}
    assert "Traceback" not in two.log()
