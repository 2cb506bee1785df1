"""loadtest.serverless pointed at targets given on the command line: a password from the environment, a wrong
password, and a token command over TLS."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest
from token_support import init_keys, token_proxy, tokens_section

from devtools.servers import MariaDBInstance, PostgresInstance, free_port
from serverless_support import result_rows, run_harness
from support import ProxyProcess


@pytest.mark.timeout(90)
def test_given_targets_and_password_from_the_environment(tmp_path: Path, mariadb_server: MariaDBInstance,
                                                         mysql_proxy: ProxyProcess) -> None:
    env = {**os.environ, "SERVERLESS_PASSWORD": "app-secret"}
    report = run_harness(["--engine", "mysql", "--profile", "steady", "--rate", "100", "--duration", "1",
                   "--direct", f"127.0.0.1:{mariadb_server.port}", "--proxy", f"127.0.0.1:{mysql_proxy.ports['mysql']}",
                   "--user", "app", "--password-env", "SERVERLESS_PASSWORD", "--rounds", "1"], tmp_path, env)
    rows = result_rows(report)
    assert set(rows) == {"direct", "proxy"}
    for cells in rows.values():
        assert cells[3] == "100" and cells[4] == "100 (100.0%)", cells
        assert int(cells[9]) >= 1  # the app's sessions counted on the database given with --direct
    assert "app-secret" not in report


def test_wrong_password_is_counted_as_an_authentication_error(tmp_path: Path, mariadb_server: MariaDBInstance,
                                                               mysql_proxy: ProxyProcess) -> None:
    report = run_harness(["--engine", "mysql", "--profile", "spike", "--invocations", "10", "--rounds", "1",
                   "--proxy", f"127.0.0.1:{mysql_proxy.ports['mysql']}", "--user", "app", "--password", "wrong"],
                  tmp_path)
    (cells,) = result_rows(report).values()
    assert cells[4] == "0 (0.0%)" and cells[5] == "authentication (1045): 10", cells


@pytest.mark.timeout(90)
def test_token_command_logs_every_invocation_in_over_tls(tmp_path: Path, pg_server: PostgresInstance) -> None:
    """Each invocation sends a token from --token-command (`dbproxy token generate`) to an endpoint that
    accepts nothing else."""
    keys = init_keys(tmp_path / "keys")
    sections = {
        "server": {"log_level": "info", "workers": 1},
        "secrets": {"file": "secrets.toml"},
        "postgresql.pool": {"max_connections": 3},
        "postgresql.clusters.main": {"instances": [{"host": "127.0.0.1", "port": pg_server.port}]},
        "postgresql.endpoints.fn": {"port": free_port(), "cluster": "main", "token_auth": "required"},
        "mysql": {"enabled": False},
    }
    command = shlex.join([sys.executable, "-m", "proxy", "token", "generate", "--user", "app", "--endpoint", "fn",
                          "--keys", str(keys), "--ttl", "5m"])
    with token_proxy(tmp_path / "proxy", sections, tokens_section(keys, "", "app", [])) as proxy:
        report = run_harness(["--engine", "postgresql", "--profile", "cold-start", "--invocations", "60",
                              "--waves", "2", "--period", "0.5", "--rounds", "1",
                              "--proxy", f"127.0.0.1:{proxy.ports['fn']}", "--user", "app", "--tls",
                              "--token-command", command], tmp_path / "out")
        wrong = run_harness(["--engine", "postgresql", "--profile", "spike", "--invocations", "5", "--rounds", "1",
                      "--proxy", f"127.0.0.1:{proxy.ports['fn']}", "--user", "app", "--tls",
                      "--password", "app-secret"], tmp_path / "wrong")
    (cells,) = result_rows(report).values()
    assert cells[1] == "cold-start" and cells[4] == "60 (100.0%)" and cells[5] == "none", cells
    (cells,) = result_rows(wrong).values()
    assert cells[4] == "0 (0.0%)" and cells[5].startswith("authentication (28"), cells
