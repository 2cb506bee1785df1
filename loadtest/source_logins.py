"""Logins from a chosen source address (a loopback alias such as 127.0.0.2): PostgreSQL SCRAM and MySQL
mysql_native_password over raw asyncio sockets, with the outcome and how long it took."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from dataclasses import dataclass

from proxy.auth.mysql import scramble_native_password
from proxy.auth.scram import MECHANISM, ScramClient
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import HandshakeResponse41, HandshakeV10, frame
from proxy.protocol.pg import messages as pg

CLIENT_CAPABILITIES = (my.CLIENT_PROTOCOL_41 | my.CLIENT_SECURE_CONNECTION | my.CLIENT_PLUGIN_AUTH
                       | my.CLIENT_CONNECT_WITH_DB | my.CLIENT_LONG_PASSWORD | my.CLIENT_TRANSACTIONS)


@dataclass
class Outcome:
    """How a login ended: ok, or the error's code (SQLSTATE for PostgreSQL, errno for MySQL) and message; `seconds`
    from connect to the answer; `before_auth` when the error came before any authentication request (PostgreSQL)."""

    ok: bool
    code: str = ""
    message: str = ""
    seconds: float = 0.0
    before_auth: bool = False


async def pg_login(port: int, user: str, password: str | None, *, source: str = "127.0.0.1",
                   database: str | None = None, host: str = "127.0.0.1") -> Outcome:
    """A SCRAM login; `password` None sends a made-up proof (an attacker that spends no PBKDF2 of its own)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    try:
        writer.write(pg.startup_message({"user": user, "database": database or user}))
        scram = ScramClient(password.encode()) if password is not None else None
        nonce = base64.b64encode(os.urandom(18)).decode()
        asked = False
        while True:
            head = await reader.readexactly(5)
            body = await reader.readexactly(int.from_bytes(head[1:5], "big") - 4)
            kind = chr(head[0])
            if kind == "E":
                fields = {chr(part[0]): part[1:].decode() for part in body.split(b"\0") if part}
                return Outcome(False, fields.get("C", ""), fields.get("M", ""), time.perf_counter() - started,
                               not asked)
            if kind == "Z":
                writer.write(pg.message(b"X", b""))
                return Outcome(True, seconds=time.perf_counter() - started)
            if kind != "R":
                continue
            asked = True
            code = int.from_bytes(body[:4], "big")
            if code == pg.AUTH_SASL:
                first = scram.client_first() if scram is not None else f"n,,n=,r={nonce}".encode()
                writer.write(pg.sasl_initial_response(MECHANISM, first))
            elif code == pg.AUTH_SASL_CONTINUE:
                if scram is not None:
                    writer.write(pg.password_message(scram.client_final(body[4:])))
                else:
                    server_nonce = dict(p.split("=", 1) for p in body[4:].decode().split(","))["r"]
                    proof = base64.b64encode(os.urandom(32)).decode()
                    writer.write(pg.password_message(f"c=biws,r={server_nonce},p={proof}".encode()))
            elif code == pg.AUTH_CLEARTEXT:
                writer.write(pg.password_message((password or "wrong").encode()))
    finally:
        writer.close()


async def _mysql_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(4)
    return head[3], await reader.readexactly(int.from_bytes(head[:3], "little"))


async def mysql_login(port: int, user: str, password: str, *, source: str = "127.0.0.1", database: str = "",
                      host: str = "127.0.0.1") -> Outcome:
    """A mysql_native_password login (an auth switch to it is followed)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    try:
        seq, payload = await _mysql_packet(reader)
        if payload[:1] == b"\xff":
            return _mysql_error(payload, started)
        greeting = HandshakeV10.parse(payload)
        answer = scramble_native_password(password.encode(), greeting.auth_plugin_data[:20])
        response = HandshakeResponse41(CLIENT_CAPABILITIES, user, answer, database, my.MYSQL_NATIVE_PASSWORD)
        writer.write(frame(response.build(), seq + 1))
        while True:
            seq, payload = await _mysql_packet(reader)
            if payload[:1] == b"\x00":
                writer.write(frame(b"\x01", 0))  # COM_QUIT
                return Outcome(True, seconds=time.perf_counter() - started)
            if payload[:1] == b"\xff":
                return _mysql_error(payload, started)
            if payload[:1] == b"\xfe":  # AuthSwitchRequest: plugin name, then its nonce
                nonce = payload[1:].split(b"\0", 1)[1].rstrip(b"\0")
                writer.write(frame(scramble_native_password(password.encode(), nonce[:20]), seq + 1))
    finally:
        writer.close()


def _mysql_error(payload: bytes, started: float) -> Outcome:
    errno = int.from_bytes(payload[1:3], "little")
    message = payload[9:] if payload[3:4] == b"#" else payload[3:]
    return Outcome(False, str(errno), message.decode(errors="replace"), time.perf_counter() - started)
