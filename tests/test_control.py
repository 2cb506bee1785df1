"""The control socket and `dbproxy instance readmit`: a fenced instance is re-admitted in every worker; an unknown
instance, one that is not fenced, and a proxy that is not running each give an error and exit status 1."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.servers import PostgresInstance
from proxy import channel
from proxy.control import ask_control, control_socket_path
from replicated import cluster_config, monitor_secret, postgres_pair
from support import ProxyProcess, write_config


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[tuple[PostgresInstance, PostgresInstance]]:
    with postgres_pair(tmp_path, "") as instances:
        yield instances


def _dbproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=30)


def test_readmit_a_fenced_instance_through_the_control_socket(
    tmp_path: Path, pair: tuple[PostgresInstance, PostgresInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, standby = pair
    folder = tmp_path / "proxy"
    folder.mkdir()
    sections = cluster_config(primary, standby, login_timeout=None, names=True, roles=False, monitor_interval=0.2,
                              monitor_user=monitor_secret(monkeypatch, primary))
    sections["server"].update(workers=2, pid_file=str(folder / "dbproxy.pid"))
    sections["mysql"] = {"enabled": False}
    config = write_config(folder, sections)
    assert "no running dbproxy answers" in _dbproxy("instance", "readmit", "one", "-c", str(config)).stderr
    proxy = ProxyProcess(config, folder / "proxy.log")
    proxy.start()
    try:
        socket_path = control_socket_path(folder / "dbproxy.pid")
        mode = socket_path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
        assert ask_control(socket_path, {"kind": "nonsense"}, 5)["error"] == "unknown"

        proxy.wait_for_log(rf"instance .*:{primary.port} is now writer")
        not_fenced = _dbproxy("instance", "readmit", "one", "-c", str(config))
        assert not_fenced.returncode == 1 and "instance one is not fenced" in not_fenced.stderr, not_fenced.stderr
        unknown = _dbproxy("instance", "readmit", "three", "-c", str(config))
        assert unknown.returncode == 1 and "no instance 'three'" in unknown.stderr, unknown.stderr

        standby.promote()  # two writers: the one on the newer timeline wins, the old primary is fenced
        deadline = time.monotonic() + 10
        while proxy.log().count(f"instance 127.0.0.1:{primary.port} is fenced") < 2:
            assert time.monotonic() < deadline, proxy.log()[-3000:]
            time.sleep(0.05)
        done = _dbproxy("instance", "readmit", "one", "-c", str(config))
        assert done.returncode == 0, done.stderr
        assert "instance one re-admitted (2 of 2 workers had fenced it)" in done.stdout, done.stdout
        assert proxy.log().count(f"instance 127.0.0.1:{primary.port} is re-admitted") == 2
        again = _dbproxy("instance", "readmit", f"{primary.host}:{primary.port}", "-c", str(config))
        assert again.returncode == 1 and "is not fenced" in again.stderr, again.stderr
    finally:
        proxy.stop()
    assert not socket_path.exists()  # removed at exit
    with pytest.raises(channel.ChannelError):
        ask_control(socket_path, {"kind": "readmit", "instance": "one"}, 2)
