"""``/metrics`` for Prometheus: graft's series and its HTTP traffic by route template, behind a bearer key.

BentoML's own HTTP instrumentation is switched off (``metrics={"enabled": False}`` in service/app.py): it
labels series with the raw request path, so anyone could read other tenants' head names from it and grow it
without bound with distinct paths. Here a request is labelled with the template of the route that took it
(``/v1/heads/{head}``), or ``unmatched``; its method is one of the standard ones or ``OTHER``. So the number
of series is fixed by the code, and no label holds a caller's value.

``/metrics`` answers only ``Authorization: Bearer $GRAFT_METRICS_KEY`` (a Prometheus scrape sends it with
``authorization: {credentials_file: ...}``); without the setting it answers in open mode only.
"""

import hmac
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.errors import FailedPrecondition, GraftError, PermissionDenied, Unauthenticated
from service.http.errors import error_response

REQUESTS = Counter(
    name="graft_http_requests_total",
    documentation="HTTP requests answered, by route template, method and status.",
    labelnames=["route", "method", "code"],
)
SECONDS = Histogram(
    name="graft_http_request_duration_seconds",
    documentation="HTTP request duration, by route template and method.",
    labelnames=["route", "method"],
)
_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


class RequestMetrics:
    """Counts every request of the app under its route template (bounded labels)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        status = 500
        started = time.perf_counter()

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # the router records its match
            REQUESTS.labels(route=route, method=method, code=str(status)).inc()
            SECONDS.labels(route=route, method=method).observe(time.perf_counter() - started)


def add_metrics_route(app: FastAPI, settings: Settings) -> None:
    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        problem = _refusal(settings, request.headers.get("authorization"))
        if problem is not None:
            return error_response(problem)
        registry: CollectorRegistry = REGISTRY
        if folder := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=folder)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _refusal(settings: Settings, authorization: str | None) -> GraftError | None:
    if settings.auth == "open":
        return None
    if settings.metrics_key is None:
        return FailedPrecondition("/metrics is disabled: start the service with GRAFT_METRICS_KEY set")
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return Unauthenticated("/metrics needs 'Authorization: Bearer <GRAFT_METRICS_KEY>'")
    if not hmac.compare_digest(token.strip().encode(), settings.metrics_key.get_secret_value().encode()):
        return PermissionDenied("/metrics needs the metrics key (GRAFT_METRICS_KEY)")
    return None
