"""Secrets sources: a Kubernetes-style folder, precedence (environment > folder > file), change detection, the
backend credential of rotation and alternating users, and nothing secret in reprs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.config import SecretsSettings, parse_config
from proxy.errors import ConfigError
from proxy.secret_sources import fingerprint, read_dir, update
from proxy.secrets import SecretStore, retry_password
from secret_support import kubelet_write


def test_folder_as_kubernetes_mounts_it(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    kubelet_write(folder, {"app": "pw-one", "bench": "pw-two"})
    (folder / ".hidden").write_text("not a user")
    (folder / "sub").mkdir()
    assert read_dir(folder) == {"app": "pw-one", "bench": "pw-two"}  # trailing newline stripped, ..data skipped
    store = SecretStore.from_settings(SecretsSettings(dir=folder))
    secret = store.get("app")
    assert secret is not None and secret.password == b"pw-one"
    assert store.get("..data") is None and store.users == ["app", "bench"]


def test_swap_of_data_link_changes_the_fingerprint(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    kubelet_write(folder, {"app": "pw-one"})
    settings = SecretsSettings(dir=folder)
    before = fingerprint(settings)
    assert fingerprint(settings) == before  # nothing changed: the same marks
    kubelet_write(folder, {"app": "pw-two"})
    assert fingerprint(settings) != before
    assert read_dir(folder) == {"app": "pw-two"}


def test_environment_over_folder_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "s.toml").write_text('[users]\napp = "from-file"\nbench = "file-bench"\nonly = "file-only"\n')
    kubelet_write(tmp_path / "dir", {"app": "from-dir", "bench": "dir-bench"})
    monkeypatch.setenv("TESTPW_APP", "from-env")
    store = SecretStore.from_settings(SecretsSettings(file=tmp_path / "s.toml", dir=tmp_path / "dir",
                                                      env_prefix="TESTPW_"))
    found = {user: (store.get(user) or pytest.fail(user)).password for user in ("app", "bench", "only")}
    assert found == {"app": b"from-env", "bench": b"dir-bench", "only": b"file-only"}


def test_secrets_settings() -> None:
    config = parse_config({"secrets": {"dir": "s", "watch_interval": 0.5, "alternating": {"app": "app_clone"}}})
    assert config.secrets.dir == Path("s") and config.secrets.watch_interval == 0.5
    with pytest.raises(ConfigError, match="watch_interval"):
        parse_config({"secrets": {"watch_interval": -1}})


def test_backend_credentials(tmp_path: Path) -> None:
    settings = SecretsSettings(dir=tmp_path, alternating={"app": "app_clone"})
    update(settings, {"app": "client-pw", "bench": "bench-pw"})
    store = SecretStore.from_settings(settings)
    login = store.backend_login("app")
    assert login is not None and (login.user, login.password, login.pending) == ("app", b"client-pw", None)
    update(settings, {"app.backend": "db-pw", "app_clone.backend": "clone-pw", "app_clone.pending": "next",
                      "app.active": "app_clone"})
    store = SecretStore.from_settings(settings)
    login = store.backend_login("app")
    assert login is not None and (login.user, login.password, login.pending) == ("app_clone", b"clone-pw", b"next")
    assert store.get("app.backend") is None and store.users == ["app", "bench"]
    secret = store.get("app")
    assert secret is not None and secret.password == b"client-pw"  # the client-facing password stays
    assert store.backend_login("nobody") is None  # auth passthrough decides


def test_retry_reads_the_secrets_again(tmp_path: Path) -> None:
    settings = SecretsSettings(dir=tmp_path)
    update(settings, {"app": "old"})
    store = SecretStore.from_settings(settings)
    tried = store.backend_login("app")
    assert tried is not None and retry_password(store, "app", tried) is None  # nothing new: no retry
    update(settings, {"app.pending": "new"})
    retry = retry_password(store, "app", tried)
    assert retry is not None and retry[1] == b"new"
    update(settings, {"app.backend": "newer", "app.pending": None})
    retry = retry_password(store, "app", tried)
    assert retry is not None and retry[1] == b"newer"


def test_plain_folder_updates_are_atomic_files(tmp_path: Path) -> None:
    settings = SecretsSettings(dir=tmp_path)
    update(settings, {"app": "one"})
    assert (tmp_path / "app").read_text() == "one"
    assert os.stat(tmp_path / "app").st_mode & 0o777 == 0o600
    update(settings, {"app": None})
    assert not (tmp_path / "app").exists()
    with pytest.raises(ConfigError):
        update(settings, {"../escape": "x"})


def test_kubernetes_folder_updates_swap_data(tmp_path: Path) -> None:
    folder = tmp_path / "k"
    kubelet_write(folder, {"app": "one"})
    before = os.readlink(folder / "..data")
    update(SecretsSettings(dir=folder), {"app.backend": "two"})
    assert os.readlink(folder / "..data") != before and not (folder / before).exists()
    assert read_dir(folder) == {"app": "one", "app.backend": "two"}
    assert (folder / "app.backend").is_symlink()


def test_toml_file_updates(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[users]\napp = "one"\n')
    update(SecretsSettings(file=path), {"app.backend": 'tricky"\\pw\n'})
    store = SecretStore.from_settings(SecretsSettings(file=path))
    login = store.backend_login("app")
    assert login is not None and login.password == b'tricky"\\pw\n'


def test_reprs_show_no_secret(tmp_path: Path) -> None:
    settings = SecretsSettings(dir=tmp_path, rotation_user="admin")
    update(settings, {"app": "very-secret-1", "app.backend": "very-secret-2", "app.pending": "very-secret-3"})
    store = SecretStore.from_settings(settings)
    shown = " ".join([repr(store), str(store), repr(settings), str(settings), repr(store.get("app")),
                      str(store.get("app")), repr(store.backend_login("app")), str(store.backend_login("app"))])
    assert "very-secret" not in shown


def test_changes_go_to_the_first_writable_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only mounted folder (as Kubernetes mounts a Secret): changes go to the file below it, unless the
    folder holds the entry (it would hide the change)."""
    import proxy.secret_sources as sources

    kubelet_write(tmp_path / "mounted", {"app": "client-pw"})
    (tmp_path / "s.toml").write_text('[users]\nadmin = "x"\n')
    settings = SecretsSettings(dir=tmp_path / "mounted", file=tmp_path / "s.toml")
    monkeypatch.setattr(sources, "_writable", lambda kind, path: kind != "dir")
    assert update(settings, {"app.backend": "db-pw"}) == str(tmp_path / "s.toml")
    login = SecretStore.from_settings(settings).backend_login("app")
    assert login is not None and login.password == b"db-pw"
    with pytest.raises(ConfigError, match="cannot be written and holds app"):
        update(settings, {"app": "new"})
    monkeypatch.setattr(sources, "_writable", lambda kind, path: False)
    with pytest.raises(ConfigError, match="is not writable"):
        update(settings, {"other": "x"})


def test_watch_keeps_the_store_when_the_change_does_not_load(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    from proxy.secret_watch import SecretsWatch

    caplog.set_level("INFO")
    path = tmp_path / "s.toml"
    path.write_text('[users]\napp = "pw-one"\n')
    settings = SecretsSettings(file=path)
    used: list[SecretStore] = []
    watch = SecretsWatch(lambda: settings, used.append, fingerprint(settings))
    assert not watch.check() and used == []  # nothing changed
    path.write_text('[users]\napp = "pw-two\n')  # half written: not TOML
    assert not watch.check() and used == []
    assert "secrets changed but cannot be loaded; the previous ones stay in use" in caplog.text
    path.write_text('[users]\napp = "pw-three"\nbench = "x"\n')
    assert watch.check() and len(used) == 1
    secret = used[0].get("app")
    assert secret is not None and secret.password == b"pw-three"
    assert "secrets reloaded (2 users)" in caplog.text and "pw-" not in caplog.text
