"""System calls per transaction of a middleman: `strace -c -f` on all its processes for a fixed pgbench count."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from loadtest.machine import PGBENCH
from loadtest.runner import client_env, first_error, run_bounded
from loadtest.targets import Endpoint

STRACE = "strace"
INSTALL_HINT = "n/a (strace not installed: apt-get install strace)"
#: The calls grouped per column: what a middleman does per message (receive, send, wait for readiness).
READS = ("read", "recvfrom", "recvmsg", "readv")
WRITES = ("write", "sendto", "writev", "sendmsg")
WAITS = ("epoll_wait", "epoll_pwait", "epoll_pwait2")
COLUMNS = (("read/recvfrom", READS), ("write/sendto/writev", WRITES), ("epoll_wait", WAITS))
ATTACH_TIMEOUT = 10.0
PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
#: A row of ``strace -c``: % time, seconds, usecs/call, calls, [errors], syscall.
ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


@dataclass(frozen=True)
class SyscallRun:
    """``pgbench -S -M simple -c CLIENTS -t TRANSACTIONS/CLIENTS`` (a fixed count, not a duration)."""

    clients: int
    transactions: int  # in total, over all clients

    @property
    def per_client(self) -> int:
        return max(1, self.transactions // self.clients)

    def label(self) -> str:
        return f"pgbench -S -M simple -c {self.clients} -t {self.per_client}"


@dataclass
class SyscallCount:
    """What one middleman's processes called while pgbench ran its fixed number of transactions."""

    target: str
    transactions: int = 0
    processes: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    error: str = ""

    def per_transaction(self, names: tuple[str, ...]) -> float:
        return sum(self.calls.get(name, 0) for name in names) / self.transactions if self.transactions else 0.0

    def others_per_transaction(self) -> float:
        grouped = {name for _, names in COLUMNS for name in names}
        others = sum(count for name, count in self.calls.items() if name not in grouped)
        return others / self.transactions if self.transactions else 0.0

    def total_per_transaction(self) -> float:
        return sum(self.calls.values()) / self.transactions if self.transactions else 0.0


def available() -> bool:
    return shutil.which(STRACE) is not None


def parse_summary(text: str) -> dict[str, int]:
    """Calls by system call name from ``strace -c`` output (the ``total`` row left out)."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match and match.group(2) != "total":
            calls[match.group(2)] = calls.get(match.group(2), 0) + int(match.group(1))
    return calls


def _pids(process: psutil.Process) -> list[int]:
    try:
        return [process.pid, *(child.pid for child in process.children(recursive=True))]
    except psutil.Error:
        return [process.pid]


def _wait_attached(log: Path, count: int, tracer: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while time.monotonic() < deadline and tracer.poll() is None:
        with contextlib.suppress(OSError):
            if log.read_text(errors="replace").count(" attached") >= count:
                return True
        time.sleep(0.05)
    return False


def _pgbench(endpoint: Endpoint, spec: SyscallRun) -> tuple[int, str]:
    cmd = [PGBENCH, "-n", "-S", "-M", "simple", "-c", str(spec.clients), "-j", str(min(2, spec.clients)),
           "-t", str(spec.per_client), "-h", endpoint.host, "-p", str(endpoint.port), "-U", endpoint.user,
           endpoint.database]
    done = run_bounded(cmd, timeout=600, env=client_env(endpoint.password))
    processed = PROCESSED.search(done.stdout)
    if done.returncode != 0 or processed is None:
        return 0, first_error(done.stderr + done.stdout) or f"pgbench exited with {done.returncode}"
    return int(processed.group(1)), ""


def count(endpoint: Endpoint, spec: SyscallRun, workdir: Path) -> SyscallCount:
    """Attach ``strace -c -f`` to every process of the endpoint's middleman, run pgbench, stop strace (SIGINT)."""
    found = SyscallCount(endpoint.target)
    if not available():
        found.error = INSTALL_HINT
        return found
    if endpoint.unavailable or endpoint.process is None:
        found.error = endpoint.unavailable or "no middleman process"
        return found
    pids = _pids(endpoint.process)
    found.processes = len(pids)
    workdir.mkdir(parents=True, exist_ok=True)
    summary, log = workdir / f"strace-{endpoint.target}.txt", workdir / f"strace-{endpoint.target}.log"
    cmd = [STRACE, "-c", "-f", "-o", str(summary), *(arg for pid in pids for arg in ("-p", str(pid)))]
    with log.open("wb") as err:
        tracer = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        if not _wait_attached(log, len(pids), tracer):
            found.error = f"strace did not attach: {first_error(log.read_text(errors='replace'))}"
            return found
        found.transactions, found.error = _pgbench(endpoint, spec)
    finally:
        _stop(tracer)
    with contextlib.suppress(OSError):
        found.calls = parse_summary(summary.read_text(errors="replace"))
    if not found.calls and not found.error:
        found.error = "strace reported no system calls"
    return found


def _stop(tracer: subprocess.Popen[bytes]) -> None:
    if tracer.poll() is None:
        tracer.send_signal(signal.SIGINT)  # strace detaches and writes its summary
    try:
        tracer.wait(30)
    except subprocess.TimeoutExpired:
        tracer.kill()
        tracer.wait(10)
