"""Fuzz cases for both listeners: protocol message builders, byte mutators and case generators (pure, seeded)."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import write_lenenc_str
from proxy.protocol.pg import messages as pg

I16 = struct.Struct("!h")
I32 = struct.Struct("!i")
U32 = struct.Struct("!I")

# --- cases ---


@dataclass(slots=True)
class Case:
    """One fuzz connection: how far to log in properly, then the packets to send (pipelined, in one write).

    stage, PostgreSQL: "raw" (nothing before), "startup" (valid StartupMessage, then the packets stand for the
    SASLInitialResponse), "sasl_final" (valid SCRAM first step; the client-final is built and mutated with
    `mutation_seed`), "session" (full login, then the packets).
    stage, MySQL: "raw" (send before reading the greeting), "greeting" (after it), "handshake" (a valid
    HandshakeResponse41 built for the greeting, mutated with `mutation_seed`), "session" (full login first).
    """

    protocol: str
    stage: str
    packets: list[bytes] = field(default_factory=list)
    mutation_seed: int | None = None
    mutated: int = 0  # how many of the packets were mutated

    def describe(self) -> str:
        head = f"{self.protocol}/{self.stage}"
        if self.mutation_seed is not None:
            head += f" (login packet mutated with seed {self.mutation_seed})"
        return head + " " + repr(b"".join(self.packets))


# --- mutators ---

INTERESTING_32 = (0, 1, 3, 4, 5, 8, 0x7F, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000, 0xFFFFFF, 0x1000000, 0x3FFFFFFF,
                  0x40000000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
INTERESTING_24 = (0, 1, 2, 0xFF, 0x100, 0xFFFF, 0x10000, 0xFFFFFE, 0xFFFFFF)


def _body_mutation(rng: random.Random, body: bytes) -> bytes:
    """One change inside a message body (the header is fixed afterwards)."""
    choice = rng.random()
    if not body or choice < 0.1:
        return rng.randbytes(rng.randint(0, 40))
    data = bytearray(body)
    if choice < 0.4:
        for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice < 0.55:
        data[rng.randrange(len(data))] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.getrandbits(8)))
    elif choice < 0.7:
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randint(1, 16))
    elif choice < 0.8:
        at = rng.randrange(len(data))
        del data[at : at + rng.randint(1, 8)]
    elif choice < 0.9:  # an int16/int32 field somewhere gets a boundary value
        at = rng.randrange(len(data))
        value = rng.choice(INTERESTING_32)
        data[at : at + 4] = U32.pack(value) if rng.random() < 0.5 else (value & 0xFFFF).to_bytes(2, "big")
    else:
        del data[rng.randrange(len(data)) :]
    return bytes(data)


def mutate_pg(rng: random.Random, message: bytes) -> bytes:
    """A PostgreSQL message (type byte + int32 length + body, or a startup-style packet) with one defect."""
    startup_style = not message[:1].isalpha()
    head = 4 if startup_style else 5
    body = message[head:]
    choice = rng.random()
    if choice < 0.6:
        body = _body_mutation(rng, body)
        return (b"" if startup_style else message[:1]) + U32.pack(len(body) + 4) + body
    if choice < 0.7:  # the length field lies
        length = rng.choice((*INTERESTING_32, len(body) + 3, len(body) + 5, rng.getrandbits(32)))
        return (b"" if startup_style else message[:1]) + U32.pack(length) + body
    if choice < 0.78 and not startup_style:  # another type byte
        return bytes((rng.getrandbits(8),)) + message[1:]
    if choice < 0.86:  # cut short: the rest of the stream becomes this message's body
        return message[: rng.randrange(max(len(message), 1))]
    if choice < 0.93:  # bit flips anywhere, header included
        data = bytearray(message)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    return message + rng.randbytes(rng.randint(1, 12))  # trailing junk


def mutate_mysql(rng: random.Random, packet: bytes) -> bytes:
    """A framed MySQL packet (3-byte length, sequence id, payload) with one defect; never a COM_PROCESS_KILL
    (a mutated COM_STMT_FETCH 1 becomes KILL 1, and killing another client of the same user is allowed)."""
    mutated = _mutate_mysql(rng, packet)
    if len(mutated) > 4 and mutated[4] == my.COM_PROCESS_KILL:
        mutated = mutated[:4] + bytes((my.COM_PING,)) + mutated[5:]
    return mutated


def _mutate_mysql(rng: random.Random, packet: bytes) -> bytes:
    seq, payload = packet[3], packet[4:]
    choice = rng.random()
    if choice < 0.6:
        payload = _body_mutation(rng, payload)
        return frame_raw(payload, seq)
    if choice < 0.7:  # the length lies
        length = rng.choice((*INTERESTING_24, len(payload) + 1, max(len(payload) - 1, 0), rng.getrandbits(24)))
        return length.to_bytes(3, "little") + bytes((seq,)) + payload
    if choice < 0.78:  # wrong sequence id
        return packet[:3] + bytes((rng.choice((1, 2, 0xFF, rng.getrandbits(8))),)) + payload
    if choice < 0.86:
        return packet[: rng.randrange(max(len(packet), 1))]
    if choice < 0.93:
        data = bytearray(packet)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    return packet + rng.randbytes(rng.randint(1, 12))


def random_bytes(rng: random.Random, most: int = 200) -> bytes:
    return rng.randbytes(rng.randint(1, most))


# --- PostgreSQL builders ---

def _cstr(text: str | bytes) -> bytes:
    return pg.cstring(text)


def pg_parse(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    return pg.message(b"P", _cstr(name) + _cstr(sql) + I16.pack(len(types)) + b"".join(I32.pack(t) for t in types))


def pg_bind(portal: str, statement: str, params: tuple[bytes | None, ...] = (), formats: tuple[int, ...] = (),
            result_formats: tuple[int, ...] = ()) -> bytes:
    body = _cstr(portal) + _cstr(statement) + I16.pack(len(formats)) + b"".join(I16.pack(f) for f in formats)
    body += I16.pack(len(params))
    for value in params:
        body += I32.pack(-1) if value is None else I32.pack(len(value)) + value
    body += I16.pack(len(result_formats)) + b"".join(I16.pack(f) for f in result_formats)
    return pg.message(b"B", body)


def pg_describe(kind: bytes, name: str) -> bytes:
    return pg.message(b"D", kind + _cstr(name))


def pg_execute(portal: str, max_rows: int = 0) -> bytes:
    return pg.message(b"E", _cstr(portal) + I32.pack(max_rows))


def pg_close(kind: bytes, name: str) -> bytes:
    return pg.message(b"C", kind + _cstr(name))


def pg_function_call(oid: int, args: tuple[bytes | None, ...] = ()) -> bytes:
    body = U32.pack(oid) + I16.pack(0) + I16.pack(len(args))
    for value in args:
        body += I32.pack(-1) if value is None else I32.pack(len(value)) + value
    return pg.message(b"F", body + I16.pack(0))


PG_SYNC = pg.message(b"S")
PG_FLUSH = pg.message(b"H")

# Statements chosen to touch what the proxy tracks (transactions, session state that pins, COPY, errors,
# prepared statements, large rows) while staying cheap and harmless for everybody else.
PG_SQL = (
    "SELECT 1", "SELECT 1", "SELECT 'fuzz', 2, NULL", "SELECT 1/0", "SELECT generate_series(1, 50)",
    "BEGIN", "COMMIT", "ROLLBACK", "BEGIN; SELECT 1", "SELECT 1; SELECT 2", "SAVEPOINT s", "ROLLBACK TO s",
    "SET application_name = 'fuzz'", "SET search_path = fuzz", "SET statement_timeout = 1",
    "SET LOCAL statement_timeout = 1", "RESET ALL", "DISCARD ALL",
    "PREPARE fz AS SELECT $1::int", "EXECUTE fz(1)", "DEALLOCATE fz", "DEALLOCATE ALL",
    "CREATE TEMP TABLE IF NOT EXISTS fz (t text)", "INSERT INTO fz VALUES ('a')",
    "COPY (SELECT generate_series(1, 20)) TO STDOUT", "COPY fz FROM STDIN", "COPY fz TO STDOUT",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1", "FETCH c", "CLOSE c", "LISTEN fz", "UNLISTEN *",
    "SELECT repeat('x', 20000)", "SELECT pg_sleep(0.001)", "", ";", "SELECT $1",
)
PG_PARAM_SQL = ("SELECT $1::text", "SELECT $1::int + 1", "SELECT $1::text, $2::int", "SELECT 1",
                "INSERT INTO fz VALUES ($1)", "SELECT pg_sleep(0)")
PG_FUNCTION_OIDS = (1598, 2026, 1317, 0, 1)  # random(), pg_backend_pid(), length(text), and non-functions


def _pg_name(rng: random.Random) -> str:
    return rng.choice(("", "", "s1", "s2", "fz", "x" * rng.randint(60, 70)))


def pg_unit(rng: random.Random) -> list[bytes]:
    """One well-formed exchange a client might send (before mutation)."""
    kind = rng.random()
    if kind < 0.3:
        return [pg.query(rng.choice(PG_SQL))]
    if kind < 0.6:
        name, portal = _pg_name(rng), rng.choice(("", "", "p1"))
        sql = rng.choice(PG_PARAM_SQL)
        params = tuple(rng.choice((b"1", b"abc", None, b"", b"\xff\xfe")) for _ in range(sql.count("$")))
        formats = rng.choice(((), (), (0,), (1,)))
        unit = [pg_parse(name, sql, rng.choice(((), (), (25,), (23, 23))))]
        if rng.random() < 0.3:
            unit.append(pg_describe(b"S", name))
        unit.append(pg_bind(portal, name, params, formats, rng.choice(((), (1,)))))
        if rng.random() < 0.5:
            unit.append(pg_describe(b"P", portal))
        unit.append(pg_execute(portal, rng.choice((0, 0, 1, 2))))
        if rng.random() < 0.3:
            unit.append(PG_FLUSH)
        if rng.random() < 0.3:
            unit.append(pg_close(rng.choice((b"S", b"P")), rng.choice((name, portal))))
        if rng.random() < 0.9:
            unit.append(PG_SYNC)
        return unit
    if kind < 0.7:
        unit = [pg.query("CREATE TEMP TABLE IF NOT EXISTS fz (t text)"), pg.query("COPY fz FROM STDIN")]
        unit += [pg.message(b"d", rng.choice((b"a\n", b"b c\n", b"\\N\n", b"x" * 100 + b"\n")))
                 for _ in range(rng.randint(0, 4))]
        unit.append(pg.message(b"c") if rng.random() < 0.7 else pg.message(b"f", _cstr("fuzz gave up")))
        return unit
    if kind < 0.78:
        args = tuple(rng.choice((b"abc", None, b"\x00\x00\x00\x01")) for _ in range(rng.randint(0, 2)))
        return [pg_function_call(rng.choice(PG_FUNCTION_OIDS), args)]
    # a single message on its own, often out of place
    return [rng.choice((
        PG_SYNC, PG_FLUSH, pg.message(b"d", b"stray\n"), pg.message(b"c"), pg.message(b"f", _cstr("no copy")),
        pg_describe(b"S", _pg_name(rng)), pg_describe(b"P", ""), pg_execute("", 1), pg_close(b"S", _pg_name(rng)),
        pg_bind("", "nope", ()), pg_parse("", "SELECT 1"),
        *([pg.password_message(b"late")] if rng.random() < 0.05 else []),
    ))]


def pg_session_case(rng: random.Random, units: int, mutation_rate: float) -> Case:
    """After a valid login: `units` exchanges, each message mutated with probability `mutation_rate`."""
    packets: list[bytes] = []
    mutated = 0
    for _ in range(units):
        for message in pg_unit(rng):
            if rng.random() < mutation_rate:
                message = mutate_pg(rng, message)
                mutated += 1
            packets.append(message)
    if rng.random() < 0.002:  # now and then a large message
        packets.append(pg.query("SELECT 1 -- " + "x" * rng.randint(1 << 16, 1 << 20)))
    return Case("postgresql", "session", packets, mutated=mutated)


def pg_startup_params(rng: random.Random) -> dict[str, str]:
    params = {"user": "app", "database": "app"}
    extra = rng.random()
    if extra < 0.2:
        params["application_name"] = rng.choice(("fz", "x" * 100, "é"))
    elif extra < 0.3:
        params["options"] = rng.choice(("-c search_path=fz", "-c statement_timeout=1", "--x", "-c"))
    elif extra < 0.35:
        params["replication"] = rng.choice(("database", "true", "x"))
    return params


def pg_preauth_case(rng: random.Random) -> Case:
    """Bytes before or during the login: random, truncated, bit-flipped or lying startup/handshake packets."""
    kind = rng.random()
    if kind < 0.005:  # a big first packet: must be refused at its header, not buffered
        header = U32.pack(rng.choice((1 << 24, 1 << 30)))
        return Case("postgresql", "raw", [header + rng.randbytes(64) * (1 << 14)], mutated=1)
    if kind < 0.15:
        return Case("postgresql", "raw", [random_bytes(rng)], mutated=1)
    if kind < 0.5:
        packet = pg.startup_message(pg_startup_params(rng))
        return Case("postgresql", "raw", [mutate_pg(rng, packet)], mutated=1)
    if kind < 0.6:
        first = rng.choice((pg.ssl_request(), I32.pack(8) + I32.pack(pg.GSSENC_REQUEST_CODE),
                            pg.cancel_request(rng.getrandbits(31), rng.getrandbits(31))))
        tail = [pg.startup_message(pg_startup_params(rng))] if rng.random() < 0.5 else [random_bytes(rng, 40)]
        return Case("postgresql", "raw", [mutate_pg(rng, first) if rng.random() < 0.7 else first, *tail], mutated=1)
    if kind < 0.8:
        initial = pg.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=" + b"A" * 24)
        return Case("postgresql", "startup", [mutate_pg(rng, initial)], mutated=1)
    return Case("postgresql", "sasl_final", [], mutation_seed=rng.getrandbits(32), mutated=1)


# --- MySQL builders ---

def frame_raw(payload: bytes, seq: int = 0) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes((seq & 0xFF,)) + payload


MY_SQL = (
    "SELECT 1", "SELECT 1", "SELECT 'fuzz', 2, NULL", "SELECT 1/0", "SELECT * FROM nope", "DO 1",
    "BEGIN", "COMMIT", "ROLLBACK", "START TRANSACTION READ ONLY", "SAVEPOINT s", "ROLLBACK TO s",
    "SET @fuzz = 1", "SET autocommit = 0", "SET SESSION sql_mode = 'ANSI_QUOTES'", "SET NAMES latin1",
    "SET SESSION wait_timeout = 5", "USE app", "PREPARE s FROM 'SELECT 1'", "EXECUTE s", "DEALLOCATE PREPARE s",
    "CREATE TEMPORARY TABLE IF NOT EXISTS fz (t TEXT)", "INSERT INTO fz VALUES ('a')", "SELECT * FROM fz",
    "SELECT REPEAT('x', 20000)", "SELECT SLEEP(0.001)", "SELECT LAST_INSERT_ID(), ROW_COUNT(), FOUND_ROWS()",
    "SELECT 1; SELECT 2", "SHOW VARIABLES LIKE 'auto%'", "SELECT CONNECTION_ID()", "", "SELECT ?",
)
MY_PREPARE_SQL = ("SELECT ?", "SELECT ?, ?", "SELECT 1", "INSERT INTO fz VALUES (?)", "SELECT * FROM fz",
                  "SELECT REPEAT('y', 3000) FROM (SELECT 1 UNION ALL SELECT 2) t", "nonsense ?")


def my_command(command: int, body: bytes = b"") -> bytes:
    return frame_raw(bytes((command,)) + body, 0)


def my_stmt_execute(stmt_id: int, params: tuple[bytes | None, ...], cursor: bool = False) -> bytes:
    body = U32.pack(stmt_id)[::-1] + bytes((1 if cursor else 0,)) + (1).to_bytes(4, "little")
    if params:
        bitmap = bytearray((len(params) + 7) // 8)
        for index, value in enumerate(params):
            if value is None:
                bitmap[index // 8] |= 1 << (index % 8)
        body += bytes(bitmap) + b"\x01" + b"".join(bytes((0xFD, 0)) for _ in params)
        body += b"".join(write_lenenc_str(value) for value in params if value is not None)
    return my_command(my.COM_STMT_EXECUTE, body)


# Stands for the scramble of a valid COM_CHANGE_USER; the fuzz client replaces it once it knows the greeting's nonce.
CHANGE_USER_SCRAMBLE = b"@fuzz:change-user:20"


def my_change_user(username: str, scramble: bytes, database: str = "app") -> bytes:
    body = username.encode() + b"\x00" + bytes((len(scramble),)) + scramble + database.encode() + b"\x00"
    body += my.UTF8MB4_GENERAL_CI.to_bytes(2, "little") + my.MYSQL_NATIVE_PASSWORD.encode() + b"\x00"
    return my_command(my.COM_CHANGE_USER, body)


def my_unit(rng: random.Random, state: dict[str, int]) -> list[bytes]:
    """One well-formed command (or prepared-statement exchange); `state` counts statements prepared."""
    def stmt_id() -> int:
        if rng.random() < 0.1:
            return rng.getrandbits(32)
        return rng.randint(1, state["prepared"] + 1)

    kind = rng.random()
    if kind < 0.35:
        return [my_command(my.COM_QUERY, rng.choice(MY_SQL).encode())]
    if kind < 0.6:
        sql = rng.choice(MY_PREPARE_SQL)
        unit = [my_command(my.COM_STMT_PREPARE, sql.encode())]
        state["prepared"] += 1
        params = tuple(rng.choice((b"1", b"abc", None, b"")) for _ in range(sql.count("?")))
        ident = state["prepared"] if rng.random() < 0.8 else stmt_id()
        if params and rng.random() < 0.3:
            unit.append(my_command(my.COM_STMT_SEND_LONG_DATA, ident.to_bytes(4, "little") + b"\x00\x00" + b"ld"))
        cursor = rng.random() < 0.3
        unit.append(my_stmt_execute(ident, params, cursor))
        if cursor or rng.random() < 0.1:
            unit.append(my_command(my.COM_STMT_FETCH, ident.to_bytes(4, "little") + (1).to_bytes(4, "little")))
        if rng.random() < 0.3:
            unit.append(my_command(rng.choice((my.COM_STMT_CLOSE, my.COM_STMT_RESET)), ident.to_bytes(4, "little")))
        return unit
    if kind < 0.7:
        return [my_command(my.COM_STMT_FETCH, stmt_id().to_bytes(4, "little") + (2).to_bytes(4, "little"))]
    if kind < 0.75:
        return [my_command(my.COM_STMT_SEND_LONG_DATA, stmt_id().to_bytes(4, "little") + b"\x00\x00" + b"z" * 50)]
    if kind < 0.82:
        return [my_command(my.COM_STMT_EXECUTE, stmt_id().to_bytes(4, "little") + b"\x00\x01\x00\x00\x00")]
    if kind < 0.84:  # mostly a valid one (the client puts the real scramble in), else wrong credentials
        if rng.random() < 0.6:
            return [my_change_user("app", CHANGE_USER_SCRAMBLE)]
        scramble = rng.randbytes(20) if rng.random() < 0.5 else b""
        return [my_change_user(rng.choice(("app", "nobody", "")), scramble)]
    return [rng.choice((
        my_command(my.COM_PING), my_command(my.COM_INIT_DB, b"app"), my_command(my.COM_RESET_CONNECTION),
        my_command(my.COM_SET_OPTION, b"\x00\x00"), my_command(my.COM_SET_OPTION, b"\x01\x00"),
        my_command(my.COM_STATISTICS), my_command(my.COM_FIELD_LIST, b"fz\x00"), my_command(my.COM_SLEEP),
        my_command(my.COM_STMT_BULK_EXECUTE, b"\x01\x00\x00\x00\x00\x00"), my_command(my.COM_DEBUG),
    ))]


def mysql_session_case(rng: random.Random, units: int, mutation_rate: float) -> Case:
    """After a valid login: `units` commands, each packet mutated with probability `mutation_rate`."""
    state = {"prepared": 0}
    packets: list[bytes] = []
    mutated = 0
    for _ in range(units):
        for packet in my_unit(rng, state):
            if rng.random() < mutation_rate:
                packet = mutate_mysql(rng, packet)
                mutated += 1
            packets.append(packet)
    if rng.random() < 0.002:
        packets.append(my_command(my.COM_QUERY, b"SELECT 1 -- " + b"x" * rng.randint(1 << 16, 1 << 20)))
    return Case("mysql", "session", packets, mutated=mutated)


def mysql_preauth_case(rng: random.Random) -> Case:
    """Bytes before or during the login: random, truncated, bit-flipped or lying handshake packets."""
    kind = rng.random()
    if kind < 0.005:  # a big login packet: must be refused at its header, not buffered
        return Case("mysql", "greeting", [b"\xff\xff\xff\x01" + rng.randbytes(64) * (1 << 14)], mutated=1)
    if kind < 0.15:
        return Case("mysql", rng.choice(("raw", "greeting")), [random_bytes(rng)], mutated=1)
    if kind < 0.3:
        ssl = frame_raw((my.CLIENT_SSL | my.CLIENT_PROTOCOL_41).to_bytes(4, "little") + b"\0" * 28, 1)
        return Case("mysql", "greeting", [mutate_mysql(rng, ssl), *([random_bytes(rng, 40)] * rng.randint(0, 1))],
                    mutated=1)
    if kind < 0.4:
        return Case("mysql", "greeting", [mutate_mysql(rng, frame_raw(random_bytes(rng, 120), 1))], mutated=1)
    return Case("mysql", "handshake", [random_bytes(rng, 40)] if rng.random() < 0.2 else [],
                mutation_seed=rng.getrandbits(32), mutated=1)


def session_case(protocol: str, rng: random.Random, units: int, mutation_rate: float) -> Case:
    if protocol == "postgresql":
        return pg_session_case(rng, units, mutation_rate)
    return mysql_session_case(rng, units, mutation_rate)


def preauth_case(protocol: str, rng: random.Random) -> Case:
    return pg_preauth_case(rng) if protocol == "postgresql" else mysql_preauth_case(rng)
