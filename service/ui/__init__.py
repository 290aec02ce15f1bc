"""The web page: static files served by the service itself, at ``/ui``, with ``/`` sending people there.

Plain HTML, CSS and JavaScript modules in ``static/``: no build step and no CDN, so the page works wherever
the service does, offline included. The page only calls the public ``/v1`` API, as any client would; the
gate lets ``/ui`` through without a key (it holds no data), and the page asks for one when ``/v1`` says 401.
"""

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount_ui(app: FastAPI) -> None:
    """Serve the page at ``/ui/`` and redirect ``/`` to it; neither appears in the OpenAPI document."""
    app.mount("/ui", StaticFiles(directory=STATIC, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    def to_the_page() -> RedirectResponse:
        return RedirectResponse("/ui/")
