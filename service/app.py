"""The BentoML service: one per worker, owning the core that both doors call."""

import logging

import bentoml

from service.core import Core
from service.http.routes import create_app

log = logging.getLogger("graft")


@bentoml.asgi_app(create_app(), path="/")
@bentoml.service(name="graft", traffic={"timeout": 600})
class Graft:
    def __init__(self) -> None:
        self.core = Core.open()
        log.info("graft ready: backbones %s on %s", list(self.core.backbones), self.core.placement.device)

    def __is_ready__(self) -> bool:
        return bool(self.core.backbones)
