"""The BentoML service: one per worker, owning the runtime that both doors call.

``bentoml serve`` constructs :class:`Graft` (loading the backbones), then runs
the startup hook inside the serving event loop, where background jobs start.
"""

import logging

import bentoml

from service.config import Settings
from service.http.app import create_app
from service.provision import bento_weights_dir
from service.runtime import Runtime

log = logging.getLogger("graft")
settings = Settings()
if settings.weights_dir is None:
    settings.weights_dir = bento_weights_dir()


@bentoml.asgi_app(create_app(settings), path="/")
@bentoml.service(name="graft", traffic={"timeout": 600}, http={"port": 3000})
class Graft:
    def __init__(self) -> None:
        self.runtime = Runtime.open(settings)
        self.started = False
        log.info("graft loaded backbones %s on %s", list(self.runtime.core.backbones), self.runtime.core.placement.device)

    @bentoml.on_startup
    async def start(self) -> None:
        await self.runtime.start()
        self.started = True

    @bentoml.on_shutdown
    async def stop(self) -> None:
        await self.runtime.stop()

    def __is_ready__(self) -> bool:
        return self.started
