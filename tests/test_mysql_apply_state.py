"""A client's whole session given to a fresh MariaDB backend connection in one call (MySQLBackend.apply_state)."""

from __future__ import annotations

from devtools.servers import MariaDBInstance
from proxy.config import MySQLPoolSettings, MySQLSettings
from proxy.pool.mysql_backend import Profile, open_backend
from proxy.pool.pool import Pool, Target
from proxy.protocol.mysql import constants as my
from proxy.protocol.mysql.packets import ErrPacket
from proxy.secrets import SecretStore
from proxy.session.state import SessionState

UTF8MB4_GENERAL_CI = 45


async def test_apply_state_gives_a_new_backend_the_clients_session(mariadb_server: MariaDBInstance) -> None:
    mariadb_server.sql("CREATE DATABASE IF NOT EXISTS applied; GRANT ALL ON applied.* TO 'app'@'%'")
    settings = MySQLSettings(backend_port=mariadb_server.port, pool=MySQLPoolSettings(max_connections=5))
    target = Target("t", "127.0.0.1", mariadb_server.port, settings.pool)
    pool = Pool(target, "app", "app", lambda pool: None)  # type: ignore[arg-type,return-value]
    session: SessionState[bytes, object] = SessionState(
        user="app", database="applied", autocommit=False,
        settings={"sql_mode": b"sql_mode='ANSI_QUOTES'", "wait_timeout": b"wait_timeout=77"},
        user_variables={b"greeting": b"'hello'"},
    )
    refused: list[tuple[str | None, int]] = []

    def refuse(name: str | None, failure: bytes) -> None:  # as the client does: the setting leaves its session
        refused.append((name, ErrPacket.parse(failure).error_code))
        if name is not None:
            session.settings.pop(name, None)

    backend, _ = await open_backend(pool, Profile(0, UTF8MB4_GENERAL_CI), settings,
                                    SecretStore({"app": "app-secret"}), None)
    try:
        assert not backend.serves(session, UTF8MB4_GENERAL_CI, False)
        await backend.apply_state(session, UTF8MB4_GENERAL_CI, False, lambda collation: b"", refuse)
        assert backend.serves(session, UTF8MB4_GENERAL_CI, False) and not refused
        rows = await backend.query("SELECT @@sql_mode, @@wait_timeout, @greeting, @@autocommit, DATABASE()")
        assert rows == [[b"ANSI_QUOTES", b"77", b"hello", b"0", b"applied"]]

        session.settings["version"] = b"version='1'"  # read only: the server refuses it
        del session.user_variables[b"greeting"]
        session.autocommit = True
        await backend.apply_state(session, UTF8MB4_GENERAL_CI, False, lambda collation: b"", refuse)
        assert refused == [("version", 1238)]
        assert backend.serves(session, UTF8MB4_GENERAL_CI, False)
        rows = await backend.query("SELECT @@sql_mode, @greeting, @@autocommit")
        assert rows == [[b"ANSI_QUOTES", None, b"1"]]
        assert backend.tracker.status_flags & my.SERVER_STATUS_AUTOCOMMIT
    finally:
        backend.close()
