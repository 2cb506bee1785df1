"""Fuzzing both listeners: random, truncated and bit-flipped login packets and, after a valid login, mutated
protocol messages; a checked bystander client per protocol must see no error and no stall meanwhile, the proxy
must stay up and log no traceback. The generators are loadtest/fuzzgen.py, shared with `python -m loadtest.fuzz`."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from devtools.servers import MariaDBInstance, PostgresInstance
from loadtest.fuzzclient import (
    STALL_SECONDS,
    Bystander,
    LogWatcher,
    mysql_bystander,
    pg_bystander,
    run_case_sync,
    tracebacks_by_kind,
)
from loadtest.fuzzgen import PG_SYNC, Case, frame_raw, pg_describe, preauth_case, session_case
from proxy.protocol.mysql import constants as my
from proxy.protocol.pg import messages as pg
from rawpg import RawClient
from support import ProxyProcess, running_proxy

pytestmark = pytest.mark.timeout(300)

# Enough examples to cover every message kind and mutation many times, within about 18 s per protocol; on a
# slow machine the time budget ends the run first (the examples left pass at once).
SECONDS_PER_PROTOCOL = 18.0
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


@dataclass
class Watch:
    """The checks after every fuzz case: proxy alive, no new traceback, each bystander fine and not stalled."""

    proxy: ProxyProcess
    bystanders: list[Bystander]
    log: LogWatcher

    def __post_init__(self) -> None:
        self.seen_errors = {b.report.name: len(b.report.errors) for b in self.bystanders}
        self.seen_stalls = {b.report.name: len(b.report.stalls) for b in self.bystanders}

    def check(self, case: Case) -> None:
        finished = time.monotonic()
        problems = []
        for bystander in self.bystanders:  # each must complete a fresh query after the case
            if not bystander.wait_cycle_after(finished, timeout=5 * STALL_SECONDS):
                problems.append(f"{bystander.report.name} bystander stalled (no answer within "
                                f"{5 * STALL_SECONDS} s)")
            report = bystander.report
            errors = report.errors[self.seen_errors[report.name]:]
            stalls = report.stalls[self.seen_stalls[report.name]:]
            self.seen_errors[report.name] += len(errors)
            self.seen_stalls[report.name] += len(stalls)
            distinct = Counter(error.split(" ", 1)[-1] for error in errors)  # without the time stamp
            problems += [f"{report.name} bystander (x{count}): {error}" for error, count in distinct.items()]
            if stalls:
                problems.append(f"{report.name} bystander waited {max(stalls)} s ({len(stalls)} queries over "
                                f"{STALL_SECONDS} s)")
        if not self.proxy.alive:
            problems.append("the proxy died")
        tracebacks = tracebacks_by_kind(self.log.new_text())
        problems += [f"proxy traceback {kind} x{count}" for kind, count in tracebacks.items()]
        if problems:
            raise AssertionError("; ".join(problems) + f"\nafter {case.describe()[:3000]}")


SANITY = (
    Case("postgresql", "session", [pg.query("SELECT 1"), pg_describe(b"S", ""), PG_SYNC]),
    Case("mysql", "session", [frame_raw(bytes((my.COM_QUERY,)) + b"SELECT 1", 0), frame_raw(bytes((my.COM_PING,)), 0)]),
)


@pytest.fixture
def watch(tmp_path: Path, pg_server: PostgresInstance, mariadb_server: MariaDBInstance) -> Iterator[Watch]:
    """A proxy of its own for each test (both listeners, pools of 3 so fuzzed sessions and the bystanders share
    backends) and a running bystander per protocol."""
    with running_proxy(tmp_path, pg_server, mariadb_server, postgresql__pool={"max_connections": 3},
                       mysql__pool={"max_connections": 3}) as proxy:
        bystanders = [pg_bystander(proxy.ports["postgresql"]), mysql_bystander(proxy.ports["mysql"])]
        for bystander in bystanders:
            bystander.start()
        try:
            for bystander in bystanders:
                assert bystander.wait_cycle_after(0.0, timeout=10), f"{bystander.report.name} bystander never ran"
                assert not bystander.report.errors, bystander.report.errors
            for case in SANITY:  # the fuzz client itself works: unmutated pipelined messages are all answered
                outcome = run_case_sync(case, proxy.ports[case.protocol], idle=2.0, total=5.0)
                assert outcome.answered, (case.describe(), outcome)
            yield Watch(proxy, bystanders, LogWatcher(proxy.log_path))
        finally:
            for bystander in bystanders:
                bystander.stop()


_started: dict[str, float] = {}


def fuzz_one(watch: Watch, protocol: str, seed: int, logged_in: bool) -> None:
    rng = random.Random(seed)  # (hypothesis' own Random is too slow for the many draws of a case)
    if logged_in:
        case = session_case(protocol, rng, units=rng.randint(1, 6), mutation_rate=0.3)
    else:
        case = preauth_case(protocol, rng)
    if time.monotonic() - _started.setdefault(protocol, time.monotonic()) > SECONDS_PER_PROTOCOL:
        return
    run_case_sync(case, watch.proxy.ports[protocol], idle=0.1, total=0.5)
    watch.check(case)


@FUZZ
@given(seed=st.integers(0, 2**64 - 1), logged_in=st.booleans())
def test_fuzz_postgresql_listener(watch: Watch, seed: int, logged_in: bool) -> None:
    fuzz_one(watch, "postgresql", seed, logged_in)


@FUZZ
@given(seed=st.integers(0, 2**64 - 1), logged_in=st.booleans())
def test_fuzz_mysql_listener(watch: Watch, seed: int, logged_in: bool) -> None:
    fuzz_one(watch, "mysql", seed, logged_in)


# --- what the fuzzer found, each as a fixed case ---

def test_setting_does_not_follow_backend_when_client_leaves_mid_message(watch: Watch) -> None:
    port = watch.proxy.ports["postgresql"]
    client = RawClient(port)
    client.login()
    client.send(pg.query("SET search_path = fuzz") + b"Q\x00\x00\x01\x00SELECT")  # the second message stops short
    client.until("Z")
    time.sleep(0.2)
    client.close()
    for _ in range(6):  # every backend of the pool (3) is seen at least once by someone
        other = RawClient(port)
        other.login()
        rows = [body for kind, body in other.query("SHOW search_path") if kind == "D"]
        other.close()
        assert rows == [b'\x00\x01\x00\x00\x00\x0f"$user", public'], rows
    watch.check(Case("postgresql", "session", [pg.query("SET search_path = fuzz"), b"Q\x00\x00\x01\x00SELECT"]))


def test_malformed_describe_while_backend_attaches(watch: Watch) -> None:
    port = watch.proxy.ports["postgresql"]
    client = RawClient(port, timeout=3)
    client.login()
    bad = pg.message(b"D", b"X")  # neither 'S' nor 'P', no name
    client.send(bad + PG_SYNC)
    try:
        fields = client.error()
    finally:
        client.close()
    assert fields["C"] == "08P01", fields
    watch.check(Case("postgresql", "session", [bad, PG_SYNC]))


def test_pinned_session_state_does_not_reach_next_client(tmp_path: Path, pg_server: PostgresInstance) -> None:
    state = ("SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()),"
             " (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'),"
             " (SELECT count(*) FROM pg_listening_channels()),"
             " (SELECT count(*) FROM pg_prepared_statements WHERE from_sql), (SELECT count(*) FROM pg_cursors)")
    with running_proxy(tmp_path, pg_server, postgresql__pool={"max_connections": 1}) as proxy:
        client = RawClient(proxy.ports["postgresql"])
        client.login()
        client.query("CREATE TEMP TABLE fz (t text); SELECT pg_advisory_lock(7); LISTEN fz; "
                      "PREPARE fzp AS SELECT 1; DECLARE c CURSOR WITH HOLD FOR SELECT 1")
        client.close()
        time.sleep(0.5)
        other = RawClient(proxy.ports["postgresql"])
        other.login()
        rows = [body for kind, body in other.query(state) if kind == "D"]
        other.close()
    assert rows == [b"\x00\x05" + b"\x00\x00\x00\x010" * 5], rows


def test_next_client_not_swallowed_by_unfinished_message(tmp_path: Path, pg_server: PostgresInstance) -> None:
    with running_proxy(tmp_path, pg_server,
                       postgresql__pool={"max_connections": 1, "connection_borrow_timeout": 4.0}) as proxy:
        client = RawClient(proxy.ports["postgresql"])
        client.login()
        # a failed COPY, then a CopyData whose header promises 6.5 MB and that stops after 3 kB
        client.send(pg.query("COPY no_such_table FROM STDIN") + b"d" + (0x640000).to_bytes(4, "big") + b"x" * 3000)
        time.sleep(0.5)
        client.close()
        time.sleep(0.5)
        other = RawClient(proxy.ports["postgresql"], timeout=5)
        other.login()
        rows = [body for kind, body in other.query("SELECT 42") if kind == "D"]
        other.close()
    assert rows == [b"\x00\x01\x00\x00\x00\x0242"], rows
