"""The control API's pieces without a server: [api] validation, the bearer check, redaction, endpoint edits."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.api.redact import redacted_config
from proxy.api.token import bearer_matches, read_token
from proxy.config import ApiSettings, load_config, parse_config
from proxy.endpoint_edits import EditRefused, EndpointEdits
from proxy.errors import ConfigError


def test_api_settings_need_a_token_when_the_port_is_set() -> None:
    assert ApiSettings().port == -1
    with pytest.raises(ConfigError, match="give token or token_file"):
        parse_config({"api": {"port": 0}})
    with pytest.raises(ConfigError, match="not both"):
        parse_config({"api": {"port": 0, "token": "a", "token_file": "/x"}})
    with pytest.raises(ConfigError, match="port 7000 is already taken"):
        parse_config({"api": {"port": 7000, "token": "a", "health_port": 7000}})
    config = parse_config({"api": {"port": 0, "token": "very-secret"}})
    assert "very-secret" not in repr(config) and "very-secret" not in str(config.api)


def test_token_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file\n")
    assert read_token(ApiSettings(port=0, token_file=tmp_path / "token")) == b"from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_token(ApiSettings(port=0, token_file=tmp_path / "empty"))
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(ApiSettings(port=0, token_file=tmp_path / "missing"))


@pytest.mark.parametrize(("header", "ok"), [
    ("Bearer s3cret", True), ("bearer s3cret", True), ("Bearer  s3cret ", True), ("Bearer s3cre", False),
    ("Bearer s3cretx", False), ("Basic s3cret", False), ("s3cret", False), ("", False), (None, False),
    ("Bearer s3cret\u00e9", False)])
def test_bearer_matches(header: str | None, ok: bool) -> None:
    assert bearer_matches(header, b"s3cret") is ok


def test_redacted_config_hides_every_secret() -> None:
    config = parse_config({"api": {"port": 0, "token": "tok-123"},
                           "tokens": {"jwks_url": "https://user:pw-456@idp.example/jwks"}})
    text = str(redacted_config(config))
    assert "tok-123" not in text and "pw-456" not in text and "<redacted>" in text
    assert redacted_config(config)["tokens"]["jwks_url"] == "https://<redacted>@idp.example/jwks"


def test_endpoint_edits_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text('[postgresql.clusters.main]\ninstances = [{ host = "127.0.0.1", port = 5432 }]\n'
                    '[postgresql.endpoints.rw]\nport = 7001\ncluster = "main"\n')
    config = load_config(path)
    edits = EndpointEdits().add(config, "postgresql", "ro", {"port": 7002, "cluster": "main", "role": "read_only"})
    edited = load_config(path, edits.apply)
    assert set(edited.postgresql.endpoints) == {"rw", "ro"}
    edits = edits.change(edited, "rw", {"port": 7003})
    edits = edits.remove(load_config(path, edits.apply), "ro")
    final = load_config(path, edits.apply)
    assert set(final.postgresql.endpoints) == {"rw"} and final.postgresql.endpoints["rw"].port == 7003
    assert set(load_config(path).postgresql.endpoints) == {"rw"}  # the file itself is untouched
    with pytest.raises(EditRefused) as taken:
        edits.add(final, "postgresql", "rw", {"port": 0, "cluster": "main"})
    assert taken.value.status == 409
    with pytest.raises(EditRefused) as missing:
        edits.remove(final, "nosuch")
    assert missing.value.status == 404
    with pytest.raises(EditRefused, match="engine"):
        edits.add(final, "oracle", "x", {})
