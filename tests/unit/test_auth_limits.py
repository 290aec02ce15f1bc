"""The admin key must be strong, and guessing keys is rate limited per client over both doors."""

import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from pydantic import SecretStr

from service.auth import CLIENT, Tenants
from service.config import Settings, WeakKeyError
from service.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.runtime import Runtime
from service.store.db import Database

STRONG = "9f2c4e6a8b0d1f3e5a7c9e1b3d5f7a9c2e4b6d8f0a1c3e5b"
REPO = Path(__file__).resolve().parents[2]


def tenants(tmp_path: Path, **settings) -> Tenants:
    s = Settings(data_dir=tmp_path, admin_key=SecretStr(STRONG), **settings)
    return Tenants(Database(s.resolved_registry_url), s)


@pytest.mark.parametrize("weak", ["change-me", "test-admin-key", "a" * 64, "abcabcabcabcabcabcabcabcabcabcabcabc"])
def test_a_short_or_obvious_admin_key_is_refused_with_how_to_make_one(weak: str) -> None:
    with pytest.raises(WeakKeyError, match=r"openssl rand -hex 32") as refused:
        Settings(admin_key=SecretStr(weak))
    assert weak not in str(refused.value)  # never echoed into a log
    assert Settings(admin_key=SecretStr(STRONG)).admin_key is not None


def test_the_service_does_not_start_with_a_weak_admin_key() -> None:
    env = {**os.environ, "GRAFT_ADMIN_KEY": "change-me", "GRAFT_BACKBONES": "[]"}
    result = subprocess.run(
        [sys.executable, "-c", "import service.app"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "GRAFT_ADMIN_KEY is too weak" in result.stderr and "openssl rand -hex 32" in result.stderr


def test_failed_authentications_from_one_address_get_429_but_valid_keys_still_pass(tmp_path) -> None:
    t = tenants(tmp_path, auth_failures_burst=3, auth_failures_per_minute=6)
    t.create_tenant("acme")
    good = f"Bearer {t.create_key('acme').secret}"
    CLIENT.set("10.0.0.1")
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            t.authenticate("Bearer graft_000000000000_" + "x" * 43)
    with pytest.raises(ResourceExhausted) as limited:
        t.authenticate("Bearer wrong")
    assert 1 <= limited.value.retry_after_s <= 10
    assert t.authenticate(good) == "acme"  # a valid key is never locked out by its neighbours' failures
    CLIENT.set("10.0.0.2")
    with pytest.raises(Unauthenticated):  # another address has its own budget
        t.authenticate("Bearer wrong")


def test_admin_key_guesses_are_refused_before_the_comparison_once_over_the_limit(tmp_path) -> None:
    t = tenants(tmp_path, auth_failures_burst=2)
    CLIENT.set("10.0.0.3")
    for _ in range(2):
        with pytest.raises(PermissionDenied):
            t.require_admin("Bearer " + STRONG[:-1] + "0")
    with pytest.raises(ResourceExhausted):
        t.require_admin(f"Bearer {STRONG}")  # even the right key: the guesser must not learn it was right
    CLIENT.set("10.0.0.4")
    t.require_admin(f"Bearer {STRONG}")


def test_admin_calls_are_rate_limited_per_address(tmp_path) -> None:
    t = tenants(tmp_path, admin_calls_per_minute=3)
    CLIENT.set("10.0.0.5")
    for _ in range(3):
        t.require_admin(f"Bearer {STRONG}")
    with pytest.raises(ResourceExhausted, match="admin calls"):
        t.require_admin(f"Bearer {STRONG}")


@pytest.mark.anyio
async def test_the_http_door_answers_429_with_retry_after_to_a_key_guesser(tmp_path) -> None:
    runtime = Runtime.open(
        Settings(data_dir=tmp_path, auth="keys", backbones=[], admin_key=SecretStr(STRONG), auth_failures_burst=3)
    )
    transport = httpx.ASGITransport(app=create_app(runtime.settings, lambda: runtime), client=("10.1.1.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:
        codes = [
            (await client.get("/v1/heads", headers={"Authorization": "Bearer nope"})).status_code for _ in range(3)
        ]
        assert codes == [401, 401, 401]
        limited = await client.get("/v1/heads", headers={"Authorization": "Bearer nope"})
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        admin = await client.post(
            "/v1/admin/tenants", json={"name": "x"}, headers={"Authorization": f"Bearer {STRONG}"}
        )
        assert admin.status_code == 429  # the same address, the same budget, before the admin key is compared


@pytest.mark.anyio
async def test_the_grpc_door_answers_resource_exhausted_to_a_key_guesser(tmp_path) -> None:
    runtime = Runtime.open(Settings(data_dir=tmp_path, auth="keys", backbones=[], auth_failures_burst=3))
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = rpc.HeadServiceStub(channel)
            wrong = [("authorization", "Bearer graft_000000000000_" + "y" * 43)]
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ListHeads(api.ListHeadsRequest(), metadata=wrong)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as limited:
                await stub.ListHeads(api.ListHeadsRequest(), metadata=[("authorization", "Bearer other-guess")])
            assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # keyed on the peer's address
            assert dict(limited.value.trailing_metadata() or ())["retry-after"]
    finally:
        await server.stop(grace=1)
