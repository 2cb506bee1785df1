"""Backend login against a scripted caching_sha2_password server (MariaDB 10.11 has no server-side caching_sha2)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.auth.mysql import check_caching_sha2, generate_rsa_keypair, rsa_decrypt_password
from proxy.config import MySQLPoolSettings, MySQLSettings
from proxy.errors import AuthenticationFailed
from proxy.pool.mysql_backend import Profile, open_backend
from proxy.pool.pool import Pool, Target
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import (
    ErrPacket,
    HandshakeResponse41,
    HandshakeV10,
    OkPacket,
    PacketReader,
    build_auth_more_data,
    frame,
)
from proxy.secrets import SecretStore

NONCE = bytes(range(65, 85))
KEY, PUBLIC_PEM = generate_rsa_keypair(1024)


async def serve_once(full_auth: bool, password: bytes, seen: dict[str, object]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        packets = PacketReader()

        async def packet() -> tuple[int, bytes]:
            while (got := packets.next_packet()) is None:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionResetError
                packets.feed(data)
            return got

        caps = my.DEFAULT_SERVER_CAPABILITIES | my.CLIENT_MYSQL
        writer.write(frame(HandshakeV10("8.0.36", 77, NONCE, caps, auth_plugin_name=my.CACHING_SHA2_PASSWORD)
                           .build(), 0))
        try:
            seq, payload = await packet()
        except ConnectionResetError:
            return
        response = HandshakeResponse41.parse(payload)
        seen["user"], seen["database"] = response.username, response.database
        ok = check_caching_sha2(password, NONCE, response.auth_response)
        if full_auth:
            writer.write(frame(build_auth_more_data(bytes((my.CACHING_SHA2_PERFORM_FULL_AUTH,))), seq + 1))
            seq, payload = await packet()
            assert payload == bytes((my.CACHING_SHA2_REQUEST_PUBLIC_KEY,))
            writer.write(frame(build_auth_more_data(PUBLIC_PEM), seq + 1))
            seq, payload = await packet()
            ok = rsa_decrypt_password(KEY, payload, NONCE) == password
            seen["rsa"] = True
        elif ok:
            writer.write(frame(build_auth_more_data(bytes((my.CACHING_SHA2_FAST_AUTH_SUCCESS,))), seq + 1))
            seq += 1
        if not ok:
            writer.write(frame(ErrPacket(1045, "Access denied").build(), seq + 1))
        else:
            writer.write(frame(OkPacket().build(), seq + 1))
            seq, payload = await packet()  # the server offers CLIENT_SESSION_TRACK: the proxy turns it on
            assert payload.startswith(b"\x03SET session_track_system_variables='*'")
            writer.write(frame(OkPacket().build(), 1))
            seq, payload = await packet()
            assert payload == b"\x03SELECT @@max_connections, @@max_prepared_stmt_count"
            column = b"\x03def\x00\x00\x00\x11@@max_connections\x00\x0c?\x00\x15\x00\x00\x00\x08\x80\x00\x00\x00\x00"
            result = [b"\x02", column, column, b"\xfe\x00\x00\x02\x00", b"\x0242\x0516382", b"\xfe\x00\x00\x02\x00"]
            for number, item in enumerate(result):
                writer.write(frame(item, number + 1))
        await writer.drain()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("full_auth", [False, True])
async def test_backend_login_with_caching_sha2(full_auth: bool) -> None:
    seen: dict[str, object] = {}
    server = await serve_once(full_auth, b"s3cret", seen)
    port = server.sockets[0].getsockname()[1]
    settings = MySQLSettings(backend_port=port, pool=MySQLPoolSettings(max_connections="50%"))
    target = Target("t", "127.0.0.1", port, settings.pool)
    pool = Pool(target, "app", "app", lambda pool: None)  # type: ignore[arg-type,return-value]
    try:
        backend, greeting = await open_backend(pool, Profile(my.CLIENT_MULTI_RESULTS, 45), settings,
                                               SecretStore({"app": "s3cret"}), None)
        assert greeting.server_version == "8.0.36" and backend.thread_id == 77
        assert seen == {"user": "app", "database": "app", **({"rsa": True} if full_auth else {})}
        assert target.max_connections == 19  # 50% of (42 - 3 reserved)
        backend.close()
        with pytest.raises(AuthenticationFailed):
            await open_backend(pool, Profile(0, 45), settings, SecretStore({}), None)
    finally:
        server.close()
