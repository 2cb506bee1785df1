"""A minimal blocking MySQL client over a raw socket, for tests that send bad or unusual bytes."""

from __future__ import annotations

import socket

from proxy.auth.mysql import scramble_native_password
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import ErrPacket, HandshakeResponse41, HandshakeV10, PacketReader, frame

CAPS = (my.CLIENT_PROTOCOL_41 | my.CLIENT_SECURE_CONNECTION | my.CLIENT_PLUGIN_AUTH | my.CLIENT_CONNECT_WITH_DB
        | my.CLIENT_TRANSACTIONS | my.CLIENT_LONG_PASSWORD | my.CLIENT_MULTI_RESULTS)


class RawClient:
    """Reads the greeting, logs in with mysql_native_password using the project's codec, then sends any bytes."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.reader = PacketReader(1 << 30)
        self.greeting: HandshakeV10 | None = None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def packet(self) -> tuple[int, bytes]:
        while True:
            packet = self.reader.next_packet()
            if packet is not None:
                return packet
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the proxy")
            self.reader.feed(chunk)

    def read_greeting(self) -> HandshakeV10:
        _, payload = self.packet()
        self.greeting = HandshakeV10.parse(payload)
        return self.greeting

    def login(self, user: str = "app", password: str = "app-secret", database: str = "app") -> None:
        greeting = self.read_greeting()
        scramble = scramble_native_password(password.encode(), greeting.auth_plugin_data)
        response = HandshakeResponse41(CAPS, user, scramble, database, my.MYSQL_NATIVE_PASSWORD)
        self.send(frame(response.build(), 1))
        _, payload = self.packet()
        if payload[0] == 0xFF:
            raise PermissionError(ErrPacket.parse(payload).message)
        assert payload[0] == 0x00, payload

    def query(self, sql: str) -> list[bytes]:
        """Send COM_QUERY and read packets up to the end of the (last) result; returns them."""
        self.send(frame(bytes((my.COM_QUERY,)) + sql.encode(), 0))
        packets = []
        _, first = self.packet()
        packets.append(first)
        if first[0] in (0x00, 0xFF):
            return packets
        eofs = 0
        while eofs < 2:
            _, payload = self.packet()
            packets.append(payload)
            if payload[0] == 0xFE and len(payload) < 9:
                eofs += 1
            elif payload[0] == 0xFF:
                break
        return packets

    def error(self) -> ErrPacket:
        """Read until an ERR packet (or the close) and return it."""
        while True:
            _, payload = self.packet()
            if payload[:1] == b"\xff":
                return ErrPacket.parse(payload)

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()
