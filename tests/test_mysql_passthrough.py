"""Auth passthrough on MariaDB: users the proxy has no secret for log in with their own database password."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mysql.connector
import pymysql
import pytest
from passthrough_support import memory_holds, passthrough_proxy

from devtools.servers import MARIADB_CLIENT, MariaDBInstance, start_mariadb
from proxy.auth.mysql import native_password_hash, scramble_native_password
from proxy.auth.mysql_passthrough import NativeCredential, stored_hash
from support import ProxyProcess

TTL = 1.0
BACKENDS = 2  # the pool's max_connections: fewer than the concurrent clients below


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBInstance]:
    instance = start_mariadb(tmp_path_factory.mktemp("mariadb"), users={"app": "app-secret", "bench": "bench-secret"})
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, server: MariaDBInstance) -> Iterator[ProxyProcess]:
    settings = {"auth_passthrough": True, "auth_user": "root", "auth_cache_ttl": TTL}
    with passthrough_proxy(tmp_path_factory.mktemp("proxy"), {"root": server.root_password}, mariadb=server,
                           mysql=settings, mysql__pool={"max_connections": BACKENDS}) as running:
        yield running


def create_user(server: MariaDBInstance, name: str, password: str, how: str = "") -> None:
    server.sql(f"CREATE USER '{name}'@'%' {how or f'IDENTIFIED BY {password!r}'}; GRANT ALL ON app.* TO '{name}'@'%'")


def connect(proxy: ProxyProcess, user: str, password: str) -> pymysql.connections.Connection:
    return pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user=user, password=password,
                           database="app", autocommit=True, connect_timeout=10)


def query(conn: pymysql.connections.Connection, sql: str) -> tuple[object, ...]:
    with conn.cursor() as cursor:
        cursor.execute(sql)
        return tuple(cursor.fetchone() or ())


def mariadb_client(proxy: ProxyProcess, user: str, password: str, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MARIADB_CLIENT, "--no-defaults", "--protocol=TCP", "-h", "127.0.0.1", "-P",
                           str(proxy.ports["mysql"]), "-u", user, "-D", "app", "-N", "-B", "--connect-timeout=10",
                           "-e", sql], env=dict(os.environ, MYSQL_PWD=password), capture_output=True, text=True,
                          timeout=30)


def test_user_created_after_start_logs_in(proxy: ProxyProcess, server: MariaDBInstance) -> None:
    create_user(server, "late_my", "late-my-password-1")
    done = mariadb_client(proxy, "late_my", "late-my-password-1", "SELECT CURRENT_USER(), 40 + 2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "late_my@%\t42"
    conn = connect(proxy, "late_my", "late-my-password-1")
    try:
        query(conn, "CREATE TABLE late_my_rows (n int)")
        query(conn, "INSERT INTO late_my_rows VALUES (1), (2), (3), (4)")
        assert query(conn, "SELECT SUM(n), CURRENT_USER() FROM late_my_rows") == (10, "late_my@%")
    finally:
        conn.close()
    assert "late-my-password-1" not in proxy.log()


def test_more_clients_than_backends(proxy: ProxyProcess, server: MariaDBInstance) -> None:
    create_user(server, "many_my", "many-my-password-2")
    totals: dict[int, int] = {}
    errors: list[BaseException] = []

    def client(number: int) -> None:
        try:
            conn = connect(proxy, "many_my", "many-my-password-2")
            try:
                totals[number] = sum(int(query(conn, f"SELECT {number} + {step}")[0]) for step in range(20))
            finally:
                conn.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert totals == {number: 20 * number + sum(range(20)) for number in range(8)}
    on_server = int(server.sql("SELECT COUNT(*) FROM information_schema.processlist WHERE user = 'many_my'"))
    assert 1 <= on_server <= BACKENDS


def test_wrong_password_is_refused(proxy: ProxyProcess, server: MariaDBInstance) -> None:
    create_user(server, "guarded_my", "guarded-my-password-3")
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(proxy, "guarded_my", "not-the-password")
    assert info.value.args[0] == 1045
    done = mariadb_client(proxy, "guarded_my", "not-the-password", "SELECT 1")
    assert done.returncode != 0 and "Access denied for user 'guarded_my'" in done.stderr
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(proxy, "nobody_at_all", "whatever")
    assert info.value.args[0] == 1045
    conn = connect(proxy, "guarded_my", "guarded-my-password-3")
    assert query(conn, "SELECT CURRENT_USER()") == ("guarded_my@%",)
    conn.close()


def test_other_plugins_refused_clearly(proxy: ProxyProcess, server: MariaDBInstance) -> None:
    create_user(server, "socket_my", "", how="IDENTIFIED VIA unix_socket")
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(proxy, "socket_my", "any-password")
    assert info.value.args[0] == 1045
    assert "auth passthrough supports mysql_native_password accounts only" in str(info.value)
    proxy.wait_for_log(r"user 'socket_my' uses the 'unix_socket' plugin on the database")


def test_dropped_user_refused_after_ttl(proxy: ProxyProcess, server: MariaDBInstance) -> None:
    create_user(server, "gone_my", "gone-my-password-4")
    conn = connect(proxy, "gone_my", "gone-my-password-4")
    assert query(conn, "SELECT 1") == (1,)
    conn.close()
    server.sql("DROP USER 'gone_my'@'%'")
    time.sleep(TTL + 0.2)
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(proxy, "gone_my", "gone-my-password-4")
    assert info.value.args[0] == 1045


def test_stored_secret_users_unchanged(proxy: ProxyProcess) -> None:
    conn = connect(proxy, "app", "app-secret")
    assert query(conn, "SELECT CURRENT_USER()") == ("app@%",)
    conn.close()
    with pytest.raises(pymysql.err.OperationalError):
        connect(proxy, "app", "some-other-password")


def test_no_copy_of_the_password_in_log_or_memory(proxy: ProxyProcess, server: MariaDBInstance) -> None:
    password = "secret-in-memory-" + os.urandom(8).hex()
    create_user(server, "hidden_my", password)
    for _ in range(3):
        assert mariadb_client(proxy, "hidden_my", password, "SELECT 1").stdout.strip() == "1"
        conn = connect(proxy, "hidden_my", password)
        assert query(conn, "SELECT CURRENT_USER()") == ("hidden_my@%",)
        conn.close()
    assert password not in proxy.log()
    assert memory_holds(proxy.pid, password.encode()) == []
    assert memory_holds(os.getpid(), password.encode()) != []  # the search finds it where it is (this process)


def test_lookup_failure_is_a_clear_error(tmp_path: Path, server: MariaDBInstance) -> None:
    settings = {"auth_passthrough": True, "auth_user": "root", "auth_cache_ttl": TTL}
    with passthrough_proxy(tmp_path, {"root": "not-the-root-password"}, mariadb=server, mysql=settings) as broken:
        create_user(server, "stuck_my", "stuck-my-password-5")
        started = time.monotonic()
        with pytest.raises(pymysql.err.MySQLError, match="auth passthrough: the database could not check user"):
            connect(broken, "stuck_my", "stuck-my-password-5")
        assert time.monotonic() - started < 5
        conn = connect(broken, "app", "app-secret")
        assert query(conn, "SELECT 1") == (1,)
        conn.close()
        assert "not-the-root-password" not in broken.log()


def test_lookup_connection_reopened_when_lost(proxy: ProxyProcess, server: MariaDBInstance) -> None:
    create_user(server, "before_my", "before-my-password-6")
    connect(proxy, "before_my", "before-my-password-6").close()
    ids = server.sql("SELECT id FROM information_schema.processlist WHERE user = 'root' AND id <> CONNECTION_ID()")
    assert len(ids.split()) == 1  # the proxy's one lookup connection
    server.sql(f"KILL {ids.strip()}")
    create_user(server, "after_my", "after-my-password-7")
    conn = connect(proxy, "after_my", "after-my-password-7")
    assert query(conn, "SELECT CURRENT_USER()") == ("after_my@%",)
    conn.close()
    proxy.wait_for_log(r"auth passthrough: the lookup connection to .* failed .*; opening another")


def test_credentials_never_show_their_keys() -> None:
    stage1 = hashlib.sha1(b"a password").digest()
    credential = NativeCredential(stage1)
    for text in (repr(credential), str(credential), f"{credential}"):
        assert text == "NativeCredential()"
    nonce = b"n" * 20
    assert credential.answer(nonce) == scramble_native_password(b"a password", nonce)
    account = ("mysql_native_password", "*" + native_password_hash(b"a password").hex().upper())
    assert stored_hash(account) == native_password_hash(b"a password")
    assert stored_hash(("ed25519", "x" * 43)) is None


def test_password_change_seen_after_ttl(proxy: ProxyProcess, server: MariaDBInstance) -> None:
    create_user(server, "moved_my", "moved-my-password-8")
    connect(proxy, "moved_my", "moved-my-password-8").close()
    server.sql("ALTER USER 'moved_my'@'%' IDENTIFIED BY 'moved-my-password-9'")
    time.sleep(TTL + 0.2)
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(proxy, "moved_my", "moved-my-password-8")
    assert info.value.args[0] == 1045
    conn = connect(proxy, "moved_my", "moved-my-password-9")
    assert query(conn, "SELECT CURRENT_USER()") == ("moved_my@%",)
    conn.close()


def test_change_user_to_a_passthrough_user(proxy: ProxyProcess, server: MariaDBInstance) -> None:
    create_user(server, "switched_my", "switched-my-password-10")
    conn = mysql.connector.connect(host="127.0.0.1", port=proxy.ports["mysql"], user="app", password="app-secret",
                                   database="app", auth_plugin="mysql_native_password", ssl_disabled=True)
    try:
        conn.cmd_change_user(username="switched_my", password="switched-my-password-10", database="app")
        cursor = conn.cursor()
        cursor.execute("SELECT CURRENT_USER()")
        assert cursor.fetchone() == ("switched_my@%",)
        cursor.close()
        with pytest.raises(mysql.connector.Error) as info:
            conn.cmd_change_user(username="switched_my", password="wrong", database="app")
        assert info.value.errno == 1045
    finally:
        conn.close()


def test_caching_sha2_endpoint_switches_passthrough_users_to_native(tmp_path: Path, server: MariaDBInstance) -> None:
    settings = {"auth_passthrough": True, "auth_user": "root", "auth_method": "caching_sha2_password"}
    with passthrough_proxy(tmp_path, {"root": server.root_password}, mariadb=server, mysql=settings) as sha2:
        create_user(server, "sha2_my", "sha2-my-password-11")
        conn = connect(sha2, "sha2_my", "sha2-my-password-11")
        assert query(conn, "SELECT CURRENT_USER()") == ("sha2_my@%",)
        conn.close()
        conn = connect(sha2, "app", "app-secret")  # a user with a secret: caching_sha2 as before
        assert query(conn, "SELECT CURRENT_USER()") == ("app@%",)
        conn.close()
