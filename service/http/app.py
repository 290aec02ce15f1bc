"""The FastAPI app of the HTTP door: routers, error mapping and request limits."""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.config import Settings
from service.http import admin, backbones, datasets, heads, jobs, predict
from service.http.errors import error_body, install_error_handlers


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="graft",
        version="1",
        description="Transfer learning as a service: upload labelled images, train a head, predict.",
    )
    for module in (backbones, datasets, jobs, heads, predict, admin):
        app.include_router(module.router)
    install_error_handlers(app)

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        """Refuse oversized bodies from their declared length, before reading them."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_upload_bytes:
            message = f"request body of {int(declared):,} bytes is over the limit of {settings.max_upload_bytes:,}"
            return JSONResponse(error_body("invalid_argument", message, {}), status_code=413)
        return await call_next(request)

    return app
