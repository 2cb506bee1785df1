"""`dbproxy secrets rotate` on PostgreSQL while pgbench runs through the proxy: single (the user's own password,
with the pending one tried while the change propagates) and alternating (the user and its clone take turns). No
transaction fails, the database refuses the old password afterwards, and no password shows in logs or output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.servers import PostgresInstance
from proxy.secret_sources import read_toml
from secret_support import dbproxy, stored, wait_for_count
from support import ProxyProcess, running_proxy

CLIENT_PASSWORD = "rot-client-pw-7Q"  # clients' password to the proxy, and the databases users' first one
CLONE_PASSWORD = "rot-clone-pw-3K"
ROTATIONS = 2
BENCH_SECONDS = 25


def make_roles(pg: PostgresInstance, user: str, clone: str | None) -> None:
    pg.psql(f"DROP DATABASE IF EXISTS {user}")
    pg.psql(f"DROP ROLE IF EXISTS {user}")
    pg.psql(f"CREATE ROLE {user} LOGIN PASSWORD '{CLIENT_PASSWORD}'")
    pg.psql(f"CREATE DATABASE {user} OWNER {user}")
    if clone is not None:
        pg.psql(f"DROP ROLE IF EXISTS {clone}")
        pg.psql(f"CREATE ROLE {clone} LOGIN PASSWORD '{CLONE_PASSWORD}' IN ROLE {user}")  # the user's privileges
    env = dict(os.environ, PGPASSWORD=CLIENT_PASSWORD)
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", pg.host, "-p", str(pg.port), "-U", user, user],
                   env=env, check=True, capture_output=True, timeout=60)


def drop_roles(pg: PostgresInstance, *users: str) -> None:
    for user in users:
        pg.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{user}'")
    pg.psql(f"DROP DATABASE IF EXISTS {users[0]}")
    for user in reversed(users):
        pg.psql(f"DROP ROLE IF EXISTS {user}")


def direct_login(pg: PostgresInstance, user: str, password: str) -> bool:
    try:
        psycopg.connect(host=pg.host, port=pg.port, user=user, password=password, dbname="postgres", sslmode="disable",
                        connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        assert "password authentication failed" in str(exc)
        return False
    return True


def encrypted_store(folder: Path, entries: dict[str, str]) -> dict[str, str]:
    folder.mkdir(parents=True)
    assert dbproxy("secrets", "master-key", "--out", str(folder / "master.key")).returncode == 0
    for user, password in entries.items():
        put = subprocess.run([sys.executable, "-m", "proxy", "secrets", "put", "--user", user, "--password-stdin",
                              "--encrypted-file", str(folder / "secrets.enc"), "--master-key-file",
                              str(folder / "master.key")], input=password, capture_output=True, text=True,
                             timeout=60)
        assert put.returncode == 0, put.stderr
    return {"encrypted_file": "secrets.enc", "master_key_file": "master.key"}


def run_rotations(proxy: ProxyProcess, user: str, strategy: str, pg: PostgresInstance,
                  clone: str | None) -> tuple[subprocess.CompletedProcess[str], list[str], set[str]]:
    """pgbench through the proxy, `ROTATIONS` rotations while it runs; its result, the commands' output, and the
    database users the proxy's backend connections were seen logged in as."""
    env = dict(os.environ, PGPASSWORD=CLIENT_PASSWORD)
    bench = subprocess.Popen(
        ["pgbench", "-n", "-c", "4", "-j", "2", "-T", str(BENCH_SECONDS), "-h", "127.0.0.1", "-p",
         str(proxy.ports["postgresql"]), "-U", user, user],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs: list[str] = []
    seen: set[str] = set()
    try:
        time.sleep(1.5)
        for number in range(ROTATIONS):
            done = dbproxy("secrets", "rotate", "--user", user, "--strategy", strategy, "-c", str(proxy.config))
            assert done.returncode == 0, done.stderr
            outputs.append(done.stdout + done.stderr)
            wait_for_count(proxy, "secrets reloaded (", number + 1)
            for _ in range(3):  # backends age out (max_connection_lifetime): new logins with the new password
                time.sleep(0.5)
                names = pg.psql(f"SELECT string_agg(usename, ',') FROM pg_stat_activity WHERE datname = '{user}'")
                seen.update(name for name in names.strip().split(",") if name)
            assert bench.poll() is None, "pgbench ended before the rotations did"
        out, err = bench.communicate(timeout=BENCH_SECONDS + 60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    return subprocess.CompletedProcess(bench.args, bench.returncode, out, err), outputs, seen


def check_bench(result: subprocess.CompletedProcess[str]) -> int:
    assert result.returncode == 0, result.stdout + result.stderr
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    assert failed is not None and failed.group(1) == "0", result.stdout
    processed = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    assert processed is not None and int(processed.group(1)) > 100, result.stdout
    return int(processed.group(1))


def proxy_settings(secrets: dict[str, str]) -> dict[str, Any]:
    return {
        "secrets": {**secrets, "watch_interval": 0.5, "rotation_user": "postgres"},
        "postgresql.pool": {"max_connections": 8, "connection_borrow_timeout": 30.0, "max_connection_lifetime": 1.0},
    }



@pytest.mark.parametrize("strategy", ["single", "alternating"])
def test_rotation_under_pgbench(tmp_path: Path, pg_server: PostgresInstance, strategy: str) -> None:
    user = f"rot_{strategy[:3]}"
    clone = f"{user}_clone" if strategy == "alternating" else None
    make_roles(pg_server, user, clone)
    try:
        secrets = encrypted_store(tmp_path / "proxy", {user: CLIENT_PASSWORD, "postgres": "postgres"})
        settings = proxy_settings(secrets)
        if clone is not None:
            settings["secrets.alternating"] = {user: clone}
        with running_proxy(tmp_path / "proxy", pg_server, **settings) as proxy:
            result, outputs, seen = run_rotations(proxy, user, strategy, pg_server, clone)
            processed = check_bench(result)
            rotated = {name: stored(proxy, f"{name}.backend") for name in (user, clone) if name}
            # a new client logs in with the unchanged client-facing password, on a new backend connection
            with psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user=user,
                                 password=CLIENT_PASSWORD, dbname=user, sslmode="disable") as conn:
                row = conn.execute("SELECT current_user").fetchone()
            log = proxy.log()
        retried = log.count("trying the secrets read again")
        print(f"{strategy}: {processed} transactions, backends seen as {sorted(seen)}, {retried} logins retried")
        assert not direct_login(pg_server, user, CLIENT_PASSWORD)  # the old password no longer works
        assert direct_login(pg_server, user, rotated[user])
        if clone is not None:
            assert not direct_login(pg_server, clone, CLONE_PASSWORD)
            assert direct_login(pg_server, clone, rotated[clone])
            assert {user, clone} <= seen  # the backend logins alternated
            assert row == (user,)  # the second rotation made the user itself the active one again
        else:
            assert row == (user,)
        for text in [log, *outputs, result.stdout, result.stderr]:
            for password in (CLIENT_PASSWORD, CLONE_PASSWORD, *rotated.values()):
                assert password not in text
    finally:
        drop_roles(pg_server, user, *([clone] if clone else []))


def test_refused_rotation_changes_nothing(tmp_path: Path, pg_server: PostgresInstance) -> None:
    """The admin login fails: exit status 1, one line without any password, no pending entry left, the database
    user keeps its password. Misconfigurations are refused before anything is stored."""
    user = "rot_refused"
    make_roles(pg_server, user, None)
    folder = tmp_path / "proxy"
    folder.mkdir()
    (folder / "secrets.toml").write_text(f'[users]\n{user} = "{CLIENT_PASSWORD}"\npostgres = "wrong-admin-pw"\n')
    config = folder / "proxy.toml"
    body = f'[postgresql]\nport = 0\nbackend_port = {pg_server.port}\n'
    try:
        config.write_text('[secrets]\nfile = "secrets.toml"\nrotation_user = "postgres"\n' + body)
        before = read_toml(folder / "secrets.toml")
        done = dbproxy("secrets", "rotate", "--user", user, "-c", str(config))
        assert done.returncode == 1 and "rotation failed: postgresql 127.0.0.1:" in done.stderr, done.stderr
        assert "password authentication failed" in done.stderr
        assert "wrong-admin-pw" not in done.stderr + done.stdout
        assert read_toml(folder / "secrets.toml") == before  # no pending entry left
        assert direct_login(pg_server, user, CLIENT_PASSWORD)
        for settings, message in (
            ('[secrets]\nfile = "secrets.toml"\n', "rotation_user is not set"),
            ('[secrets]\nfile = "secrets.toml"\nrotation_user = "nobody"\n', "no password for rotation_user nobody"),
            (f'[secrets]\nfile = "secrets.toml"\nrotation_user = "postgres"\n[secrets.alternating]\n{user} = "c"\n',
             "rotate it with --strategy alternating"),
        ):
            config.write_text(settings + body)
            refused = dbproxy("secrets", "rotate", "--user", user, "-c", str(config))
            assert refused.returncode == 1 and message in refused.stderr, refused.stderr
        config.write_text('[secrets]\nfile = "secrets.toml"\nrotation_user = "postgres"\n' + body)
        refused = dbproxy("secrets", "rotate", "--user", user, "--strategy", "alternating", "-c", str(config))
        assert refused.returncode == 1 and "no clone for" in refused.stderr, refused.stderr
        assert read_toml(folder / "secrets.toml") == before
    finally:
        drop_roles(pg_server, user)


def test_concurrent_rotations_stay_consistent(tmp_path: Path, pg_server: PostgresInstance) -> None:
    """Two rotations at once run one after the other (a lock beside the secrets): the password stored last is the
    one the database has."""
    user = "rot_twice"
    make_roles(pg_server, user, None)
    folder = tmp_path / "proxy"
    folder.mkdir()
    (folder / "secrets.toml").write_text(f'[users]\n{user} = "{CLIENT_PASSWORD}"\npostgres = "postgres"\n')
    config = folder / "proxy.toml"
    config.write_text('[secrets]\nfile = "secrets.toml"\nrotation_user = "postgres"\n'
                      f'[postgresql]\nport = 0\nbackend_port = {pg_server.port}\n')
    try:
        runs = [subprocess.Popen([sys.executable, "-m", "proxy", "secrets", "rotate", "--user", user, "-c",
                                  str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
        for run in runs:
            _, err = run.communicate(timeout=60)
            assert run.returncode == 0, err
        entries = read_toml(folder / "secrets.toml")
        assert f"{user}.pending" not in entries and entries[user] == CLIENT_PASSWORD
        assert direct_login(pg_server, user, entries[f"{user}.backend"])
        assert not direct_login(pg_server, user, CLIENT_PASSWORD)
    finally:
        drop_roles(pg_server, user)
