"""Token verification with real signed tokens: every refusal (forged, tampered, expired, wrong key), the policy."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.auth.jwks import PUBLIC_SUFFIX, KeyRing, KeysFolder
from proxy.auth.policy import Policy, Rule, claim_at
from proxy.auth.tokens import TokenIdentity, TokenRejected, TokenVerifier, looks_like_token, settings_problem
from proxy.config import TokenPolicyRule, TokenSettings, load_config
from proxy.errors import ConfigError
from proxy.token_commands import PRIVATE_SUFFIX, create_key, retire_key

NOW = time.time()


class Keys:
    """A keys folder with an ES256 and an RS256 key (as `dbproxy keys init` writes it), and a signer."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.es = create_key(folder, "ES256")
        self.rs = create_key(folder, "RS256")

    def private(self, kid: str) -> Any:
        return serialization.load_pem_private_key((self.folder / f"{kid}{PRIVATE_SUFFIX}").read_bytes(), None)

    def public_pem(self, kid: str) -> bytes:
        return (self.folder / f"{kid}{PUBLIC_SUFFIX}").read_bytes()

    def sign(self, kid: str | None = None, alg: str = "ES256", key: Any = None, header: dict[str, Any] | None = None,
             **claims: Any) -> bytes:
        """A token signed by `key` (default: the private key of `kid`), with default claims for user app on main."""
        kid = kid if kid is not None else (self.es if alg.startswith("ES") else self.rs)
        body = {"iss": "dbproxy", "sub": "app", "aud": "main", "iat": int(NOW), "nbf": int(NOW),
                "exp": int(NOW) + 600}
        body.update(claims)
        body = {name: value for name, value in body.items() if value is not None}
        signer = key if key is not None else self.private(kid)
        payload = json.dumps(body).encode()  # any claims, even those jwt.encode would refuse
        return jwt.PyJWS().encode(payload, signer, algorithm=alg, headers={"kid": kid, **(header or {})}).encode()


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def forge(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None = None) -> bytes:
    """A token built by hand: no signature (alg none), or an HMAC-SHA256 with `secret`."""
    signed = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(claims).encode())
    signature = b"" if secret is None else b64(hmac.new(secret, signed, hashlib.sha256).digest())
    return signed + b"." + signature


def good_claims() -> dict[str, Any]:
    return {"iss": "dbproxy", "sub": "app", "aud": "main", "iat": int(NOW), "nbf": int(NOW), "exp": int(NOW) + 600}


@pytest.fixture()
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


def verifier(keys: Keys, **settings: Any) -> TokenVerifier:
    """A verifier whose clock stands at NOW, the time the test tokens are signed for (the suite may run long)."""
    found = TokenVerifier.from_settings(TokenSettings(keys_dir=keys.folder, **settings))
    assert found is not None
    found.clock = lambda: NOW
    return found


async def reason(verifier: TokenVerifier, token: bytes, user: str = "app", endpoint: str = "main") -> str:
    """The refusal reason; also checks that the token shows nowhere in the refusal."""
    with pytest.raises(TokenRejected) as caught:
        await verifier.verify(token, user=user, endpoint=endpoint)
    shown = f"{caught.value} {caught.value!r} {caught.value.reason} {caught.value.message}"
    for part in token.split(b"."):
        if len(part) > 8:
            assert part.decode(errors="replace") not in shown
    assert caught.value.sqlstate == "28P01" and caught.value.mysql_errno == 1045
    return caught.value.reason


async def test_valid_es256_and_rs256_tokens_are_accepted(keys: Keys) -> None:
    check = verifier(keys)
    identity = await check.verify(keys.sign(alg="ES256"), user="app", endpoint="main")
    assert identity == TokenIdentity("app", keys.es, float(int(NOW) + 600), identity.claims)
    assert identity.claims["aud"] == "main" and "signature" not in repr(identity)
    await check.verify(keys.sign() + b"\n", user="app", endpoint="main")  # as read from a file
    rs = await check.verify(keys.sign(alg="RS256"), user="app", endpoint="main")
    assert rs.key_id == keys.rs
    assert looks_like_token(keys.sign()) and not looks_like_token(b"app-secret")


async def test_time_claims(keys: Keys) -> None:
    check = verifier(keys)
    assert await reason(check, keys.sign(iat=int(NOW) - 700, nbf=None, exp=int(NOW) - 60)) == "expired"
    await check.verify(keys.sign(iat=int(NOW) - 610, exp=int(NOW) - 10), user="app", endpoint="main")  # leeway
    assert await reason(check, keys.sign(nbf=int(NOW) + 120)) == "not yet valid"
    await check.verify(keys.sign(nbf=int(NOW) + 10), user="app", endpoint="main")  # within the leeway
    assert await reason(check, keys.sign(iat=int(NOW) + 120, nbf=None, exp=int(NOW) + 600)) == "issued in the future"
    assert await reason(check, keys.sign(exp=int(NOW) + 901)) == "lifetime too long"
    await check.verify(keys.sign(exp=int(NOW) + 900), user="app", endpoint="main")
    assert await reason(check, keys.sign(exp=None)) == "missing claim 'exp'"
    assert await reason(check, keys.sign(iat=None)) == "missing claim 'iat'"
    for odd in ("tomorrow", float("nan"), float("inf"), True, [int(NOW) + 60]):
        assert await reason(check, keys.sign(exp=odd)) == "malformed"
    strict = verifier(keys, leeway=0, max_lifetime=60)
    assert await reason(strict, keys.sign(iat=int(NOW) - 600, exp=int(NOW) - 1)) == "expired"
    assert await reason(strict, keys.sign()) == "lifetime too long"


async def test_issuer_and_audience(keys: Keys) -> None:
    check = verifier(keys, issuers=["dbproxy", "https://issuer.example"], audiences=["shop-databases"])
    assert await reason(check, keys.sign(iss="someone-else")) == "wrong issuer"
    assert await reason(check, keys.sign(iss=None)) == "wrong issuer"
    assert await reason(check, keys.sign(iss=["dbproxy"])) == "wrong issuer"
    assert await reason(check, keys.sign(aud={"main": True})) == "wrong audience"
    await check.verify(keys.sign(iss="https://issuer.example"), user="app", endpoint="main")
    assert await reason(check, keys.sign(aud="other")) == "wrong audience"
    assert await reason(check, keys.sign(aud=None)) == "wrong audience"
    assert await reason(check, keys.sign(aud="main"), endpoint="reports") == "wrong audience"
    await check.verify(keys.sign(aud=["x", "main"]), user="app", endpoint="main")
    await check.verify(keys.sign(aud="shop-databases"), user="app", endpoint="reports")
    assert await reason(check, keys.sign(sub=None)) == "missing claim 'sub'"


async def test_forged_and_tampered_tokens_are_refused(keys: Keys) -> None:
    check = verifier(keys)
    claims = good_claims()
    assert await reason(check, forge({"alg": "none", "kid": keys.es}, claims)) == "algorithm not allowed"
    assert await reason(check, forge({"alg": "None", "kid": keys.es}, claims)) == "algorithm not allowed"
    for kid in (keys.es, keys.rs):  # HMAC with the public key (PEM, as a verifier would hold it) as the secret
        forged = forge({"alg": "HS256", "kid": kid, "typ": "JWT"}, claims, keys.public_pem(kid))
        assert await reason(check, forged) == "algorithm not allowed"
    hs_everywhere = verifier(keys, algorithms=["ES256", "RS256", "PS256"])
    forged = forge({"alg": "ES256", "kid": keys.es}, claims, keys.public_pem(keys.es))  # an HMAC under ES256
    assert await reason(hs_everywhere, forged) == "bad signature"

    header, payload, signature = keys.sign().split(b".")
    other = b64(json.dumps({**claims, "sub": "admin"}).encode())
    assert await reason(check, b".".join((header, other, signature)), user="admin") == "bad signature"
    flipped = signature[:10] + (b"A" if signature[10:11] != b"A" else b"B") + signature[11:]
    assert await reason(check, b".".join((header, payload, flipped))) == "bad signature"
    assert await reason(check, b".".join((header, payload, b""))) in ("bad signature", "malformed")
    stranger = ec.generate_private_key(ec.SECP256R1())
    assert await reason(check, keys.sign(kid=keys.es, key=stranger)) == "bad signature"
    rsa_stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert await reason(check, keys.sign(kid=keys.rs, alg="RS256", key=rsa_stranger)) == "bad signature"


async def test_algorithms_outside_the_configured_set_are_refused(keys: Keys) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    (keys.folder / f"p384{PUBLIC_SUFFIX}").write_bytes(p384.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    token = keys.sign(kid="p384", alg="ES384", key=p384)
    assert await reason(verifier(keys), token) == "algorithm not allowed"
    await verifier(keys, algorithms=["ES384"]).verify(token, user="app", endpoint="main")
    # an algorithm of the set that is not the key's own: an RSA algorithm naming an EC key, a curve that differs
    both = verifier(keys, algorithms=["ES256", "ES384", "RS256", "PS256"])
    assert await reason(both, keys.sign(kid=keys.es, alg="ES384", key=p384)) == "algorithm not allowed"
    rsa_key = keys.private(keys.rs)
    assert await reason(both, keys.sign(kid=keys.es, alg="RS256", key=rsa_key)) == "algorithm not allowed"
    await both.verify(keys.sign(kid=keys.rs, alg="PS256", key=rsa_key), user="app", endpoint="main")
    assert await reason(verifier(keys), keys.sign(kid=keys.rs, alg="PS256", key=rsa_key)) == "algorithm not allowed"
    with pytest.raises(ValueError, match="algorithms"):
        TokenSettings(algorithms=["HS256"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="algorithms"):
        TokenSettings(algorithms=["none"])  # type: ignore[list-item]


async def test_unknown_or_missing_key_id(keys: Keys) -> None:
    check = verifier(keys)
    assert await reason(check, keys.sign(kid="nobody", key=keys.private(keys.es))) == "unknown key"
    header = {"alg": "ES256", "typ": "JWT"}
    token = jwt.encode(good_claims(), keys.private(keys.es), algorithm="ES256", headers=header).encode()
    assert b"kid" not in base64.urlsafe_b64decode(token.split(b".")[0] + b"==")
    assert await reason(check, token) == "unknown key"


async def test_size_and_malformed_tokens(keys: Keys) -> None:
    check = verifier(keys, max_token_size=1024)
    assert await reason(check, b"eyJ" + b"A" * 1200 + b".x.y") == "too large"
    assert await reason(check, keys.sign(padding="x" * 1024)) == "too large"
    await verifier(keys).verify(keys.sign(padding="x" * 1024), user="app", endpoint="main")
    for junk in (b"eyJ.x.y", b"not a token", b"eyJhbGciOiJFUzI1NiJ9", b"\xff\xfe.\x00.\x01", b""):
        assert await reason(check, junk) == "malformed"
    assert await reason(check, forge({"alg": "ES256", "kid": keys.es}, ["not", "an", "object"])) in (  # type: ignore[arg-type]
        "malformed", "bad signature")
    critical = keys.sign(header={"crit": ["exp"]}, exp=int(NOW) + 60)
    assert await reason(check, critical) == "malformed"


async def test_default_policy_is_subject_equals_user(keys: Keys) -> None:
    check = verifier(keys)
    token = keys.sign(sub="app")
    refusal = await reason(check, token, user="bench")
    assert refusal == "policy refuses subject 'app' as user 'bench' on endpoint 'main'"
    hostile = keys.sign(sub="x'\n" + "y" * 500)
    refusal = await reason(check, hostile, user="app")
    assert "\n" not in refusal and len(refusal) < 300


SERVICE_ACCOUNT = {  # the claims of a Kubernetes projected service-account token
    "iss": "https://kubernetes.default.svc.cluster.local",
    "sub": "system:serviceaccount:shop:orders",
    "aud": ["dbproxy"],
    "kubernetes.io": {"namespace": "shop", "pod": {"name": "orders-7d9f", "uid": "0d6c"},
                      "serviceaccount": {"name": "orders", "uid": "41b2"}},
}
K8S_POLICY = [
    TokenPolicyRule(claims={"kubernetes.io/namespace": "shop", "kubernetes.io/serviceaccount/name": "orders"},
                    users=["orders_rw", "orders_ro"], endpoints=["main", "reports"]),
    TokenPolicyRule(subject="system:serviceaccount:analytics:*", users=["reader"], endpoints=["reports"]),
    TokenPolicyRule(subject="svc-*", users=["{sub}"]),
]


async def test_kubernetes_service_account_tokens_against_policy_rules(keys: Keys) -> None:
    check = verifier(keys, issuers=[SERVICE_ACCOUNT["iss"]], audiences=["dbproxy"], policy=K8S_POLICY,
                     max_lifetime=3600)
    times = {"iat": int(NOW), "nbf": int(NOW), "exp": int(NOW) + 3600}
    orders = keys.sign(**SERVICE_ACCOUNT, **times)
    identity = await check.verify(orders, user="orders_rw", endpoint="main")
    assert identity.subject == "system:serviceaccount:shop:orders"
    await check.verify(orders, user="orders_ro", endpoint="reports")
    assert (await reason(check, orders, user="admin", endpoint="main")
            == "policy refuses subject 'system:serviceaccount:shop:orders' as user 'admin' on endpoint 'main'")
    assert (await reason(check, orders, user="orders_rw", endpoint="billing")).startswith("policy refuses")
    other_namespace = {**SERVICE_ACCOUNT, "sub": "system:serviceaccount:dev:orders",
                       "kubernetes.io": {"namespace": "dev", "serviceaccount": {"name": "orders"}}}
    dev = keys.sign(**other_namespace, **times)
    assert (await reason(check, dev, user="orders_rw")).startswith("policy refuses subject 'system:serviceaccount:dev")
    analytics = keys.sign(**{**SERVICE_ACCOUNT, "sub": "system:serviceaccount:analytics:etl"}, **times)
    await check.verify(analytics, user="reader", endpoint="reports")
    assert (await reason(check, analytics, user="reader", endpoint="main")).startswith("policy refuses")
    svc = keys.sign(**{**SERVICE_ACCOUNT, "sub": "svc-billing", "kubernetes.io": {}}, **times)
    await check.verify(svc, user="svc-billing", endpoint="anything")
    assert (await reason(check, svc, user="svc-other")).startswith("policy refuses")
    assert await reason(check, keys.sign(**SERVICE_ACCOUNT, iat=int(NOW), exp=int(NOW) + 3601)) == (
        "lifetime too long")


def test_policy_rules_and_claim_paths() -> None:
    claims = {"kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "orders"}},
              "https://example.com/roles": ["db-admin", "dev"], "groups": ["a", "b"], "level": 3, "admin": True}
    assert claim_at(claims, "kubernetes.io/serviceaccount/name") == "orders"
    assert claim_at(claims, "https://example.com/roles") == ["db-admin", "dev"]
    assert claim_at(claims, "kubernetes.io/missing") is None and claim_at(claims, "nothing/at/all") is None
    rule = Rule(claims=(("https://example.com/roles", "db-*"), ("level", "3"), ("admin", "true")), users=("dba",))
    assert rule.allows("alice", claims, "dba", "main")
    assert not rule.allows("alice", {**claims, "level": 2}, "dba", "main")
    assert not rule.allows("alice", {**claims, "https://example.com/roles": ["dev"]}, "dba", "main")
    assert not rule.allows("alice", claims, "dba2", "main")
    assert Policy().allows("app", {}, "app", "any") and not Policy().allows("app", {}, "App", "any")
    assert not Policy([Rule(users=("app_*",), endpoints=("ro_*",))]).allows("x", {}, "app_1", "rw_main")
    assert Policy([Rule(users=("app_*",), endpoints=("ro_*",))]).allows("x", {}, "app_1", "ro_main")


def test_tokens_section_of_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text('[tokens]\nkeys_dir = "keys"\njwks_file = "jwks.json"\nissuers = ["dbproxy", "k8s"]\n'
                    'max_lifetime = 3600\n[[tokens.policy]]\nsubject = "svc-*"\nusers = ["{sub}"]\n'
                    '[tokens.policy.claims]\n"kubernetes.io/namespace" = "shop"\n')
    settings = load_config(path).tokens
    assert settings.keys_dir == tmp_path / "keys" and settings.jwks_file == tmp_path / "jwks.json"
    assert settings.algorithms == ["ES256", "RS256"] and settings.leeway == 30 and settings.max_token_size == 8192
    assert settings.policy[0].claims == {"kubernetes.io/namespace": "shop"} and settings.policy[0].endpoints == ["*"]
    path.write_text('[tokens]\nalgorithms = ["HS256"]\n')
    with pytest.raises(ConfigError, match="tokens.algorithms"):
        load_config(path)
    path.write_text('[tokens]\nkey_dir = "keys"\n')
    with pytest.raises(ConfigError, match="unknown key 'tokens.key_dir'"):
        load_config(path)
    assert TokenVerifier.from_settings(TokenSettings()) is None


async def test_keys_added_or_retired_in_the_folder_count_at_once_and_nothing_is_logged_of_tokens(
        keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    clock = [0.0]
    ring = KeyRing([KeysFolder(keys.folder)], refresh_interval=30, clock=lambda: clock[0])
    check = TokenVerifier(ring, TokenSettings(keys_dir=keys.folder), clock=lambda: NOW)
    caplog.set_level(logging.DEBUG)
    older = keys.sign()
    await check.verify(older, user="app", endpoint="main")
    newer = create_key(keys.folder, "ES256")  # `dbproxy keys init`: the folder changed, it is read again
    token = keys.sign(kid=newer)
    await check.verify(token, user="app", endpoint="main")
    retire_key(keys.folder, keys.es)
    assert await reason(check, older) == "unknown key"
    assert ring.refreshes == 1  # only the changed folder was read again, no refetch for the unknown kid
    stranger = keys.sign(kid="nobody", key=keys.private(newer))
    clock[0] = 31.0
    assert await reason(check, stranger) == "unknown key"
    assert await reason(check, stranger) == "unknown key"
    assert ring.refreshes == 2  # an unknown kid: read again at most once per refresh_interval
    clock[0] = 62.0
    assert await reason(check, stranger) == "unknown key"
    assert ring.refreshes == 3
    assert all(token.split(b".")[2].decode() not in record.getMessage() for record in caplog.records)
    check.close()


async def test_a_missing_keys_folder_is_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "keys"
    check = TokenVerifier.from_settings(TokenSettings(keys_dir=folder))
    assert check is not None
    token = jwt.encode(good_claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                       headers={"kid": "k"}).encode()
    with caplog.at_level(logging.WARNING, "proxy.tokens"):
        assert await reason(check, token) == "unknown key"
        assert await reason(check, token) == "unknown key"
    assert len(caplog.records) == 1 and "not a folder" in caplog.text


def test_settings_problem_names_the_key_sources_that_cannot_work(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    assert settings_problem(TokenSettings()) is None
    assert settings_problem(TokenSettings(keys_dir=folder)) == f"'tokens.keys_dir': keys folder {folder}: not a folder"
    folder.mkdir()
    assert "holds no usable public key" in (settings_problem(TokenSettings(keys_dir=folder)) or "")
    create_key(folder, "ES256")
    assert settings_problem(TokenSettings(keys_dir=folder, jwks_file=folder / "jwks.json")) is None
    assert "No such file" in (settings_problem(TokenSettings(jwks_file=tmp_path / "none.json")) or "")
    (tmp_path / "bad.json").write_text("{}")
    assert "no 'keys' list" in (settings_problem(TokenSettings(jwks_file=tmp_path / "bad.json")) or "")
    ca = tmp_path / "ca.pem"
    assert "not an https:// URL" in (settings_problem(TokenSettings(jwks_url="http://x/j", jwks_ca_file=ca)) or "")
    assert "cannot read" in (settings_problem(TokenSettings(jwks_url="https://x/j", jwks_ca_file=ca)) or "")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_any_bytes_or_mutation_is_an_identity_or_a_refusal(keys: Keys, data: st.DataObject) -> None:
    check = verifier(keys, algorithms=["ES256", "RS256", "PS256"])
    token = keys.sign()
    kind = data.draw(st.sampled_from(["bytes", "flip", "segment"]))
    if kind == "bytes":
        candidate = data.draw(st.binary(max_size=300))
    elif kind == "flip":
        at = data.draw(st.integers(0, len(token) - 1))
        candidate = token[:at] + bytes([data.draw(st.integers(0, 255))]) + token[at + 1:]
    else:  # a header or payload of any JSON
        value = data.draw(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                       lambda inner: st.lists(inner, max_size=3)
                                       | st.dictionaries(st.sampled_from(["alg", "kid", "crit", "exp", "iat",
                                                                          "sub", "aud", "iss", "x"]), inner),
                                       max_leaves=8))
        parts = token.split(b".")
        parts[data.draw(st.integers(0, 1))] = b64(json.dumps(value).encode())
        candidate = b".".join(parts)
    try:
        identity = await check.verify(candidate, user="app", endpoint="main")
    except TokenRejected as exc:
        assert exc.reason
    else:
        assert identity.subject == "app"
