"""lastval()/currval() through a pool smaller than the clients: each client reads its own ids, never another's."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest
from psycopg import errors

from devtools.servers import PostgresInstance
from support import ProxyProcess, running_proxy

CLIENTS = 20
ROUNDS = 8


@pytest.fixture(scope="module")
def seq_proxy(tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresInstance) -> Iterator[ProxyProcess]:
    pg_server.psql("CREATE TABLE IF NOT EXISTS seq_t (id serial PRIMARY KEY, who int NOT NULL)", user="app",
                   db="app")
    with running_proxy(tmp_path_factory.mktemp("seq"), pg_server, postgresql__pool={"max_connections": 5}) as proxy:
        yield proxy


def owner_of(pg: PostgresInstance, ids: list[int]) -> dict[int, int]:
    rows = pg.psql(f"SELECT id, who FROM seq_t WHERE id IN ({','.join(map(str, ids))})", user="app", db="app")
    return {int(i): int(w) for i, w in (line.split("|") for line in rows.split())}


async def test_asyncpg_clients_read_their_own_lastval_and_currval(seq_proxy: ProxyProcess,
                                                                  pg_server: PostgresInstance) -> None:
    """20 clients, pool of 5: INSERT into a serial table, then lastval()/currval() in the next transaction."""
    port = seq_proxy.ports["postgresql"]

    async def client(who: int) -> list[int]:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                     database="app", ssl=False, statement_cache_size=0)
        seen = []
        try:
            for i in range(ROUNDS):
                await conn.execute("INSERT INTO seq_t (who) VALUES ($1)", who)
                query = "SELECT lastval()" if i % 2 == 0 else "SELECT currval('seq_t_id_seq')"
                seen.append(await conn.fetchval(query))
        finally:
            await conn.close()
        return seen

    results = await asyncio.gather(*(client(who) for who in range(CLIENTS)))
    owners = owner_of(pg_server, [i for ids in results for i in ids])
    for who, ids in enumerate(results):
        assert [owners[i] for i in ids] == [who] * ROUNDS


def test_psycopg_clients_read_their_own_lastval(seq_proxy: ProxyProcess, pg_server: PostgresInstance) -> None:
    results: dict[int, list[int]] = {}
    failures: list[BaseException] = []

    def client(who: int) -> None:
        try:
            with psycopg.connect(host="127.0.0.1", port=seq_proxy.ports["postgresql"], user="app",
                                 password="app-secret", dbname="app", sslmode="disable", autocommit=True) as conn:
                seen = []
                for i in range(ROUNDS):
                    # simple-query protocol (no parameters, ClientCursor) and extended, alternately
                    cursor = psycopg.ClientCursor(conn) if i % 2 else conn.cursor()
                    cursor.execute(f"INSERT INTO seq_t (who) VALUES ({who})")
                    row = cursor.execute("SELECT lastval()").fetchone()
                    assert row is not None
                    seen.append(row[0])
                results[who] = seen
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(who,)) for who in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures[0]
    owners = owner_of(pg_server, [i for ids in results.values() for i in ids])
    for who, ids in results.items():
        assert [owners[i] for i in ids] == [who] * ROUNDS


def test_never_another_clients_value(seq_proxy: ProxyProcess) -> None:
    """A client that never called nextval() gets "not yet defined", whatever its backend did for others."""
    stop = threading.Event()

    def inserter() -> None:
        with psycopg.connect(host="127.0.0.1", port=seq_proxy.ports["postgresql"], user="app",
                             password="app-secret", dbname="app", sslmode="disable", autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO seq_t (who) VALUES (-1)")

    threads = [threading.Thread(target=inserter, daemon=True) for _ in range(8)]  # more than the pool
    for thread in threads:
        thread.start()
    try:
        with psycopg.connect(host="127.0.0.1", port=seq_proxy.ports["postgresql"], user="app",
                             password="app-secret", dbname="app", sslmode="disable", autocommit=True) as reader:
            for _ in range(30):
                with pytest.raises(errors.ObjectNotInPrerequisiteState):
                    reader.execute("SELECT lastval()")
                with pytest.raises(errors.ObjectNotInPrerequisiteState):
                    reader.execute("SELECT currval('seq_t_id_seq')")
                reader.execute("SELECT 1")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)


def test_never_another_clients_value_inside_a_transaction(seq_proxy: ProxyProcess) -> None:
    """BEGIN on its own, then currval() in a later round trip (extended protocol): still not another's value."""
    stop = threading.Event()

    def inserter() -> None:
        with psycopg.connect(host="127.0.0.1", port=seq_proxy.ports["postgresql"], user="app",
                             password="app-secret", dbname="app", sslmode="disable", autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO seq_t (who) VALUES (-2)")

    threads = [threading.Thread(target=inserter, daemon=True) for _ in range(8)]  # more than the pool
    for thread in threads:
        thread.start()
    try:
        with psycopg.connect(host="127.0.0.1", port=seq_proxy.ports["postgresql"], user="app",
                             password="app-secret", dbname="app", sslmode="disable") as reader:
            for _ in range(20):
                with pytest.raises(errors.ObjectNotInPrerequisiteState):
                    with reader.transaction():
                        reader.execute("SELECT 1")
                        reader.execute("SELECT currval('seq_t_id_seq')")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)


@pytest.mark.parametrize("begin", ["BEGIN", "START TRANSACTION"])
async def test_transaction_block_after_another_clients_insert(seq_proxy: ProxyProcess, begin: str) -> None:
    """The backend another client just inserted on; then BEGIN alone and currval() in a later round trip
    (asyncpg: simple protocol for BEGIN, extended for the query, where no DISCARD can go first)."""
    port = seq_proxy.ports["postgresql"]

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(host="127.0.0.1", port=port, user="app", password="app-secret",
                                     database="app", ssl=False)

    reader = await connect()
    try:
        for _ in range(5):
            other = await connect()
            await other.execute("INSERT INTO seq_t (who) VALUES (-3)")
            await other.close()
            await reader.execute(begin)
            with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):
                await reader.fetchval("SELECT currval('seq_t_id_seq')")
            await reader.execute("ROLLBACK")
    finally:
        await reader.close()


def test_sequence_words_and_discard_decisions() -> None:
    """Unit: the words seen in a first batch (named statements resolved) and when DISCARD SEQUENCES goes first."""
    from proxy.protocol.pg import extended as ext
    from proxy.protocol.pg import messages as pg
    from proxy.session import pg_sequences as seq

    class Named:
        rest = b"INSERT INTO t (x) VALUES ($1)\x00\x00\x00"
        seq_words: frozenset[bytes] | None = None

    statements = {b"s1": Named()}
    bind = b"B" + pg.INT32.pack(4 + 1 + 3 + 4) + b"\x00s1\x00" + b"\x00" * 4
    assert seq.words_in(bind, statements) == {b"insert"}
    assert seq.words_in(pg.query("SELECT LastVal()"), {}) == {b"lastval"}
    assert seq.words_in(pg.query("SELECT inserted_at, copy_count FROM t"), {}) == set()

    class FakeBackend:
        uses = 0
        seq_owner = seq.NOBODY
        expect: list[ext.Expectation] = []

        def expect_reply(self, expectation: ext.Expectation) -> None:
            self.expect.append(expectation)

        def count_use(self) -> int:
            self.uses += 1
            return self.uses

        def sequences_belong_to(self, owner: int) -> None:
            self.seq_owner = owner

    backend = FakeBackend()
    assert seq.attach(backend, 7, {b"insert"}) == (b"", True)  # type: ignore[arg-type]  # a new session
    assert seq.attach(backend, 8, set()) == (b"", False)  # type: ignore[arg-type]  # nothing to discard for
    assert backend.seq_owner == seq.SHARED
    assert seq.attach(backend, 8, {b"insert", b"returning"}) == (seq.DISCARD_SEQUENCES, False)  # type: ignore[arg-type]
    assert seq.attach(backend, 8, {b"lastval"}) == (b"", False)  # type: ignore[arg-type]  # its own values
    assert backend.uses == 4 and len(backend.expect) == 1
