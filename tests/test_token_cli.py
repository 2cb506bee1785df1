"""`dbproxy keys init|list|retire` and `dbproxy token generate` as a user runs them, checked by the verifier."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from proxy.auth.tokens import TokenRejected, TokenVerifier
from proxy.config import load_config
from proxy.token_commands import CommandError, parse_ttl

ROOT = Path(__file__).resolve().parent.parent


def dbproxy(*args: str, status: int = 0) -> subprocess.CompletedProcess[str]:
    """`python -m proxy ARGS` from the repository; checks the exit status."""
    done = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == status, done.stderr
    return done


def new_kid(output: str) -> str:
    return output.split(" signing key ")[1].split()[0]


async def test_round_trip_with_a_configuration(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('[tokens]\nkeys_dir = "keys"\n')
    kid = new_kid(dbproxy("keys", "init", "-c", str(config)).stdout)
    folder = tmp_path / "keys"
    assert stat.S_IMODE(os.stat(folder / f"{kid}.key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    published = json.loads((folder / "jwks.json").read_text())["keys"]
    assert [(key["kid"], key["alg"], key["kty"], "d" in key) for key in published] == [(kid, "ES256", "EC", False)]
    token = dbproxy("token", "generate", "--user", "app", "--endpoint", "main", "-c", str(config)).stdout.strip()
    header, claims = jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})
    assert header == {"alg": "ES256", "kid": kid, "typ": "JWT"}
    assert {k: claims[k] for k in ("sub", "aud", "iss")} == {"sub": "app", "aud": "main", "iss": "dbproxy"}
    assert claims["exp"] - claims["iat"] == 900 and claims["nbf"] == claims["iat"]
    verifier = TokenVerifier.from_settings(load_config(config).tokens)
    assert verifier is not None
    identity = await verifier.verify(token.encode(), user="app", endpoint="main")
    assert identity.subject == "app" and identity.key_id == kid
    with pytest.raises(TokenRejected, match="bench"):
        await verifier.verify(token.encode(), user="bench", endpoint="main")


async def test_rotation_and_retire(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    old = new_kid(dbproxy("keys", "init", "--dir", str(folder)).stdout)
    old_token = dbproxy("token", "generate", "--user", "app", "--endpoint", "main", "--keys", str(folder)).stdout
    new = new_kid(dbproxy("keys", "init", "--dir", str(folder), "--algorithm", "RS256").stdout)
    assert dbproxy("keys", "list", "--dir", str(folder)).stdout.splitlines() == [
        f"{old}  ES256  verifies", f"{new}  RS256  signs"]
    assert len(json.loads((folder / "jwks.json").read_text())["keys"]) == 2
    new_token = dbproxy("token", "generate", "--user", "app", "--endpoint", "main", "--keys", str(folder),
                        "--ttl", "30s").stdout.strip()
    assert jwt.get_unverified_header(new_token)["kid"] == new
    assert jwt.get_unverified_header(new_token)["alg"] == "RS256"
    verifier = TokenVerifier.from_settings(load_config(None).tokens.model_copy(update={"keys_dir": folder}))
    assert verifier is not None
    for token in (old_token, new_token):  # both keys verify while both are in the folder
        await verifier.verify(token.strip().encode(), user="app", endpoint="main")
    assert dbproxy("keys", "retire", old, "--dir", str(folder)).stdout.strip() == (
        f"dbproxy: key {old} retired from {folder}")
    assert not list(folder.glob(f"{old}*"))
    assert [key["kid"] for key in json.loads((folder / "jwks.json").read_text())["keys"]] == [new]
    with pytest.raises(TokenRejected) as caught:  # the same verifier: a retired key stops verifying at once
        await verifier.verify(old_token.strip().encode(), user="app", endpoint="main")
    assert caught.value.reason == "unknown key"
    await verifier.verify(new_token.encode(), user="app", endpoint="main")
    assert f"no key '{old}'" in dbproxy("keys", "retire", old, "--dir", str(folder), status=2).stderr


def test_ttl_issuer_and_errors(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    assert "no keys" in dbproxy("keys", "list", "--dir", str(folder)).stdout
    assert "no signing key" in dbproxy("token", "generate", "--user", "a", "--endpoint", "e", "--keys", str(folder),
                                       status=2).stderr
    dbproxy("keys", "init", "--dir", str(folder))
    for ttl, seconds in (("900", 900), ("30s", 30), ("15m", 900), ("2m", 120)):
        token = dbproxy("token", "generate", "--user", "a", "--endpoint", "e", "--keys", str(folder),
                        "--ttl", ttl, "--issuer", "ci").stdout
        claims = jwt.decode(token.strip(), options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == seconds and claims["iss"] == "ci"
    too_long = dbproxy("token", "generate", "--user", "a", "--endpoint", "e", "--keys", str(folder), "--ttl", "16m",
                       status=2)
    assert "longer than max_lifetime (900 s)" in too_long.stderr and too_long.stdout == ""
    config = tmp_path / "long.toml"
    config.write_text(f'[tokens]\nkeys_dir = "{folder}"\nmax_lifetime = 3600\nissuers = ["k8s", "dbproxy"]\n')
    token = dbproxy("token", "generate", "--user", "a", "--endpoint", "e", "-c", str(config), "--ttl", "1h").stdout
    claims = jwt.decode(token.strip(), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 3600 and claims["iss"] == "k8s"
    assert "no keys folder" in dbproxy("keys", "init", status=2).stderr
    assert "no key 'nope'" in dbproxy("token", "generate", "--user", "a", "--endpoint", "e", "--keys", str(folder),
                                      "--kid", "nope", status=2).stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[tokens]\nalgorithms = ["HS256"]\n')
    assert "configuration error" in dbproxy("keys", "list", "-c", str(bad), status=2).stderr
    for text in ("0", "-5m", "15 minutes", "1d", ""):
        with pytest.raises(CommandError):
            parse_ttl(text)


def test_keys_follow_the_configured_algorithms(tmp_path: Path) -> None:
    config = tmp_path / "rsa.toml"
    config.write_text('[tokens]\nkeys_dir = "keys"\nalgorithms = ["RS256"]\n')
    assert " RS256 signing key " in dbproxy("keys", "init", "-c", str(config)).stdout  # the default follows
    refused = dbproxy("keys", "init", "-c", str(config), "--algorithm", "ES256", status=2).stderr
    assert "does not accept it (RS256)" in refused
    dbproxy("keys", "init", "--dir", str(tmp_path / "keys"), "--algorithm", "ES256")  # without the configuration
    refused = dbproxy("token", "generate", "--user", "a", "--endpoint", "e", "-c", str(config), status=2).stderr
    assert "signs with ES256, which [tokens] algorithms does not accept (RS256)" in refused
