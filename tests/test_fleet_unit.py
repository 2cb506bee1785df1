"""The fleet's pieces from values: the client id layouts (which proxy and worker own an id), the signed messages
(forged, stale, replayed and misdirected ones refused) and the [fleet] settings."""

from __future__ import annotations

import asyncio
import itertools
import socket
from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.errors import ConfigError, TooManyClients
from proxy.fleet.peers import split_address
from proxy.fleet.wire import HEADER, MAX_MESSAGE, MIN_KEY_BYTES, Refused, Verifier, load_key, read_message, sign
from proxy.session import mysql_ids, pg_ids

KEY = b"k" * MIN_KEY_BYTES


@pytest.mark.parametrize(("proxy", "worker", "serial"), [(0, 0, 1), (1, 0, 1), (127, 63, 1), (5, 3, 1 << 20)])
def test_fleet_ids_name_their_proxy_and_worker(proxy: int, worker: int, serial: int) -> None:
    process_id = pg_ids.make_process_id(worker, serial, proxy)
    assert (pg_ids.fleet_proxy_of(process_id), pg_ids.worker_of(process_id)) == (proxy, worker)
    assert 1 << 22 < process_id < 1 << 31  # above any server pid, a positive int32
    connection_id = mysql_ids.make_proxy_id(worker, serial, proxy)
    assert (mysql_ids.fleet_proxy_of(connection_id), mysql_ids.worker_of(connection_id)) == (proxy, worker)
    assert mysql_ids.is_proxy_id(connection_id) and connection_id < 1 << 32


def test_single_proxy_ids_are_those_of_before() -> None:
    assert pg_ids.make_process_id(3, 1) == (3 << 24) + (1 << 22) + 1
    assert pg_ids.fleet_proxy_of(pg_ids.make_process_id(3, 1)) is None
    assert pg_ids.worker_of(pg_ids.make_process_id(3, 77)) == 3
    assert mysql_ids.make_proxy_id(2, 1) == mysql_ids.PROXY_ID_BASE + (2 << 24) + 1
    assert mysql_ids.fleet_proxy_of(mysql_ids.make_proxy_id(2, 1)) is None
    assert not mysql_ids.is_proxy_id(12345)  # a server thread id


def test_counters_wrap_past_ids_still_in_use() -> None:
    taken = {pg_ids.make_process_id(0, 1, 4), pg_ids.make_process_id(0, 2, 4)}
    assert pg_ids.next_process_id(0, itertools.count(1), taken, 4) == pg_ids.make_process_id(0, 3, 4)
    wrapped = pg_ids.make_process_id(1, pg_ids.FLEET_COUNTER_MASK + 1, 4)
    assert wrapped == pg_ids.make_process_id(1, 1, 4)
    assert mysql_ids.make_proxy_id(1, mysql_ids.FLEET_COUNTER_MASK + 1, 4) == mysql_ids.make_proxy_id(1, 1, 4)


def test_a_worker_out_of_ids_refuses_the_client() -> None:
    taken = {pg_ids.make_process_id(0, serial, 4) for serial in range(1, pg_ids.FLEET_COUNTER_MASK + 1)}
    with pytest.raises(TooManyClients):
        pg_ids.next_process_id(0, itertools.count(1), taken, 4)


def test_a_signed_message_is_accepted_once() -> None:
    verifier = Verifier(KEY, 30.0)
    message = sign(KEY, {"kind": "cancel", "to": 2}, 1000.0)
    assert verifier.verify(message, 1001.0) == {"kind": "cancel", "to": 2}
    with pytest.raises(Refused, match="replayed"):
        verifier.verify(message, 1002.0)


@pytest.mark.parametrize(("change", "reason"), [
    ({"mac": "00"}, "bad signature"),
    ({"body": {"kind": "cancel", "to": 3}}, "bad signature"),  # the body changed after signing
    ({"ts": 1.0}, "bad signature"),
    ({"mac": None}, "bad signature"),
])
def test_a_changed_message_is_refused(change: dict[str, object], reason: str) -> None:
    message = {**sign(KEY, {"kind": "cancel", "to": 2}, 1000.0), **change}
    with pytest.raises(Refused, match=reason):
        Verifier(KEY, 30.0).verify(message, 1000.0)


def test_other_keys_stale_times_and_other_requests_are_refused() -> None:
    verifier = Verifier(KEY, 30.0)
    with pytest.raises(Refused, match="bad signature"):
        verifier.verify(sign(b"x" * MIN_KEY_BYTES, {}, 1000.0), 1000.0)
    with pytest.raises(Refused, match="clock skew"):
        verifier.verify(sign(KEY, {}, 1000.0), 1031.0)
    with pytest.raises(Refused, match="clock skew"):
        verifier.verify(sign(KEY, {}, 1031.0), 1000.0)  # from the future
    with pytest.raises(Refused, match="another request"):
        verifier.verify(sign(KEY, {}, 1000.0, reply_to="abc"), 1000.0, reply_to="def")
    with pytest.raises(Refused, match="not a signed message"):
        verifier.verify({"body": {}}, 1000.0)
    with pytest.raises(Refused, match="clock skew"):  # (signed by a key holder, but no time at all)
        verifier.verify(sign(KEY, {}, float("nan")), 1000.0)


def test_reading_refuses_large_and_deeply_nested_messages() -> None:
    async def read(data: bytes) -> object:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_message(reader)

    with pytest.raises(ValueError, match="too large"):
        asyncio.run(read(HEADER.pack(MAX_MESSAGE + 1)))
    nested = b"[" * 8000 + b"]" * 8000  # within the size cap, far beyond the recursion limit
    with pytest.raises(ValueError, match="nested"):
        asyncio.run(read(HEADER.pack(len(nested)) + nested))
    body = b'{"body": {}}'
    assert asyncio.run(read(HEADER.pack(len(body)) + body)) == {"body": {}}


def test_nonces_are_forgotten_once_stale() -> None:
    verifier = Verifier(KEY, 30.0)
    for second in range(200):
        verifier.verify(sign(KEY, {}, 1000.0 + second), 1000.0 + second)
    assert "seen=61" in repr(verifier)  # two skews' worth kept, the older ones forgotten


def test_fleet_settings(tmp_path: Path) -> None:
    assert not parse_config({}).fleet.enabled
    with pytest.raises(ConfigError, match="key_file"):
        parse_config({"fleet": {"port": 7000}})
    with pytest.raises(ConfigError, match="fixed port"):
        parse_config({"fleet": {"port": 0, "key_file": "k"}})
    with pytest.raises(ConfigError, match="proxy_id"):
        parse_config({"fleet": {"proxy_id": 128}})
    with pytest.raises(ConfigError, match="peers"):
        parse_config({"fleet": {"peers": ["no-port"]}})
    with pytest.raises(ConfigError, match="already taken"):
        parse_config({"fleet": {"port": 7000, "key_file": "k"}, "api": {"port": 7000, "token": "t"}})
    short = tmp_path / "short.key"
    short.write_bytes(b"short\n")
    with pytest.raises(ConfigError, match="at least 16 bytes") as refused:
        load_key(short)
    assert "short" not in str(refused.value).replace(str(short), "")  # the key itself is never shown
    with pytest.raises(ConfigError, match="cannot read"):
        load_key(tmp_path / "missing.key")
    assert split_address("[::1]:7000") == ("::1", 7000)
    assert split_address("dbproxy-fleet.default.svc:7000") == ("dbproxy-fleet.default.svc", 7000)


@pytest.mark.parametrize(("host", "expected"), [("dbproxy-7", 7), ("dbproxy-0", 0), ("pod12", 12),
                                                 ("dbproxy", "does not end with a number"),
                                                 ("dbproxy-128", "less than or equal to 127")])
def test_proxy_id_from_the_statefulset_ordinal(monkeypatch: pytest.MonkeyPatch, host: str,
                                               expected: int | str) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: host)
    if isinstance(expected, int):
        assert parse_config({"fleet": {"proxy_id": "ordinal"}}).fleet.proxy_id == expected
    else:
        with pytest.raises(ConfigError, match=expected):
            parse_config({"fleet": {"proxy_id": "ordinal"}})
