"""The leak check itself: it finds a registered secret in a proxy log or a recorded output, and passes clean ones."""

from __future__ import annotations

from pathlib import Path

import leakcheck


def test_a_secret_in_a_proxy_log_or_an_output_is_found(tmp_path: Path) -> None:
    leakcheck.register_secret("Sq7-unique-secret-for-the-check")
    (tmp_path / "proxy").mkdir()
    (tmp_path / "proxy" / "proxy.log").write_text("line one\nlogin with Sq7-unique-secret-for-the-check\n")
    (tmp_path / "server.log").write_text("Sq7-unique-secret-for-the-check\n")  # a database's own log: not searched
    found = leakcheck._leaks(tmp_path)
    assert len(found) == 1 and "proxy.log:2" in found[0] and "Sq7-unique" not in found[0]
    (tmp_path / "proxy" / "proxy.log").write_text("clean\n")
    assert leakcheck._leaks(tmp_path) == []
    leakcheck.record_output("GET /v1/config", "password: Sq7-unique-secret-for-the-check")
    try:
        assert [line.split(":")[0] for line in leakcheck._leaks(tmp_path)] == ["GET /v1/config"]
    finally:
        leakcheck._OUTPUTS.pop()
        leakcheck._SECRETS.discard("Sq7-unique-secret-for-the-check")
