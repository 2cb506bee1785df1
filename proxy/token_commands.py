"""Signing keys and login tokens on the command line: `dbproxy keys init|list|retire`, `dbproxy token generate`."""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from proxy.auth.jwks import PUBLIC_SUFFIX
from proxy.config import TokenSettings, load_config
from proxy.errors import ConfigError

PRIVATE_SUFFIX = ".key.pem"  # <kid>.key.pem, mode 0600
JWKS_NAME = "jwks.json"  # every public key of the folder, to publish
SIGNING_ALGORITHMS = ("ES256", "RS256")
RSA_BITS = 3072
DEFAULT_TTL = "15m"
TTL = re.compile(r"^\s*(\d+)\s*([smh]?)\s*$")
TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}
USAGE_STATUS = 2  # a missing folder, an unknown key, a TTL too long
FAILED_STATUS = 1  # a file that could not be written


class CommandError(Exception):
    """What a token command could not do; `status` is the exit status."""

    def __init__(self, message: str, status: int = USAGE_STATUS) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SigningKey:
    """A key of the folder: its id, algorithm, public key, and private key when this folder holds it."""

    kid: str
    algorithm: str
    public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    has_private: bool

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r}, algorithm={self.algorithm!r})"


def new_kid() -> str:
    """A key id that sorts by creation time (UTC, microseconds), with a random tail."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(3)}"


def _algorithm_of(key: object) -> str:
    return "ES256" if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) else "RS256"


def read_keys(folder: Path) -> list[SigningKey]:
    """The folder's keys, oldest first (the last one signs)."""
    found = []
    for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")):
        kid = path.name[: -len(PUBLIC_SUFFIX)]
        public = serialization.load_pem_public_key(path.read_bytes())
        if isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            found.append(SigningKey(kid, _algorithm_of(public), public, (folder / f"{kid}{PRIVATE_SUFFIX}").exists()))
    return found


def write_jwks(folder: Path) -> Path:
    """Rewrite the folder's jwks.json with every public key (atomically)."""
    keys = []
    for key in read_keys(folder):
        public = key.public
        jwk = (ECAlgorithm.to_jwk(public, as_dict=True) if isinstance(public, ec.EllipticCurvePublicKey)
               else RSAAlgorithm.to_jwk(public, as_dict=True))
        keys.append({**jwk, "kid": key.kid, "alg": key.algorithm, "use": "sig"})
    path = folder / JWKS_NAME
    temporary = folder / f".{JWKS_NAME}.{os.getpid()}"
    temporary.write_text(json.dumps({"keys": keys}, indent=2) + "\n")
    temporary.replace(path)
    return path


def create_key(folder: Path, algorithm: str = "ES256") -> str:
    """A new signing key in `folder` (made 0700 if new): <kid>.key.pem (0600), <kid>.pub.pem; jwks.json rewritten."""
    if algorithm not in SIGNING_ALGORITHMS:
        raise CommandError(f"algorithm {algorithm} is not one of {', '.join(SIGNING_ALGORITHMS)}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256"
        else rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS))
    kid = new_kid()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    descriptor = os.open(folder / f"{kid}{PRIVATE_SUFFIX}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    (folder / f"{kid}{PUBLIC_SUFFIX}").write_bytes(public)
    write_jwks(folder)
    return kid


def retire_key(folder: Path, kid: str) -> None:
    """Remove a key (its tokens stop verifying once the proxies reread the folder); jwks.json rewritten."""
    public = folder / f"{kid}{PUBLIC_SUFFIX}"
    if "/" in kid or not public.exists():
        known = ", ".join(key.kid for key in read_keys(folder)) or "none"
        raise CommandError(f"no key '{kid}' in {folder} (keys: {known})")
    (folder / f"{kid}{PRIVATE_SUFFIX}").unlink(missing_ok=True)
    public.unlink()
    write_jwks(folder)


def parse_ttl(text: str) -> int:
    """Seconds from '900', '30s', '15m' or '1h'."""
    match = TTL.match(text)
    seconds = int(match.group(1)) * TTL_UNITS[match.group(2)] if match else 0
    if seconds <= 0:
        raise CommandError(f"--ttl {text!r}: give a positive number of seconds, or a number with s, m or h")
    return seconds


def generate_token(folder: Path, user: str, endpoint: str, ttl: int, issuer: str, kid: str | None = None,
                   accepted: Collection[str] = SIGNING_ALGORITHMS, now: float | None = None) -> str:
    """A token signed by the folder's newest key with a private key (or by `kid`): sub=user, aud=endpoint; the
    key's algorithm must be one the proxy accepts."""
    signers = [key for key in read_keys(folder) if key.has_private and (kid is None or key.kid == kid)]
    if not signers:
        raise CommandError(f"no key '{kid}' with its private key in {folder}" if kid
                           else f"no signing key in {folder}: create one with `dbproxy keys init`")
    signer = signers[-1]
    if signer.algorithm not in accepted:
        raise CommandError(f"key {signer.kid} signs with {signer.algorithm}, which [tokens] algorithms does not "
                           f"accept ({', '.join(accepted)})")
    private = serialization.load_pem_private_key((folder / f"{signer.kid}{PRIVATE_SUFFIX}").read_bytes(), None)
    issued = int(time.time() if now is None else now)
    claims = {"iss": issuer, "sub": user, "aud": endpoint, "iat": issued, "nbf": issued, "exp": issued + ttl}
    return jwt.encode(claims, private, algorithm=signer.algorithm,  # type: ignore[arg-type]
                      headers={"kid": signer.kid, "typ": "JWT"})


def add_token_commands(sub: Any) -> None:
    """`keys init|list|retire` and `token generate` on the command line's subcommands."""
    keys = sub.add_parser("keys", help="token signing keys: create, list, retire (rotation)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="create a new signing key (the newest signs; older ones still verify)")
    init.add_argument("--algorithm", choices=SIGNING_ALGORITHMS, default=None,
                      help="default: ES256, or RS256 when [tokens] algorithms accepts only that")
    listing = keys_sub.add_parser("list", help="the keys of the folder, oldest first")
    retire = keys_sub.add_parser("retire", help="remove a key: its tokens are refused once proxies reread the keys")
    retire.add_argument("kid", help="the key id, as `dbproxy keys list` shows it")
    token = sub.add_parser("token", help="login tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    generate = token_sub.add_parser("generate", help="print a signed login token (send it as the password)")
    generate.add_argument("--user", required=True, help="the database user (the token's subject)")
    generate.add_argument("--endpoint", required=True, help="the endpoint name (the token's audience)")
    generate.add_argument("--ttl", default=DEFAULT_TTL, help="lifetime: 900, 30s, 15m (default: %(default)s)")
    generate.add_argument("--issuer", default=None, help="iss (default: the first of [tokens] issuers)")
    generate.add_argument("--kid", default=None, help="sign with this key (default: the newest)")
    for command, folder_option in ((init, "--dir"), (listing, "--dir"), (retire, "--dir"), (generate, "--keys")):
        where = command.add_mutually_exclusive_group()
        where.add_argument(folder_option, dest="keys_dir", type=Path, default=None, help="the keys folder")
        where.add_argument("-c", "--config", type=Path, default=None,
                           help="TOML configuration file (its [tokens] keys_dir)")


def _settings(args: argparse.Namespace) -> tuple[Path, TokenSettings]:
    settings = load_config(args.config).tokens if args.config is not None else TokenSettings()
    folder = args.keys_dir or settings.keys_dir
    if folder is None:
        raise CommandError("no keys folder: give --dir/--keys, or -c with a configuration whose [tokens] has "
                           "keys_dir")
    return folder, settings


def _run(args: argparse.Namespace) -> str:
    """The command's output."""
    folder, settings = _settings(args)
    if args.command == "token":
        ttl = parse_ttl(args.ttl)
        if ttl > settings.max_lifetime:
            raise CommandError(f"--ttl {args.ttl}: longer than max_lifetime ({settings.max_lifetime:g} s)")
        return generate_token(folder, args.user, args.endpoint, ttl, args.issuer or settings.issuers[0], args.kid,
                              settings.algorithms)
    if args.keys_command == "init":
        algorithm = args.algorithm or next((a for a in SIGNING_ALGORITHMS if a in settings.algorithms), "ES256")
        if algorithm not in settings.algorithms:
            raise CommandError(f"--algorithm {algorithm}: [tokens] algorithms does not accept it "
                               f"({', '.join(settings.algorithms)})")
        kid = create_key(folder, algorithm)
        return f"dbproxy: new {algorithm} signing key {kid} in {folder} (public keys: {folder / JWKS_NAME})"
    if args.keys_command == "retire":
        retire_key(folder, args.kid)
        return f"dbproxy: key {args.kid} retired from {folder}"
    keys = read_keys(folder) if folder.is_dir() else []
    signing = next((key.kid for key in reversed(keys) if key.has_private), None)
    lines = [f"{key.kid}  {key.algorithm}  {'signs' if key.kid == signing else 'verifies'}"
             f"{'' if key.has_private else ' (public key only)'}" for key in keys]
    return "\n".join(lines) or f"dbproxy: no keys in {folder}"


def run_token_command(args: argparse.Namespace) -> None:
    """Run `keys ...` or `token ...` and print its output; exit with a one-line error when it fails."""
    try:
        print(_run(args), flush=True)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}", USAGE_STATUS)
    except CommandError as exc:
        _fail(str(exc), exc.status)
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.strerror:
            _fail(f"{exc.filename or args.command}: {exc.strerror}", FAILED_STATUS)
        _fail(f"{args.command}: not a key ({type(exc).__name__})", FAILED_STATUS)


def _fail(message: str, status: int) -> NoReturn:
    print(f"dbproxy: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)
