"""Start-up errors a user meets first: one clear line and a non-zero exit, and `dbproxy run --check` catching them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.servers import free_port
from proxy.tls import self_signed_pair
from support import write_config

START_LIMIT = 20.0  # seconds; a failing start must end well before this (it used to hang forever)
SOURCE = str(Path(__file__).resolve().parents[1])  # run this tree's code whatever the working folder


def proxy_env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp), PYTHONPATH=SOURCE)


def proxy_command(folder: Path, *args: str, timeout: float = START_LIMIT) -> subprocess.CompletedProcess[str]:
    """`python -m proxy ARGS` with its temporary folder inside `folder/tmp`, so leftovers can be seen."""
    tmp = folder / "tmp"
    tmp.mkdir(exist_ok=True)
    try:
        return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                              env=proxy_env(tmp),
                              timeout=timeout, cwd=folder)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"dbproxy {' '.join(args)} still running after {timeout} s; stderr:\n{exc.stderr!r}")


def base_sections(**server: Any) -> dict[str, dict[str, Any]]:
    return {
        "server": {"log_level": "info", **server},
        "secrets": {"file": "secrets.toml"},
        "postgresql": {"port": free_port(), "backend_port": free_port()},
        "mysql": {"enabled": False},
    }


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Non-zero exit, no traceback, and exactly one `dbproxy:` line on stderr naming each of `expected`."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dbproxy:")]
    assert len(lines) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == lines[0], result.stderr
    for text in expected:
        assert text in lines[0], result.stderr
    return lines[0]


def leftover_run_folders(folder: Path) -> list[Path]:
    return sorted((folder / "tmp").glob("dbproxy-*"))


@pytest.mark.parametrize("workers", [None, 1, 2], ids=["default-workers", "one-worker", "two-workers"])
def test_missing_secrets_file_ends_start_at_once_with_one_line(tmp_path: Path, workers: int | None) -> None:
    sections = base_sections(**({} if workers is None else {"workers": workers}))
    sections["secrets"]["file"] = "missing-secrets.toml"
    config = write_config(tmp_path, sections)
    started = time.monotonic()
    result = proxy_command(tmp_path, "run", "-c", str(config))
    assert time.monotonic() - started < 10
    assert_one_clear_line(result, "missing-secrets.toml")
    assert result.stderr.strip().count("\n") == 0, result.stderr  # nothing else: no worker started
    assert leftover_run_folders(tmp_path) == []


@pytest.mark.parametrize("workers", [None, 1, 2], ids=["default-workers", "one-worker", "two-workers"])
def test_port_taken_ends_start_at_once_with_one_line(tmp_path: Path, workers: int | None) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        sections = base_sections(**({} if workers is None else {"workers": workers}))
        sections["postgresql"]["port"] = port
        config = write_config(tmp_path, sections)
        started = time.monotonic()
        result = proxy_command(tmp_path, "run", "-c", str(config))
    assert time.monotonic() - started < 10
    line = assert_one_clear_line(result, str(port))
    assert "in use" in line
    assert leftover_run_folders(tmp_path) == []


def test_clean_stop_with_workers_leaves_no_run_folder(tmp_path: Path) -> None:
    config = write_config(tmp_path, base_sections(workers=2))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=proxy_env(tmp))
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("dbproxy ready:")
        assert len(leftover_run_folders(tmp_path)) == 1
    finally:
        process.terminate()
        process.wait(15)
    assert process.returncode == 0
    assert leftover_run_folders(tmp_path) == []


# --- dbproxy run --check ---


def check(tmp_path: Path, sections: dict[str, dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    return proxy_command(tmp_path, "run", "-c", str(write_config(tmp_path, sections)), "--check")


def test_check_passes_a_good_config_and_names_it(tmp_path: Path) -> None:
    result = check(tmp_path, base_sections())
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "proxy.toml") in result.stdout
    assert "OK" in result.stdout


def test_check_without_config_names_the_defaults_it_checked(tmp_path: Path) -> None:
    result = proxy_command(tmp_path, "run", "--check")
    assert result.returncode == 0, result.stderr
    assert "built-in defaults" in result.stdout
    assert "None" not in result.stdout


def test_check_reports_a_missing_secrets_file(tmp_path: Path) -> None:
    sections = base_sections()
    sections["secrets"]["file"] = "nowhere.toml"
    assert_one_clear_line(check(tmp_path, sections), "nowhere.toml")


def test_check_reports_a_secrets_path_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "secrets.d").mkdir()
    sections = base_sections()
    sections["secrets"]["file"] = "secrets.d"
    assert_one_clear_line(check(tmp_path, sections), "secrets.d", "cannot read")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_check_reports_an_unreadable_secrets_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, base_sections())
    (tmp_path / "secrets.toml").chmod(0)
    assert_one_clear_line(proxy_command(tmp_path, "run", "-c", str(config), "--check"), "secrets.toml", "cannot read")


def test_check_reports_a_secrets_file_that_is_not_text(tmp_path: Path) -> None:
    config = write_config(tmp_path, base_sections())
    (tmp_path / "secrets.toml").write_bytes(b'[users]\napp = "\xff\xfe"\n')
    assert_one_clear_line(proxy_command(tmp_path, "run", "-c", str(config), "--check"), "secrets.toml")


def test_check_reports_a_password_that_is_not_a_string(tmp_path: Path) -> None:
    config = write_config(tmp_path, base_sections())
    (tmp_path / "secrets.toml").write_text("[users]\napp = 12345\n")
    line = assert_one_clear_line(proxy_command(tmp_path, "run", "-c", str(config), "--check"), "'app'", "string")
    assert "12345" not in line  # the bad value may be a real password: never echoed


def test_check_reports_a_users_entry_that_is_not_a_table(tmp_path: Path) -> None:
    config = write_config(tmp_path, base_sections())
    (tmp_path / "secrets.toml").write_text('users = "app:secret"\n')
    line = assert_one_clear_line(proxy_command(tmp_path, "run", "-c", str(config), "--check"), "[users]")
    assert "secret" not in line.replace("secrets", "")


def test_check_reports_an_invalid_log_level(tmp_path: Path) -> None:
    assert_one_clear_line(check(tmp_path, base_sections(log_level="verbose")), "log_level")


def test_run_refuses_an_invalid_log_level_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, base_sections(log_level="verbose", workers=1))
    assert_one_clear_line(proxy_command(tmp_path, "run", "-c", str(config)), "log_level")


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    assert check(tmp_path, base_sections(log_level="WARNING")).returncode == 0


def test_check_reports_a_missing_certificate(tmp_path: Path) -> None:
    sections = base_sections()
    sections["tls"] = {"cert_file": "nocert.pem", "key_file": "nokey.pem"}
    assert_one_clear_line(check(tmp_path, sections), "nocert.pem")


def test_check_reports_a_certificate_that_does_not_load(tmp_path: Path) -> None:
    cert, key = self_signed_pair()
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_bytes(key)
    sections = base_sections()
    sections["tls"] = {"cert_file": "cert.pem", "key_file": "key.pem"}
    assert_one_clear_line(check(tmp_path, sections), "cert.pem")
    (tmp_path / "cert.pem").write_bytes(cert)
    assert check(tmp_path, sections).returncode == 0


def test_check_reports_a_key_without_a_certificate(tmp_path: Path) -> None:
    _, key = self_signed_pair()
    (tmp_path / "key.pem").write_bytes(key)
    sections = base_sections()
    sections["tls"] = {"key_file": "key.pem"}
    assert_one_clear_line(check(tmp_path, sections), "cert_file")


def test_check_reports_a_missing_backend_ca_file(tmp_path: Path) -> None:
    sections = base_sections()
    sections["postgresql"].update(backend_tls="verify-full", backend_ca_file="no-ca.pem")
    assert_one_clear_line(check(tmp_path, sections), "no-ca.pem")


def test_run_refuses_an_unreadable_certificate_with_one_line(tmp_path: Path) -> None:
    sections = base_sections()
    sections["tls"] = {"cert_file": "nocert.pem", "key_file": "nokey.pem"}
    assert_one_clear_line(proxy_command(tmp_path, "run", "-c", str(write_config(tmp_path, sections))), "nocert.pem")
    assert leftover_run_folders(tmp_path) == []


# --- the example configuration documents every setting ---


def test_example_config_shows_every_setting_with_its_default() -> None:
    """Each setting of the schema appears in config/dbproxy.toml (commented out when it has no default value),
    and the value shown is the real default unless its comment says it is not."""
    import re

    from pydantic import BaseModel

    from proxy.config import Config

    example = Path(SOURCE, "config", "dbproxy.toml").read_text()
    sections: dict[str, dict[str, str]] = {}
    current = ""
    for line in example.splitlines():
        header = re.match(r"^\[([\w.]+)\]", line)
        if header:
            current = header.group(1)
            continue
        entry = re.match(r"^#? ?(\w+) = (.*?)\s*(?:#\s*(.*))?$", line)
        if entry and current:
            sections.setdefault(current, {})[entry.group(1)] = line

    def walk(model: type[BaseModel], where: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{where}.{name}" if where else name)
                continue
            line = sections.get(where, {}).get(name)
            assert line is not None, f"[{where}] {name} is not in config/dbproxy.toml"
            default = field.get_default(call_default_factory=True)
            if default is None:
                assert line.startswith("#") or "default" in line, line
                continue
            shown = tomllib_value(line.split("=", 1)[1])
            if shown != (default.value if hasattr(default, "value") else default):
                assert "default" in line, f"{line!r}: the default is {default!r}"

    walk(Config, "")


def tomllib_value(text: str) -> object:
    import tomllib

    return tomllib.loads("value = " + text.split("  #")[0].split(" #")[0].strip())["value"]


@pytest.mark.parametrize("mode", ["check", "run"])
def test_a_listening_host_that_does_not_resolve_is_one_line(tmp_path: Path, mode: str) -> None:
    config = write_config(tmp_path, base_sections(host="no-such-host.invalid", workers=1))
    result = proxy_command(tmp_path, "run", "-c", str(config), *(["--check"] if mode == "check" else []))
    assert_one_clear_line(result, "no-such-host.invalid")
