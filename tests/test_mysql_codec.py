"""Tests for the sans-IO MySQL codec: framing, lenenc values, packets, and the response tracker."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol.mysql import constants as c
from proxy.protocol.mysql.packets import (
    AuthSwitchRequest,
    ChangeUser,
    EofPacket,
    ErrPacket,
    HandshakeResponse41,
    HandshakeV10,
    OkPacket,
    PacketReader,
    PrepareOk,
    ProtocolViolation,
    ResponseTracker,
    SSLRequest,
    build_auth_more_data,
    frame,
    frame_many,
    frames_needed,
    is_eof,
    is_err,
    is_ok,
    is_ssl_request,
    parse_auth_more_data,
    parse_handshake_response,
    parse_header,
    parse_session_state,
    read_lenenc_int,
    read_lenenc_str,
    read_null_str,
    write_lenenc_int,
    write_lenenc_str,
)

MAX = c.MAX_PACKET
SCRAMBLE = bytes(range(1, 21))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- length-encoded values ---

LENENC_INTS = [
    (0, b"\x00"),
    (1, b"\x01"),
    (250, b"\xfa"),
    (251, b"\xfc\xfb\x00"),
    (0xFFFF, b"\xfc\xff\xff"),
    (0x10000, b"\xfd\x00\x00\x01"),
    (0xFFFFFF, b"\xfd\xff\xff\xff"),
    (0x1000000, b"\xfe\x00\x00\x00\x01\x00\x00\x00\x00"),
    (2**64 - 1, b"\xfe" + b"\xff" * 8),
]


@pytest.mark.parametrize(("value", "wire"), LENENC_INTS)
def test_lenenc_int_table(value: int, wire: bytes) -> None:
    assert write_lenenc_int(value) == wire
    assert read_lenenc_int(wire) == (value, len(wire))
    assert read_lenenc_int(b"xx" + wire + b"yy", 2) == (value, 2 + len(wire))
    assert read_lenenc_int(memoryview(wire)) == (value, len(wire))


@pytest.mark.parametrize("wire", [b"", b"\xfb", b"\xff", b"\xfc\x01", b"\xfd\x01\x02", b"\xfe\x00\x00"])
def test_lenenc_int_invalid(wire: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        read_lenenc_int(wire)


def test_lenenc_int_out_of_range() -> None:
    with pytest.raises(ValueError):
        write_lenenc_int(-1)
    with pytest.raises(ValueError):
        write_lenenc_int(2**64)


def test_lenenc_str() -> None:
    assert write_lenenc_str(b"") == b"\x00"
    assert write_lenenc_str(b"def") == b"\x03def"
    long = b"x" * 300
    assert write_lenenc_str(long) == b"\xfc\x2c\x01" + long
    assert read_lenenc_str(b"\x03defXYZ") == (b"def", 4)
    assert read_lenenc_str(b"\xfc\x2c\x01" + long) == (long, 303)
    with pytest.raises(ProtocolViolation):
        read_lenenc_str(b"\x05abc")


def test_null_str() -> None:
    assert read_null_str(b"root\x00rest") == (b"root", 5)
    assert read_null_str(memoryview(b"ab\x00cd\x00"), 3) == (b"cd", 6)
    assert read_null_str(b"\x00") == (b"", 1)
    with pytest.raises(ProtocolViolation):
        read_null_str(b"no terminator")
    assert read_null_str(b"no terminator", allow_eof=True) == (b"no terminator", 13)
    assert read_null_str(b"ab", 2, allow_eof=True) == (b"", 2)


@given(st.integers(0, 2**64 - 1))
def test_lenenc_int_roundtrip(value: int) -> None:
    wire = write_lenenc_int(value)
    assert read_lenenc_int(wire) == (value, len(wire))


# --- framing ---

FRAMES = [
    (b"", 0, b"\x00\x00\x00\x00"),
    (b"\x0e", 0, b"\x01\x00\x00\x00\x0e"),
    (b"\x03SELECT 1", 0, b"\x09\x00\x00\x00\x03SELECT 1"),
    (b"ab", 7, b"\x02\x00\x00\x07ab"),
    (b"ab", 255, b"\x02\x00\x00\xffab"),
    (b"ab", 256, b"\x02\x00\x00\x00ab"),
    (b"x" * 300, 1, b"\x2c\x01\x00\x01" + b"x" * 300),
]


@pytest.mark.parametrize(("payload", "seq", "wire"), FRAMES)
def test_frame_table(payload: bytes, seq: int, wire: bytes) -> None:
    assert frame(payload, seq) == wire
    assert frame(memoryview(payload), seq) == wire
    reader = PacketReader()
    reader.feed(wire)
    assert reader.next_packet() == (seq & 0xFF, payload)
    assert reader.next_packet() is None
    assert reader.expected_seq == (seq + 1) & 0xFF
    assert parse_header(wire) == (len(payload), seq & 0xFF)


def test_parse_header_short() -> None:
    assert parse_header(b"\x01\x00\x00") is None
    assert parse_header(b"..\x05\x00\x00\x09", 2) == (5, 9)


def test_frame_many() -> None:
    wire, seq = frame_many([b"\x01", b"", b"abc"], 254)
    assert wire == b"\x01\x00\x00\xfe\x01" + b"\x00\x00\x00\xff" + b"\x03\x00\x00\x00abc"
    assert seq == 1


def test_frames_needed() -> None:
    assert [frames_needed(n) for n in (0, 1, MAX - 1, MAX, MAX + 1, 2 * MAX)] == [1, 1, 1, 2, 2, 3]


def _headers(wire: bytes) -> list[tuple[int, int]]:
    out = []
    pos = 0
    while pos < len(wire):
        header = parse_header(wire, pos)
        assert header is not None
        out.append(header)
        pos += 4 + header[0]
    assert pos == len(wire)
    return out


def test_continuation_exactly_max() -> None:
    payload = bytes(range(256)) * (MAX // 256) + bytes(range(MAX % 256))
    assert len(payload) == MAX
    wire = frame(payload, 3)
    assert _headers(wire) == [(MAX, 3), (0, 4)]  # the empty terminator frame
    reader = PacketReader()
    reader.feed(wire[:-1])
    assert reader.next_packet() is None  # the terminator header is incomplete
    reader.feed(wire[-1:])
    seq, got = reader.next_packet() or (None, b"")
    assert seq == 3 and got == payload
    assert reader.expected_seq == 5
    assert reader.buffered == 0


def test_continuation_max_plus_one() -> None:
    payload = b"\x03" + b"q" * MAX
    wire = frame(payload, 0)
    assert _headers(wire) == [(MAX, 0), (1, 1)]
    assert wire[4 + MAX + 4 :] == b"q"
    reader = PacketReader(strict_seq=True)
    # arrive in uneven chunks, with the next packet right behind
    wire += frame(b"\x0e", 2)
    for start in range(0, len(wire), 5_000_001):
        reader.feed(wire[start : start + 5_000_001])
    assert reader.next_packet() == (0, payload)
    assert reader.next_packet() == (2, b"\x0e")
    assert reader.next_packet() is None


def test_continuation_two_full_frames() -> None:
    payload = bytes(2 * MAX)
    wire = frame(payload, 0)
    assert _headers(wire) == [(MAX, 0), (MAX, 1), (0, 2)]
    reader = PacketReader()
    reader.feed(wire)
    assert reader.next_packet() == (0, payload)
    assert reader.expected_seq == 3


def test_oversize_rejected_from_header() -> None:
    reader = PacketReader(max_packet_size=100)
    reader.feed(b"\x65\x00\x00\x00")  # 101 bytes announced, none sent yet
    with pytest.raises(ProtocolViolation) as info:
        reader.next_packet()
    assert info.value.mysql_errno == c.ER_NET_PACKET_TOO_LARGE
    ok = PacketReader(max_packet_size=100)
    ok.feed(frame(b"x" * 100))
    assert ok.next_packet() == (0, b"x" * 100)


def test_oversize_rejected_across_continuation() -> None:
    reader = PacketReader(max_packet_size=MAX + 10)
    reader.feed(b"\xff\xff\xff\x00" + bytes(MAX) + b"\x0b\x00\x00\x01")  # 11 more bytes announced
    with pytest.raises(ProtocolViolation) as info:
        reader.next_packet()
    assert info.value.mysql_errno == c.ER_NET_PACKET_TOO_LARGE
    small = PacketReader(max_packet_size=1000)
    small.feed(b"\xff\xff\xff\x00")
    with pytest.raises(ProtocolViolation):
        small.next_packet()


def test_sequence_violation() -> None:
    reader = PacketReader(strict_seq=True)
    reader.feed(frame(b"\x03SELECT 1", 0) + frame(b"\x0e", 5))
    assert reader.next_packet() == (0, b"\x03SELECT 1")
    with pytest.raises(ProtocolViolation) as info:
        reader.next_packet()
    assert info.value.mysql_errno == c.ER_NET_PACKETS_OUT_OF_ORDER
    lax = PacketReader()
    lax.feed(frame(b"\x0e", 5))
    assert lax.next_packet() == (5, b"\x0e")
    assert lax.expected_seq == 6
    lax.reset_seq()
    assert lax.expected_seq == 0


def test_continuation_sequence_violation_even_when_lax() -> None:
    reader = PacketReader()
    reader.feed(b"\xff\xff\xff\x00" + bytes(MAX) + b"\x00\x00\x00\x07")
    with pytest.raises(ProtocolViolation):
        reader.next_packet()


def test_take_buffer_after_ssl_request() -> None:
    reader = PacketReader()
    ssl = SSLRequest(c.CLIENT_PROTOCOL_41 | c.CLIENT_SECURE_CONNECTION).build()
    reader.feed(frame(ssl, 1) + b"\x16\x03\x01TLS...")
    seq, payload = reader.next_packet() or (0, b"")
    assert seq == 1 and is_ssl_request(payload)
    assert reader.buffered == 9
    assert reader.take_buffer() == b"\x16\x03\x01TLS..."
    assert reader.buffered == 0


@given(
    st.lists(st.binary(max_size=300), max_size=12),
    st.integers(0, 255),
    st.lists(st.integers(1, 400), min_size=1, max_size=20),
)
def test_reader_reassembles_any_chunking(payloads: list[bytes], seq: int, cuts: list[int]) -> None:
    wire, _ = frame_many(payloads, seq)
    reader = PacketReader(strict_seq=True, expected_seq=seq)
    got: list[tuple[int, bytes]] = []
    pos = 0
    i = 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        reader.feed(wire[pos : pos + step])
        pos += step
        i += 1
        got.extend(reader.packets())
    assert got == [((seq + n) & 0xFF, p) for n, p in enumerate(payloads)]
    assert reader.buffered == 0


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=10), st.booleans(), st.integers(0, 300))
def test_reader_fuzz(chunks: list[bytes], strict: bool, limit: int) -> None:
    reader = PacketReader(max_packet_size=limit, strict_seq=strict)
    with contextlib.suppress(ProtocolViolation):
        for chunk in chunks:
            reader.feed(chunk)
            for _seq, payload in reader.packets():
                assert len(payload) <= limit


# --- classification ---


@pytest.mark.parametrize(
    ("payload", "deprecate_eof", "expected"),
    [
        (b"\xfe\x00\x00\x02\x00", False, True),
        (b"\xfe", False, True),
        (b"\xfe" + bytes(8), False, False),  # 9 bytes: a row
        (b"\xfe\x00\x00\x02\x00\x00\x00", True, True),  # OK with 0xFE header
        (b"\xfe\x00\x00\x02\x00\x00\x00" + b"i" * 100, True, True),
        (b"\x00\x00\x00\x02\x00\x00\x00", True, False),
        (b"\xfb", False, False),
        (b"", False, False),
    ],
)
def test_is_eof(payload: bytes, deprecate_eof: bool, expected: bool) -> None:
    assert is_eof(payload, deprecate_eof) is expected


def test_is_eof_huge_row() -> None:
    row = b"\xfe" + bytes(MAX - 1)
    assert not is_eof(row, True)
    assert not is_eof(row, False)


def test_is_ok_is_err() -> None:
    assert is_ok(b"\x00\x00\x00\x02\x00\x00\x00")
    assert not is_ok(b"\x00\x00\x00\x02\x00")
    assert not is_ok(b"\xff\x00\x00\x02\x00\x00\x00")
    assert is_err(b"\xff\x15\x04")
    assert not is_err(b"")
    assert not is_err(b"\x00")


# --- handshake ---

MYSQL_CAPS = (
    c.CLIENT_LONG_PASSWORD
    | c.CLIENT_PROTOCOL_41
    | c.CLIENT_SECURE_CONNECTION
    | c.CLIENT_PLUGIN_AUTH
    | c.CLIENT_DEPRECATE_EOF
)  # 0x01088201

HANDSHAKE_WIRE = (
    b"\x0a"
    + b"8.0.36\x00"
    + b"\x0d\x0c\x0b\x0a"  # connection id
    + SCRAMBLE[:8]
    + b"\x00"
    + b"\x01\x82"  # capabilities, lower
    + b"\x2d"  # utf8mb4_general_ci
    + b"\x02\x00"  # SERVER_STATUS_AUTOCOMMIT
    + b"\x08\x01"  # capabilities, upper
    + b"\x15"  # auth-plugin-data length: 21
    + bytes(10)
    + SCRAMBLE[8:]
    + b"\x00"
    + b"mysql_native_password\x00"
)


def test_handshake_v10_exact_bytes() -> None:
    hs = HandshakeV10("8.0.36", 0x0A0B0C0D, SCRAMBLE, MYSQL_CAPS)
    assert MYSQL_CAPS == 0x01088201
    assert hs.build() == HANDSHAKE_WIRE
    assert HandshakeV10.parse(HANDSHAKE_WIRE) == hs
    assert not hs.is_mariadb


def test_handshake_v10_mariadb_extended_caps() -> None:
    caps = (MYSQL_CAPS & ~c.CLIENT_MYSQL) | c.MARIADB_CLIENT_PROGRESS | c.MARIADB_CLIENT_CACHE_METADATA
    hs = HandshakeV10("5.5.5-10.11.6-MariaDB", 9, SCRAMBLE, caps, auth_plugin_name="caching_sha2_password")
    wire = hs.build()
    reserved_at = 1 + len(b"5.5.5-10.11.6-MariaDB\x00") + 4 + 9 + 2 + 1 + 2 + 2 + 1
    assert wire[reserved_at : reserved_at + 10] == bytes(6) + b"\x11\x00\x00\x00"
    parsed = HandshakeV10.parse(wire)
    assert parsed == hs
    assert parsed.is_mariadb


def test_handshake_v10_mysql_flavour_drops_extended_caps() -> None:
    hs = HandshakeV10("8.0.36", 1, SCRAMBLE, MYSQL_CAPS | c.MARIADB_CLIENT_PROGRESS)
    assert HandshakeV10.parse(hs.build()).capabilities == MYSQL_CAPS


def test_handshake_v10_truncated_old_server() -> None:
    wire = b"\x0a" + b"4.0.1\x00" + b"\x01\x00\x00\x00" + b"abcdefgh" + b"\x00" + b"\x00\x02"
    hs = HandshakeV10.parse(wire)
    assert hs.auth_plugin_data == b"abcdefgh"
    assert hs.capabilities == c.CLIENT_PROTOCOL_41
    assert hs.auth_plugin_name == ""


@pytest.mark.parametrize("wire", [b"", b"\x09" + HANDSHAKE_WIRE[1:], HANDSHAKE_WIRE[:20], HANDSHAKE_WIRE[:-40]])
def test_handshake_v10_malformed(wire: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        HandshakeV10.parse(wire)


RESPONSE_CAPS = (
    c.CLIENT_LONG_PASSWORD
    | c.CLIENT_CONNECT_WITH_DB
    | c.CLIENT_PROTOCOL_41
    | c.CLIENT_SECURE_CONNECTION
    | c.CLIENT_PLUGIN_AUTH
    | c.CLIENT_CONNECT_ATTRS
    | c.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
)  # 0x00388209
AUTH = bytes(range(100, 120))
RESPONSE_PREFIX = b"\x09\x82\x38\x00" + b"\xff\xff\xff\x00" + b"\x2d" + bytes(23) + b"app\x00"


@pytest.mark.parametrize(
    ("response", "wire"),
    [
        (
            HandshakeResponse41(RESPONSE_CAPS, "app", AUTH, "appdb", "mysql_native_password", {"_client_name": "x"}),
            RESPONSE_PREFIX
            + b"\x14"
            + AUTH
            + b"appdb\x00"
            + b"mysql_native_password\x00"
            + b"\x0f"
            + b"\x0c_client_name\x01x",
        ),
        (  # 1-byte length (CLIENT_SECURE_CONNECTION only), no db, no attrs
            HandshakeResponse41(
                c.CLIENT_PROTOCOL_41 | c.CLIENT_SECURE_CONNECTION | c.CLIENT_PLUGIN_AUTH,
                "root",
                AUTH,
                auth_plugin_name="caching_sha2_password",
                charset=255,
            ),
            b"\x00\x82\x08\x00\xff\xff\xff\x00\xff" + bytes(23) + b"root\x00\x14" + AUTH + b"caching_sha2_password\x00",
        ),
        (  # NUL-terminated auth response (neither flag)
            HandshakeResponse41(c.CLIENT_PROTOCOL_41, "u", b"pw", max_packet_size=1 << 24, charset=8),
            b"\x00\x02\x00\x00\x00\x00\x00\x01\x08" + bytes(23) + b"u\x00pw\x00",
        ),
        (  # a long auth response needs lenenc; empty attrs
            HandshakeResponse41(
                c.CLIENT_PROTOCOL_41 | c.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | c.CLIENT_CONNECT_ATTRS,
                "u",
                b"k" * 300,
                connect_attrs={},
            ),
            b"\x00\x02\x30\x00\xff\xff\xff\x00\x2d" + bytes(23) + b"u\x00\xfc\x2c\x01" + b"k" * 300 + b"\x00",
        ),
        (  # MariaDB client: CLIENT_MYSQL clear, extended capabilities in the last 4 filler bytes
            HandshakeResponse41(
                c.CLIENT_PROTOCOL_41 | c.CLIENT_SECURE_CONNECTION | c.MARIADB_CLIENT_STMT_BULK_OPERATIONS,
                "m",
                b"",
            ),
            b"\x00\x82\x00\x00\xff\xff\xff\x00\x2d" + bytes(19) + b"\x04\x00\x00\x00" + b"m\x00\x00",
        ),
    ],
)
def test_handshake_response_table(response: HandshakeResponse41, wire: bytes) -> None:
    assert response.build() == wire
    assert HandshakeResponse41.parse(wire) == response
    assert parse_handshake_response(wire) == response


def test_handshake_response_tolerates_missing_trailing_fields() -> None:
    wire = RESPONSE_PREFIX + b"\x14" + AUTH  # db/plugin/attrs flags set, packet ends
    parsed = HandshakeResponse41.parse(wire)
    assert parsed.username == "app" and parsed.auth_response == AUTH
    assert parsed.database is None and parsed.auth_plugin_name is None and parsed.connect_attrs is None
    no_nul = RESPONSE_PREFIX + b"\x14" + AUTH + b"db\x00mysql_native_password"
    parsed = HandshakeResponse41.parse(no_nul)
    assert parsed.database == "db" and parsed.auth_plugin_name == "mysql_native_password"


def test_handshake_response_inconsistent_build() -> None:
    with pytest.raises(ValueError):
        HandshakeResponse41(c.CLIENT_PROTOCOL_41, "u", database="db").build()
    with pytest.raises(ValueError):
        HandshakeResponse41(c.CLIENT_PROTOCOL_41, "u", auth_plugin_name="x").build()
    with pytest.raises(ValueError):
        HandshakeResponse41(c.CLIENT_PROTOCOL_41, "u", connect_attrs={"a": "b"}).build()
    with pytest.raises(ValueError):
        HandshakeResponse41(c.CLIENT_PROTOCOL_41 | c.CLIENT_SECURE_CONNECTION, "u", b"x" * 256).build()
    with pytest.raises(ValueError):
        HandshakeResponse41(0, "u").build()


def test_handshake_response_rejects() -> None:
    with pytest.raises(ProtocolViolation):  # pre-4.1
        HandshakeResponse41.parse(b"\x05\x00" + bytes(30) + b"u\x00")
    ssl = SSLRequest(c.CLIENT_PROTOCOL_41).build()
    with pytest.raises(ProtocolViolation):
        HandshakeResponse41.parse(ssl)
    with pytest.raises(ProtocolViolation):  # attribute block longer than the packet
        HandshakeResponse41.parse(RESPONSE_PREFIX + b"\x00" + b"\x00" + b"\x00" + b"\x09\x01a")


def test_ssl_request() -> None:
    req = SSLRequest(c.CLIENT_PROTOCOL_41 | c.CLIENT_SECURE_CONNECTION | c.CLIENT_PLUGIN_AUTH)
    wire = req.build()
    assert wire == b"\x00\x8a\x08\x00\xff\xff\xff\x00\x2d" + bytes(23)
    assert len(wire) == 32 and is_ssl_request(wire)
    parsed = parse_handshake_response(wire)
    assert isinstance(parsed, SSLRequest)
    assert parsed.capabilities == req.capabilities | c.CLIENT_SSL
    assert not is_ssl_request(wire[:31])
    assert not is_ssl_request(b"\x00\x02\x00\x00" + wire[4:])  # CLIENT_SSL not set
    with pytest.raises(ProtocolViolation):
        SSLRequest.parse(wire + b"\x00")
    mariadb = SSLRequest((c.CLIENT_PROTOCOL_41 | c.MARIADB_CLIENT_PROGRESS) & ~c.CLIENT_MYSQL)
    assert SSLRequest.parse(mariadb.build()).capabilities == mariadb.capabilities | c.CLIENT_SSL


# --- auth packets ---


def test_auth_switch_request() -> None:
    req = AuthSwitchRequest.for_scramble("mysql_native_password", SCRAMBLE)
    wire = req.build()
    assert wire == b"\xfemysql_native_password\x00" + SCRAMBLE + b"\x00"
    parsed = AuthSwitchRequest.parse(wire)
    assert parsed == req
    assert parsed.scramble == SCRAMBLE
    assert AuthSwitchRequest.parse(b"\xfe") == AuthSwitchRequest("mysql_old_password", b"")
    assert AuthSwitchRequest.parse(b"\xfemysql_clear_password") == AuthSwitchRequest("mysql_clear_password", b"")
    with pytest.raises(ProtocolViolation):
        AuthSwitchRequest.parse(b"\x00abc\x00")


def test_auth_more_data() -> None:
    assert build_auth_more_data(b"\x03") == b"\x01\x03"
    assert parse_auth_more_data(b"\x01\x04") == b"\x04"
    assert parse_auth_more_data(b"\x01-----BEGIN PUBLIC KEY-----") == b"-----BEGIN PUBLIC KEY-----"
    with pytest.raises(ProtocolViolation):
        parse_auth_more_data(b"")
    with pytest.raises(ProtocolViolation):
        parse_auth_more_data(b"\x02")


# --- OK / ERR / EOF ---

P41 = c.CLIENT_PROTOCOL_41
TRACK = c.CLIENT_PROTOCOL_41 | c.CLIENT_SESSION_TRACK
SCHEMA_CHANGE = b"\x01\x05\x04test"  # SESSION_TRACK_SCHEMA, payload = lenenc "test"


@pytest.mark.parametrize(
    ("packet", "caps", "wire"),
    [
        (OkPacket(), P41, b"\x00\x00\x00\x02\x00\x00\x00"),
        (
            OkPacket(1, 300, 0x0003, 2, "Rows matched: 1"),
            P41,
            b"\x00\x01\xfc\x2c\x01\x03\x00\x02\x00Rows matched: 1",
        ),
        (OkPacket(status_flags=0x0022, header=0xFE), P41, b"\xfe\x00\x00\x22\x00\x00\x00"),
        (OkPacket(), TRACK, b"\x00\x00\x00\x02\x00\x00\x00"),
        (OkPacket(info="hi"), TRACK, b"\x00\x00\x00\x02\x00\x00\x00\x02hi"),
        (
            OkPacket(status_flags=0x4002, session_state_info=SCHEMA_CHANGE),
            TRACK,
            b"\x00\x00\x00\x02\x40\x00\x00" + b"\x00" + b"\x07" + SCHEMA_CHANGE,
        ),
        (OkPacket(5, 0, 0, 0, "x"), 0, b"\x00\x05\x00x"),
        (OkPacket(5, 0, 3, 0), c.CLIENT_TRANSACTIONS, b"\x00\x05\x00\x03\x00"),
    ],
)
def test_ok_packet_table(packet: OkPacket, caps: int, wire: bytes) -> None:
    assert packet.build(caps) == wire
    assert OkPacket.parse(wire, caps) == packet


def test_session_state() -> None:
    assert parse_session_state(SCHEMA_CHANGE) == [(c.SESSION_TRACK_SCHEMA, b"\x04test")]
    sysvar = b"\x00\x0f\x0aautocommit\x03OFF"
    assert parse_session_state(sysvar + b"\x05\x09\x08T_______") == [
        (c.SESSION_TRACK_SYSTEM_VARIABLES, b"\x0aautocommit\x03OFF"),
        (c.SESSION_TRACK_TRANSACTION_STATE, b"\x08T_______"),
    ]
    with pytest.raises(ProtocolViolation):
        parse_session_state(b"\x01\x09abc")


def test_ok_packet_build_rejects_orphan_session_state() -> None:
    with pytest.raises(ValueError):
        OkPacket(session_state_info=b"x").build(TRACK)


ERR_TABLE = [
    (ErrPacket(1045, "Access denied", "28000"), P41, b"\xff\x15\x04#28000Access denied"),
    (ErrPacket(1064, "syntax", "42000"), P41, b"\xff\x28\x04#42000syntax"),
    (ErrPacket(1040, "Too many connections"), 0, b"\xff\x10\x04Too many connections"),
]


@pytest.mark.parametrize(("packet", "caps", "wire"), ERR_TABLE)
def test_err_packet_table(packet: ErrPacket, caps: int, wire: bytes) -> None:
    assert packet.build(caps) == wire
    assert ErrPacket.parse(wire) == packet


def test_err_packet_defaults_sqlstate() -> None:
    assert ErrPacket(c.ER_ACCESS_DENIED_ERROR, "no").build() == b"\xff\x15\x04#28000no"
    assert ErrPacket(4242, "?").build() == b"\xff\x92\x10#HY000?"
    assert ErrPacket.parse(b"\xff\xff\xff\x01\x00\x01...").is_progress
    with pytest.raises(ProtocolViolation):
        ErrPacket.parse(b"\xff\x15")
    with pytest.raises(ValueError):
        ErrPacket(1, "x", "TOOLONG").build()


def test_eof_packet() -> None:
    assert EofPacket(0, 2).build() == b"\xfe\x00\x00\x02\x00"
    assert EofPacket(3, 0x0041).build() == b"\xfe\x03\x00\x41\x00"
    assert EofPacket.parse(b"\xfe\x03\x00\x41\x00") == EofPacket(3, 0x41)
    assert EofPacket.parse(b"\xfe") == EofPacket(0, 0)
    with pytest.raises(ProtocolViolation):
        EofPacket.parse(b"\xfe" + bytes(9))


def test_prepare_ok() -> None:
    wire = b"\x00\x01\x00\x00\x00\x02\x00\x03\x00\x00\x00\x00"
    assert PrepareOk(1, 2, 3).build() == wire
    assert PrepareOk.parse(wire) == PrepareOk(1, 2, 3, 0)
    assert PrepareOk.parse(wire[:9]) == PrepareOk(1, 2, 3, 0)
    with pytest.raises(ProtocolViolation):
        PrepareOk.parse(wire[:8])


# --- round trips ---

texts = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=30)


@given(
    texts,
    st.integers(0, 2**32 - 1),
    st.binary(min_size=20, max_size=20).filter(lambda b: b"\x00" not in b),
    st.integers(0, 2**38 - 1),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    texts,
)
def test_handshake_v10_roundtrip(
    version: str, conn_id: int, scramble: bytes, caps: int, charset: int, status: int, plugin: str
) -> None:
    caps |= c.CLIENT_SECURE_CONNECTION | c.CLIENT_PLUGIN_AUTH
    if caps & c.CLIENT_MYSQL:
        caps &= 0xFFFFFFFF
    hs = HandshakeV10(version, conn_id, scramble, caps, charset, status, plugin)
    assert HandshakeV10.parse(hs.build()) == hs


@given(
    st.integers(0, 2**38 - 1),
    texts,
    st.binary(max_size=300),
    st.none() | texts,
    st.none() | texts,
    st.none() | st.dictionaries(texts, texts, max_size=4),
    st.integers(0, 2**32 - 1),
    st.integers(0, 255),
)
def test_handshake_response_roundtrip(
    caps: int,
    user: str,
    auth: bytes,
    db: str | None,
    plugin: str | None,
    attrs: dict[str, str] | None,
    max_packet: int,
    charset: int,
) -> None:
    caps |= c.CLIENT_PROTOCOL_41 | c.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    caps &= ~c.CLIENT_ZSTD_COMPRESSION_ALGORITHM
    if caps & c.CLIENT_MYSQL:
        caps &= 0xFFFFFFFF
    caps = caps | c.CLIENT_CONNECT_WITH_DB if db is not None else caps & ~c.CLIENT_CONNECT_WITH_DB
    caps = caps | c.CLIENT_PLUGIN_AUTH if plugin is not None else caps & ~c.CLIENT_PLUGIN_AUTH
    caps = caps | c.CLIENT_CONNECT_ATTRS if attrs is not None else caps & ~c.CLIENT_CONNECT_ATTRS
    resp = HandshakeResponse41(caps, user, auth, db, plugin, attrs, max_packet, charset)
    wire = resp.build()
    if not (caps & c.CLIENT_SSL and len(wire) == 32):
        assert HandshakeResponse41.parse(wire) == resp


@given(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    texts,
    st.binary(max_size=40),
    st.sampled_from([0x00, 0xFE]),
    st.booleans(),
)
def test_ok_packet_roundtrip(
    affected: int, last_id: int, status: int, warnings: int, info: str, state: bytes, header: int, track: bool
) -> None:
    caps = TRACK if track else P41
    state_info = state if track and status & c.SERVER_SESSION_STATE_CHANGED else None
    ok = OkPacket(affected, last_id, status, warnings, info, state_info, header)
    assert OkPacket.parse(ok.build(caps), caps) == ok


@given(
    st.integers(0, 0xFFFF),
    texts,
    st.text(st.characters(min_codepoint=0x30, max_codepoint=0x5A), min_size=5, max_size=5),
)
def test_err_packet_roundtrip(code: int, message: str, state: str) -> None:
    err = ErrPacket(code, message, state)
    assert ErrPacket.parse(err.build()) == err


# --- parsers never raise anything but ProtocolViolation ---


PARSERS: list[Callable[[bytes], object]] = [
    HandshakeV10.parse,
    HandshakeResponse41.parse,
    parse_handshake_response,
    SSLRequest.parse,
    lambda b: OkPacket.parse(b, P41),
    lambda b: OkPacket.parse(b, TRACK),
    lambda b: OkPacket.parse(b, 0),
    ErrPacket.parse,
    EofPacket.parse,
    AuthSwitchRequest.parse,
    parse_auth_more_data,
    PrepareOk.parse,
    parse_session_state,
    read_lenenc_int,
    read_lenenc_str,
    read_null_str,
]


@FUZZ
@given(st.sampled_from(range(len(PARSERS))), st.binary(max_size=120))
def test_parsers_fuzz_random_bytes(index: int, data: bytes) -> None:
    with contextlib.suppress(ProtocolViolation):
        PARSERS[index](data)


@FUZZ
@given(st.sampled_from([0x00, 0x01, 0x0A, 0xFE, 0xFF]), st.binary(max_size=120))
def test_parsers_fuzz_plausible_headers(header: int, data: bytes) -> None:
    for parser in PARSERS:
        with contextlib.suppress(ProtocolViolation):
            parser(bytes((header,)) + data)


@FUZZ
@given(st.integers(0, 2**32 - 1), st.binary(max_size=200))
def test_handshake_response_fuzz(caps: int, data: bytes) -> None:
    wire = (caps | c.CLIENT_PROTOCOL_41).to_bytes(4, "little") + data
    with contextlib.suppress(ProtocolViolation):
        parse_handshake_response(wire)


@FUZZ
@given(st.binary(max_size=200))
def test_handshake_v10_fuzz(data: bytes) -> None:
    with contextlib.suppress(ProtocolViolation):
        HandshakeV10.parse(b"\x0a" + data)
    with contextlib.suppress(ProtocolViolation):
        HandshakeV10.parse(HANDSHAKE_WIRE[: len(data) % len(HANDSHAKE_WIRE)] + data)


# --- response tracker ---


def coldef(name: str, col_type: int = 253) -> bytes:
    """A ColumnDefinition41 packet."""
    out = b"".join(write_lenenc_str(s) for s in (b"def", b"db", b"t", b"t", name.encode(), name.encode()))
    return out + b"\x0c" + b"\x2d\x00" + b"\xff\x00\x00\x00" + bytes((col_type,)) + b"\x00\x00" + b"\x00" + b"\x00\x00"


def text_row(*values: bytes | None) -> bytes:
    return b"".join(b"\xfb" if v is None else write_lenenc_str(v) for v in values)


def binary_row(*ints: int) -> bytes:
    return b"\x00" + b"\x00" + b"".join(i.to_bytes(8, "little") for i in ints)


def ok(status: int = c.SERVER_STATUS_AUTOCOMMIT, affected: int = 0, header: int = 0x00, info: str = "") -> bytes:
    return OkPacket(affected, 0, status, 0, info, header=header).build(P41)


def eof(status: int = c.SERVER_STATUS_AUTOCOMMIT) -> bytes:
    return EofPacket(0, status).build()


def err(code: int = 1064) -> bytes:
    return ErrPacket(code, "boom").build()


def term(deprecate_eof: bool, status: int = c.SERVER_STATUS_AUTOCOMMIT) -> bytes:
    """The end of rows: EOF, or the OK packet with a 0xFE header."""
    return ok(status, header=0xFE) if deprecate_eof else eof(status)


def metadata(deprecate_eof: bool, *names: str, status: int = c.SERVER_STATUS_AUTOCOMMIT) -> list[bytes]:
    out = [write_lenenc_int(len(names))] + [coldef(n) for n in names]
    return out if deprecate_eof else [*out, eof(status)]


def resultset(deprecate_eof: bool, rows: Sequence[bytes], status: int = c.SERVER_STATUS_AUTOCOMMIT) -> list[bytes]:
    return [*metadata(deprecate_eof, "a", "b"), *rows, term(deprecate_eof, status)]


AC = c.SERVER_STATUS_AUTOCOMMIT
MORE = c.SERVER_MORE_RESULTS_EXISTS
IN_TRANS = c.SERVER_STATUS_IN_TRANS
CURSOR = c.SERVER_STATUS_CURSOR_EXISTS
ROWS3 = [text_row(b"1", b"x"), text_row(None, b"y"), text_row(b"\xfe", b"")]


def run_feed(tracker: ResponseTracker, packets: Sequence[bytes]) -> None:
    for i, packet in enumerate(packets):
        done = tracker.feed(packet)
        assert done is (i == len(packets) - 1), f"packet {i} of {len(packets)}: done={done}"


def run_scan(tracker: ResponseTracker, packets: Sequence[bytes], chunk: int, seq: int = 1) -> None:
    wire, _ = frame_many(packets, seq)
    buf = bytearray()
    fed = 0
    while fed < len(wire):
        buf += wire[fed : fed + chunk]
        fed += chunk
        consumed = tracker.scan(buf)
        del buf[:consumed]
        assert tracker.done is (fed >= len(wire) and not buf)
    assert not buf


def run_scan_stream(tracker: ResponseTracker, packets: Sequence[bytes], chunk: int, seq: int = 1) -> int:
    """scan(stream=True) as a forwarder uses it; returns the most bytes ever held back."""
    wire, _ = frame_many(packets, seq)
    buf = bytearray()
    fed = forwarded = held = 0
    while fed < len(wire):
        buf += wire[fed : fed + chunk]
        fed += chunk
        consumed = tracker.scan(buf, stream=True)
        forwarded += consumed
        del buf[:consumed]
        held = max(held, len(buf))
    assert not buf and tracker.skip == 0 and forwarded == len(wire)
    return held


def check(
    command: int,
    deprecate_eof: bool,
    packets: Sequence[bytes],
    *,
    status: int | None = None,
    rows: int | None = None,
    error: int | None = None,
    **options: bool,
) -> ResponseTracker:
    """Run the response through feed() and through scan() at several chunk sizes; same outcome each time."""
    results = []
    for chunk, stream in ((None, False), (1, False), (3, False), (7, False), (64, False), (100_000, False),
                          (1, True), (5, True), (64, True)):
        tracker = ResponseTracker()
        assert tracker.start(command, deprecate_eof, seq=None if chunk is None else 1, **options) is False
        if chunk is None:
            run_feed(tracker, packets)
        elif stream:
            run_scan_stream(tracker, packets, chunk)
        else:
            run_scan(tracker, packets, chunk)
        assert tracker.done
        results.append((tracker.status_flags, tracker.rows, tracker.error, tracker.result_sets, tracker.prepare_ok))
        if status is not None:
            assert tracker.status_flags == status
        if rows is not None:
            assert tracker.rows == rows
        assert tracker.error == error
    assert all(r == results[0] for r in results)
    return tracker


both = pytest.mark.parametrize("deprecate_eof", [False, True])


@both
def test_query_ok(deprecate_eof: bool) -> None:
    t = check(c.COM_QUERY, deprecate_eof, [ok(IN_TRANS | AC, affected=3)], status=IN_TRANS | AC)
    assert t.in_transaction and t.affected_rows == 3 and t.result_sets == 1 and not t.more_results


@both
def test_query_err_keeps_status(deprecate_eof: bool) -> None:
    tracker = ResponseTracker(IN_TRANS | MORE)
    tracker.start(c.COM_QUERY, deprecate_eof)
    assert tracker.feed(err(1064))
    assert tracker.error == 1064
    assert tracker.status_flags == IN_TRANS  # ERR carries no status; MORE_RESULTS cannot survive it
    assert tracker.error_packet == err(1064)


@both
def test_query_resultset(deprecate_eof: bool) -> None:
    t = check(c.COM_QUERY, deprecate_eof, resultset(deprecate_eof, ROWS3), status=AC, rows=3)
    assert t.result_sets == 1


def test_long_ok_terminator_with_session_state() -> None:
    # with CLIENT_DEPRECATE_EOF the end of rows is an OK packet, which may be far longer than an EOF
    terminator = OkPacket(0, 0, AC | c.SERVER_SESSION_STATE_CHANGED, 0, "", SCHEMA_CHANGE, 0xFE).build(TRACK)
    assert len(terminator) > 9
    t = check(c.COM_QUERY, True, [*metadata(True, "a", "b"), *ROWS3, terminator], rows=3)
    assert t.status_flags == AC | c.SERVER_SESSION_STATE_CHANGED
    t = check(c.COM_STMT_FETCH, True, [binary_row(1, 2), terminator], rows=1)
    assert t.seen_status & c.SERVER_SESSION_STATE_CHANGED


@both
def test_query_empty_resultset(deprecate_eof: bool) -> None:
    check(c.COM_QUERY, deprecate_eof, resultset(deprecate_eof, [], status=IN_TRANS), status=IN_TRANS, rows=0)


@both
def test_multi_statement_results(deprecate_eof: bool) -> None:
    packets = [
        *resultset(deprecate_eof, ROWS3[:1], status=AC | MORE),
        ok(AC | MORE | c.SERVER_SESSION_STATE_CHANGED, affected=1),
        *resultset(deprecate_eof, ROWS3, status=AC | MORE),
        ok(AC),  # e.g. the final OK of a CALL
    ]
    t = check(c.COM_QUERY, deprecate_eof, packets, status=AC, rows=4)
    assert t.result_sets == 4
    assert t.seen_status & c.SERVER_SESSION_STATE_CHANGED


@both
def test_multi_statement_error_ends_response(deprecate_eof: bool) -> None:
    packets = [*resultset(deprecate_eof, ROWS3, status=AC | MORE), err(1146)]
    check(c.COM_QUERY, deprecate_eof, packets, status=AC, rows=3, error=1146)


@both
def test_error_while_streaming_rows(deprecate_eof: bool) -> None:
    packets = [*metadata(deprecate_eof, "a", "b"), *ROWS3, err(c.ER_QUERY_INTERRUPTED)]
    check(c.COM_QUERY, deprecate_eof, packets, rows=3, error=c.ER_QUERY_INTERRUPTED)


def test_mariadb_progress_reports_are_skipped() -> None:
    progress = b"\xff\xff\xff\x01\x01\x01\x10\x27\x00\x05stage"
    t = check(c.COM_QUERY, False, [progress, progress, ok(AC, affected=7)], status=AC)
    assert t.affected_rows == 7


def test_local_infile_feed() -> None:
    t = ResponseTracker()
    t.start(c.COM_QUERY, True)
    assert t.feed(b"\xfb/tmp/data.csv") is False
    assert t.expects_local_infile
    assert t.feed_infile(b"1,2\n3,4\n") is False
    assert t.feed_infile(b"") is True
    assert not t.expects_local_infile
    assert t.feed(ok(AC, affected=2, info="Records: 2")) is True
    assert t.affected_rows == 2
    with pytest.raises(ProtocolViolation):
        t.feed_infile(b"late")


def test_local_infile_scan_with_continuation_and_more_results() -> None:
    t = ResponseTracker()
    t.start_command(b"\x03LOAD DATA LOCAL INFILE 'x' INTO TABLE t; SELECT 1", c.CLIENT_DEPRECATE_EOF)
    server = frame(b"\xfbx", 1)
    assert t.scan(server + b"\x00\x00") == len(server)  # stops after the request
    assert t.expects_local_infile and not t.done
    # client: one packet of exactly 0xFFFFFF bytes (frame + empty continuation frame), then the empty packet
    big = frame(bytes(MAX), 2)
    upload = big + frame(b"", 4)
    assert t.scan_infile(upload[:100]) == 0
    assert t.scan_infile(upload[: len(big)]) == len(big)  # the empty continuation frame is not the end
    assert t.expects_local_infile
    assert t.scan_infile(upload, len(big)) == len(upload)
    assert not t.expects_local_infile
    rest, _ = frame_many([ok(AC | MORE, affected=1), *resultset(True, ROWS3)], 5)
    assert t.scan(rest) == len(rest)
    assert t.done and t.rows == 3 and t.status_flags == AC and t.result_sets == 2


def test_local_infile_refused_by_server() -> None:
    check(c.COM_QUERY, False, [err(c.ER_NOT_ALLOWED_COMMAND)], error=c.ER_NOT_ALLOWED_COMMAND)


@both
def test_stmt_prepare(deprecate_eof: bool) -> None:
    packets = [PrepareOk(7, 2, 1).build(), coldef("?")]
    if not deprecate_eof:
        packets.append(eof())
    packets += [coldef("a"), coldef("b")]
    if not deprecate_eof:
        packets.append(eof())
    t = check(c.COM_STMT_PREPARE, deprecate_eof, packets)
    assert t.prepare_ok == PrepareOk(7, 2, 1)


@both
@pytest.mark.parametrize(("columns", "params"), [(0, 0), (0, 2), (3, 0)])
def test_stmt_prepare_shapes(deprecate_eof: bool, columns: int, params: int) -> None:
    packets = [PrepareOk(1, columns, params, 1).build()]
    for defs in (params, columns):
        if defs:
            packets += [coldef("?")] * defs
            if not deprecate_eof:
                packets.append(eof())
    t = check(c.COM_STMT_PREPARE, deprecate_eof, packets)
    assert t.prepare_ok == PrepareOk(1, columns, params, 1)
    assert t.warnings == 1 or not deprecate_eof


def test_stmt_prepare_error() -> None:
    t = check(c.COM_STMT_PREPARE, False, [err(1146)], error=1146)
    assert t.prepare_ok is None


def test_stmt_prepare_optional_metadata_none() -> None:
    prepare_ok = PrepareOk(1, 2, 2).build() + b"\x00"  # metadata_follows = RESULTSET_METADATA_NONE
    t = check(c.COM_STMT_PREPARE, False, [prepare_ok], optional_metadata=True)
    assert t.prepare_ok == PrepareOk(1, 2, 2)


@both
def test_stmt_execute_binary_rows(deprecate_eof: bool) -> None:
    rows = [binary_row(1, 2), binary_row(3, 4)]
    assert rows[0][0] == 0x00  # would look like an OK header
    check(c.COM_STMT_EXECUTE, deprecate_eof, resultset(deprecate_eof, rows, status=IN_TRANS), rows=2)


@both
def test_stmt_execute_call_multiple_results(deprecate_eof: bool) -> None:
    packets = [
        *resultset(deprecate_eof, [binary_row(1, 1)], status=AC | MORE),
        *resultset(deprecate_eof, [binary_row(2, 2)], status=AC | MORE | c.SERVER_PS_OUT_PARAMS),
        ok(AC),
    ]
    check(c.COM_STMT_EXECUTE, deprecate_eof, packets, status=AC, rows=2)


@both
def test_stmt_execute_ok(deprecate_eof: bool) -> None:
    check(c.COM_STMT_EXECUTE, deprecate_eof, [ok(AC, affected=1)], status=AC)


@both
def test_stmt_execute_opens_cursor(deprecate_eof: bool) -> None:
    # the columns, then EOF (or OK-0xFE) with SERVER_STATUS_CURSOR_EXISTS and no rows
    packets = [write_lenenc_int(2), coldef("a"), coldef("b"), term(deprecate_eof, AC | CURSOR)]
    t = check(c.COM_STMT_EXECUTE, deprecate_eof, packets, status=AC | CURSOR, rows=0)
    assert t.cursor_open


def test_stmt_execute_cursor_not_opened() -> None:
    # cursor asked for, but the EOF lacks CURSOR_EXISTS: the rows follow as usual
    packets = [*metadata(False, "a", "b"), binary_row(1, 2), eof(AC)]
    check(c.COM_STMT_EXECUTE, False, packets, status=AC, rows=1)


def test_text_query_ignores_cursor_flag_in_metadata_eof() -> None:
    packets = [*metadata(False, "a", "b", status=AC | CURSOR), text_row(b"1", b"2"), eof(AC)]
    check(c.COM_QUERY, False, packets, status=AC, rows=1)


@both
def test_stmt_fetch(deprecate_eof: bool) -> None:
    packets = [binary_row(1, 2), binary_row(3, 4), term(deprecate_eof, AC | CURSOR)]
    check(c.COM_STMT_FETCH, deprecate_eof, packets, status=AC | CURSOR, rows=2)
    last = [term(deprecate_eof, AC | c.SERVER_STATUS_LAST_ROW_SENT)]
    check(c.COM_STMT_FETCH, deprecate_eof, last, status=AC | c.SERVER_STATUS_LAST_ROW_SENT, rows=0)
    check(c.COM_STMT_FETCH, deprecate_eof, [err(1243)], error=1243)


@both
def test_field_list(deprecate_eof: bool) -> None:
    check(c.COM_FIELD_LIST, deprecate_eof, [coldef("a"), coldef("b"), term(deprecate_eof)], status=AC)
    check(c.COM_FIELD_LIST, deprecate_eof, [err(1146)], error=1146)


def test_statistics() -> None:
    check(c.COM_STATISTICS, False, [b"Uptime: 100  Threads: 1  Questions: 5"])
    check(c.COM_STATISTICS, True, [err(1105)], error=1105)


@both
@pytest.mark.parametrize(
    "command", [c.COM_PING, c.COM_INIT_DB, c.COM_RESET_CONNECTION, c.COM_STMT_RESET, c.COM_PROCESS_KILL]
)
def test_ok_err_commands(deprecate_eof: bool, command: int) -> None:
    check(command, deprecate_eof, [ok(AC | IN_TRANS)], status=AC | IN_TRANS)
    check(command, deprecate_eof, [err(1049)], error=1049)


@both
def test_set_option_answers_with_eof(deprecate_eof: bool) -> None:
    check(c.COM_SET_OPTION, deprecate_eof, [term(deprecate_eof, AC | IN_TRANS)], status=AC | IN_TRANS)


def test_unknown_command_gets_err() -> None:
    check(0x60, False, [err(c.ER_UNKNOWN_COM_ERROR)], error=c.ER_UNKNOWN_COM_ERROR)


@pytest.mark.parametrize("command", [c.COM_STMT_CLOSE, c.COM_STMT_SEND_LONG_DATA, c.COM_QUIT])
def test_commands_without_response(command: int) -> None:
    t = ResponseTracker()
    assert t.start(command, True) is True
    assert t.done
    assert t.scan(b"\x01\x00\x00\x01\x00") == 0
    with pytest.raises(ProtocolViolation):
        t.feed(ok())


@pytest.mark.parametrize("command", [c.COM_CHANGE_USER, c.COM_BINLOG_DUMP, c.COM_BINLOG_DUMP_GTID])
def test_untrackable_commands(command: int) -> None:
    with pytest.raises(ValueError):
        ResponseTracker().start(command, True)


def test_optional_metadata_none_skips_columns_and_eof() -> None:
    packets = [b"\x02\x00", text_row(b"1", b"2"), eof(AC)]  # column count 2, metadata_follows 0
    check(c.COM_QUERY, False, packets, status=AC, rows=1, optional_metadata=True)
    full = [b"\x02\x01", coldef("a"), coldef("b"), eof(), text_row(b"1", b"2"), eof(AC)]
    check(c.COM_QUERY, False, full, status=AC, rows=1, optional_metadata=True)


@both
def test_mariadb_cache_metadata_skipped(deprecate_eof: bool) -> None:
    packets = [b"\x02\x00"] + ([] if deprecate_eof else [eof()]) + [binary_row(1, 2), term(deprecate_eof, AC)]
    check(c.COM_STMT_EXECUTE, deprecate_eof, packets, status=AC, rows=1, cache_metadata=True)


def test_scan_checks_sequence_ids() -> None:
    t = ResponseTracker()
    t.start(c.COM_QUERY, False, seq=1)
    with pytest.raises(ProtocolViolation) as info:
        t.scan(frame(ok(), 2))
    assert info.value.mysql_errno == c.ER_NET_PACKETS_OUT_OF_ORDER
    t.start(c.COM_QUERY, False, seq=1)
    wire, next_seq = frame_many(resultset(False, ROWS3), 1)
    assert t.scan(wire) == len(wire) and t.done
    assert t.last_seq == next_seq - 1


def test_start_command_derives_options() -> None:
    t = ResponseTracker()
    t.start_command(b"\x03SELECT 1", c.CLIENT_DEPRECATE_EOF | P41)
    wire, _ = frame_many(resultset(True, ROWS3), 1)
    assert t.scan(wire) == len(wire) and t.done and t.rows == 3
    t.start_command(b"\x0e", P41, status_flags=IN_TRANS)
    assert t.status_flags == IN_TRANS
    with pytest.raises(ProtocolViolation):  # seq 1 expected
        t.scan(frame(ok(), 0))
    with pytest.raises(ProtocolViolation):
        t.start_command(b"", P41)


def test_scan_stops_after_response_and_leaves_the_rest() -> None:
    t = ResponseTracker()
    t.start(c.COM_PING, False)
    wire = frame(ok(), 1) + frame(ok(), 2)
    assert t.scan(wire) == 11 and t.done
    assert t.scan(wire, 11) == 11
    with pytest.raises(ProtocolViolation):
        t.feed(ok())


@pytest.mark.parametrize(
    ("command", "packets"),
    [
        (c.COM_QUERY, [eof()]),  # 0xFE where a result starts
        (c.COM_QUERY, [b"\x01", coldef("a"), text_row(b"1")]),  # missing EOF after columns
        (c.COM_STMT_PREPARE, [ok()]),  # too short for COM_STMT_PREPARE_OK
        (c.COM_PING, [b"\x01\x02"]),
        (c.COM_QUERY, [b""]),
        (c.COM_QUERY, [b"\xfc\x01"]),  # truncated column count
        (c.COM_QUERY, [b"\x00\xfe\x01"]),  # truncated OK
    ],
)
def test_tracker_rejects_desync(command: int, packets: list[bytes]) -> None:
    t = ResponseTracker()
    t.start(command, False)
    with pytest.raises(ProtocolViolation):
        for packet in packets:
            t.feed(packet)


@both
def test_huge_rows_through_scan(deprecate_eof: bool) -> None:
    # a text row >= 16 MiB whose first column has an 8-byte length: starts with 0xFE but is not an EOF
    value = b"v" * (MAX + 5)
    huge = text_row(value)
    assert huge[0] == 0xFE and len(huge) > MAX
    exact = b"\xfc\xfc\xff" + bytes(MAX - 3)  # a row of exactly 0xFFFFFF bytes: ends with an empty frame
    packets = [write_lenenc_int(1), coldef("a"), *([] if deprecate_eof else [eof()])]
    packets += [huge, exact, text_row(b"1"), term(deprecate_eof, IN_TRANS)]
    wire, _ = frame_many(packets, 1)
    t = ResponseTracker()
    t.start(c.COM_QUERY, deprecate_eof, seq=1)
    pos = 0
    for stop in (100, len(wire) // 2, len(wire) - 3, len(wire)):
        pos = t.scan(wire, pos, stop)
    assert pos == len(wire) and t.done and t.rows == 3 and t.status_flags == IN_TRANS
    t2 = ResponseTracker()
    t2.start(c.COM_QUERY, deprecate_eof)
    run_feed(t2, packets)
    assert t2.rows == 3


COMMANDS = [
    c.COM_QUERY,
    c.COM_STMT_EXECUTE,
    c.COM_STMT_PREPARE,
    c.COM_STMT_FETCH,
    c.COM_FIELD_LIST,
    c.COM_STATISTICS,
    c.COM_PING,
    c.COM_SET_OPTION,
]
fuzz_packets = st.lists(
    st.one_of(
        st.binary(max_size=30),
        st.sampled_from([ok(), ok(AC | MORE), eof(), eof(AC | MORE | CURSOR), err(), b"\xfbf", b"\x02", coldef("x")]),
    ),
    max_size=12,
)


@FUZZ
@given(st.sampled_from(COMMANDS), st.booleans(), st.booleans(), st.booleans(), fuzz_packets)
def test_tracker_fuzz_feed(command: int, deprecate: bool, optional: bool, cache: bool, packets: list[bytes]) -> None:
    t = ResponseTracker()
    t.start(command, deprecate, optional_metadata=optional, cache_metadata=cache)
    with contextlib.suppress(ProtocolViolation):
        for packet in packets:
            if t.expects_local_infile:
                t.feed_infile(b"")
            t.feed(packet)


@FUZZ
@given(st.sampled_from(COMMANDS), st.booleans(), st.binary(max_size=300), st.integers(1, 50))
def test_tracker_fuzz_scan(command: int, deprecate: bool, data: bytes, chunk: int) -> None:
    t = ResponseTracker()
    t.start(command, deprecate)
    buf = bytearray()
    with contextlib.suppress(ProtocolViolation):
        for i in range(0, len(data), chunk):
            buf += data[i : i + chunk]
            consumed = t.scan(buf)
            assert 0 <= consumed <= len(buf)
            del buf[:consumed]
            if t.expects_local_infile:
                del buf[: t.scan_infile(buf)]


@given(
    st.booleans(),
    st.lists(st.lists(st.binary(min_size=1, max_size=20).map(lambda v: write_lenenc_str(v)), max_size=5), max_size=4),
    st.lists(st.integers(1, 80), min_size=1, max_size=10),
)
def test_tracker_scan_matches_feed(deprecate: bool, result_rows: list[list[bytes]], cuts: list[int]) -> None:
    packets: list[bytes] = []
    for i, rows in enumerate(result_rows):
        more = MORE if i < len(result_rows) - 1 else 0
        packets += resultset(deprecate, rows, status=AC | more)
    if not result_rows:
        packets.append(ok(AC))
    fed = ResponseTracker()
    fed.start(c.COM_QUERY, deprecate)
    run_feed(fed, packets)
    scanned = ResponseTracker()
    scanned.start(c.COM_QUERY, deprecate, seq=1)
    wire, _ = frame_many(packets, 1)
    buf = bytearray()
    pos = i = 0
    while pos < len(wire):
        buf += wire[pos : pos + cuts[i % len(cuts)]]
        pos += cuts[i % len(cuts)]
        i += 1
        del buf[: scanned.scan(buf)]
    assert scanned.done and not buf
    assert (scanned.rows, scanned.status_flags, scanned.result_sets) == (fed.rows, fed.status_flags, fed.result_sets)
    assert fed.rows == sum(len(r) for r in result_rows)


@both
def test_scan_stream_forwards_huge_rows_without_holding_them(deprecate_eof: bool) -> None:
    big = text_row(b"x" * (c.MAX_PACKET + 1000), b"y")  # one row in two frames
    packets = [*metadata(deprecate_eof, "a", "b"), big, text_row(b"1", b"2"), term(deprecate_eof, AC | IN_TRANS)]
    tracker = ResponseTracker()
    tracker.start(c.COM_QUERY, deprecate_eof, seq=1)
    held = run_scan_stream(tracker, packets, 65536)
    assert tracker.done and tracker.rows == 2 and tracker.in_transaction
    assert held < 65536 + 4  # never more than one read (plus a header) held back


def test_scan_stream_checks_sequence_of_a_streamed_frame() -> None:
    tracker = ResponseTracker()
    tracker.start(c.COM_QUERY, False, seq=1)
    wire, _ = frame_many(metadata(False, "a"), 1)
    tracker.scan(wire, stream=True)
    bad = frame(text_row(b"x" * 1000), 9)
    with pytest.raises(ProtocolViolation):
        tracker.scan(bad[:100], stream=True)


def test_change_user_roundtrip_and_exact_bytes() -> None:
    caps = c.CLIENT_PROTOCOL_41 | c.CLIENT_SECURE_CONNECTION | c.CLIENT_PLUGIN_AUTH | c.CLIENT_CONNECT_ATTRS
    packet = ChangeUser("bob", b"\x01\x02", "db1", 45, "mysql_native_password", {"a": "b"})
    wire = packet.build(caps)
    assert wire == (b"\x11bob\x00\x02\x01\x02db1\x00\x2d\x00mysql_native_password\x00" + b"\x04\x01a\x01b")
    assert ChangeUser.parse(wire, caps) == packet
    short = ChangeUser("bob", b"", "")
    assert ChangeUser.parse(short.build(caps), caps) == short
    with pytest.raises(ProtocolViolation):
        ChangeUser.parse(b"\x11bob", caps)
