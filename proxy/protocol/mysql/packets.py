"""MySQL/MariaDB framing, length-encoded values, packet builders/parsers and a sans-IO response tracker."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from proxy import errors
from proxy.protocol.mysql.constants import (
    AUTH_MORE_DATA_HEADER,
    AUTH_SWITCH_HEADER,
    CLIENT_CONNECT_ATTRS,
    CLIENT_CONNECT_WITH_DB,
    CLIENT_DEPRECATE_EOF,
    CLIENT_MYSQL,
    CLIENT_OPTIONAL_RESULTSET_METADATA,
    CLIENT_PLUGIN_AUTH,
    CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
    CLIENT_PROTOCOL_41,
    CLIENT_SECURE_CONNECTION,
    CLIENT_SESSION_TRACK,
    CLIENT_SSL,
    CLIENT_TRANSACTIONS,
    CLIENT_ZSTD_COMPRESSION_ALGORITHM,
    COM_BINLOG_DUMP,
    COM_BINLOG_DUMP_GTID,
    COM_CHANGE_USER,
    COM_CLONE,
    COM_FIELD_LIST,
    COM_MULTI,
    COM_PROCESS_INFO,
    COM_QUERY,
    COM_QUIT,
    COM_REGISTER_SLAVE,
    COM_STATISTICS,
    COM_STMT_BULK_EXECUTE,
    COM_STMT_CLOSE,
    COM_STMT_EXECUTE,
    COM_STMT_FETCH,
    COM_STMT_PREPARE,
    COM_STMT_SEND_LONG_DATA,
    COM_TABLE_DUMP,
    DEFAULT_SERVER_CAPABILITIES,
    EOF_HEADER,
    ER_HANDSHAKE_ERROR,
    ER_MALFORMED_PACKET,
    ER_NET_PACKET_TOO_LARGE,
    ER_NET_PACKETS_OUT_OF_ORDER,
    ERR_HEADER,
    LOCAL_INFILE_HEADER,
    MARIADB_CLIENT_CACHE_METADATA,
    MARIADB_PROGRESS_ERRNO,
    MAX_PACKET,
    MYSQL_NATIVE_PASSWORD,
    MYSQL_OLD_PASSWORD,
    OK_HEADER,
    PROTOCOL_VERSION,
    SERVER_MORE_RESULTS_EXISTS,
    SERVER_SESSION_STATE_CHANGED,
    SERVER_STATUS_AUTOCOMMIT,
    SERVER_STATUS_CURSOR_EXISTS,
    SERVER_STATUS_IN_TRANS,
    UTF8MB4_GENERAL_CI,
    sqlstate_for,
)

Buffer = bytes | bytearray | memoryview

DEFAULT_MAX_PACKET_SIZE: Final = 64 * 1024 * 1024  # MySQL 8's default max_allowed_packet

_HEADER = struct.Struct("<I")  # 3-byte length | seq << 24
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class ProtocolViolation(errors.ProtocolViolation):
    """The peer's bytes break the MySQL protocol; mysql_errno says what to answer (if anything)."""

    def __init__(self, message: str, errno: int = ER_MALFORMED_PACKET) -> None:
        super().__init__(message)
        self.mysql_errno = errno
        self.mysql_sqlstate = sqlstate_for(errno)


def _text(data: Buffer) -> str:
    # surrogateescape: any bytes decode, and encode back to the same bytes.
    return bytes(data).decode("utf-8", "surrogateescape")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _cstr(text: str) -> bytes:
    data = _bytes(text)
    if b"\x00" in data:
        raise ValueError(f"NUL inside a NUL-terminated string: {text!r}")
    return data + b"\x00"


# --- framing ---


def frames_needed(payload_len: int) -> int:
    """How many frames (each with its own sequence id) a payload of this length is sent in."""
    return payload_len // MAX_PACKET + 1


def frame(payload: Buffer, seq: int = 0) -> bytes:
    """The wire bytes for one logical packet; payloads >= 16 MiB are split into continuation frames.

    A payload whose length is an exact multiple of 0xFFFFFF ends with an empty frame.
    The next sequence id is (seq + frames_needed(len(payload))) & 0xFF.
    """
    n = len(payload)
    if n < MAX_PACKET:
        return _HEADER.pack(n | ((seq & 0xFF) << 24)) + payload
    view = memoryview(payload)
    parts: list[Buffer] = []
    off = 0
    while True:
        chunk = view[off : off + MAX_PACKET]
        size = len(chunk)
        parts.append(_HEADER.pack(size | ((seq & 0xFF) << 24)))
        parts.append(chunk)
        seq += 1
        off += size
        if size < MAX_PACKET:
            return b"".join(parts)


def frame_many(payloads: Iterable[Buffer], seq: int = 0) -> tuple[bytes, int]:
    """Frame consecutive packets; returns (wire bytes, next sequence id)."""
    parts: list[bytes] = []
    for payload in payloads:
        parts.append(frame(payload, seq))
        seq = (seq + frames_needed(len(payload))) & 0xFF
    return b"".join(parts), seq


def parse_header(buf: Buffer, pos: int = 0) -> tuple[int, int] | None:
    """(payload length, sequence id) of the frame header at pos, or None if fewer than 4 bytes remain."""
    if len(buf) - pos < 4:
        return None
    return buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16), buf[pos + 3]


class PacketReader:
    """Reassembles logical packets from a byte stream (sans-IO).

    feed() bytes as they arrive, then call next_packet() until it returns None. Continuation frames
    (length 0xFFFFFF) are joined; a logical packet larger than max_packet_size raises ProtocolViolation
    (ER_NET_PACKET_TOO_LARGE) as soon as the headers show it. With strict_seq, every frame's sequence id
    must equal expected_seq (ER_NET_PACKETS_OUT_OF_ORDER otherwise); expected_seq is tracked either way,
    so after a packet it is the sequence id a reply must use. Set it (reset_seq) when a new command starts.
    """

    __slots__ = ("_buf", "_pos", "expected_seq", "max_packet_size", "strict_seq")

    def __init__(
        self, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE, *, strict_seq: bool = False, expected_seq: int = 0
    ) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_packet_size = max_packet_size
        self.strict_seq = strict_seq
        self.expected_seq = expected_seq

    def feed(self, data: Buffer) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as packets."""
        return len(self._buf) - self._pos

    def take_buffer(self) -> bytes:
        """Remove and return the unread bytes (e.g. a TLS ClientHello that followed an SSLRequest)."""
        data = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return data

    def reset_seq(self, seq: int = 0) -> None:
        self.expected_seq = seq & 0xFF

    def next_packet(self) -> tuple[int, bytes] | None:
        """The next complete logical packet as (sequence id of its first frame, payload), or None."""
        buf = self._buf
        pos = self._pos
        end = len(buf)
        if end - pos < 4:
            return None
        length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
        seq = buf[pos + 3]
        if self.strict_seq and seq != self.expected_seq:
            raise ProtocolViolation(
                f"packet sequence id {seq}, expected {self.expected_seq}", ER_NET_PACKETS_OUT_OF_ORDER
            )
        if length > self.max_packet_size:
            raise ProtocolViolation(
                f"packet of {length} bytes exceeds the {self.max_packet_size} byte limit", ER_NET_PACKET_TOO_LARGE
            )
        if length < MAX_PACKET:  # the common case: one frame
            stop = pos + 4 + length
            if stop > end:
                return None
            payload = bytes(buf[pos + 4 : stop])
            self._consumed(stop, seq)
            return seq, payload
        return self._next_multi(buf, pos, end, seq)

    def _next_multi(self, buf: bytearray, pos: int, end: int, first_seq: int) -> tuple[int, bytes] | None:
        spans: list[tuple[int, int]] = []
        total = 0
        expected = first_seq
        p = pos
        while True:
            if end - p < 4:
                return None
            length = buf[p] | (buf[p + 1] << 8) | (buf[p + 2] << 16)
            seq = buf[p + 3]
            if p != pos and seq != expected:  # the first frame was checked by next_packet
                raise ProtocolViolation(
                    f"continuation frame sequence id {seq}, expected {expected}", ER_NET_PACKETS_OUT_OF_ORDER
                )
            total += length
            if total > self.max_packet_size:
                raise ProtocolViolation(
                    f"packet of at least {total} bytes exceeds the {self.max_packet_size} byte limit",
                    ER_NET_PACKET_TOO_LARGE,
                )
            stop = p + 4 + length
            if stop > end:
                return None
            spans.append((p + 4, stop))
            expected = (seq + 1) & 0xFF
            p = stop
            if length < MAX_PACKET:
                break
        with memoryview(buf) as view:
            payload = b"".join([view[a:b] for a, b in spans])
        self._consumed(p, (expected - 1) & 0xFF)
        return first_seq, payload

    def _consumed(self, stop: int, last_seq: int) -> None:
        self.expected_seq = (last_seq + 1) & 0xFF
        if stop == len(self._buf):
            self._buf.clear()
            self._pos = 0
        else:
            self._pos = stop

    def packets(self) -> Iterator[tuple[int, bytes]]:
        """Iterate over the complete packets currently buffered."""
        while (packet := self.next_packet()) is not None:
            yield packet


# --- length-encoded integers and strings ---


def read_lenenc_int(buf: Buffer, pos: int = 0) -> tuple[int, int]:
    """Decode a length-encoded integer at pos; returns (value, position after it).

    0xFB (NULL in a text row) and 0xFF are not integers and raise ProtocolViolation.
    """
    return _lenenc_at(buf, pos, len(buf))


def write_lenenc_int(value: int) -> bytes:
    if value < 0:
        raise ValueError("length-encoded integers are unsigned")
    if value < 0xFB:
        return bytes((value,))
    if value < 1 << 16:
        return b"\xfc" + value.to_bytes(2, "little")
    if value < 1 << 24:
        return b"\xfd" + value.to_bytes(3, "little")
    if value < 1 << 64:
        return b"\xfe" + value.to_bytes(8, "little")
    raise ValueError("length-encoded integer out of range")


def read_lenenc_str(buf: Buffer, pos: int = 0) -> tuple[bytes, int]:
    """Decode a length-encoded string at pos; returns (bytes, position after it)."""
    length, pos = read_lenenc_int(buf, pos)
    stop = pos + length
    if stop > len(buf):
        raise ProtocolViolation("truncated length-encoded string")
    return bytes(buf[pos:stop]), stop


def write_lenenc_str(data: Buffer) -> bytes:
    return write_lenenc_int(len(data)) + data


def read_null_str(buf: Buffer, pos: int = 0, *, allow_eof: bool = False) -> tuple[bytes, int]:
    """Decode a NUL-terminated string at pos; returns (bytes without the NUL, position after the NUL).

    With allow_eof, a string running to the end of the packet without its NUL is accepted too
    (some clients omit the final NUL of the last field).
    """
    if isinstance(buf, memoryview):
        buf = bytes(buf)
    end = len(buf)
    if pos > end:
        raise ProtocolViolation("truncated NUL-terminated string")
    nul = buf.find(b"\x00", pos)
    if nul < 0:
        if allow_eof:
            return bytes(buf[pos:]), end
        raise ProtocolViolation("NUL-terminated string without its NUL")
    return bytes(buf[pos:nul]), nul + 1


class _Cursor:
    """Bounds-checked sequential reads over one payload; every shortfall is a ProtocolViolation."""

    __slots__ = ("buf", "end", "errno", "pos", "what")

    def __init__(self, buf: Buffer, what: str, errno: int = ER_MALFORMED_PACKET) -> None:
        self.buf = bytes(buf)
        self.pos = 0
        self.end = len(self.buf)
        self.what = what
        self.errno = errno

    def fail(self, detail: str) -> ProtocolViolation:
        return ProtocolViolation(f"malformed {self.what}: {detail}", self.errno)

    @property
    def at_end(self) -> bool:
        return self.pos >= self.end

    def fixed(self, n: int, field: str) -> bytes:
        stop = self.pos + n
        if stop > self.end:
            raise self.fail(f"truncated {field}")
        data = self.buf[self.pos : stop]
        self.pos = stop
        return data

    def u8(self, field: str) -> int:
        if self.pos >= self.end:
            raise self.fail(f"truncated {field}")
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def u16(self, field: str) -> int:
        return int.from_bytes(self.fixed(2, field), "little")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.fixed(4, field), "little")

    def lenenc_int(self, field: str) -> int:
        try:
            value, self.pos = read_lenenc_int(self.buf, self.pos)
        except ProtocolViolation as exc:
            raise self.fail(f"{field}: {exc}") from None
        return value

    def lenenc_str(self, field: str) -> bytes:
        try:
            value, self.pos = read_lenenc_str(self.buf, self.pos)
        except ProtocolViolation as exc:
            raise self.fail(f"{field}: {exc}") from None
        return value

    def null_str(self, field: str, *, allow_eof: bool = False) -> bytes:
        try:
            value, self.pos = read_null_str(self.buf, self.pos, allow_eof=allow_eof)
        except ProtocolViolation as exc:
            raise self.fail(f"{field}: {exc}") from None
        return value

    def rest(self) -> bytes:
        data = self.buf[self.pos :]
        self.pos = self.end
        return data


# --- packet classification ---


def is_ok(payload: Buffer) -> bool:
    """An OK packet (0x00 header, at least 7 bytes). Only meaningful where a response starts:
    binary result rows start with 0x00 too."""
    return len(payload) >= 7 and payload[0] == OK_HEADER


def is_err(payload: Buffer) -> bool:
    return len(payload) > 0 and payload[0] == ERR_HEADER


def is_eof(payload: Buffer, deprecate_eof: bool = False) -> bool:
    """An EOF packet, or with CLIENT_DEPRECATE_EOF the OK packet with a 0xFE header that replaces it.

    A text row can start with 0xFE too (an 8-byte length prefix), but it is then at least 16 MiB long:
    an EOF is shorter than 9 bytes, the OK replacement shorter than 0xFFFFFF. In the auth phase 0xFE is
    an AuthSwitchRequest instead.
    """
    n = len(payload)
    if n == 0 or payload[0] != EOF_HEADER:
        return False
    return n < MAX_PACKET if deprecate_eof else n < 9


# --- connection phase ---


@dataclass(slots=True)
class HandshakeV10:
    """The server's greeting. capabilities bits 32..63 are MariaDB extended capabilities."""

    server_version: str
    connection_id: int
    auth_plugin_data: bytes  # the scramble/nonce, normally 20 bytes (no trailing NUL)
    capabilities: int = DEFAULT_SERVER_CAPABILITIES
    charset: int = UTF8MB4_GENERAL_CI
    status_flags: int = SERVER_STATUS_AUTOCOMMIT
    auth_plugin_name: str = MYSQL_NATIVE_PASSWORD

    @property
    def is_mariadb(self) -> bool:
        return not self.capabilities & CLIENT_MYSQL or "mariadb" in self.server_version.lower()

    def build(self) -> bytes:
        data = self.auth_plugin_data
        caps = self.capabilities
        if len(data) < 8 or len(data) > 254:
            raise ValueError("auth_plugin_data must be 8..254 bytes")
        out = bytearray((PROTOCOL_VERSION,))
        out += _cstr(self.server_version)
        out += struct.pack(
            "<I8sBHBHH",
            self.connection_id,
            data[:8],
            0,
            caps & 0xFFFF,
            self.charset,
            self.status_flags,
            (caps >> 16) & 0xFFFF,
        )
        out.append(len(data) + 1 if caps & CLIENT_PLUGIN_AUTH else 0)
        out += bytes(6)
        out += _U32.pack(0 if caps & CLIENT_MYSQL else (caps >> 32) & 0xFFFFFFFF)
        if caps & CLIENT_SECURE_CONNECTION:
            out += (data[8:] + b"\x00").ljust(13, b"\x00")
        if caps & CLIENT_PLUGIN_AUTH:
            out += _cstr(self.auth_plugin_name)
        return bytes(out)

    @classmethod
    def parse(cls, payload: Buffer) -> HandshakeV10:
        r = _Cursor(payload, "initial handshake", ER_HANDSHAKE_ERROR)
        version = r.u8("protocol version")
        if version != PROTOCOL_VERSION:
            raise r.fail(f"unsupported protocol version {version}")
        server_version = _text(r.null_str("server version"))
        connection_id = r.u32("connection id")
        data = r.fixed(8, "auth-plugin-data part 1")
        r.fixed(1, "filler")
        caps = r.u16("capability flags")
        charset = status = 0
        plugin = ""
        if not r.at_end:
            charset = r.u8("character set")
            status = r.u16("status flags")
            caps |= r.u16("upper capability flags") << 16
            data_len = r.u8("auth-plugin-data length")
            reserved = r.fixed(10, "reserved")
            if not caps & CLIENT_MYSQL:
                caps |= int.from_bytes(reserved[6:10], "little") << 32
            if caps & CLIENT_SECURE_CONNECTION:
                part2 = r.fixed(max(13, data_len - 8), "auth-plugin-data part 2")
                data += part2[: max(12, data_len - 9)]
            if caps & CLIENT_PLUGIN_AUTH:
                plugin = _text(r.null_str("auth plugin name", allow_eof=True))
        return cls(server_version, connection_id, data, caps, charset, status, plugin)


def _client_prefix(caps: int, max_packet_size: int, charset: int) -> bytes:
    ext = 0 if caps & CLIENT_MYSQL else (caps >> 32) & 0xFFFFFFFF
    return struct.pack("<IIB19sI", caps & 0xFFFFFFFF, max_packet_size, charset, b"", ext)


@dataclass(slots=True)
class SSLRequest:
    """The 32-byte short handshake response asking for TLS; the full response follows inside TLS."""

    capabilities: int
    max_packet_size: int = MAX_PACKET
    charset: int = UTF8MB4_GENERAL_CI

    def build(self) -> bytes:
        return _client_prefix(self.capabilities | CLIENT_SSL, self.max_packet_size, self.charset)

    @classmethod
    def parse(cls, payload: Buffer) -> SSLRequest:
        if not is_ssl_request(payload):
            raise ProtocolViolation("not an SSLRequest", ER_HANDSHAKE_ERROR)
        caps, max_packet, charset, _, ext = struct.unpack("<IIB19sI", payload)
        if not caps & CLIENT_MYSQL:
            caps |= ext << 32
        return cls(caps, max_packet, charset)


def is_ssl_request(payload: Buffer) -> bool:
    """The client's 32-byte SSLRequest (a handshake response cut short, CLIENT_SSL set)."""
    if len(payload) != 32:
        return False
    caps = int.from_bytes(payload[:4], "little")
    return bool(caps & CLIENT_SSL) and bool(caps & CLIENT_PROTOCOL_41)


@dataclass(slots=True)
class HandshakeResponse41:
    """The client's login packet. capabilities bits 32..63 are MariaDB extended capabilities."""

    capabilities: int
    username: str
    auth_response: bytes = b""
    database: str | None = None  # sent when CLIENT_CONNECT_WITH_DB
    auth_plugin_name: str | None = None  # sent when CLIENT_PLUGIN_AUTH
    connect_attrs: dict[str, str] | None = None  # sent when CLIENT_CONNECT_ATTRS
    max_packet_size: int = MAX_PACKET
    charset: int = UTF8MB4_GENERAL_CI
    zstd_level: int | None = None  # sent when CLIENT_ZSTD_COMPRESSION_ALGORITHM

    def build(self) -> bytes:
        caps = self.capabilities
        if not caps & CLIENT_PROTOCOL_41:
            raise ValueError("HandshakeResponse41 needs CLIENT_PROTOCOL_41")
        out = bytearray(_client_prefix(caps, self.max_packet_size, self.charset))
        out += _cstr(self.username)
        auth = self.auth_response
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            out += write_lenenc_str(auth)
        elif caps & CLIENT_SECURE_CONNECTION:
            if len(auth) > 255:
                raise ValueError("auth response longer than 255 bytes needs CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA")
            out.append(len(auth))
            out += auth
        else:
            if b"\x00" in auth:
                raise ValueError("NUL in a NUL-terminated auth response")
            out += auth + b"\x00"
        if caps & CLIENT_CONNECT_WITH_DB:
            out += _cstr(self.database or "")
        elif self.database is not None:
            raise ValueError("database given without CLIENT_CONNECT_WITH_DB")
        if caps & CLIENT_PLUGIN_AUTH:
            out += _cstr(self.auth_plugin_name or "")
        elif self.auth_plugin_name is not None:
            raise ValueError("auth_plugin_name given without CLIENT_PLUGIN_AUTH")
        if caps & CLIENT_CONNECT_ATTRS:
            attrs = self.connect_attrs or {}
            block = b"".join(
                write_lenenc_str(_bytes(key)) + write_lenenc_str(_bytes(value)) for key, value in attrs.items()
            )
            out += write_lenenc_str(block)
        elif self.connect_attrs is not None:
            raise ValueError("connect_attrs given without CLIENT_CONNECT_ATTRS")
        if caps & CLIENT_ZSTD_COMPRESSION_ALGORITHM and self.zstd_level is not None:
            out.append(self.zstd_level)
        return bytes(out)

    @classmethod
    def parse(cls, payload: Buffer) -> HandshakeResponse41:
        r = _Cursor(payload, "handshake response", ER_HANDSHAKE_ERROR)
        caps = r.u32("capability flags")
        if not caps & CLIENT_PROTOCOL_41:
            raise r.fail("pre-4.1 clients (no CLIENT_PROTOCOL_41) are not supported")
        max_packet = r.u32("max packet size")
        charset = r.u8("character set")
        filler = r.fixed(23, "filler")
        if not caps & CLIENT_MYSQL:
            caps |= int.from_bytes(filler[19:23], "little") << 32
        if r.at_end:
            raise r.fail("no username (an SSLRequest where the full response was expected?)")
        username = _text(r.null_str("username"))
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            auth = r.lenenc_str("auth response")
        elif caps & CLIENT_SECURE_CONNECTION:
            auth = r.fixed(r.u8("auth response length"), "auth response")
        else:
            auth = r.null_str("auth response", allow_eof=True)
        database = plugin = None
        attrs = zstd_level = None
        if caps & CLIENT_CONNECT_WITH_DB and not r.at_end:
            database = _text(r.null_str("database", allow_eof=True))
        if caps & CLIENT_PLUGIN_AUTH and not r.at_end:
            plugin = _text(r.null_str("auth plugin name", allow_eof=True))
        if caps & CLIENT_CONNECT_ATTRS and not r.at_end:
            attrs = _parse_attrs(r.lenenc_str("connection attributes"))
        if caps & CLIENT_ZSTD_COMPRESSION_ALGORITHM and not r.at_end:
            zstd_level = r.u8("zstd compression level")
        return cls(caps, username, auth, database, plugin, attrs, max_packet, charset, zstd_level)


def _parse_attrs(block: bytes) -> dict[str, str]:
    attrs: dict[str, str] = {}
    pos = 0
    try:
        while pos < len(block):
            key, pos = read_lenenc_str(block, pos)
            value, pos = read_lenenc_str(block, pos)
            attrs[_text(key)] = _text(value)
    except ProtocolViolation as exc:
        raise ProtocolViolation(f"malformed connection attributes: {exc}", ER_HANDSHAKE_ERROR) from None
    return attrs


def parse_handshake_response(payload: Buffer) -> HandshakeResponse41 | SSLRequest:
    """The client's first packet: an SSLRequest (TLS wanted) or a full HandshakeResponse41."""
    if is_ssl_request(payload):
        return SSLRequest.parse(payload)
    return HandshakeResponse41.parse(payload)


@dataclass(slots=True)
class AuthSwitchRequest:
    """Server -> client: restart authentication with another plugin and nonce (0xFE header)."""

    plugin_name: str
    plugin_data: bytes = b""  # raw; MySQL appends a NUL to a 20-byte scramble (see for_scramble)

    @classmethod
    def for_scramble(cls, plugin_name: str, scramble: bytes) -> AuthSwitchRequest:
        """The form mysqld sends for native/caching_sha2: the scramble plus a trailing NUL."""
        return cls(plugin_name, scramble + b"\x00")

    @property
    def scramble(self) -> bytes:
        """plugin_data without its trailing NUL."""
        data = self.plugin_data
        return data[:-1] if data.endswith(b"\x00") else data

    def build(self) -> bytes:
        return bytes((AUTH_SWITCH_HEADER,)) + _cstr(self.plugin_name) + self.plugin_data

    @classmethod
    def parse(cls, payload: Buffer) -> AuthSwitchRequest:
        r = _Cursor(payload, "auth switch request", ER_HANDSHAKE_ERROR)
        if r.u8("header") != AUTH_SWITCH_HEADER:
            raise r.fail("header is not 0xFE")
        if r.at_end:  # the pre-4.1 "use old password" request
            return cls(MYSQL_OLD_PASSWORD, b"")
        plugin = _text(r.null_str("plugin name", allow_eof=True))
        return cls(plugin, r.rest())


@dataclass(slots=True)
class ChangeUser:
    """COM_CHANGE_USER: log in again as another user on the same connection (client -> server)."""

    username: str
    auth_response: bytes = b""
    database: str = ""
    charset: int | None = None
    auth_plugin_name: str | None = None
    connect_attrs: dict[str, str] | None = None

    def build(self, capabilities: int) -> bytes:
        out = bytearray((COM_CHANGE_USER,))
        out += _cstr(self.username)
        if capabilities & CLIENT_SECURE_CONNECTION:
            out.append(len(self.auth_response))
            out += self.auth_response
        else:
            out += self.auth_response + b"\x00"
        out += _cstr(self.database)
        if self.charset is not None:
            out += _U16.pack(self.charset)
            if capabilities & CLIENT_PLUGIN_AUTH:
                out += _cstr(self.auth_plugin_name or "")
            if capabilities & CLIENT_CONNECT_ATTRS and self.connect_attrs is not None:
                block = b"".join(write_lenenc_str(_bytes(k)) + write_lenenc_str(_bytes(v))
                                 for k, v in self.connect_attrs.items())
                out += write_lenenc_str(block)
        return bytes(out)

    @classmethod
    def parse(cls, payload: Buffer, capabilities: int) -> ChangeUser:
        r = _Cursor(payload, "COM_CHANGE_USER")
        if r.u8("command") != COM_CHANGE_USER:
            raise r.fail("not COM_CHANGE_USER")
        username = _text(r.null_str("username"))
        if capabilities & CLIENT_SECURE_CONNECTION:
            auth = r.fixed(r.u8("auth response length"), "auth response")
        else:
            auth = r.null_str("auth response")
        database = _text(r.null_str("database", allow_eof=True))
        charset = plugin = attrs = None
        if not r.at_end:
            charset = r.u16("character set")
        if capabilities & CLIENT_PLUGIN_AUTH and not r.at_end:
            plugin = _text(r.null_str("auth plugin name", allow_eof=True))
        if capabilities & CLIENT_CONNECT_ATTRS and not r.at_end:
            attrs = _parse_attrs(r.lenenc_str("connection attributes"))
        return cls(username, auth, database, charset, plugin, attrs)


def build_auth_more_data(data: Buffer) -> bytes:
    """Server -> client extra auth data (0x01 header): e.g. caching_sha2 fast-auth result, a PEM key."""
    return bytes((AUTH_MORE_DATA_HEADER,)) + data


def parse_auth_more_data(payload: Buffer) -> bytes:
    if not len(payload) or payload[0] != AUTH_MORE_DATA_HEADER:
        raise ProtocolViolation("not an AuthMoreData packet", ER_HANDSHAKE_ERROR)
    return bytes(payload[1:])


# --- generic responses ---


@dataclass(slots=True)
class OkPacket:
    affected_rows: int = 0
    last_insert_id: int = 0
    status_flags: int = SERVER_STATUS_AUTOCOMMIT
    warnings: int = 0
    info: str = ""
    session_state_info: bytes | None = None  # raw; only with SERVER_SESSION_STATE_CHANGED + CLIENT_SESSION_TRACK
    header: int = OK_HEADER  # 0xFE for the EOF replacement under CLIENT_DEPRECATE_EOF

    def build(self, capabilities: int = CLIENT_PROTOCOL_41) -> bytes:
        if self.header not in (OK_HEADER, EOF_HEADER):
            raise ValueError("OK header must be 0x00 or 0xFE")
        out = bytearray((self.header,))
        out += write_lenenc_int(self.affected_rows)
        out += write_lenenc_int(self.last_insert_id)
        if capabilities & CLIENT_PROTOCOL_41:
            out += struct.pack("<HH", self.status_flags, self.warnings)
        elif capabilities & CLIENT_TRANSACTIONS:
            out += _U16.pack(self.status_flags)
        info = _bytes(self.info)
        state_changed = bool(self.status_flags & SERVER_SESSION_STATE_CHANGED)
        if self.session_state_info is not None and not (state_changed and capabilities & CLIENT_SESSION_TRACK):
            raise ValueError("session_state_info needs SERVER_SESSION_STATE_CHANGED and CLIENT_SESSION_TRACK")
        if capabilities & CLIENT_SESSION_TRACK:
            if info or state_changed:
                out += write_lenenc_str(info)
            if state_changed:
                out += write_lenenc_str(self.session_state_info or b"")
        else:
            out += info
        return bytes(out)

    @classmethod
    def parse(cls, payload: Buffer, capabilities: int = CLIENT_PROTOCOL_41) -> OkPacket:
        r = _Cursor(payload, "OK packet")
        header = r.u8("header")
        if header not in (OK_HEADER, EOF_HEADER):
            raise r.fail(f"header 0x{header:02x}")
        affected = r.lenenc_int("affected rows")
        last_id = r.lenenc_int("last insert id")
        status = warnings = 0
        if capabilities & CLIENT_PROTOCOL_41:
            status = r.u16("status flags")
            warnings = r.u16("warnings")
        elif capabilities & CLIENT_TRANSACTIONS:
            status = r.u16("status flags")
        info = b""
        state_info = None
        if capabilities & CLIENT_SESSION_TRACK:
            if not r.at_end:
                info = r.lenenc_str("info")
            if status & SERVER_SESSION_STATE_CHANGED:
                state_info = r.lenenc_str("session state info") if not r.at_end else b""
        else:
            info = r.rest()
        return cls(affected, last_id, status, warnings, _text(info), state_info, header)


def parse_session_state(data: Buffer) -> list[tuple[int, bytes]]:
    """Split OkPacket.session_state_info into (SESSION_TRACK_* type, entry payload) pairs.

    Entry payloads: SYSTEM_VARIABLES = lenenc name + lenenc value; SCHEMA, STATE_CHANGE,
    TRANSACTION_CHARACTERISTICS, TRANSACTION_STATE = one lenenc string; GTIDS = 1 spec byte + lenenc string.
    """
    entries: list[tuple[int, bytes]] = []
    pos = 0
    end = len(data)
    while pos < end:
        kind = data[pos]
        payload, pos = read_lenenc_str(data, pos + 1)
        entries.append((kind, payload))
    return entries


@dataclass(slots=True)
class ErrPacket:
    error_code: int
    message: str = ""
    sql_state: str | None = None  # build: defaults from the errno; parse: None when the '#' marker is absent

    @property
    def is_progress(self) -> bool:
        """A MariaDB progress report (errno 0xFFFF), not an error."""
        return self.error_code == MARIADB_PROGRESS_ERRNO

    def build(self, capabilities: int = CLIENT_PROTOCOL_41) -> bytes:
        """capabilities=0 gives the pre-4.1 form (no SQLSTATE) a server uses before the handshake."""
        out = bytearray((ERR_HEADER,))
        out += _U16.pack(self.error_code)
        if capabilities & CLIENT_PROTOCOL_41:
            state = (self.sql_state or sqlstate_for(self.error_code)).encode("latin-1")
            if len(state) != 5:
                raise ValueError("SQLSTATE must be 5 characters")
            out += b"#" + state
        out += _bytes(self.message)
        return bytes(out)

    @classmethod
    def parse(cls, payload: Buffer) -> ErrPacket:
        r = _Cursor(payload, "ERR packet")
        if r.u8("header") != ERR_HEADER:
            raise r.fail("header is not 0xFF")
        code = r.u16("error code")
        state = None
        if r.end - r.pos >= 6 and r.buf[r.pos] == 0x23:  # '#'
            state = r.buf[r.pos + 1 : r.pos + 6].decode("latin-1")
            r.pos += 6
        return cls(code, _text(r.rest()), state)


@dataclass(slots=True)
class EofPacket:
    warnings: int = 0
    status_flags: int = SERVER_STATUS_AUTOCOMMIT

    def build(self) -> bytes:
        return struct.pack("<BHH", EOF_HEADER, self.warnings, self.status_flags)

    @classmethod
    def parse(cls, payload: Buffer) -> EofPacket:
        if not is_eof(payload):
            raise ProtocolViolation("not an EOF packet")
        if len(payload) < 5:  # pre-4.1: the bare 0xFE
            return cls(0, 0)
        warnings, status = struct.unpack_from("<HH", payload, 1)
        return cls(warnings, status)


@dataclass(slots=True)
class PrepareOk:
    """COM_STMT_PREPARE_OK: the first packet of a successful COM_STMT_PREPARE response."""

    statement_id: int
    num_columns: int
    num_params: int
    warnings: int = 0

    def build(self) -> bytes:
        return struct.pack("<BIHHBH", OK_HEADER, self.statement_id, self.num_columns, self.num_params, 0, self.warnings)

    @classmethod
    def parse(cls, payload: Buffer) -> PrepareOk:
        if len(payload) < 9 or payload[0] != OK_HEADER:
            raise ProtocolViolation("malformed COM_STMT_PREPARE_OK")
        stmt_id, columns, params = struct.unpack_from("<IHH", payload, 1)
        warnings = _U16.unpack_from(payload, 10)[0] if len(payload) >= 12 else 0
        return cls(stmt_id, columns, params, warnings)


# --- response tracking ---

_DONE: Final = 0
_RESULT: Final = 1  # first packet of a (next) result: OK, ERR, LOCAL INFILE request or column count
_COLUMNS: Final = 2
_COLUMNS_EOF: Final = 3
_ROWS: Final = 4
_PREPARE: Final = 5
_PARAMS: Final = 6
_PARAMS_EOF: Final = 7
_PREP_COLUMNS: Final = 8
_PREP_COLUMNS_EOF: Final = 9
_STATUS: Final = 10  # a single OK, EOF (or OK-0xFE) or ERR
_STRING: Final = 11  # COM_STATISTICS: one text packet

_RESULT_COMMANDS: Final = frozenset({COM_QUERY, COM_STMT_EXECUTE, COM_PROCESS_INFO, COM_STMT_BULK_EXECUTE})
_BINARY_COMMANDS: Final = frozenset({COM_STMT_EXECUTE, COM_STMT_BULK_EXECUTE})
_NO_RESPONSE_COMMANDS: Final = frozenset({COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA, COM_QUIT})
UNTRACKABLE_COMMANDS: Final = frozenset(
    {COM_CHANGE_USER, COM_BINLOG_DUMP, COM_BINLOG_DUMP_GTID, COM_TABLE_DUMP, COM_REGISTER_SLAVE, COM_CLONE, COM_MULTI}
)


class ResponseOutcome:
    """What the server's response to one command said (filled in by ResponseTracker): status flags, the fields
    of its OK, EOF or ERR, its result sets, and the session state changes it reported."""

    __slots__ = (
        "affected_rows",
        "edits",
        "error",
        "error_packet",
        "expects_local_infile",
        "last_insert_id",
        "last_seq",
        "prepare_ok",
        "prepare_ok_at",
        "result_sets",
        "row_sets",
        "rows",
        "seen_status",
        "session_state",
        "session_track",
        "status_flags",
        "strip_session_state",
        "warnings",
    )
    status_flags: int
    session_track: bool  # CLIENT_SESSION_TRACK is on: OK packets' session state changes are collected
    strip_session_state: bool  # ... and where those OK packets are is noted in edits (see ResponseTracker)
    edits: list[tuple[int, int]]

    def _reset_results(self) -> None:
        self.error: int | None = None
        self.error_packet: bytes | None = None
        self.expects_local_infile = False
        self.prepare_ok: PrepareOk | None = None
        self.prepare_ok_at = -1  # payload offset of the COM_STMT_PREPARE_OK in the buffer scan() read it from
        self.session_state: list[bytes] | None = None  # raw session state info of each OK packet, when tracked
        self.result_sets = 0
        self.row_sets = 0  # result sets with columns (rows), not OK packets
        self.rows = 0
        self.seen_status = 0
        self.affected_rows = 0
        self.last_insert_id = 0
        self.warnings = 0
        self.last_seq = -1

    @property
    def in_transaction(self) -> bool:
        return bool(self.status_flags & SERVER_STATUS_IN_TRANS)

    @property
    def more_results(self) -> bool:
        return bool(self.status_flags & SERVER_MORE_RESULTS_EXISTS)

    @property
    def cursor_open(self) -> bool:
        return bool(self.status_flags & SERVER_STATUS_CURSOR_EXISTS)

    def _eof(self, buf: Buffer, off: int, length: int) -> None:
        if length >= 5:
            self.warnings = buf[off + 1] | (buf[off + 2] << 8)
            status = buf[off + 3] | (buf[off + 4] << 8)
            self.status_flags = status
            self.seen_status |= status

    def _ok(self, buf: Buffer, off: int, length: int) -> None:
        end = off + length
        self.affected_rows, p = _lenenc_at(buf, off + 1, end)
        self.last_insert_id, p = _lenenc_at(buf, p, end)
        if p + 2 > end:
            raise ProtocolViolation("OK packet without status flags")
        status = buf[p] | (buf[p + 1] << 8)
        self.warnings = buf[p + 2] | (buf[p + 3] << 8) if p + 4 <= end else 0
        self.status_flags = status
        self.seen_status |= status
        if status & SERVER_SESSION_STATE_CHANGED and self.session_track:
            self._state_changes(buf, off, length, p + 4)

    def _state_changes(self, buf: Buffer, off: int, length: int, p: int) -> None:
        """An OK packet with session state info (CLIENT_SESSION_TRACK): keep the info; note the packet."""
        end = off + length
        if p < end:
            size, p = _lenenc_at(buf, p, end)  # the human-readable info
            p += size
            if p < end:
                size, p = _lenenc_at(buf, p, end)
                if p + size > end:
                    raise ProtocolViolation("truncated session state info")
                if self.session_state is None:
                    self.session_state = []
                self.session_state.append(bytes(buf[p : p + size]))
        if self.strip_session_state:
            self.edits.append((off, length))


class ResponseTracker(ResponseOutcome):
    """Follows the server's response to one command and says when it is complete (sans-IO).

    One tracker per backend connection; call start() (or start_command()) for each command, then either
    feed() each logical response packet, or scan() raw bytes from the server (frames, continuation-aware,
    no copying). It looks at each packet's first byte and length only, except OK/EOF/ERR.

    After completion: status_flags is the last status the server reported (an ERR carries none, so it
    then keeps the previous value minus SERVER_MORE_RESULTS_EXISTS), error is the errno of a final ERR.
    After a LOCAL INFILE request expects_local_infile is True: the client now sends file content and an
    empty packet (scan_infile/feed_infile follow that), then the server answers as for a new result.
    """

    __slots__ = (
        "_binary",
        "_cache_metadata",
        "_cont",
        "_deprecate_eof",
        "_expected_seq",
        "_infile_cont",
        "_multi",
        "_optional_metadata",
        "_prep_columns",
        "_remaining",
        "_state",
        "_term_limit",
        "command",
        "done",
        "skip",
    )

    def __init__(self, status_flags: int = SERVER_STATUS_AUTOCOMMIT) -> None:
        self.status_flags = status_flags
        self.command = -1
        self._state = _DONE
        self.done = True
        self._deprecate_eof = False
        self._term_limit = 9
        self._optional_metadata = False
        self._cache_metadata = False
        self._binary = False
        self._multi = False
        self._remaining = 0
        self._prep_columns = 0
        self._cont = False
        self._infile_cont = False
        self._expected_seq: int | None = None
        self.skip = 0  # bytes of a streamed frame still to come (scan with stream=True)
        # CLIENT_SESSION_TRACK is on: collect the session state changes OK packets report (session_state)
        self.session_track = False
        # and note where OK packets carrying them are (edits: (payload offset, length) in the scanned buffer;
        # the reader clears the list) so they can be rewritten for a client that did not ask for them
        self.strip_session_state = False
        self.edits: list[tuple[int, int]] = []
        self._reset_results()

    # --- starting a command ---

    def start(
        self,
        command: int,
        deprecate_eof: bool,
        *,
        status_flags: int | None = None,
        optional_metadata: bool = False,
        cache_metadata: bool = False,
        seq: int | None = None,
    ) -> bool:
        """Expect the response to `command`; returns True if it has none (already done).

        deprecate_eof: CLIENT_DEPRECATE_EOF was negotiated. optional_metadata: MySQL's
        CLIENT_OPTIONAL_RESULTSET_METADATA (a metadata-follows byte after column counts and in
        COM_STMT_PREPARE_OK). cache_metadata: MariaDB's MARIADB_CLIENT_CACHE_METADATA for this
        COM_STMT_EXECUTE. seq: the sequence id the first response frame must carry (checked by
        scan/scan_infile; None disables the check). Raises ValueError for commands that are not a
        request/response exchange (COM_CHANGE_USER, replication).
        """
        if command in UNTRACKABLE_COMMANDS:
            raise ValueError(f"command 0x{command:02x} is not a plain request/response exchange")
        self.command = command
        if status_flags is not None:
            self.status_flags = status_flags
        self._reset_results()
        self._deprecate_eof = deprecate_eof
        self._term_limit = MAX_PACKET if deprecate_eof else 9
        self._optional_metadata = optional_metadata
        self._cache_metadata = cache_metadata
        self._binary = command in _BINARY_COMMANDS
        self._multi = command in _RESULT_COMMANDS
        self._cont = False
        self._infile_cont = False
        self._expected_seq = None if seq is None else seq & 0xFF
        self.skip = 0
        self.done = False
        if command in _RESULT_COMMANDS:
            self._state = _RESULT
        elif command == COM_STMT_PREPARE:
            self._state = _PREPARE
        elif command in (COM_STMT_FETCH, COM_FIELD_LIST):
            self._state = _ROWS  # rows / column definitions up to an EOF (or OK-0xFE)
        elif command == COM_STATISTICS:
            self._state = _STRING
        elif command in _NO_RESPONSE_COMMANDS:
            return self._finish()
        else:  # PING, INIT_DB, RESET_CONNECTION, SET_OPTION (EOF!), STMT_RESET, REFRESH, KILL, unknown...
            self._state = _STATUS
        return False

    def start_command(self, payload: Buffer, capabilities: int, *, status_flags: int | None = None) -> bool:
        """start() from the client's command packet and the capabilities in effect (client & server)."""
        if not len(payload):
            raise ProtocolViolation("empty command packet")
        command = payload[0]
        optional = bool(capabilities & CLIENT_OPTIONAL_RESULTSET_METADATA) and command in (
            COM_QUERY,
            COM_STMT_EXECUTE,
            COM_STMT_PREPARE,
        )
        cache = bool(capabilities & MARIADB_CLIENT_CACHE_METADATA) and command in _BINARY_COMMANDS
        return self.start(
            command,
            bool(capabilities & CLIENT_DEPRECATE_EOF),
            status_flags=status_flags,
            optional_metadata=optional,
            cache_metadata=cache,
            seq=frames_needed(len(payload)),
        )

    # --- derived state ---

    # --- input ---

    def feed(self, payload: Buffer) -> bool:
        """One complete (reassembled) response packet; returns True once the response is complete."""
        return self._packet(payload, 0, len(payload))

    def scan(self, buf: Buffer, pos: int = 0, end: int | None = None, *, stream: bool = False) -> int:
        """Walk raw server frames in buf[pos:end]; returns the offset after the last frame consumed.

        Stops at an incomplete frame, right after the frame that completes the response, and right
        after a LOCAL INFILE request; bytes up to the returned offset can be forwarded as they are.

        With stream=True an incomplete data row or continuation frame (known from its header and first
        byte, whatever its length) counts as consumed: the offset returned is `end`, and `skip` holds the
        bytes of that frame still to come, which the next scan() passes over before reading a header.
        So rows of any size are forwarded as they arrive instead of being buffered whole.
        """
        end = len(buf) if end is None else end
        skip = self.skip
        if skip:
            if end - pos <= skip:
                self.skip = skip - (end - pos)
                return end
            pos += skip
            self.skip = 0
        cont = self._cont
        expected = self._expected_seq
        term = self._term_limit
        last_seq = self.last_seq
        state = self._state
        rows = 0
        try:
            while end - pos >= 4:
                if state == _DONE and not cont:
                    break
                length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
                stop = pos + 4 + length
                if stop > end:
                    if stream and end - pos > 4 and (
                        cont
                        or (state == _ROWS and ((first := buf[pos + 4]) < EOF_HEADER
                                                or (first == EOF_HEADER and length >= term)))
                    ):
                        last_seq = buf[pos + 3]
                        if expected is not None:
                            if last_seq != expected:
                                raise ProtocolViolation(
                                    f"response sequence id {last_seq}, expected {expected}",
                                    ER_NET_PACKETS_OUT_OF_ORDER,
                                )
                            expected = (last_seq + 1) & 0xFF
                        if not cont:
                            rows += 1
                        cont = length == MAX_PACKET
                        self.skip = stop - end
                        pos = end
                    break
                last_seq = buf[pos + 3]
                if expected is not None:
                    if last_seq != expected:
                        raise ProtocolViolation(
                            f"response sequence id {last_seq}, expected {expected}", ER_NET_PACKETS_OUT_OF_ORDER
                        )
                    expected = (last_seq + 1) & 0xFF
                if cont or (
                    state == _ROWS
                    and length
                    and ((first := buf[pos + 4]) < EOF_HEADER or (first == EOF_HEADER and length >= term))
                ):
                    # a continuation frame, or the hot path: a data row (not ERR, not the 0xFE terminator)
                    if not cont:
                        rows += 1
                    cont = length == MAX_PACKET
                    pos = stop
                    continue
                self._packet(buf, pos + 4, length)
                state = self._state
                cont = length == MAX_PACKET
                pos = stop
                if self.expects_local_infile and not cont:
                    break
        finally:
            self.rows += rows
            self._cont = cont
            self._expected_seq = expected
            self.last_seq = last_seq
        return pos

    def scan_infile(self, buf: Buffer, pos: int = 0, end: int | None = None) -> int:
        """Walk the client's LOCAL INFILE frames; returns the offset after the frames consumed.

        The upload ends with an empty packet (an empty frame that does not terminate a 0xFFFFFF
        frame); after it expects_local_infile is False and the server's answer goes to scan()/feed().
        """
        if end is None:
            end = len(buf)
        cont = self._infile_cont
        expected = self._expected_seq
        while self.expects_local_infile and end - pos >= 4:
            length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16)
            stop = pos + 4 + length
            if stop > end:
                break
            seq = buf[pos + 3]
            if expected is not None:
                if seq != expected:
                    raise ProtocolViolation(
                        f"LOCAL INFILE sequence id {seq}, expected {expected}", ER_NET_PACKETS_OUT_OF_ORDER
                    )
                expected = (seq + 1) & 0xFF
            pos = stop
            if length == 0 and not cont:
                self.expects_local_infile = False
            cont = length == MAX_PACKET
        self._infile_cont = cont
        self._expected_seq = expected
        return pos

    def feed_infile(self, payload: Buffer) -> bool:
        """One reassembled client LOCAL INFILE packet; returns True for the empty end-of-file packet."""
        if not self.expects_local_infile:
            raise ProtocolViolation("LOCAL INFILE data without a request")
        if len(payload) == 0:
            self.expects_local_infile = False
            return True
        return False

    # --- the state machine ---

    def _finish(self) -> bool:
        self._state = _DONE
        self.done = True
        return True

    def _packet(self, buf: Buffer, off: int, length: int) -> bool:
        state = self._state
        if state == _DONE:
            raise ProtocolViolation("response packet after the response was complete")
        if length == 0:
            if state == _STRING:
                return self._finish()
            raise ProtocolViolation("empty packet in a response")
        first = buf[off]
        if first == ERR_HEADER:
            errno = buf[off + 1] | (buf[off + 2] << 8) if length >= 3 else 0
            if errno == MARIADB_PROGRESS_ERRNO:
                return False
            self.error = errno
            self.error_packet = bytes(buf[off : off + length])
            self.status_flags &= ~SERVER_MORE_RESULTS_EXISTS
            self.expects_local_infile = False
            return self._finish()
        if state == _ROWS:
            if first == EOF_HEADER and length < self._term_limit:
                self._terminator(buf, off, length)
                if self._multi and self.status_flags & SERVER_MORE_RESULTS_EXISTS:
                    self._state = _RESULT
                    return False
                return self._finish()
            self.rows += 1
            return False
        if state == _COLUMNS:
            self._remaining -= 1
            if self._remaining <= 0:
                self._state = _ROWS if self._deprecate_eof else _COLUMNS_EOF
            return False
        if state == _RESULT:
            self.expects_local_infile = False
            if first == OK_HEADER:
                self._ok(buf, off, length)
                self.result_sets += 1
                if self.status_flags & SERVER_MORE_RESULTS_EXISTS:
                    return False
                return self._finish()
            if first == LOCAL_INFILE_HEADER:
                self.expects_local_infile = True
                self._infile_cont = False
                return False
            if first == EOF_HEADER:
                raise ProtocolViolation("0xFE packet where a result set header was expected")
            end = off + length
            count, p = _lenenc_at(buf, off, end)
            self.result_sets += 1
            self.row_sets += 1
            metadata = True
            if (self._optional_metadata or self._cache_metadata) and p < end:
                metadata = buf[p] != 0
            if metadata:
                self._remaining = count
                self._state = _COLUMNS
            elif self._cache_metadata and not self._deprecate_eof:
                self._state = _COLUMNS_EOF  # MariaDB still sends the EOF when it skips the metadata
            else:
                self._state = _ROWS
            return False
        if state == _COLUMNS_EOF:
            self._expect_eof(buf, off, length, "column definitions")
            if self._binary and self.status_flags & SERVER_STATUS_CURSOR_EXISTS:
                return self._finish()  # a cursor was opened: rows come via COM_STMT_FETCH
            self._state = _ROWS
            return False
        if state == _STATUS:
            if first == OK_HEADER:
                self._ok(buf, off, length)
            elif first == EOF_HEADER and length < self._term_limit:
                self._terminator(buf, off, length)
            else:
                raise ProtocolViolation(f"unexpected 0x{first:02x} packet where OK/ERR was expected")
            return self._finish()
        if state == _STRING:
            return self._finish()
        if state == _PREPARE:
            if first != OK_HEADER or length < 9:
                raise ProtocolViolation("malformed COM_STMT_PREPARE response")
            stmt_id = int.from_bytes(buf[off + 1 : off + 5], "little")
            columns = buf[off + 5] | (buf[off + 6] << 8)
            params = buf[off + 7] | (buf[off + 8] << 8)
            warnings = buf[off + 10] | (buf[off + 11] << 8) if length >= 12 else 0
            self.warnings = warnings
            self.prepare_ok = PrepareOk(stmt_id, columns, params, warnings)
            self.prepare_ok_at = off
            metadata = not (self._optional_metadata and length >= 13 and buf[off + 12] == 0)
            self._prep_columns = columns if metadata else 0
            if params and metadata:
                self._remaining = params
                self._state = _PARAMS
                return False
            return self._prepare_columns()
        if state == _PARAMS:
            self._remaining -= 1
            if self._remaining <= 0:
                if not self._deprecate_eof:
                    self._state = _PARAMS_EOF
                    return False
                return self._prepare_columns()
            return False
        if state == _PARAMS_EOF:
            self._expect_eof(buf, off, length, "parameter definitions")
            return self._prepare_columns()
        if state == _PREP_COLUMNS:
            self._remaining -= 1
            if self._remaining <= 0:
                if not self._deprecate_eof:
                    self._state = _PREP_COLUMNS_EOF
                    return False
                return self._finish()
            return False
        if state == _PREP_COLUMNS_EOF:
            self._expect_eof(buf, off, length, "column definitions")
            return self._finish()
        raise AssertionError(f"unknown tracker state {state}")  # pragma: no cover

    def _prepare_columns(self) -> bool:
        if self._prep_columns:
            self._remaining = self._prep_columns
            self._state = _PREP_COLUMNS
            return False
        return self._finish()

    def _expect_eof(self, buf: Buffer, off: int, length: int, after: str) -> None:
        if buf[off] != EOF_HEADER or length >= 9:
            raise ProtocolViolation(f"expected EOF after {after}, got 0x{buf[off]:02x} ({length} bytes)")
        self._eof(buf, off, length)

    def _terminator(self, buf: Buffer, off: int, length: int) -> None:
        if self._deprecate_eof:
            self._ok(buf, off, length)
        else:
            self._eof(buf, off, length)


def strip_session_state(payload: Buffer) -> bytes:
    """An OK packet with CLIENT_SESSION_TRACK content, as a server sends it to a client without that capability.

    The session state info goes, SERVER_SESSION_STATE_CHANGED is cleared; the info text stays (length-encoded,
    as servers send it either way) when there is one.
    """
    end = len(payload)
    _, p = _lenenc_at(payload, 1, end)
    _, p = _lenenc_at(payload, p, end)
    if p + 4 > end:
        raise ProtocolViolation("OK packet without status flags and warnings")
    status = (payload[p] | (payload[p + 1] << 8)) & ~SERVER_SESSION_STATE_CHANGED
    out = bytearray(payload[:p])
    out += _U16.pack(status)
    out += payload[p + 2 : p + 4]
    p += 4
    if p < end:
        size, q = _lenenc_at(payload, p, end)
        if size:
            out += payload[p : q + size]
    return bytes(out)


def _lenenc_at(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """read_lenenc_int bounded by end instead of len(buf)."""
    if pos >= end:
        raise ProtocolViolation("truncated length-encoded integer")
    first = buf[pos]
    if first < 0xFB:
        return first, pos + 1
    if first == 0xFC:
        size = 2
    elif first == 0xFD:
        size = 3
    elif first == 0xFE:
        size = 8
    else:
        raise ProtocolViolation(f"invalid length-encoded integer prefix 0x{first:02x}")
    stop = pos + 1 + size
    if stop > end:
        raise ProtocolViolation("truncated length-encoded integer")
    return int.from_bytes(buf[pos + 1 : stop], "little"), stop
