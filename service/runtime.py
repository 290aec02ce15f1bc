"""Everything one service worker runs, started and stopped together.

Both doors (HTTP and gRPC) receive this object and call only its parts, so a
behaviour exists once: the core (storage, backbones, trainer), the predictor
(head cache + one batcher per backbone), background training jobs, and
tenants with their API keys.
"""

from dataclasses import dataclass

from service.auth import Tenants
from service.config import Settings
from service.core import Core
from service.engine.head_cache import HeadCache
from service.engine.predictor import Predictor
from service.jobs import JobRunner
from service.metrics import PrometheusMetrics


@dataclass
class Runtime:
    core: Core
    predictor: Predictor
    jobs: JobRunner
    tenants: Tenants

    @classmethod
    def open(cls, settings: Settings | None = None) -> "Runtime":
        core = Core.open(settings)
        heads = HeadCache(core.heads, core.backbones, core.settings.head_cache_bytes)
        metrics = PrometheusMetrics()
        predictor = Predictor(core.backbones, heads, core.settings, metrics)
        jobs = JobRunner(core.db, core.trainer, core.settings, core.quotas, on_finished=metrics.job_finished)
        tenants = Tenants(core.db, core.settings)
        return cls(core, predictor, jobs, tenants)

    @property
    def settings(self) -> Settings:
        return self.core.settings

    async def start(self) -> None:
        """Call from inside the serving event loop."""
        await self.jobs.start()

    async def stop(self) -> None:
        await self.jobs.stop()
        await self.predictor.stop()
