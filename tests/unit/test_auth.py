"""Tenants and API keys: hashed at rest, checked on every call, managed by the admin or the CLI."""

import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import event

from service import admin
from service.auth import OPEN_TENANT, Tenants, _caller
from service.config import Settings
from service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from service.store.db import Database

ADMIN_KEY = "admin-secret-for-tests-4f9c2a7e1b3d5f60"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, admin_key=SecretStr(ADMIN_KEY))


@pytest.fixture
def tenants(settings) -> Tenants:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Tenants(Database(settings.resolved_registry_url), settings)


def bearer(secret: str) -> str:
    return f"Bearer {secret}"


# -- keys --------------------------------------------------------------------------------


def test_a_new_key_authenticates_its_tenant(tenants):
    tenants.create_tenant("acme")
    key = tenants.create_key("acme")
    assert key.secret.startswith(f"graft_{key.key_id}_")
    assert tenants.authenticate(bearer(key.secret)) == "acme"
    assert tenants.authenticate(f"bearer   {key.secret}  ") == "acme"  # scheme is case-insensitive


def test_the_database_holds_only_a_hash_of_the_secret(tenants, settings):
    tenants.create_tenant("acme")
    key = tenants.create_key("acme")
    dump = "\n".join(sqlite3.connect(settings.data_dir / "registry.db").iterdump())
    assert key.key_id in dump
    assert key.secret not in dump
    assert key.secret.removeprefix(f"graft_{key.key_id}_") not in dump


def test_each_key_maps_to_its_own_tenant(tenants):
    for name in ("acme", "globex"):
        tenants.create_tenant(name)
    acme, globex = tenants.create_key("acme"), tenants.create_key("globex")
    assert tenants.authenticate(bearer(acme.secret)) == "acme"
    assert tenants.authenticate(bearer(globex.secret)) == "globex"
    # another key's id with this key's secret part is no key at all
    forged = f"graft_{globex.key_id}_{acme.secret.rsplit('_', 1)[-1]}"
    with pytest.raises(Unauthenticated, match="invalid API key"):
        tenants.authenticate(bearer(forged))


def test_a_missing_key_says_how_to_send_one(tenants):
    for header in (None, ""):
        with pytest.raises(Unauthenticated, match="missing API key: send 'Authorization: Bearer <key>'"):
            tenants.authenticate(header)


@pytest.mark.parametrize("header", ["graft_abc", "Basic dXNlcjpwYXNz", "Bearer", "Bearer a b"])
def test_a_malformed_header_is_unauthenticated(tenants, header):
    with pytest.raises(Unauthenticated, match="malformed Authorization header"):
        tenants.authenticate(header)


def test_unknown_and_made_up_keys_are_invalid(tenants):
    tenants.create_tenant("acme")
    real = tenants.create_key("acme").secret
    tampered = real[:-1] + ("A" if real[-1] != "A" else "B")
    for secret in ("nonsense", f"graft_000000000000_{'x' * 43}", tampered):
        with pytest.raises(Unauthenticated, match="invalid API key"):
            tenants.authenticate(bearer(secret))


def test_a_revoked_key_stops_working_and_others_keep_working(tenants):
    tenants.create_tenant("acme")
    revoked, kept = tenants.create_key("acme"), tenants.create_key("acme")
    tenants.revoke_key(revoked.key_id)
    tenants.revoke_key(revoked.key_id)  # twice is harmless
    with pytest.raises(Unauthenticated, match="invalid API key"):
        tenants.authenticate(bearer(revoked.secret))
    assert tenants.authenticate(bearer(kept.secret)) == "acme"
    with pytest.raises(NotFound):
        tenants.revoke_key("000000000000")


def test_open_mode_makes_every_caller_the_default_tenant(tmp_path):
    settings = Settings(data_dir=tmp_path, auth="open")
    tenants = Tenants(Database(settings.resolved_registry_url), settings)
    assert tenants.authenticate(None) == OPEN_TENANT == "default"
    assert tenants.authenticate("Bearer anything") == "default"


# -- tenants -------------------------------------------------------------------------------


def test_tenants_are_created_once_and_listed_by_name(tenants):
    for name in ("globex", "acme"):
        tenants.create_tenant(name)
    with pytest.raises(AlreadyExists):
        tenants.create_tenant("acme")
    assert [t.name for t in tenants.list_tenants()] == ["acme", "globex"]


@pytest.mark.parametrize("name", ["", "Acme", "a_b", "1st", "x" * 64])
def test_tenant_names_follow_the_head_name_rules(tenants, name):
    with pytest.raises(InvalidArgument, match="tenant name"):
        tenants.create_tenant(name)


def test_keys_are_only_issued_for_existing_tenants(tenants):
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        tenants.create_key("nobody")


# -- the admin key ---------------------------------------------------------------------------


def test_the_admin_key_opens_admin_endpoints_and_is_never_counted_as_a_failure(tenants, settings):
    """More calls than failed authentications may burst: each is let through, none is held against the caller."""
    for _ in range(settings.auth_failures_burst + 5):
        tenants.require_admin(bearer(ADMIN_KEY))  # raises for any other key (the next test)
    assert tenants.failures.wait_s(_caller(bearer(ADMIN_KEY))) == 0


def test_admin_endpoints_refuse_other_callers(tenants):
    tenants.create_tenant("acme")
    tenant_key = tenants.create_key("acme").secret
    for wrong in (tenant_key, ADMIN_KEY + "x"):
        with pytest.raises(PermissionDenied):
            tenants.require_admin(bearer(wrong))
    with pytest.raises(Unauthenticated, match="missing API key"):
        tenants.require_admin(None)


def test_admin_endpoints_are_disabled_without_an_admin_key(tmp_path):
    settings = Settings(data_dir=tmp_path, admin_key=None)
    tenants = Tenants(Database(settings.resolved_registry_url), settings)
    with pytest.raises(FailedPrecondition, match="GRAFT_ADMIN_KEY"):
        tenants.require_admin(bearer("anything"))


# -- the command line -------------------------------------------------------------------------


def admin_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GRAFT_DATA_DIR": str(data_dir)}
    env.pop("GRAFT_REGISTRY_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "service.admin", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def test_the_cli_creates_tenants_and_keys_the_service_accepts(tmp_path):
    assert admin_cli(tmp_path, "create-tenant", "acme").returncode == 0
    created = admin_cli(tmp_path, "create-key", "acme")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()  # stdout is the key alone, for scripts

    settings = Settings(data_dir=tmp_path)
    tenants = Tenants(Database(settings.resolved_registry_url), settings)
    assert tenants.authenticate(bearer(secret)) == "acme"

    key_id = secret.split("_")[1]
    assert admin_cli(tmp_path, "revoke-key", key_id).returncode == 0
    with pytest.raises(Unauthenticated):
        tenants.authenticate(bearer(secret))


def test_the_cli_lists_tenants_and_explains_refusals(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRAFT_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("GRAFT_REGISTRY_URL", raising=False)
    assert admin.main(["create-tenant", "acme"]) == 0
    assert admin.main(["list-tenants"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split("\t")[0] == "acme"

    assert admin.main(["create-key", "nobody"]) == 1
    assert "error: tenant 'nobody' not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        admin.main(["no-such-command"])
    assert usage.value.code == 2


def test_two_replicas_creating_one_tenant_at_once_get_one_tenant_and_one_already_exists(registry_url, tmp_path):
    """The second creator is held between its existence check and its insert while the first commits."""
    settings = Settings(data_dir=tmp_path, admin_key=SecretStr(ADMIN_KEY))
    first, second = Database(registry_url), Database(registry_url)
    paused = threading.Event()

    def hold_the_insert(_conn, _cursor, statement: str, *_args) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO TENANTS") and not paused.is_set():
            paused.set()
            threading.Event().wait(0.5)

    event.listen(second.engine, "before_cursor_execute", hold_the_insert)
    outcomes: list[object] = []

    def create(db: Database) -> None:
        try:
            outcomes.append(Tenants(db, settings).create_tenant("acme"))
        except AlreadyExists as exc:
            outcomes.append(exc)

    held = threading.Thread(target=create, args=(second,))
    held.start()
    assert paused.wait(10)
    create(first)
    held.join(10)
    assert sorted(type(outcome).__name__ for outcome in outcomes) == ["AlreadyExists", "TenantInfo"]
    assert [tenant.name for tenant in Tenants(first, settings).list_tenants()] == ["acme"]
    first.close()
    second.close()
