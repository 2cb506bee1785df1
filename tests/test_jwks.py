"""JWKS documents over HTTP(S) from a local server: rotation, rate-limited refetch, bounds, a server that goes away."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from proxy.auth.jwks import MAX_DOCUMENT_SIZE, MAX_KEYS, JwksFile, JwksUrl, KeyRing, key_from_jwk
from proxy.auth.tokens import TokenRejected, TokenVerifier
from proxy.config import TokenSettings
from proxy.tls import self_signed_pair
from proxy.token_commands import JWKS_NAME, create_key, generate_token, retire_key

ISSUER = "https://kubernetes.default.svc.cluster.local"


class Signer:
    """A signing key and its public JWK."""

    def __init__(self, kid: str, curve: ec.EllipticCurve | None = None) -> None:
        self.kid = kid
        self.private: Any = (ec.generate_private_key(curve) if curve is not None
                             else rsa.generate_private_key(public_exponent=65537, key_size=2048))
        self.alg = {"secp256r1": "ES256", "secp384r1": "ES384"}[curve.name] if curve is not None else "RS256"

    def jwk(self, **extra: Any) -> dict[str, Any]:
        codec: Any = ECAlgorithm if self.alg.startswith("ES") else RSAAlgorithm
        return {**codec.to_jwk(self.private.public_key(), as_dict=True), "kid": self.kid, "use": "sig", **extra}

    def token(self, **claims: Any) -> bytes:
        now = int(time.time())
        body = {"iss": ISSUER, "sub": "system:serviceaccount:shop:orders", "aud": ["dbproxy"], "iat": now,
                "nbf": now, "exp": now + 600, "kubernetes.io": {"namespace": "shop",
                                                               "serviceaccount": {"name": "orders"}}, **claims}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": self.kid}).encode()


def document(*keys: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


class JwksServer:
    """An HTTP server on 127.0.0.1 (a free port) serving a JWKS document that a test changes; counts requests."""

    def __init__(self, body: bytes, context: ssl.SSLContext | None = None) -> None:
        self.body = body
        self.context = context
        self.requests = 0
        self.status = 200
        self.chunked = False  # no Content-Length
        self.hang = asyncio.Event()  # set: answer; clear: never answer
        self.hang.set()
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.context else 'http'}://127.0.0.1:{self.port}/openid/v1/jwks"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        await self.hang.wait()
        if self.status in (301, 302):
            raise web.HTTPFound("/elsewhere")
        if self.chunked:
            response = web.StreamResponse(status=self.status)
            response.enable_chunked_encoding()
            await response.prepare(request)
            for start in range(0, len(self.body), 65536):
                await response.write(self.body[start:start + 65536])
            await response.write_eof()
            return response
        return web.Response(body=self.body, status=self.status, content_type="application/json")

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/openid/v1/jwks", self.handle)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port, ssl_context=self.context)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            self.hang.set()
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture()
async def first() -> Signer:
    return Signer("sa-key-1", ec.SECP256R1())


@pytest.fixture()
async def server(first: Signer) -> AsyncIterator[JwksServer]:
    found = JwksServer(document(first.jwk()))
    await found.start()
    yield found
    await found.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def verifier_for(source: Any, clock: Clock, **settings: Any) -> tuple[TokenVerifier, KeyRing]:
    chosen = TokenSettings(issuers=[ISSUER], audiences=["dbproxy"], **settings)
    ring = KeyRing([source], cache_ttl=chosen.jwks_cache_ttl, refresh_interval=chosen.jwks_refresh_interval,
                   clock=clock)
    return TokenVerifier(ring, chosen), ring


async def refused(verifier: TokenVerifier, token: bytes, user: str = "system:serviceaccount:shop:orders") -> str:
    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(token, user=user, endpoint="main")
    return caught.value.reason


USER = "system:serviceaccount:shop:orders"


async def test_rotation_a_new_kid_in_the_document_is_fetched(server: JwksServer, first: Signer) -> None:
    clock = Clock()
    check, ring = verifier_for(JwksUrl(server.url), clock, algorithms=["ES256", "ES384"])
    await check.verify(first.token(), user=USER, endpoint="main")
    await check.verify(first.token(), user=USER, endpoint="main")
    assert server.requests == 1  # cached
    second = Signer("sa-key-2", ec.SECP384R1())
    server.body = document(first.jwk(), second.jwk())
    clock.now += 31
    identity = await check.verify(second.token(), user=USER, endpoint="main")  # unknown kid: fetched again
    assert identity.key_id == "sa-key-2" and server.requests == 2
    server.body = document(second.jwk())  # the first key retired by the issuer
    clock.now += 3600  # past jwks_cache_ttl: refetched in the background, the login meanwhile uses the cache
    await check.verify(second.token(), user=USER, endpoint="main")
    await ring.settled()
    assert server.requests == 3
    assert await refused(check, first.token()) == "unknown key"
    assert server.requests == 3  # the refetch a moment ago counts: no other for this unknown kid


async def test_unknown_kids_refetch_at_most_once_per_refresh_interval(server: JwksServer, first: Signer) -> None:
    clock = Clock()
    check, ring = verifier_for(JwksUrl(server.url), clock, jwks_refresh_interval=30)
    stranger = Signer("not-published", ec.SECP256R1())
    results = await asyncio.gather(*(check.verify(stranger.token(), user=USER, endpoint="main") for _ in range(20)),
                                   return_exceptions=True)
    assert all(isinstance(result, TokenRejected) and result.reason == "unknown key" for result in results)
    assert server.requests == 1  # twenty logins at once share the first fetch
    for _ in range(50):
        assert await refused(check, stranger.token()) == "unknown key"
        clock.now += 0.5
    assert server.requests == 1  # 25 s later: still none
    clock.now += 5
    assert await refused(check, stranger.token()) == "unknown key"
    assert server.requests == 2 and ring.refreshes == 2


async def test_oversize_and_bad_documents_are_refused_and_the_keys_kept(
        server: JwksServer, first: Signer, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    check, _ = verifier_for(JwksUrl(server.url), clock)
    await check.verify(first.token(), user=USER, endpoint="main")
    second = Signer("sa-key-2", ec.SECP256R1())
    padding = {"kid": "pad", "kty": "oct", "k": "A" * MAX_DOCUMENT_SIZE}
    bad_bodies = [
        ("larger than", False, document(first.jwk(), second.jwk(), padding)),
        ("larger than", True, document(first.jwk(), second.jwk(), padding)),  # no Content-Length
        (f"more than {MAX_KEYS}", False, document(second.jwk(), *({**first.jwk(), "kid": f"k{n}"}
                                                                   for n in range(MAX_KEYS + 1)))),
        ("not a JSON document", False, b"<html>sign in</html>"),
        ("no 'keys' list", False, b'{"issuer": "x"}'),
    ]
    for expected, chunked, body in bad_bodies:
        server.body, server.chunked = body, chunked
        clock.now += 31
        caplog.clear()
        with caplog.at_level(logging.WARNING, "proxy.tokens"):
            assert await refused(check, second.token()) == "unknown key"
        assert [expected in record.getMessage() for record in caplog.records] == [True]
        assert "keeping the 1 keys" in caplog.records[0].getMessage()
        await check.verify(first.token(), user=USER, endpoint="main")
    server.chunked, server.status, server.body = False, 404, document(first.jwk(), second.jwk())
    clock.now += 31
    assert await refused(check, second.token()) == "unknown key"
    server.status = 302
    clock.now += 31
    assert await refused(check, second.token()) == "unknown key"  # redirects are not followed
    server.status = 200
    clock.now += 31
    await check.verify(second.token(), user=USER, endpoint="main")


async def test_a_server_that_goes_away_or_hangs_leaves_the_cached_keys(
        server: JwksServer, first: Signer, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    check, ring = verifier_for(JwksUrl(server.url, timeout=0.5), clock)
    await check.verify(first.token(), user=USER, endpoint="main")
    await server.stop()
    clock.now += 4000  # past the cache TTL
    with caplog.at_level(logging.WARNING, "proxy.tokens"):
        await check.verify(first.token(), user=USER, endpoint="main")
        await ring.settled()
        assert await refused(check, Signer("sa-key-2", ec.SECP256R1()).token()) == "unknown key"
    assert len(caplog.records) == 1 and "ClientConnectorError" in caplog.records[0].getMessage()
    await check.verify(first.token(), user=USER, endpoint="main")
    await server.start(server.port)
    server.hang.clear()  # accepts the request, never answers
    clock.now += 31
    caplog.clear()
    with caplog.at_level(logging.WARNING, "proxy.tokens"):
        await check.verify(first.token(), user=USER, endpoint="main")
        await ring.settled()
    assert len(caplog.records) == 1 and "TimeoutError" in caplog.records[0].getMessage()
    await check.verify(first.token(), user=USER, endpoint="main")


async def test_https_with_a_ca_file(tmp_path: Path, first: Signer, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = self_signed_pair("jwks")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = JwksServer(document(first.jwk()), context)
    await server.start()
    try:
        settings = TokenSettings(jwks_url=server.url, jwks_ca_file=tmp_path / "cert.pem", issuers=[ISSUER],
                                 audiences=["dbproxy"])
        check = TokenVerifier.from_settings(settings)
        assert check is not None
        await check.verify(first.token(), user=USER, endpoint="main")
        untrusting = TokenVerifier.from_settings(settings.model_copy(update={"jwks_ca_file": None}))
        assert untrusting is not None
        with caplog.at_level(logging.WARNING, "proxy.tokens"):
            assert await refused(untrusting, first.token()) == "unknown key"
        assert "certificate" in caplog.text.lower()
        check.close()
    finally:
        await server.stop()


def test_jwk_conversion_refuses_what_cannot_verify_safely() -> None:
    p256, p384 = Signer("a", ec.SECP256R1()), Signer("b", ec.SECP384R1())
    assert key_from_jwk(p256.jwk()).algorithms == {"ES256"}
    assert key_from_jwk(p384.jwk()).algorithms == {"ES384"}
    rsa_key = key_from_jwk(Signer("c").jwk(alg="RS256"))
    assert rsa_key.algorithms == {"RS256"} and "n=" not in repr(rsa_key)
    assert "PS256" in key_from_jwk(Signer("c").jwk()).algorithms
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    refusals = {
        "no kid": {k: v for k, v in p256.jwk().items() if k != "kid"},
        "use is not 'sig'": p256.jwk(use="enc"),
        "key type 'oct'": {"kid": "h", "kty": "oct", "k": "c2VjcmV0"},
        "a private key": {**ECAlgorithm.to_jwk(p256.private, as_dict=True), "kid": "p"},
        "no usable algorithm": {**RSAAlgorithm.to_jwk(small.public_key(), as_dict=True), "kid": "s"},
        "not a valid EC key": {"kid": "x", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
    }
    for expected, jwk in refusals.items():
        with pytest.raises(ValueError, match=expected):
            key_from_jwk(jwk)
    with pytest.raises(ValueError, match="no usable algorithm"):
        key_from_jwk(p256.jwk(alg="RS256"))


async def test_jwks_file_from_keys_init_and_an_hmac_key_in_a_document(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    es, rs = create_key(folder, "ES256"), create_key(folder, "RS256")
    check = TokenVerifier.from_settings(TokenSettings(jwks_file=folder / JWKS_NAME))
    assert check is not None
    for kid in (es, rs):
        token = generate_token(folder, "app", "main", 300, "dbproxy", kid).encode()
        assert (await check.verify(token, user="app", endpoint="main")).key_id == kid
    old_token = generate_token(folder, "app", "main", 300, "dbproxy", es).encode()
    newest = create_key(folder, "ES256")  # jwks.json rewritten (replaced): read again at the next login
    token = generate_token(folder, "app", "main", 300, "dbproxy").encode()
    assert (await check.verify(token, user="app", endpoint="main")).key_id == newest
    retire_key(folder, es)
    assert await refused(check, old_token, user="app") == "unknown key"
    # an HMAC key published under a kid: skipped, so an HS256 token made with it finds nothing to verify it
    hostile = tmp_path / "hostile.json"
    secret = b"a shared secret of thirty-two bytes"
    hostile.write_bytes(document({"kid": "h", "kty": "oct", "k": base64.urlsafe_b64encode(secret).decode(),
                                  "alg": "HS256"}))
    clock = Clock()
    everything, _ = verifier_for(JwksFile(hostile), clock, algorithms=["ES256", "RS256", "PS256"])
    now = int(time.time())
    forged = jwt.encode({"iss": ISSUER, "sub": USER, "aud": "dbproxy", "iat": now, "exp": now + 60},
                        secret, algorithm="HS256", headers={"kid": "h"}).encode()
    assert await refused(everything, forged) == "algorithm not allowed"
    header = base64.urlsafe_b64encode(b'{"alg":"ES256","kid":"h"}').rstrip(b"=")
    forged_es = b".".join((header, *forged.split(b".")[1:]))  # the header now says ES256
    assert await refused(everything, forged_es) == "unknown key"


async def test_a_failing_source_leaves_the_others(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "keys"
    kid = create_key(folder, "ES256")
    url = "http://reader:hunter2@127.0.0.1:9/jwks?access_token=abc"  # the discard port: nothing listens
    settings = TokenSettings(keys_dir=folder, jwks_url=url)
    check = TokenVerifier.from_settings(settings)
    assert check is not None
    token = generate_token(folder, "app", "main", 300, "dbproxy", kid).encode()
    with caplog.at_level(logging.WARNING, "proxy.tokens"):
        assert (await check.verify(token, user="app", endpoint="main")).key_id == kid
    assert len(caplog.records) == 1 and "JWKS URL http://127.0.0.1:9/jwks:" in caplog.text
    assert "hunter2" not in caplog.text and "access_token" not in caplog.text
    check.close()
