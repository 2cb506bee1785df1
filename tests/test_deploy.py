"""deploy/: the Dockerfile parsed and its install commands run in a fresh virtualenv; the Kubernetes manifests."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.dockerfile import Instruction, Stage, parse_file

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"
BASE_CONFIG = REPO / "deploy" / "k8s" / "base" / "dbproxy.toml"
#: Where the image keeps things, and where the test puts them instead (under its temporary folder).
IMAGE_PATHS = ("/opt/dbproxy", "/wheels", "/src")


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_file(DOCKERFILE)


def test_stages_build_a_wheel_and_install_it(stages: list[Stage]) -> None:
    assert [s.base for s in stages] == ["python:3.11-slim", "python:3.11-slim"]
    builder, final = stages
    assert builder.name == "builder"
    assert any("pip wheel" in r.arguments for r in builder.of("RUN"))
    mounts = [m for r in final.of("RUN") for m in r.flags.get("mount", [])]
    assert mounts and all("from=builder" in m for m in mounts), "the final stage takes the wheels from the builder"
    assert not final.of("COPY"), "no sources in the final image"


def test_runs_as_a_user_that_is_not_root(stages: list[Stage]) -> None:
    users = stages[-1].of("USER")
    assert users, "the final stage sets USER"
    user = users[-1].arguments.split(":")[0]
    assert user not in ("root", "0")
    created = [r for r in stages[-1].of("RUN") if "useradd" in r.arguments]
    assert created and f"--uid {user}" in created[0].arguments
    assert stages[-1].instructions.index(users[-1]) > stages[-1].instructions.index(created[0])
    entry = stages[-1].instructions[-1]
    assert entry.keyword == "ENTRYPOINT" and entry.exec_form() == ["dbproxy", "run", "-c", "/etc/dbproxy/dbproxy.toml"]


def test_copies_only_what_the_repository_has(stages: list[Stage]) -> None:
    for stage in stages:
        assert not stage.of("ADD"), "COPY, never ADD (no remote URLs, no archives unpacked)"
        for copy in stage.of("COPY"):
            *sources, _destination = copy.words()
            assert sources
            for source in sources:
                assert not re.match(r"[a-z]+://", source)
                assert (REPO / source).exists(), f"line {copy.line}: COPY {source}: not in the repository"
    ignore = REPO / ".dockerignore"
    assert ignore.exists() and ".git" in ignore.read_text().split()


def test_healthcheck_asks_the_health_endpoint(stages: list[Stage]) -> None:
    checks = stages[-1].of("HEALTHCHECK")
    assert len(checks) == 1
    assert checks[0].flags.keys() >= {"interval", "timeout", "retries"}
    assert "/healthz" in " ".join(_healthcheck_command(stages))
    env = " ".join(e.arguments for e in stages[-1].of("ENV"))
    assert "DBPROXY_HEALTH_PORT=8081" in env
    assert "health_port = 8081" in BASE_CONFIG.read_text()


def _healthcheck_command(stages: list[Stage]) -> list[str]:
    arguments = stages[-1].of("HEALTHCHECK")[0].arguments
    _, _, exec_form = arguments.partition("CMD ")
    return Instruction("CMD", {}, exec_form, 0).exec_form() or []


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status", [200, 503])
def test_healthcheck_command_follows_the_status(stages: list[Stage], health_server: http.server.HTTPServer,
                                                status: int) -> None:
    _Health.status = status
    command = _healthcheck_command(stages)
    assert command[0] == "python"
    env = {**os.environ, "DBPROXY_HEALTH_PORT": str(health_server.server_address[1])}
    result = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=10)
    assert (result.returncode == 0) == (status == 200)


def loadable_config(text: str, folder: Path) -> str:
    """The container's config made checkable here: its absolute paths moved under `folder` (created there).

    The `[api]` section (health endpoints) belongs to the control API; a proxy without it refuses the section, so
    it is dropped then, after checking that it names only the keys that API defines.
    """
    from proxy.config import Config

    for path in sorted(set(re.findall(r'"(/[^"]+)"', text))):
        local = folder / path.lstrip("/")
        if path.endswith(("/secrets", "/keys")):
            local.mkdir(parents=True, exist_ok=True)
            if path.endswith("/secrets"):
                (local / "app").write_text("secret-for-check\n")
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy("/etc/ssl/certs/ca-certificates.crt", local)
        text = text.replace(f'"{path}"', f'"{local}"')
    if "api" not in Config.model_fields:
        match = re.search(r"^\[api\]\n(.*?)(?=^\[)", text, re.S | re.M)
        if match:
            keys = {line.split("=")[0].strip() for line in match.group(1).splitlines() if "=" in line}
            assert keys <= {"host", "port", "token", "token_file", "health_port"}, keys
            text = text.replace(match.group(0), "")
    return text


def _image_path(folder: Path, command: str) -> str:
    for path in IMAGE_PATHS:
        command = command.replace(path, str(folder / path.lstrip("/")))
    return command


@pytest.mark.timeout(240)
def test_the_install_commands_work_in_a_fresh_virtualenv(stages: list[Stage], tmp_path: Path) -> None:
    """The builder's and the final stage's RUN lines, run as written (image paths moved under tmp_path)."""
    builder, final = stages
    src = tmp_path / "src"
    src.mkdir()
    for copy in builder.of("COPY"):
        *sources, destination = copy.words()
        for source in sources:
            target = src / destination / (Path(source).name if destination.endswith("/") else "")
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(REPO / source, target)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    for run in builder.of("RUN"):
        subprocess.run(_image_path(tmp_path, run.arguments), shell=True, cwd=src, env=env, check=True, timeout=150)
    assert list((tmp_path / "wheels").glob("dbproxy-*.whl"))
    installs = [r for r in final.of("RUN") if not r.arguments.startswith("useradd")]
    assert len(installs) == 1 and "venv" in installs[0].arguments
    subprocess.run(_image_path(tmp_path, installs[0].arguments), shell=True, cwd=tmp_path, env=env, check=True,
                   timeout=150)
    venv = tmp_path / "opt" / "dbproxy"
    config = tmp_path / "dbproxy.toml"
    config.write_text(loadable_config(BASE_CONFIG.read_text(), tmp_path / "mounted"))
    where = subprocess.run([venv / "bin" / "python", "-c", "import proxy; print(proxy.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(venv)), where.stdout  # the installed copy, not the checkout
    check = subprocess.run([venv / "bin" / "dbproxy", "run", "--check", "-c", config], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == f"{config}: OK"
