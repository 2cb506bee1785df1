"""Login tokens for tests: a Kubernetes-style issuer (its JWKS served over HTTP), good and bad tokens, the CLI."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from leakcheck import register_secret
from support import ProxyProcess, write_config

K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"
K8S_AUDIENCE = "dbproxy"
JWKS_PATH = "/openid/v1/jwks"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Issuer:
    """A service-account token issuer like a Kubernetes cluster's: an RSA key (RS256) published by key id."""

    def __init__(self, kid: str | None = None) -> None:
        self.kid = kid or uuid.uuid4().hex[:16]
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict[str, Any]:
        public: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {**public, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, claims: dict[str, Any]) -> str:
        token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})
        register_secret(token)
        return token

    def service_account_token(self, namespace: str, account: str, ttl: float = 600.0, **changes: Any) -> str:
        """A projected service-account token of a pod in `namespace` running as `account`; `changes` replace
        claims (None removes one)."""
        return self.sign(service_account_claims(namespace, account, ttl, **changes))


def service_account_claims(namespace: str, account: str, ttl: float = 600.0, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "aud": [K8S_AUDIENCE], "exp": now + int(ttl), "iat": now, "nbf": now, "iss": K8S_ISSUER,
        "jti": str(uuid.uuid4()), "sub": f"system:serviceaccount:{namespace}:{account}",
        "kubernetes.io": {
            "namespace": namespace,
            "pod": {"name": f"{account}-7d9f8-x2x4q", "uid": str(uuid.uuid4())},
            "serviceaccount": {"name": account, "uid": str(uuid.uuid4())},
        },
    }
    claims.update(changes)
    return {key: value for key, value in claims.items() if value is not None}


def unsigned_token(claims: dict[str, Any], kid: str) -> str:
    """`alg: none`: no signature at all."""
    header = {"alg": "none", "typ": "JWT", "kid": kid}
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


def hmac_with_public_key(issuer: Issuer, claims: dict[str, Any]) -> str:
    """HS256 with the issuer's public key (PEM) as the HMAC secret: the algorithm-confusion attack."""
    header = {"alg": "HS256", "typ": "JWT", "kid": issuer.kid}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(issuer.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def tampered(token: str, **changes: Any) -> str:
    """`token` with claims of its payload changed and its signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(_unb64(payload))
    claims.update(changes)
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"


def write_projected_token(folder: Path, token: str) -> Path:
    """The token where the kubelet would mount it for the pod (a projected volume)."""
    path = folder / "var/run/secrets/tokens/dbproxy"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token)
    return path


class JwksServer:
    """An aiohttp server on 127.0.0.1 (in its own thread) serving the issuers' JWKS document, like a cluster's
    service-account issuer discovery endpoint."""

    def __init__(self, issuers: list[Issuer]) -> None:
        self.issuers = issuers
        self.port = 0
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{JWKS_PATH}"

    async def _jwks(self, _request: web.Request) -> web.Response:
        self.requests += 1
        return web.json_response({"keys": [issuer.jwk() for issuer in self.issuers]})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get(JWKS_PATH, self._jwks)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def __enter__(self) -> JwksServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def dbproxy(*args: str) -> str:
    """`python -m proxy ARGS` (the `dbproxy` command); its standard output."""
    done = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert done.returncode == 0, done.stderr
    return done.stdout


def init_keys(folder: Path) -> Path:
    """A signing key made by `dbproxy keys init`."""
    dbproxy("keys", "init", "--dir", str(folder))
    return folder


@functools.cache
def generate_token(keys: Path, user: str, endpoint: str, ttl: str = "15m") -> str:
    """`dbproxy token generate`: what `aws rds generate-db-auth-token` is to RDS Proxy (one per test run)."""
    return dbproxy("token", "generate", "--user", user, "--endpoint", endpoint, "--keys", str(keys),
                   "--ttl", ttl).strip()


def tokens_section(keys: Path, jwks_url: str, user: str, accounts: list[tuple[str, str]]) -> str:
    """The [tokens] TOML: keys from `dbproxy keys init` and the issuer's JWKS; the issuer's service accounts
    `accounts` (namespace, name) may log in as `user`, the proxy's own tokens as their subject."""
    rules = "".join(f"""
[[tokens.policy]]
subject = "system:serviceaccount:{namespace}:{account}"
claims = {{ "kubernetes.io/namespace" = "{namespace}", "kubernetes.io/serviceaccount/name" = "{account}" }}
users = ["{user}"]
""" for namespace, account in accounts)
    return f"""
[tokens]
keys_dir = "{keys}"
jwks_url = "{jwks_url}"
issuers = ["dbproxy", "{K8S_ISSUER}"]
audiences = ["{K8S_AUDIENCE}"]
leeway = 1.0
jwks_refresh_interval = 0.5
{rules}
[[tokens.policy]]
subject = "*"
claims = {{ "iss" = "dbproxy" }}
users = ["{{sub}}"]
"""


def bad_tokens(issuer: Issuer, namespace: str, account: str) -> dict[str, str]:
    """Tokens the proxy must refuse, each one change away from a token it accepts."""
    now = int(time.time())
    good = service_account_claims(namespace, account)
    impostor = Issuer(issuer.kid)  # another key under the same key id
    return {
        "expired": issuer.service_account_token(namespace, account, iat=now - 600, nbf=now - 600, exp=now - 60),
        "not yet valid": issuer.service_account_token(namespace, account, nbf=now + 300, exp=now + 600),
        "wrong audience": issuer.service_account_token(namespace, account, aud=["someone-else"]),
        "wrong issuer": issuer.service_account_token(namespace, account, iss="https://evil.example"),
        "wrong key": impostor.service_account_token(namespace, account),
        "alg none": unsigned_token(good, issuer.kid),
        "HS256 with the public key": hmac_with_public_key(issuer, good),
        "tampered": tampered(issuer.service_account_token(namespace, "intruder"),
                             sub=good["sub"], **{"kubernetes.io": good["kubernetes.io"]}),
    }


@contextmanager
def token_proxy(folder: Path, sections: dict[str, dict[str, Any]], tokens_toml: str) -> Iterator[ProxyProcess]:
    """A proxy subprocess with `sections` (see support.write_config) and the [tokens] TOML."""
    folder.mkdir(parents=True, exist_ok=True)
    path = write_config(folder, sections)
    path.write_text(path.read_text() + tokens_toml)
    proxy = ProxyProcess(path, folder / "proxy.log")
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def reload_proxy(proxy: ProxyProcess, tokens_toml: str) -> None:
    """Replace the [tokens] section of the proxy's file and SIGHUP it; returns once it serves the new file."""
    text = proxy.config.read_text()
    proxy.config.write_text(text[:text.index("\n[tokens]\n")] + tokens_toml)
    before = proxy.log().count("reload: serving")
    os.kill(proxy.pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while proxy.log().count("reload: serving") == before:
        assert time.monotonic() < deadline, proxy.log()[-3000:]
        assert "reload refused" not in proxy.log(), proxy.log()[-3000:]
        time.sleep(0.05)
