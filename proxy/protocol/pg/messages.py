"""PostgreSQL v3 messages: constants, builders (exact bytes) and parsers for the ones the proxy reads."""

from __future__ import annotations

import struct

from proxy.errors import ProtocolViolation

PROTOCOL_V3 = 196608  # 3.0
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

HEADER = struct.Struct("!cI")
INT32 = struct.Struct("!I")
INT32_PAIR = struct.Struct("!II")

# Authentication request codes (the Int32 after 'R').
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# Transaction status in ReadyForQuery.
IDLE = ord("I")
IN_TRANSACTION = ord("T")
FAILED_TRANSACTION = ord("E")

READY_FOR_QUERY_IDLE = b"Z\x00\x00\x00\x05I"

# Settings a server reports (ParameterStatus) that a client cannot change.
READ_ONLY_PARAMETERS = frozenset(
    {"server_version", "server_encoding", "integer_datetimes", "is_superuser", "session_authorization",
     "in_hot_standby", "scram_iterations"}
)


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + INT32.pack(len(body) + 4) + body


def cstring(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return data + b"\x00"


# --- messages the proxy sends to clients ---

def authentication(code: int, payload: bytes = b"") -> bytes:
    return message(b"R", INT32.pack(code) + payload)


AUTHENTICATION_OK = authentication(AUTH_OK)


def authentication_sasl(mechanisms: list[str]) -> bytes:
    return authentication(AUTH_SASL, b"".join(cstring(m) for m in mechanisms) + b"\x00")


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstring(name) + cstring(value))


def backend_key_data(process_id: int, secret_key: int) -> bytes:
    return message(b"K", INT32_PAIR.pack(process_id, secret_key))


def ready_for_query(status: int = IDLE) -> bytes:
    return message(b"Z", bytes((status,)))


def error_response(sqlstate: str, text: str, severity: str = "ERROR", detail: str | None = None) -> bytes:
    fields = b"S" + cstring(severity) + b"V" + cstring(severity) + b"C" + cstring(sqlstate) + b"M" + cstring(text)
    if detail:
        fields += b"D" + cstring(detail)
    return message(b"E", fields + b"\x00")


def notice_response(sqlstate: str, text: str, severity: str = "NOTICE") -> bytes:
    return b"N" + error_response(sqlstate, text, severity)[1:]


# --- messages the proxy sends to backends ---

def startup_message(params: dict[str, str]) -> bytes:
    body = INT32.pack(PROTOCOL_V3) + b"".join(cstring(k) + cstring(v) for k, v in params.items()) + b"\x00"
    return INT32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return INT32_PAIR.pack(8, SSL_REQUEST_CODE)


def cancel_request(process_id: int, secret_key: int) -> bytes:
    return INT32.pack(16) + INT32.pack(CANCEL_REQUEST_CODE) + INT32_PAIR.pack(process_id, secret_key)


def query(sql: str) -> bytes:
    return message(b"Q", cstring(sql))


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstring(mechanism) + INT32.pack(len(data)) + data)


TERMINATE = message(b"X")


# --- parsers ---

def _cstrings(body: bytes, start: int = 0) -> list[bytes]:
    if body[-1:] != b"\x00":
        raise ProtocolViolation("string field is not NUL-terminated")
    # (a slice whose start is past its end is empty: said outright, as the compiled build's bytes slicing raises)
    return body[start:-1].split(b"\x00") if len(body) > start else [b""]


def parse_startup(body: bytes) -> tuple[int, dict[str, str]]:
    """Parse a startup packet body (after the length): (protocol code, parameters)."""
    if len(body) < 4:
        raise ProtocolViolation("startup packet too short")
    (code,) = INT32.unpack_from(body)
    if code != PROTOCOL_V3:
        return code, {}
    parts = _cstrings(body, 4)
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise ProtocolViolation("startup packet parameters are not name/value pairs")
    try:
        texts = [p.decode() for p in parts]
    except UnicodeDecodeError:
        raise ProtocolViolation("startup packet is not valid UTF-8") from None
    return code, dict(zip(texts[::2], texts[1::2], strict=True))


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    parts = _cstrings(body)
    if len(parts) != 2:
        raise ProtocolViolation("malformed ParameterStatus")
    return parts[0].decode(errors="replace"), parts[1].decode(errors="replace")


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse, keyed by their one-letter code."""
    fields: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    end = body.find(b"\x00")
    if end < 0 or len(body) < end + 5:
        raise ProtocolViolation("malformed SASLInitialResponse")
    mechanism = body[:end].decode(errors="replace")
    (length,) = INT32.unpack_from(body, end + 1)
    data = body[end + 5:]
    if length != 0xFFFFFFFF and length != len(data):
        raise ProtocolViolation("SASLInitialResponse length does not match")
    return mechanism, data


def parse_password(body: bytes) -> bytes:
    if body[-1:] != b"\x00":
        raise ProtocolViolation("password message is not NUL-terminated")
    return body[:-1]
