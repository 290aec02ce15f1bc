"""The BentoML service: one per worker, owning the runtime that both doors call.

``bentoml serve`` constructs :class:`Graft` (loading the backbones), then runs
the startup hook inside the serving event loop: background jobs start and the
gRPC server starts on its own port in the same loop, so HTTP and gRPC share
one engine, one batcher and one copy of each backbone.

On SIGTERM (a rolling update, a scale-down) the worker drains before it stops:
it reports not ready at once (``/readyz`` 503, gRPC health NOT_SERVING),
refuses new calls so that clients retry on another replica, finishes the calls
in flight, hands running jobs back to the queue, and only then lets the server
stop, all within ``GRAFT_SHUTDOWN_GRACE_S``.
"""

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import cast

import bentoml
from bentoml.exceptions import BentoMLException

from service.config import Settings
from service.grpc.server import GrpcServer, start_grpc_server
from service.http.app import create_app
from service.http.errors import ErrorBodyOutsideTheApp, NotReadyBody
from service.provision import bento_weights_dir
from service.runtime import Runtime

log = logging.getLogger("graft")


def service_settings() -> Settings:
    """The GRAFT_* settings; without GRAFT_WEIGHTS_DIR, the checkpoints packed in the Bento, when the model store
    has them. Built whole, once: nothing changes settings after a runtime read them."""
    settings = Settings()
    if settings.weights_dir is not None:
        return settings
    return settings.model_copy(update={"weights_dir": bento_weights_dir()})


settings = service_settings()


@bentoml.asgi_app(create_app(settings, lambda: bentoml.get_current_service().runtime), path="/")
# BentoML's HTTP metrics label series with raw paths (tenants' head names, unbounded): graft serves /metrics
# itself, by route template and behind GRAFT_METRICS_KEY (service/http/telemetry.py).
@bentoml.service(name="graft", traffic={"timeout": 600}, http={"port": 3000}, metrics={"enabled": False})
class Graft:
    def __init__(self) -> None:
        self.runtime = Runtime.open(settings)
        self.grpc: GrpcServer | None = None
        log.info(
            "graft loaded backbones %s on %s", list(self.runtime.core.backbones), self.runtime.core.placement.device
        )

    @bentoml.on_startup
    async def start(self) -> None:
        await self.runtime.start()
        self.grpc = await start_grpc_server(self.runtime, settings.grpc_port)
        drain_before_stopping_on_sigterm(self.drain)
        tls = "TLS" if settings.grpc_tls_cert_file else "plaintext"
        log.info("graft gRPC listening on port %d (%s)", self.grpc.port, tls)

    async def drain(self) -> None:
        grace = settings.shutdown_grace_s
        log.info("SIGTERM: draining for at most %.0f s", grace)
        grpc_server = self.grpc
        await asyncio.gather(self.runtime.drain(grace), grpc_server.stop(grace) if grpc_server else asyncio.sleep(0))
        log.info("drained; stopping")

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop(grace=settings.shutdown_grace_s)
        await self.runtime.stop()

    def __is_ready__(self) -> bool:
        """Read by /readyz: only flags (registry probe, draining, role), never a database call on the event loop.

        A replica that only trains (GRAFT_ROLE=train) is never ready: no load balancer sends it predictions.
        Liveness (/livez) does not ask this: such a replica stays alive."""
        return self.grpc is not None and self.runtime.ready


def not_ready_reason() -> str | None:
    """Why this worker's /readyz is 503, for the person reading it; None: ready, or not started (BentoML answers)."""
    try:
        runtime = getattr(bentoml.get_current_service(), "runtime", None)
    except BentoMLException:
        return None
    return runtime.not_ready_reason if isinstance(runtime, Runtime) else None


# Unknown routes and BentoML's own routes answer errors in the HTTP door's error body too, and /readyz says why it
# is not ready. (The decorators made Graft a bentoml.Service; their stubs keep the class's type.)
cast("bentoml.Service[Graft]", Graft).add_asgi_middleware(ErrorBodyOutsideTheApp)
cast("bentoml.Service[Graft]", Graft).add_asgi_middleware(NotReadyBody, reason=not_ready_reason)


def drain_before_stopping_on_sigterm(drain: Callable[[], Awaitable[None]]) -> None:
    """Put ``drain`` in front of the server's own SIGTERM handler (uvicorn's, which stops it at once).

    Call from the serving loop's thread (the main one). A second SIGTERM goes straight to the server.
    """
    server_handler = signal.getsignal(signal.SIGTERM)
    if not callable(server_handler):
        return  # not run by a server that handles SIGTERM (e.g. a test's in-process runtime)
    loop = asyncio.get_running_loop()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, server_handler)

        async def drain_then_stop() -> None:
            try:
                await drain()
            finally:
                server_handler(signum, frame)

        loop.call_soon_threadsafe(lambda: loop.create_task(drain_then_stop(), name="drain"))

    signal.signal(signal.SIGTERM, on_sigterm)
