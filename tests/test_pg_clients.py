"""Real PostgreSQL clients through the proxy in transaction mode: psql, pgbench, psycopg 3 and asyncpg."""

from __future__ import annotations

import asyncio
import os
import subprocess

import asyncpg
import psycopg
import pytest
from psycopg import errors

from devtools.servers import PostgresInstance
from support import ProxyProcess, backend_connections

ENV = dict(os.environ, PGPASSWORD="app-secret")


def dsn(proxy: ProxyProcess, **extra: str) -> str:
    parts = {"host": "127.0.0.1", "port": str(proxy.ports["postgresql"]), "user": "app", "dbname": "app",
             "password": "app-secret", "sslmode": "disable", **extra}
    return " ".join(f"{k}={v}" for k, v in parts.items())


def connect(proxy: ProxyProcess, autocommit: bool = True, **extra: str) -> psycopg.Connection:
    """psycopg without server-side prepared statements (named ones across backends come with session state)."""
    app = extra.pop("application_name", None)
    kwargs = {"application_name": app} if app else {}
    return psycopg.connect(dsn(proxy, **extra), autocommit=autocommit, prepare_threshold=None, **kwargs)


def psql(proxy: ProxyProcess, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-At", "-h", "127.0.0.1", "-p", str(proxy.ports["postgresql"]),
         "-U", "app", "app", *args],
        env=ENV, input=stdin, capture_output=True, timeout=120,
    )


# --- psql ---

def test_psql_simple_queries_and_multi_statement(pg_proxy: ProxyProcess) -> None:
    result = psql(pg_proxy, "-c", "SELECT 1; SELECT 'two'", "-c", "SELECT current_user, current_database()")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split() == ["1", "two", "app|app"]


def test_psql_empty_query_and_error_then_recovery(pg_proxy: ProxyProcess) -> None:
    result = psql(pg_proxy, "-v", "ON_ERROR_STOP=0", stdin=b";\nSELECT 1/0;\nSELECT 42;\n")
    assert b"division by zero" in result.stderr
    assert result.stdout.decode().split() == ["42"]


def test_psql_transaction_with_error_inside(pg_proxy: ProxyProcess) -> None:
    script = b"""
    DROP TABLE IF EXISTS psql_tx; CREATE TABLE psql_tx(a int);
    BEGIN; INSERT INTO psql_tx VALUES (1); SELECT 1/0; COMMIT;
    BEGIN; INSERT INTO psql_tx VALUES (2); COMMIT;
    SELECT array_agg(a) FROM psql_tx;
    """
    result = psql(pg_proxy, "-v", "ON_ERROR_STOP=0", stdin=script)
    assert b"current transaction is aborted" in result.stderr or b"division by zero" in result.stderr
    assert result.stdout.decode().strip().splitlines()[-1] == "{2}"


def test_psql_copy_in_and_out(pg_proxy: ProxyProcess) -> None:
    rows = "".join(f"{i}\trow {i}\n" for i in range(1000)).encode()
    assert psql(pg_proxy, "-c", "DROP TABLE IF EXISTS psql_copy; CREATE TABLE psql_copy(a int, b text)").returncode == 0
    result = psql(pg_proxy, "-c", "\\copy psql_copy FROM STDIN", stdin=rows)
    assert result.returncode == 0, result.stderr
    out = psql(pg_proxy, "-c", "\\copy (SELECT * FROM psql_copy ORDER BY a) TO STDOUT")
    assert out.stdout == rows


# --- pgbench ---

@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_pgbench_through_proxy(pg_proxy: ProxyProcess, pg_bench_tables: PostgresInstance, mode: str) -> None:
    result = subprocess.run(
        ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(pg_proxy.ports["postgresql"]), "-U", "app", "-M", mode,
         "-c", "20", "-j", "2", "-t", "200", "app"],
        env=ENV, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "number of transactions actually processed: 4000/4000" in result.stdout
    assert "number of failed transactions: 0" in result.stdout


def test_pgbench_initialize_uses_copy_through_proxy(pg_proxy: ProxyProcess) -> None:
    result = subprocess.run(
        ["pgbench", "-i", "-q", "-s", "1", "--tablespace=pg_default", "-h", "127.0.0.1",
         "-p", str(pg_proxy.ports["postgresql"]), "-U", "app", "app"],
        env=ENV, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert psql(pg_proxy, "-c", "SELECT count(*) FROM pgbench_accounts").stdout.strip() == b"100000"


# --- psycopg 3 ---

def test_psycopg_transactions_errors_and_params(pg_proxy: ProxyProcess) -> None:
    with connect(pg_proxy, autocommit=False) as conn:
        conn.execute("DROP TABLE IF EXISTS pg3; CREATE TABLE pg3(id int primary key, v text)")
        conn.commit()
        with conn.transaction():
            conn.execute("INSERT INTO pg3 VALUES (%s, %s)", (1, "one"))
        with pytest.raises(errors.UniqueViolation), conn.transaction():
            conn.execute("INSERT INTO pg3 VALUES (%s, %s)", (1, "dup"))
        with pytest.raises(errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.rollback()
        assert conn.execute("SELECT v FROM pg3 WHERE id = %s", (1,)).fetchone() == ("one",)
        assert conn.info.parameter_status("server_version")
        assert conn.info.parameter_status("integer_datetimes") == "on"
        assert conn.info.parameter_status("standard_conforming_strings") == "on"
        assert conn.info.backend_pid != 0


def test_psycopg_pipeline_with_error_mid_pipeline(pg_proxy: ProxyProcess) -> None:
    with connect(pg_proxy) as conn:
        with pytest.raises(errors.DivisionByZero), conn.pipeline():
            first = conn.execute("SELECT 1")
            conn.execute("SELECT 1/0")
            conn.execute("SELECT 3")
        assert first.fetchone() == (1,)
        with conn.pipeline():
            cursors = [conn.execute("SELECT %s::int", (i,)) for i in range(50)]
        assert [c.fetchone()[0] for c in cursors] == list(range(50))  # type: ignore[index]


def test_psycopg_copy_both_ways(pg_proxy: ProxyProcess) -> None:
    with connect(pg_proxy) as conn:
        conn.execute("DROP TABLE IF EXISTS pg3copy; CREATE TABLE pg3copy(a int, b text)")
        with conn.cursor() as cur:
            with cur.copy("COPY pg3copy FROM STDIN") as copy:
                for i in range(5000):
                    copy.write_row((i, f"value {i}"))
            with cur.copy("COPY (SELECT a, b FROM pg3copy ORDER BY a) TO STDOUT") as copy:
                rows = list(copy.rows())
        assert len(rows) == 5000 and rows[4999] == ("4999", "value 4999")


def test_psycopg_copy_failure_keeps_connection_usable(pg_proxy: ProxyProcess) -> None:
    with connect(pg_proxy) as conn:
        conn.execute("DROP TABLE IF EXISTS pg3bad; CREATE TABLE pg3bad(a int)")
        with pytest.raises(errors.InvalidTextRepresentation), conn.cursor() as cur, \
                cur.copy("COPY pg3bad FROM STDIN") as copy:
            copy.write(b"1\nnot-a-number\n3\n")
        assert conn.execute("SELECT count(*) FROM pg3bad").fetchone() == (0,)


def test_psycopg_notices_pass_through(pg_proxy: ProxyProcess) -> None:
    notices: list[str] = []
    with connect(pg_proxy) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello from the server'; END $$")
    assert notices == ["hello from the server"]


def test_startup_parameters_apply_per_client(pg_proxy: ProxyProcess) -> None:
    """Clients with different startup settings share backends yet each sees its own."""
    with connect(pg_proxy, options="'-c TimeZone=Asia/Tokyo -c extra_float_digits=3'", application_name="tokyo") \
            as tokyo, connect(pg_proxy, application_name="plain") as plain:
        for _ in range(20):
            assert tokyo.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
            assert tokyo.execute("SHOW extra_float_digits").fetchone() == ("3",)
            assert tokyo.execute("SHOW application_name").fetchone() == ("tokyo",)
            assert plain.execute("SHOW TimeZone").fetchone() != ("Asia/Tokyo",)
            assert plain.execute("SHOW extra_float_digits").fetchone() == ("1",)
            assert plain.execute("SHOW application_name").fetchone() == ("plain",)
        assert tokyo.info.parameter_status("TimeZone") == "Asia/Tokyo"
        tokyo.execute("SET TimeZone = 'UTC'")
        assert tokyo.info.parameter_status("TimeZone") == "UTC"
        for _ in range(5):
            plain.execute("SELECT 1")
            assert tokyo.execute("SHOW TimeZone").fetchone() == ("UTC",)


def test_invalid_startup_setting_is_refused(pg_proxy: ProxyProcess) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        connect(pg_proxy, options="'-c TimeZone=No/Such_Zone'")
    assert "No/Such_Zone" in str(info.value)


# --- asyncpg ---

async def test_asyncpg_queries_transactions_and_copy(pg_proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(host="127.0.0.1", port=pg_proxy.ports["postgresql"], user="app",
                                 password="app-secret", database="app", statement_cache_size=0, ssl=False)
    try:
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        await conn.execute("DROP TABLE IF EXISTS apg; CREATE TABLE apg(a int, b text)")
        async with conn.transaction():
            await conn.executemany("INSERT INTO apg VALUES ($1, $2)", [(i, str(i)) for i in range(100)])
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute("CREATE UNIQUE INDEX ON apg(a)")
                await conn.execute("INSERT INTO apg VALUES (1, 'dup')")
        assert await conn.fetchval("SELECT count(*) FROM apg") == 100
        await conn.copy_records_to_table("apg", records=[(1000 + i, "copied") for i in range(500)])
        assert await conn.fetchval("SELECT count(*) FROM apg WHERE b = 'copied'") == 500
        import io
        sink = io.BytesIO()
        await conn.copy_from_query("SELECT a FROM apg ORDER BY a", output=sink)
        assert sink.getvalue().count(b"\n") == 600
    finally:
        await conn.close()


async def test_500_clients_share_10_backends(pg_proxy: ProxyProcess, pg_server: PostgresInstance) -> None:
    port = pg_proxy.ports["postgresql"]
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, await asyncio.to_thread(backend_connections, pg_server))
            await asyncio.sleep(0.05)

    # The test process computes every client's SCRAM proof on its own event loop: logins go at most 50 at a time
    # (500 at once would queue behind each other here, past the proxy's login timeout on a loaded machine); all 500
    # sessions are open together for the transactions.
    logins = asyncio.Semaphore(50)

    async def connect() -> asyncpg.Connection:
        async with logins:
            return await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                         database="app", statement_cache_size=0, ssl=False, timeout=60)

    async def client(conn: asyncpg.Connection, n: int) -> int:
        total = 0
        for i in range(3):
            async with conn.transaction():
                total += await conn.fetchval("SELECT $1::int FROM pg_sleep(0.005)", n + i)
        return total

    conns = await asyncio.gather(*(connect() for _ in range(500)))
    sampler = asyncio.create_task(sample())
    try:
        results = await asyncio.gather(*(client(conn, n) for n, conn in enumerate(conns)))
    finally:
        done.set()
        await sampler
        await asyncio.gather(*(conn.close() for conn in conns))
    assert results == [3 * n + 3 for n in range(500)]
    assert 0 < peak <= 10, peak
