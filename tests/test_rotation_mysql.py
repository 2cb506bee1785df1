"""`dbproxy secrets rotate` on MariaDB while sysbench (oltp_point_select, 4 threads) runs through the proxy, with the
secrets in a Kubernetes-style folder: single and alternating. sysbench sees no error, the database refuses the old
password afterwards, and no password shows in logs or output."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pymysql
import pytest

from devtools.servers import MariaDBInstance
from loadtest.machine import SYSBENCH
from secret_support import dbproxy, kubelet_write, stored, wait_for_count
from support import running_proxy

CLIENT_PASSWORD = "rotm-client-pw-5T"
CLONE_PASSWORD = "rotm-clone-pw-9W"
ROTATIONS = 2
BENCH_SECONDS = 25
SYSBENCH_OPTIONS = ["--db-driver=mysql", "--tables=1", "--table-size=1000"]


def make_users(server: MariaDBInstance, user: str, clone: str | None) -> None:
    statements = [f"DROP DATABASE IF EXISTS {user}", f"CREATE DATABASE {user}"]
    for name, password in ((user, CLIENT_PASSWORD), (clone, CLONE_PASSWORD)):
        if name is not None:
            statements += [f"DROP USER IF EXISTS '{name}'@'%'", f"CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'",
                           f"GRANT ALL ON {user}.* TO '{name}'@'%'"]
    server.sql("; ".join(statements))
    subprocess.run([SYSBENCH, "oltp_common", *SYSBENCH_OPTIONS, *connection(server.host, server.port, user),
                    "prepare"], check=True, capture_output=True, timeout=120)


def connection(host: str, port: int, user: str) -> list[str]:
    return [f"--mysql-host={host}", f"--mysql-port={port}", f"--mysql-user={user}",
            f"--mysql-password={CLIENT_PASSWORD}", f"--mysql-db={user}"]


def drop_users(server: MariaDBInstance, *users: str) -> None:
    server.sql("; ".join([f"DROP DATABASE IF EXISTS {users[0]}"] + [f"DROP USER IF EXISTS '{u}'@'%'" for u in users]))


def direct_login(server: MariaDBInstance, user: str, password: str) -> bool:
    try:
        pymysql.connect(host=server.host, port=server.port, user=user, password=password, connect_timeout=5).close()
    except pymysql.err.OperationalError as exc:
        assert exc.args[0] == 1045, exc
        return False
    return True



@pytest.mark.parametrize("strategy", ["single", "alternating"])
def test_rotation_under_sysbench(tmp_path: Path, mariadb_server: MariaDBInstance, strategy: str) -> None:
    user = f"rotm_{strategy[:3]}"
    clone = f"{user}_clone" if strategy == "alternating" else None
    make_users(mariadb_server, user, clone)
    folder = tmp_path / "mounted"
    kubelet_write(folder, {user: CLIENT_PASSWORD, "root": mariadb_server.root_password})
    settings: dict[str, Any] = {
        "secrets": {"dir": str(folder), "watch_interval": 0.5, "rotation_user": "root"},
        "mysql.pool": {"max_connections": 8, "connection_borrow_timeout": 30.0, "max_connection_lifetime": 1.0},
    }
    if clone is not None:
        settings["secrets.alternating"] = {user: clone}
    try:
        with running_proxy(tmp_path / "proxy", mariadb=mariadb_server, **settings) as proxy:
            bench = subprocess.Popen(
                [SYSBENCH, "oltp_point_select", *SYSBENCH_OPTIONS, *connection("127.0.0.1", proxy.ports["mysql"], user),
                 "--threads=4", f"--time={BENCH_SECONDS}", "--db-ps-mode=disable", "run"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            outputs: list[str] = []
            seen: set[str] = set()
            try:
                time.sleep(1.5)
                for number in range(ROTATIONS):
                    done = dbproxy("secrets", "rotate", "--user", user, "--strategy", strategy, "-c",
                                   str(proxy.config))
                    assert done.returncode == 0, done.stderr
                    outputs.append(done.stdout + done.stderr)
                    wait_for_count(proxy, "secrets reloaded (", number + 1)
                    for _ in range(3):
                        time.sleep(0.5)
                        seen.update(mariadb_server.sql(
                            f"SELECT DISTINCT user FROM information_schema.processlist WHERE db = '{user}'").split())
                    assert bench.poll() is None, "sysbench ended before the rotations did"
                out, err = bench.communicate(timeout=BENCH_SECONDS + 60)
            finally:
                if bench.poll() is None:
                    bench.kill()
                    bench.wait()
            assert bench.returncode == 0, out + err
            found = re.search(r"transactions:\s+(\d+)", out)
            errors = re.search(r"ignored errors:\s+(\d+)", out)
            assert found is not None and int(found.group(1)) > 1000, out
            assert errors is not None and errors.group(1) == "0", out
            rotated = {name: stored(proxy, f"{name}.backend") for name in (user, clone) if name}
            conn = pymysql.connect(host="127.0.0.1", port=proxy.ports["mysql"], user=user, password=CLIENT_PASSWORD,
                                   database=user)
            with conn.cursor() as cursor:
                cursor.execute("SELECT SUBSTRING_INDEX(CURRENT_USER(), '@', 1)")
                row = cursor.fetchone()
            conn.close()
            log = proxy.log()
        retried = log.count("trying the secrets read again")
        print(f"{strategy}: {found.group(1)} transactions, backends seen as {sorted(seen)}, {retried} logins retried")
        assert row == (user,)
        assert not direct_login(mariadb_server, user, CLIENT_PASSWORD)
        assert direct_login(mariadb_server, user, rotated[user])
        if clone is not None:
            assert not direct_login(mariadb_server, clone, CLONE_PASSWORD)
            assert direct_login(mariadb_server, clone, rotated[clone])
            assert {user, clone} <= seen
        for text in [log, *outputs, err]:
            for password in (CLIENT_PASSWORD, CLONE_PASSWORD, *rotated.values()):
                assert password not in text
    finally:
        drop_users(mariadb_server, user, *([clone] if clone else []))
