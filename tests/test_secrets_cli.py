"""`dbproxy secrets master-key|put|get|list` on an encrypted file, and a start refused when the file was altered or
the master key is not its own."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg

from devtools.servers import PostgresInstance
from support import running_proxy

PASSWORD = "cli-pw-Zx81"


def dbproxy(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], input=stdin, capture_output=True, text=True,
                          timeout=60, env=env)


def make_config(folder: Path) -> Path:
    config = folder / "proxy.toml"
    config.write_text('[secrets]\nencrypted_file = "secrets.enc"\nmaster_key_file = "master.key"\n'
                      '[postgresql]\nport = 0\n')
    return config


def test_put_get_list_on_an_encrypted_file(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    made = dbproxy("secrets", "master-key", "--out", str(tmp_path / "master.key"))
    assert made.returncode == 0, made.stderr
    assert os.stat(tmp_path / "master.key").st_mode & 0o777 == 0o600
    again = dbproxy("secrets", "master-key", "--out", str(tmp_path / "master.key"))
    assert again.returncode == 2 and "exists already" in again.stderr
    outputs = [made.stdout + made.stderr]
    for user, password in (("app", PASSWORD), ("bench", PASSWORD + "-b")):
        put = dbproxy("secrets", "put", "--user", user, "--password-stdin", "-c", str(config), stdin=password + "\n")
        assert put.returncode == 0, put.stderr
        assert put.stdout.startswith(f"dbproxy: stored the password of {user} in ")
        outputs.append(put.stdout + put.stderr)
    assert os.stat(tmp_path / "secrets.enc").st_mode & 0o777 == 0o600
    assert PASSWORD.encode() not in (tmp_path / "secrets.enc").read_bytes()
    listed = dbproxy("secrets", "list", "-c", str(config))
    assert listed.returncode == 0 and listed.stdout.split() == ["app", "bench"]
    outputs.append(listed.stdout + listed.stderr)
    got = dbproxy("secrets", "get", "--user", "app", "-c", str(config))
    assert got.returncode == 0 and got.stdout == PASSWORD + "\n"
    # the same file opened with the key from the environment
    key = (tmp_path / "master.key").read_text().strip()
    env = dict(os.environ, DBPROXY_MASTER_KEY=key)
    by_env = dbproxy("secrets", "get", "--user", "bench", "--encrypted-file", str(tmp_path / "secrets.enc"), env=env)
    assert by_env.returncode == 0 and by_env.stdout == PASSWORD + "-b\n"
    missing = dbproxy("secrets", "get", "--user", "nobody", "-c", str(config))
    assert missing.returncode == 2 and "no stored secret for nobody" in missing.stderr
    checked = dbproxy("run", "--check", "-c", str(config))
    assert checked.returncode == 0, checked.stderr
    outputs.append(checked.stdout + checked.stderr)
    assert not any(PASSWORD in text for text in outputs)


def test_altered_file_or_wrong_key_refuses_the_start(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert dbproxy("secrets", "master-key", "--out", str(tmp_path / "master.key")).returncode == 0
    assert dbproxy("secrets", "put", "--user", "app", "--password-stdin", "-c", str(config),
                   stdin=PASSWORD).returncode == 0
    sealed = (tmp_path / "secrets.enc").read_bytes()
    document = json.loads(sealed)
    raw = bytearray(base64.b64decode(document["ciphertext"]))
    raw[3] ^= 0x40
    document["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    (tmp_path / "secrets.enc").write_text(json.dumps(document))
    for args in (("run", "--check", "-c", str(config)), ("run", "-c", str(config)),
                 ("secrets", "list", "-c", str(config))):
        refused = dbproxy(*args)
        assert refused.returncode == 2, refused
        assert "the encrypted secrets were altered" in refused.stderr, refused.stderr
        assert "dbproxy ready" not in refused.stdout and "Traceback" not in refused.stderr
    (tmp_path / "secrets.enc").write_bytes(sealed)
    (tmp_path / "master.key").unlink()
    assert dbproxy("secrets", "master-key", "--out", str(tmp_path / "master.key")).returncode == 0  # another key
    refused = dbproxy("run", "-c", str(config))
    assert refused.returncode == 2 and "the master key does not open this file" in refused.stderr
    assert PASSWORD not in refused.stderr


def test_proxy_serves_the_encrypted_secrets(tmp_path: Path, pg_server: PostgresInstance) -> None:
    key = tmp_path / "proxy" / "master.key"
    key.parent.mkdir()
    assert dbproxy("secrets", "master-key", "--out", str(key)).returncode == 0
    enc = tmp_path / "proxy" / "secrets.enc"
    for user in ("app", "enc_only"):
        assert dbproxy("secrets", "put", "--user", user, "--password-stdin", "--encrypted-file", str(enc),
                       "--master-key-file", str(key), stdin=f"{user}-secret").returncode == 0
    with running_proxy(tmp_path / "proxy", pg_server,
                       secrets={"encrypted_file": "secrets.enc", "master_key_file": "master.key"}) as proxy:
        with psycopg.connect(host="127.0.0.1", port=proxy.ports["postgresql"], user="app", password="app-secret",
                             dbname="app", sslmode="disable", connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert "secrets loaded for 3 user(s) from " in proxy.log() and "secrets.enc" in proxy.log()
