"""What every HTTP handler needs: this worker's runtime and the caller's tenant (found by the gate)."""

from fastapi import Request

from service.errors import PermissionDenied, Unauthenticated
from service.http.gate import ADMIN, TENANT
from service.runtime import Runtime


def runtime(request: Request) -> Runtime:
    """The runtime owned by this worker (see ``create_app``)."""
    return request.app.state.runtime()


def tenant(request: Request) -> str:
    """The tenant whose API key the gate checked (core checks ownership)."""
    if TENANT not in request.scope:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    return request.scope[TENANT]


def admin(request: Request) -> None:
    """Routes under /v1/admin: the gate checked the admin key."""
    if not request.scope.get(ADMIN):
        raise PermissionDenied("this endpoint needs the admin key (GRAFT_ADMIN_KEY)")
