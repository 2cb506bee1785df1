"""Unit tables for the PostgreSQL codec, SCRAM and md5 helpers, and the configuration schema."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.auth.md5 import check_md5_response, md5_password_hash, md5_response
from proxy.auth.scram import ScramClient, ScramKeys, ScramServer
from proxy.config import load_config, parse_config, resolve_count
from proxy.errors import AuthenticationFailed, ConfigError, ProtocolViolation
from proxy.protocol.pg import messages as pg
from proxy.secrets import SecretStore


@pytest.mark.parametrize(("built", "wire"), [
    (pg.AUTHENTICATION_OK, b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
    (pg.authentication_sasl(["SCRAM-SHA-256"]), b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"),
    (pg.authentication(pg.AUTH_MD5, b"\x01\x02\x03\x04"), b"R\x00\x00\x00\x0c\x00\x00\x00\x05\x01\x02\x03\x04"),
    (pg.parameter_status("TimeZone", "UTC"), b"S\x00\x00\x00\x11TimeZone\x00UTC\x00"),
    (pg.backend_key_data(7, 0x01020304), b"K\x00\x00\x00\x0c\x00\x00\x00\x07\x01\x02\x03\x04"),
    (pg.ready_for_query(), b"Z\x00\x00\x00\x05I"),
    (pg.ready_for_query(pg.IN_TRANSACTION), b"Z\x00\x00\x00\x05T"),
    (pg.query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00"),
    (pg.TERMINATE, b"X\x00\x00\x00\x04"),
    (pg.ssl_request(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
    (pg.cancel_request(1, 2), b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x01\x00\x00\x00\x02"),
    (pg.startup_message({"user": "u"}), b"\x00\x00\x00\x10\x00\x03\x00\x00user\x00u\x00\x00"),
    (pg.error_response("28P01", "no", "FATAL"),
     b"E\x00\x00\x00\x1eSFATAL\x00VFATAL\x00C28P01\x00Mno\x00\x00"),
])
def test_message_bytes(built: bytes, wire: bytes) -> None:
    assert built == wire


def test_parse_startup_and_fields() -> None:
    body = pg.startup_message({"user": "app", "database": "db", "options": "-c a=b"})[4:]
    assert pg.parse_startup(body) == (pg.PROTOCOL_V3, {"user": "app", "database": "db", "options": "-c a=b"})
    assert pg.parse_startup(pg.ssl_request()[4:]) == (pg.SSL_REQUEST_CODE, {})
    # no parameters at all (the protocol code alone): empty, as the interpreter's bytes slicing makes it
    assert pg.parse_startup(b"\x00\x03\x00\x00") == (pg.PROTOCOL_V3, {})
    assert pg.parse_error_fields(pg.error_response("42P01", "missing")[5:])["C"] == "42P01"
    assert pg.parse_parameter_status(b"a\x00b\x00") == ("a", "b")
    assert pg.parse_sasl_initial_response(b"SCRAM-SHA-256\x00\x00\x00\x00\x03abc") == ("SCRAM-SHA-256", b"abc")


@pytest.mark.parametrize("body", [b"\x00\x03", b"\x00\x03\x00\x00user\x00", b"\x00\x03\x00\x00user\x00app",
                                  b"\x00\x03\x00\x00\xff\xfe\x00x\x00\x00"])
def test_parse_startup_rejects_malformed(body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        pg.parse_startup(body)


@given(st.binary(max_size=200))
@example(b"\x00\x03\x00\x00")
@example(b"\x00")
def test_parsers_raise_only_protocol_violations(data: bytes) -> None:
    for parse in (pg.parse_startup, pg.parse_parameter_status, pg.parse_sasl_initial_response, pg.parse_password):
        try:
            parse(data)
        except ProtocolViolation:
            pass


def test_scram_rfc7677_vector() -> None:
    """The exchange from RFC 7677 section 3, both sides."""
    client = ScramClient(b"pencil", nonce="rOprNGfwEbeRWgbNEkqO", username="user")
    assert client.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    keys = ScramKeys.derive(b"pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
    server = ScramServer(keys, server_nonce="%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    server_first = server.server_first(client.client_first())
    assert server_first == b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    client_final = client.client_final(server_first)
    assert client_final == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                            b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    server_final = server.server_final(client_final)
    assert server_final == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    client.verify_server_final(server_final)


def test_scram_wrong_password_and_tampering() -> None:
    keys = ScramKeys.derive(b"right")
    server, client = ScramServer(keys), ScramClient(b"wrong")
    with pytest.raises(AuthenticationFailed):
        server.server_final(client.client_final(server.server_first(client.client_first())))
    server, client = ScramServer(keys), ScramClient(b"right")
    server.server_first(client.client_first())
    with pytest.raises(ProtocolViolation):
        server.server_final(b"c=biws,r=other-nonce,p=AAAA")
    with pytest.raises(ProtocolViolation):
        ScramServer(keys).server_first(b"p=tls-server-end-point,,n=,r=abc")


def test_scram_keys_are_derived_once_per_secret() -> None:
    store = SecretStore({"app": "pw"})
    secret = store.get("app")
    assert secret is not None and secret.scram_keys is secret.scram_keys
    assert "pw" not in repr(secret) and "pw" not in str(store)


def test_md5() -> None:
    # Values computed by PostgreSQL itself: md5('secretpostgres'), md5(md5('pwapp') || 'salt').
    assert md5_password_hash(b"postgres", b"secret") == b"md553f48b7c4b76a86ce72276c5755f217d"
    response = md5_response(b"app", b"pw", b"salt")
    assert response == b"md58652ee94fb4fd2b22eb4003fc29e0fee"
    assert check_md5_response(b"app", b"pw", b"salt", response)
    assert not check_md5_response(b"app", b"other", b"salt", response)


def test_secrets_from_environment_win(monkeypatch: pytest.MonkeyPatch) -> None:
    store = SecretStore({"app": "from-file"})
    monkeypatch.setenv("DBPROXY_PASSWORD_APP", "from-env")
    secret = store.get("app")
    assert secret is not None and secret.password == b"from-env"
    assert store.get("nobody") is None


def test_config_defaults_follow_rds_proxy() -> None:
    config = parse_config({})
    pool = config.postgresql.pool
    assert (pool.mode, pool.max_connections, pool.max_idle_connections) == ("transaction", "100%", "50%")
    assert pool.connection_borrow_timeout == 120 and config.server.idle_client_timeout == 1800
    assert resolve_count("50%", 200) == 100 and resolve_count(7, 200) == 7


@pytest.mark.parametrize(("data", "message"), [
    ({"postgresql": {"pool": {"max_conections": 3}}}, "unknown key 'postgresql.pool.max_conections'"),
    ({"postgresql": {"port": 70000}}, "'postgresql.port'"),
    ({"postgresql": {"pool": {"max_connections": "150%"}}}, "'postgresql.pool.max_connections'"),
    ({"postgresql": {"pool": {"mode": "statement"}}}, "'postgresql.pool.mode'"),
    ({"surprise": {}}, "unknown key 'surprise'"),
])
def test_config_errors_name_the_key_and_file(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "proxy.toml")
    assert str(info.value).startswith("proxy.toml: ") and message in str(info.value)


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[postgresql\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    good = tmp_path / "good.toml"
    good.write_text('[secrets]\nfile = "s.toml"\n')
    assert load_config(good).secrets.file == tmp_path / "s.toml"


def test_example_config_is_valid() -> None:
    example = Path(__file__).parent.parent / "config" / "dbproxy.toml"
    config = load_config(example)
    assert config.postgresql.pool.mode == "transaction"
