"""No password anywhere but `dbproxy secrets get`: after logins (good and bad), a put, rotations, a folder swap, a
reload and a backend login the database refuses, the proxy's log (at debug level), its metrics, the commands' output,
clients' error messages and the reprs of the configuration and secrets objects hold none of the passwords used."""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path

import psycopg
import pytest

from devtools.servers import PostgresInstance
from proxy.config import load_config
from proxy.secrets import SecretStore
from secret_support import dbproxy, kubelet_write, wait_for_count
from support import ProxyProcess, running_proxy

USER, ADMIN = "hyg_user", "hyg_admin"
PASSWORDS = {"client": "hyg-client-pw-41", "admin": "hyg-admin-pw-52", "changed": "hyg-changed-pw-63",
             "put": "hyg-put-pw-74", "wrong": "hyg-wrong-pw-85", "db_only": "hyg-db-only-pw-96"}


@pytest.fixture
def roles(pg_server: PostgresInstance) -> object:
    pg_server.psql(f"DROP ROLE IF EXISTS {USER}; DROP ROLE IF EXISTS {ADMIN}")
    pg_server.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORDS['client']}'")
    pg_server.psql(f"CREATE ROLE {ADMIN} LOGIN CREATEROLE PASSWORD '{PASSWORDS['admin']}'")
    yield
    pg_server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename IN ('{USER}', '{ADMIN}')")
    pg_server.psql(f"DROP ROLE IF EXISTS {USER}; DROP ROLE IF EXISTS {ADMIN}")


def login(proxy: ProxyProcess, password: str) -> str:
    """The client's view of a login and a query: 'ok' or the error it was given."""
    try:
        with psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user=USER, password=password,
                             dbname="postgres", sslmode="disable", connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc)
    return "ok"


def test_no_password_in_logs_output_or_reprs(tmp_path: Path, pg_server: PostgresInstance, roles: object) -> None:
    folder = tmp_path / "mounted"
    kubelet_write(folder, {USER: PASSWORDS["client"], ADMIN: PASSWORDS["admin"]})
    seen: list[str] = []
    with running_proxy(tmp_path / "proxy", pg_server,
                       server={"log_level": "debug", "metrics_port": 0, "workers": 1},
                       secrets={"dir": str(folder), "watch_interval": 0.2, "rotation_user": ADMIN}) as proxy:
        config = str(proxy.config)
        assert login(proxy, PASSWORDS["client"]) == "ok"
        seen.append(login(proxy, PASSWORDS["wrong"]))
        assert "password authentication failed" in seen[-1]
        for args in (("secrets", "list", "-c", config), ("run", "--check", "-c", config)):
            done = dbproxy(*args)
            assert done.returncode == 0, done.stderr
            seen.append(done.stdout + done.stderr)
        put = dbproxy("secrets", "put", "--user", "hyg_other", "--password-stdin", "-c", config, stdin=PASSWORDS["put"])
        assert put.returncode == 0, put.stderr
        seen.append(put.stdout + put.stderr)
        wait_for_count(proxy, "secrets reloaded (", 1)
        for _ in range(2):
            done = dbproxy("secrets", "rotate", "--user", USER, "-c", config, "--reload")
            assert done.returncode == 0, done.stderr
            seen.append(done.stdout + done.stderr)
            assert login(proxy, PASSWORDS["client"]) == "ok"
        rotated = dbproxy("secrets", "get", "--user", f"{USER}.backend", "-c", config).stdout.strip()
        # the folder swapped by hand to a new client password: watched
        entries = {name: (folder / name).read_text().removesuffix("\n") for name in os.listdir(folder)
                   if not name.startswith(".")}
        kubelet_write(folder, {**entries, USER: PASSWORDS["changed"]})
        count = proxy.log().count("secrets reloaded (")
        wait_for_count(proxy, "secrets reloaded (", count + 1)
        assert login(proxy, PASSWORDS["changed"]) == "ok"
        # the database refuses the stored password (changed behind the proxy's back): an error, no password in it
        pg_server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{USER}'")
        pg_server.psql(f"ALTER ROLE {USER} PASSWORD '{PASSWORDS['db_only']}'")
        seen.append(login(proxy, PASSWORDS["changed"]))
        assert "password" in seen[-1] and seen[-1] != "ok"
        reload = dbproxy("reload", "-c", config)
        assert reload.returncode == 0, reload.stderr
        seen.append(reload.stdout + reload.stderr)
        os.kill(proxy.pid, signal.SIGHUP)
        wait_for_count(proxy, "reload: serving", 2)
        seen.append(urllib.request.urlopen(f"http://127.0.0.1:{proxy.ports['metrics']}/metrics").read().decode())
        loaded = load_config(proxy.config)
        store = SecretStore.from_settings(loaded.secrets)
        seen += [repr(loaded), str(loaded), repr(loaded.secrets), str(loaded.secrets), repr(store), str(store),
                 repr(store.get(USER)), repr(store.backend_login(USER)), str(store.backend_login(USER))]
        log = proxy.log()
    assert log.count("secrets reloaded (") >= 3
    used = [*PASSWORDS.values(), rotated]
    assert len(rotated) > 30
    for text in [log, *seen]:
        for password in used:
            assert password not in text, (password, text[:2000])
    for file in tmp_path.rglob("*.log"):
        content = file.read_text(errors="replace")
        assert not any(password in content for password in used), file
