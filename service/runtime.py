"""Everything one service worker runs, started and stopped together.

Both doors (HTTP and gRPC) receive this object and call only its parts, so a
behaviour exists once: the core (storage, backbones, trainer), the predictor
(head cache + one batcher per backbone), background training jobs, and
tenants with their API keys. It also probes the registry database, so both
doors' readiness says "not ready" while the database cannot be reached.
"""

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from sqlalchemy import text

from service.auth import Tenants
from service.calls import in_thread
from service.config import Settings
from service.core import Core
from service.engine.head_cache import HeadCache
from service.engine.predictor import Predictor
from service.jobs import JobRunner
from service.metrics import PrometheusMetrics

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 3.0


@dataclass
class Runtime:
    core: Core
    predictor: Predictor
    jobs: JobRunner
    tenants: Tenants
    registry_reachable: bool = True
    probe_interval_s: float = PROBE_INTERVAL_S
    _probe: asyncio.Task[None] | None = field(default=None, repr=False)

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
        self._probe = asyncio.get_running_loop().create_task(self._probe_forever(), name="registry-probe")

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.jobs.stop()
        await self.predictor.stop()

    async def _probe_forever(self) -> None:
        """``SELECT 1`` every few seconds, in a thread; readiness checks only read the flag it keeps."""
        while True:
            reachable = await in_thread(self._registry_answers)
            if reachable != self.registry_reachable:
                log.warning("registry database is %s", "reachable again" if reachable else "unreachable: not ready")
            self.registry_reachable = reachable
            await asyncio.sleep(self.probe_interval_s)

    def _registry_answers(self) -> bool:
        try:
            with self.core.db.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception as exc:  # any failure means "not ready"; the log says why
            log.debug("registry probe failed: %s", exc)
            return False
