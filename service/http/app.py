"""The FastAPI app of the HTTP door: routers, error mapping, and the gate every request passes first."""

from collections.abc import Callable

from fastapi import FastAPI

from service.config import Settings
from service.http import admin, backbones, datasets, heads, jobs, predict
from service.http.errors import HideInternalErrors, install_error_handlers
from service.http.gate import Gate
from service.runtime import Runtime


def create_app(settings: Settings, runtime: Callable[[], Runtime]) -> FastAPI:
    """``runtime`` returns this worker's runtime when a request comes (BentoML creates it after the app)."""
    app = FastAPI(
        title="graft",
        version="1",
        description="Transfer learning as a service: upload labelled images, train a head, predict.",
    )
    app.state.runtime = runtime
    for module in (backbones, datasets, jobs, heads, predict, admin):
        app.include_router(module.router)
    install_error_handlers(app)
    app.add_middleware(Gate, settings=settings, runtime=runtime)
    app.add_middleware(HideInternalErrors)  # added last: outermost
    return app
