"""The BentoML service: one per worker, owning the runtime that both doors call.

``bentoml serve`` constructs :class:`Graft` (loading the backbones), then runs
the startup hook inside the serving event loop: background jobs start and the
gRPC server starts on its own port in the same loop, so HTTP and gRPC share
one engine, one batcher and one copy of each backbone.
"""

import logging

import bentoml

from service.config import Settings
from service.grpc.server import GrpcServer, start_grpc_server
from service.http.app import create_app
from service.provision import bento_weights_dir
from service.runtime import Runtime

log = logging.getLogger("graft")
settings = Settings()
if settings.weights_dir is None:
    settings.weights_dir = bento_weights_dir()


@bentoml.asgi_app(create_app(settings, lambda: bentoml.get_current_service().runtime), path="/")
@bentoml.service(name="graft", traffic={"timeout": 600}, http={"port": 3000})
class Graft:
    def __init__(self) -> None:
        self.runtime = Runtime.open(settings)
        self.grpc: GrpcServer | None = None
        log.info("graft loaded backbones %s on %s", list(self.runtime.core.backbones), self.runtime.core.placement.device)

    @bentoml.on_startup
    async def start(self) -> None:
        await self.runtime.start()
        self.grpc = await start_grpc_server(self.runtime, settings.grpc_port)
        log.info("graft gRPC listening on port %d", self.grpc.port)

    @bentoml.on_shutdown
    async def stop(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop(grace=10)
        await self.runtime.stop()

    def __is_ready__(self) -> bool:
        """Read by /readyz: only a flag the registry probe keeps, never a database call on the event loop."""
        return self.grpc is not None and self.runtime.registry_reachable
