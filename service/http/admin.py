"""``/v1/admin``: tenants and API keys, for the holder of ``GRAFT_ADMIN_KEY``."""

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, StringConstraints

from service import calls
from service.auth import NewKey, TenantInfo
from service.http.deps import IdempotencyKey, admin, runtime
from service.http.errors import COMMON_ERRORS, error_responses
from service.resources import HEAD_NAME_PATTERN
from service.runtime import Runtime

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=error_responses(*COMMON_ERRORS, 403, 404, 409))

# Tenant names follow the rule of head names (service.store.heads.check_name); key ids are 12 hex digits.
TENANT_NAME = HEAD_NAME_PATTERN
KEY_ID_PATTERN = r"^[0-9a-f]{12}$"


class NewTenant(BaseModel):
    name: Annotated[str, StringConstraints(pattern=TENANT_NAME)]


@router.post("/tenants", status_code=201, dependencies=[Depends(admin)])
def create_tenant(body: NewTenant, rt: Runtime = Depends(runtime)) -> TenantInfo:
    return rt.tenants.create_tenant(body.name)


@router.post("/tenants/{name}/keys", status_code=201, dependencies=[Depends(admin)])
async def create_key(
    name: Annotated[str, Path(pattern=TENANT_NAME)],
    idempotency_key: IdempotencyKey = None,
    rt: Runtime = Depends(runtime),
) -> NewKey:
    """A new API key for the tenant; the secret is shown in this response only (and, with an ``Idempotency-Key``,
    in the answer to a repeat of this request, which gives the same key instead of another)."""
    return await calls.create_key(rt, name, idempotency_key)


@router.delete("/keys/{key_id}", status_code=204, dependencies=[Depends(admin)])
def revoke_key(key_id: Annotated[str, Path(pattern=KEY_ID_PATTERN)], rt: Runtime = Depends(runtime)) -> None:
    rt.tenants.revoke_key(key_id)
