"""``/v1/admin``: tenants and API keys, for the holder of ``GRAFT_ADMIN_KEY``."""

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from service.http.deps import admin, runtime
from service.http.errors import COMMON_ERRORS, error_responses
from service.runtime import Runtime

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=error_responses(*COMMON_ERRORS, 403, 404, 409))


class NewTenant(BaseModel):
    name: str


@router.post("/tenants", status_code=201, dependencies=[Depends(admin)])
def create_tenant(body: NewTenant, rt: Runtime = Depends(runtime)):
    return rt.tenants.create_tenant(body.name)


@router.post("/tenants/{name}/keys", status_code=201, dependencies=[Depends(admin)])
def create_key(name: str, rt: Runtime = Depends(runtime)):
    """A new API key for the tenant; the secret is shown in this response only."""
    return rt.tenants.create_key(name)


@router.delete("/keys/{key_id}", status_code=204, dependencies=[Depends(admin)])
def revoke_key(key_id: str, rt: Runtime = Depends(runtime)) -> None:
    rt.tenants.revoke_key(key_id)
