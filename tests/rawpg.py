"""A minimal blocking PostgreSQL client over a raw socket, for tests that send bad or unusual bytes."""

from __future__ import annotations

import socket

from proxy.auth.scram import MECHANISM, ScramClient
from proxy.protocol.pg import messages as pg


class RawClient:
    """Logs in with SCRAM using the project's own codec helpers, then lets a test send any bytes."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_message(self) -> tuple[str, bytes]:
        while True:
            if len(self.buffer) >= 5:
                length = int.from_bytes(self.buffer[1:5], "big")
                if len(self.buffer) >= length + 1:
                    kind, body = chr(self.buffer[0]), self.buffer[5 : length + 1]
                    self.buffer = self.buffer[length + 1 :]
                    return kind, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the proxy")
            self.buffer += chunk

    def until(self, kind: str) -> list[tuple[str, bytes]]:
        seen = []
        while True:
            message = self.recv_message()
            seen.append(message)
            if message[0] == kind:
                return seen

    def login(self, user: str = "app", password: str = "app-secret", database: str = "app") -> None:
        self.send(pg.startup_message({"user": user, "database": database}))
        kind, body = self.recv_message()
        assert kind == "R" and int.from_bytes(body[:4], "big") == pg.AUTH_SASL, (kind, body)
        scram = ScramClient(password.encode())
        self.send(pg.sasl_initial_response(MECHANISM, scram.client_first()))
        kind, body = self.recv_message()
        assert kind == "R", pg.parse_error_fields(body)
        self.send(pg.password_message(scram.client_final(body[4:])))
        kind, body = self.recv_message()
        if kind == "E":
            raise PermissionError(pg.parse_error_fields(body).get("M"))
        scram.verify_server_final(body[4:])
        self.until("Z")

    def query(self, sql: str) -> list[tuple[str, bytes]]:
        self.send(pg.query(sql))
        return self.until("Z")

    def error(self) -> dict[str, str]:
        """Read until an ErrorResponse (or the close) and return its fields."""
        while True:
            kind, body = self.recv_message()
            if kind == "E":
                return pg.parse_error_fields(body)

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()
