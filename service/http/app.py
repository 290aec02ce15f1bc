"""The FastAPI app of the HTTP door: routers, error mapping, and the gate every request passes first."""

from collections.abc import Callable

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service.config import Settings
from service.http import admin, backbones, batch_predictions, datasets, heads, jobs, predict, predictions, webhooks
from service.http.errors import HideInternalErrors, install_error_handlers
from service.http.gate import Gate
from service.http.headers import SecurityHeaders
from service.http.telemetry import RequestMetrics, add_metrics_route
from service.runtime import Runtime
from service.ui import mount_ui


def create_app(settings: Settings, runtime: Callable[[], Runtime]) -> FastAPI:
    """``runtime`` returns this worker's runtime when a request comes (BentoML creates it after the app)."""
    # /docs serves Swagger UI's assets from the installation (fastapi-offline), not a CDN: the service and
    # its container run without internet. One schema per model: requests and responses share the contract's.
    app = FastAPIOffline(
        title="graft",
        version="1",
        description="Transfer learning as a service: upload labelled images, train a head, predict.",
        separate_input_output_schemas=False,
    )
    app.state.runtime = runtime
    for module in (backbones, jobs, batch_predictions, heads, predict, predictions, webhooks, admin):
        app.include_router(module.router)
    # A multipart upload has one file and one label field per image: Starlette's default of 1,000 would
    # refuse uploads the dataset limit allows (the gate bounds their bytes).
    images = settings.max_images_per_dataset
    app.include_router(datasets.router, form_limits={"max_files": images + 1, "max_fields": images + 2})
    routers = (backbones, datasets, jobs, batch_predictions, heads, predict, predictions, webhooks, admin)
    install_error_handlers(app, [route for module in routers for route in module.router.routes])
    add_metrics_route(app, settings)  # /metrics: only with GRAFT_METRICS_KEY (service/http/telemetry.py)
    mount_ui(app)  # the web page at /ui (static files; it calls the /v1 API like any client)
    app.add_middleware(
        Gate,
        settings=settings,
        runtime=runtime,
        predictions=predict.router.routes,
        datasets=datasets.router.routes,
    )
    app.add_middleware(RequestMetrics)
    app.add_middleware(HideInternalErrors)
    app.add_middleware(SecurityHeaders)  # added last: outermost, so that every answer carries them
    return app
