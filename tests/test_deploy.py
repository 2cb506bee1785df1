"""deploy/: the Dockerfile parsed and its install commands run in a fresh virtualenv; the Kubernetes manifests."""

from __future__ import annotations

import base64
import fnmatch
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema
import kubernetes_validate
import pytest
import yaml
from token_support import Issuer, JwksServer, init_keys, token_proxy

from devtools import kustomize
from devtools.dockerfile import Instruction, Stage, parse_file
from devtools.servers import PostgresInstance, free_port

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"
K8S = REPO / "deploy" / "k8s"
BASE_CONFIG = K8S / "base" / "dbproxy.toml"
#: Where the image keeps things, and where the test puts them instead (under its temporary folder).
IMAGE_PATHS = ("/opt/dbproxy", "/wheels", "/src")


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_file(DOCKERFILE)


def test_stages_build_a_wheel_and_install_it(stages: list[Stage]) -> None:
    # the builder has a C compiler (the hot path is compiled); the image the proxy runs in has none
    assert [s.base for s in stages] == ["python:3.11", "python:3.11-slim"]
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


def loadable_config(text: str, folder: Path, mounts: dict[str, dict[str, str]]) -> str:
    """The container's config made checkable here: each absolute path it names must lie in one of `mounts` (mount
    path -> file name -> content), which is written under `folder`, and the path moved there."""
    for path in sorted(set(re.findall(r'"(/[^"]+)"', text))):
        mount = next((m for m in mounts if path == m or path.startswith(m + "/")), None)
        assert mount is not None, f"{path} is in no volume the container mounts"
        local = folder / mount.lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        for name, content in mounts[mount].items():
            (local / name).write_text(content)
        text = text.replace(f'"{path}"', f'"{folder / path.lstrip("/")}"')
    return text


def _secret_files(secret: dict[str, Any]) -> dict[str, str]:
    files = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    return {**files, **secret.get("stringData", {})}


def _mounts(objects: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, str]]:
    """What each of the container's volume mounts holds, from the rendered ConfigMaps and Secrets."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts: dict[str, dict[str, str]] = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "secret" in volume:
            (secret,) = _find(objects, "Secret", volume["secret"]["secretName"])
            mounts[mount["mountPath"]] = _secret_files(secret)
        elif "configMap" in volume and volume["configMap"]["name"] in BUILTIN_CONFIGMAPS:
            mounts[mount["mountPath"]] = {"ca.crt": Path("/etc/ssl/certs/ca-certificates.crt").read_text()}
        elif "configMap" in volume:
            (configmap,) = _find(objects, "ConfigMap", volume["configMap"]["name"])
            mounts[mount["mountPath"]] = configmap["data"]
        else:
            mounts[mount["mountPath"]] = {}
    return mounts


def _base_mounts() -> dict[str, dict[str, str]]:
    (secret,) = yaml.safe_load_all((K8S / "base" / "secret.yaml").read_text())
    return {"/etc/dbproxy/secrets": _secret_files(secret)}


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
    env["DBPROXY_COMPILE"] = "0"  # the compiled build is what the suite's own install makes and uses; not again here
    for run in builder.of("RUN"):
        subprocess.run(_image_path(tmp_path, run.arguments), shell=True, cwd=src, env=env, check=True, timeout=150)
    assert list((tmp_path / "wheels").glob("dbproxy-*.whl"))
    installs = [r for r in final.of("RUN") if not r.arguments.startswith("useradd")]
    assert len(installs) == 1 and "venv" in installs[0].arguments
    subprocess.run(_image_path(tmp_path, installs[0].arguments), shell=True, cwd=tmp_path, env=env, check=True,
                   timeout=150)
    venv = tmp_path / "opt" / "dbproxy"
    config = tmp_path / "dbproxy.toml"
    config.write_text(loadable_config(BASE_CONFIG.read_text(), tmp_path / "mounted", _base_mounts()))
    where = subprocess.run([venv / "bin" / "python", "-c", "import proxy; print(proxy.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(venv)), where.stdout  # the installed copy, not the checkout
    check = subprocess.run([venv / "bin" / "dbproxy", "run", "--check", "-c", config], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == f"{config}: OK"
    _serve_and_health_check(stages, venv, config, env, tmp_path)


def _serve_and_health_check(stages: list[Stage], venv: Path, config: Path, env: dict[str, str], folder: Path) -> None:
    """The installed proxy serves (ports moved to free ones); the image's HEALTHCHECK passes against it, /readyz
    says 503 (no database behind it), and SIGTERM stops it."""
    health = free_port()
    text = config.read_text()
    for old, new in (("port = 6432", f"port = {free_port()}"), ("health_port = 8081", f"health_port = {health}"),
                     ("metrics_port = 9090", f"metrics_port = {free_port()}"), ("workers = 2", "workers = 1")):
        assert old in text
        text = text.replace(old, new)
    config.write_text(text)
    log = (folder / "proxy.log").open("w")
    proxy = subprocess.Popen([venv / "bin" / "dbproxy", "run", "-c", config], env=env, cwd=folder,
                             stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proxy.stdout is not None
        ready = proxy.stdout.readline()
        assert ready.startswith("dbproxy ready"), (folder / "proxy.log").read_text()
        command = _healthcheck_command(stages)
        healthy = subprocess.run([venv / "bin" / command[0], *command[1:]], capture_output=True, timeout=10,
                                 env={**env, "DBPROXY_HEALTH_PORT": str(health)})
        assert healthy.returncode == 0, healthy.stderr
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=5)
        assert refused.value.code == 503
    finally:
        proxy.terminate()
        assert proxy.wait(30) == 0
        log.close()


# --- Kubernetes manifests -------------------------------------------------------------------------------------

OVERLAYS = ("sidecar", "fleet")
#: The oldest Kubernetes the manifests are meant for (native sidecars: init containers with restartPolicy), and
#: the newest schema kubernetes-validate has.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
#: ConfigMaps Kubernetes itself puts in every namespace.
BUILTIN_CONFIGMAPS = {"kube-root-ca.crt"}
#: The Prometheus Operator's ServiceMonitor is a custom resource: no Kubernetes schema; the fields used here.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                "namespaceSelector": {"type": "object"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                                   "scheme": {"enum": ["http", "https"]}},
                }},
            },
        },
    },
}


def _validate(obj: dict[str, Any]) -> None:
    if obj["kind"] == "ServiceMonitor":
        jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_validates(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert documents
    for document in documents:
        _validate(document)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize.build(K8S / "overlays" / request.param)


def _find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def _config(objects: list[dict[str, Any]]) -> str:
    (configmap,) = _find(objects, "ConfigMap", "dbproxy-config")
    text: str = configmap["data"]["dbproxy.toml"]
    return text


def _pod(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (deployment,) = _find(objects, "Deployment", name)
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def _proxy_container(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    for deployment in _find(objects, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            if container["name"] == "dbproxy":
                return spec, container
    raise AssertionError("no dbproxy container")


def test_overlay_renders_and_validates(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "ClusterRoleBinding"} == {
        {"sidecar": "shop", "fleet": "databases"}[name]}
    for obj in objects:
        _validate(obj)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for deployment in _find(objects, "Deployment"):
        template = deployment["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                ref = volume["configMap"]["name"]
                assert ref in BUILTIN_CONFIGMAPS or ("ConfigMap", ref) in names, ref
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in names
        account = template["spec"].get("serviceAccountName")
        assert account is None or ("ServiceAccount", account) in names
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            assert not any("subPath" in m for m in container.get("volumeMounts", [])), "subPath mounts never update"
            assert container["image"].count(":") == 1


def test_proxy_container_probes_and_mounts(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = rendered
    pod, container = _proxy_container(objects)
    config = tomllib.loads(_config(objects))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == config["api"]["health_port"]
    assert ports["metrics"] == config["server"]["metrics_port"]
    assert {"name": "DBPROXY_HEALTH_PORT", "value": str(ports["health"])} in container["env"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert config["api"]["host"] == "0.0.0.0", "the kubelet probes the Pod's address"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert container["command"][-1].startswith("/etc/dbproxy/config/")
    assert mounts["/etc/dbproxy/config"] == "config"
    assert config["secrets"]["dir"] == "/etc/dbproxy/secrets" and mounts["/etc/dbproxy/secrets"] == "secrets"
    assert "/tmp" in mounts and container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["runAsUser"] == 10001  # the image's user
    group = container["securityContext"]["runAsGroup"]
    assert pod["securityContext"]["fsGroup"] == group, "Secret files are root's: the proxy reads them as a group"
    for volume in pod["volumes"]:
        if "secret" in volume:
            assert volume["secret"].get("defaultMode", 0o644) & 0o040, f"{volume['name']}: not group-readable"
    grace = config["server"]["shutdown_grace"]
    if name == "sidecar":
        assert container["restartPolicy"] == "Always", "a native sidecar: up before the app, down after it"
        # the Pod's readiness is the application's: the sidecar only says it runs
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        app = pod["containers"][0]
        assert {"name": "PGHOST", "value": "127.0.0.1"} in app["env"]
        assert {"name": "PGPORT", "value": str(config["postgresql"]["port"])} in app["env"]
        assert config["server"]["host"] == "127.0.0.1"
    else:
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        sleep = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep"
        assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + grace
        endpoints = {e["port"]: n for n, e in config["postgresql"]["endpoints"].items()}
        assert ports["pg-rw"] in endpoints and endpoints[ports["pg-rw"]] == "rw"
        assert ports["pg-ro"] in endpoints and endpoints[ports["pg-ro"]] == "ro"


def test_fleet_services_autoscaling_and_monitoring() -> None:
    objects = kustomize.build(K8S / "overlays" / "fleet")
    _, container = _proxy_container(objects)
    (deployment,) = _find(objects, "Deployment", "dbproxy")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container["ports"]}
    services = {s["metadata"]["name"]: s for s in _find(objects, "Service")}
    assert {"dbproxy-rw", "dbproxy-ro", "dbproxy-metrics"} <= services.keys()
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
        assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])
    (hpa,) = _find(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "dbproxy" and hpa["spec"]["minReplicas"] >= 2
    (pdb,) = _find(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a node drain can always evict one"
    (monitor,) = _find(objects, "ServiceMonitor")
    scraped = [s for s in services.values()
               if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in scraped] == ["dbproxy-metrics"]
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in scraped[0]["spec"]["ports"]}
    (credentials,) = _find(objects, "Secret", "dbproxy-credentials")
    config = tomllib.loads(_config(objects))
    monitor_user = config["postgresql"]["clusters"]["main"]["monitor_user"]
    assert {"app", monitor_user} <= credentials["stringData"].keys()
    assert _find(objects, "Secret", "dbproxy-token-keys")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["token-keys"] == config["tokens"]["keys_dir"]


def test_projected_tokens_are_what_the_proxy_accepts(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """Each projected token's audience, issuer and subject pass the proxy's [tokens] settings and policy."""
    _, objects = rendered
    config = tomllib.loads(_config(objects))
    tokens = config["tokens"]
    assert "https://kubernetes.default.svc.cluster.local" in tokens["issuers"]
    assert tokens["jwks_url"] == "https://kubernetes.default.svc/openid/v1/jwks"
    _, container = _proxy_container(objects)
    ca_mount = Path(tokens["jwks_ca_file"]).parent
    assert any(m["mountPath"] == str(ca_mount) and m["name"] == "cluster-ca" for m in container["volumeMounts"])
    found = 0
    for deployment in _find(objects, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            for source in volume.get("projected", {}).get("sources", []):
                token = source.get("serviceAccountToken")
                if not token:
                    continue
                found += 1
                assert token["audience"] in tokens["audiences"]
                assert token["expirationSeconds"] <= tokens["max_lifetime"]
                subject = f"system:serviceaccount:{deployment['metadata']['namespace']}:{spec['serviceAccountName']}"
                rules = [r for r in tokens["policy"] if fnmatch.fnmatchcase(subject, r["subject"])]
                assert any("app" in r.get("users", []) for r in rules), subject
    assert found == 1
    assert config["postgresql"]["token_auth"] == "optional"


@pytest.mark.timeout(60)
def test_configmap_configs_are_accepted_by_the_proxy(rendered: tuple[str, list[dict[str, Any]]],
                                                     tmp_path: Path) -> None:
    from proxy.config import load_config

    _, objects = rendered
    pod, container = _proxy_container(objects)
    path = tmp_path / "dbproxy.toml"
    path.write_text(loadable_config(_config(objects), tmp_path / "mounted", _mounts(objects, pod, container)))
    config = load_config(path)
    assert str(config.server.host) in ("0.0.0.0", "127.0.0.1")
    check = subprocess.run([sys.executable, "-m", "proxy", "run", "--check", "-c", str(path)], cwd=REPO,
                           capture_output=True, text=True, timeout=50)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == f"{path}: OK"


def test_renderer_merges_and_refuses_what_it_does_not_render(tmp_path: Path) -> None:
    base = {"spec": {"containers": [{"name": "a", "image": "x:1", "env": [{"name": "A", "value": "1"}]}],
                     "volumes": [{"name": "v", "emptyDir": {}}]}}
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "B", "value": "2"}]}, {"name": "b"}]}}
    merged = kustomize.strategic_merge(base, patch)
    assert merged["spec"]["containers"][0]["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    assert [c["name"] for c in merged["spec"]["containers"]] == ["a", "b"]
    assert merged["spec"]["volumes"] == base["spec"]["volumes"]
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(kustomize.KustomizeError, match="namePrefix"):
        kustomize.build(tmp_path)


async def _login(port: int, token: str) -> str:
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", password=token, database="app",
                                 ssl="require", timeout=10)
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


def _token_client(objects: list[dict[str, Any]]) -> tuple[str, str]:
    """(namespace, service account) of the workload that mounts a projected token for the proxy."""
    for deployment in _find(objects, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        if any("projected" in v for v in spec.get("volumes", [])):
            return deployment["metadata"]["namespace"], spec["serviceAccountName"]
    raise AssertionError("no workload mounts a projected token")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_the_token_settings_accept_the_clients_projected_token(
        overlay: str, tmp_path: Path, pg_server: PostgresInstance) -> None:
    """The overlay's [tokens] section as rendered (the cluster's JWKS served here, a keys folder made here) lets
    the service account of its client workload in, and neither another account nor another namespace."""
    objects = kustomize.build(K8S / "overlays" / overlay)
    config = _config(objects)
    tokens = config[config.index("[tokens]"):]
    namespace, account = _token_client(objects)
    issuer = Issuer()
    with JwksServer([issuer]) as jwks:
        tokens = re.sub(r'^keys_dir = "[^"]*"', f'keys_dir = "{init_keys(tmp_path / "keys")}"', tokens, flags=re.M)
        tokens = re.sub(r'^jwks_url = "[^"]*"', f'jwks_url = "{jwks.url}"', tokens, flags=re.M)
        tokens = re.sub(r"^jwks_ca_file = .*\n", "", tokens, flags=re.M)  # the test's JWKS is served over http
        port = free_port()
        sections: dict[str, dict[str, Any]] = {
            "server": {"workers": 1},
            "secrets": {"file": "secrets.toml"},
            "postgresql.clusters.main": {"instances": [{"host": "127.0.0.1", "port": pg_server.port}]},
            "postgresql.endpoints.rw": {"port": port, "cluster": "main",
                                        "token_auth": tomllib.loads(config)["postgresql"]["token_auth"]},
            "mysql": {"enabled": False},
        }
        with token_proxy(tmp_path / "proxy", sections, tokens):
            assert await _login(port, issuer.service_account_token(namespace, account)) == "app"
            for other_namespace, other_account in ((namespace, "intruder"), ("elsewhere", account)):
                with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
                    await _login(port, issuer.service_account_token(other_namespace, other_account))
