"""What every HTTP handler needs: this worker's runtime and the caller's tenant."""

import bentoml
from fastapi import Depends, Request

from service.runtime import Runtime


def runtime() -> Runtime:
    """The runtime owned by this worker's BentoML service instance."""
    return bentoml.get_current_service().runtime


def tenant(request: Request, rt: Runtime = Depends(runtime)) -> str:
    """The tenant whose API key is in ``Authorization: Bearer …`` (core checks ownership)."""
    return rt.tenants.authenticate(request.headers.get("authorization"))
