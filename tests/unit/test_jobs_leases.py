"""Jobs across replicas: leases, requeueing, shutdown, publishing only by the lease holder, fair claiming."""

import asyncio
import threading
from datetime import timedelta

import anyio
import pytest
from sqlalchemy import update

from adapters.search_space import SearchSpace
from harness.sample_data import fashion_mnist_pngs
from service.core import Core
from service.jobs import JobRunner, JobState, LeaseLost
from service.quotas import Quotas
from service.store.db import JobRow, utcnow
from service.training import Trainer, TrainRequest

pytestmark = pytest.mark.anyio

TENANT = "acme"
ONE_TRIAL = SearchSpace(lr=[1.0], weight_decay=[1e-3])
TWO_TRIALS = SearchSpace(lr=[1.0], weight_decay=[1e-3, 1e-2])


@pytest.fixture
def core(tmp_path, make_core) -> Core:
    return make_core(tmp_path)


@pytest.fixture(scope="module")
def images():
    files = fashion_mnist_pngs("train", per_class=6, seed=5)
    return [(f"{i}.png", data, label) for i, (data, label) in enumerate(files) if label in ("trouser", "bag")]


@pytest.fixture
def dataset(core, images):
    return core.datasets.create(TENANT, "two-classes", images)


def make_runner(core: Core, trainer: Trainer | None = None, on_finished=None, **settings) -> JobRunner:
    changed = core.settings.model_copy(update=settings)
    return JobRunner(core.db, trainer or core.trainer, changed, Quotas(changed), on_finished=on_finished)


def request(dataset, head_name: str, search: SearchSpace = ONE_TRIAL) -> TrainRequest:
    return TrainRequest(dataset_id=dataset.id, head_name=head_name, search=search)


class HeldTrainer(Trainer):
    """The real trainer, held at a gate once a progress report of phase ``hold_after`` has been passed on.

    ``hold_after=None`` holds before the first report is passed on. Records the
    order runs started in and how each ended.
    """

    def __init__(self, trainer: Trainer, hold_after: str | None = None) -> None:
        super().__init__(
            trainer.backbones, trainer.datasets, trainer.extractor, trainer.heads, trainer.default_backbone
        )
        self.hold_after = hold_after
        self.held = threading.Event()
        self.gate = threading.Event()
        self.order: list[str] = []
        self.outcomes: list[object] = []  # the head version stored, or the exception raised
        self.ended = threading.Event()

    def train(self, tenant, request, *, progress=None, **kwargs):
        self.order.append(request.head_name)

        def held(event):
            if self.hold_after is None:
                self.hold()
            progress(event)
            if event.phase == self.hold_after:
                self.hold()

        try:
            version = super().train(tenant, request, progress=held, **kwargs)
        except Exception as exc:
            self.outcomes.append(exc)
            raise
        finally:
            self.ended.set()
        self.outcomes.append(version)
        return version

    def hold(self) -> None:
        self.held.set()
        self.gate.wait(timeout=60)


async def wait_for(flag: threading.Event) -> None:
    assert await anyio.to_thread.run_sync(flag.wait, 60), "never happened"


async def until_done(runner: JobRunner, tenant: str, job_id: str):
    with anyio.fail_after(300):
        return [update async for update in runner.watch(tenant, job_id)][-1]


def job_row(core: Core, job_id: str) -> JobRow:
    with core.db.session() as session:
        return session.get_one(JobRow, job_id)


def expire_lease(core: Core, job_id: str) -> None:
    """What a replica that stopped renewing (frozen, partitioned, dead) leaves behind."""
    with core.db.session() as session:
        session.execute(
            update(JobRow).where(JobRow.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


async def test_a_run_that_lost_its_lease_never_publishes_its_head(core, dataset):
    frozen = HeldTrainer(core.trainer, hold_after="save")  # held just before it would store the head
    first = make_runner(core, frozen, job_lease_s=600.0)  # renews every 200 s: not during this test
    await first.start()
    second = make_runner(core)
    try:
        job = await first.submit(TENANT, request(dataset, "raced"))
        await wait_for(frozen.held)
        expire_lease(core, job.id)
        await second.start()  # requeues the expired job and runs it again
        final = await until_done(second, TENANT, job.id)
        frozen.gate.set()
        await wait_for(frozen.ended)
    finally:
        frozen.gate.set()
        await first.stop()
        await second.stop()

    assert isinstance(frozen.outcomes[0], LeaseLost)
    head = core.heads.get(TENANT, "raced")
    assert [version.version for version in head.versions] == [final.head_version] == [1]
    assert (final.state, job_row(core, job.id).attempts, job_row(core, job.id).state) == (
        JobState.SUCCEEDED,
        2,
        JobState.SUCCEEDED.value,
    )


async def test_expired_leases_are_requeued_and_failed_after_the_last_attempt(core, dataset):
    idle = make_runner(core)  # submits without claiming: not started yet
    retried = await idle.submit(TENANT, request(dataset, "retried"))
    exhausted = await idle.submit(TENANT, request(dataset, "exhausted"))
    with core.db.session() as session:  # as a replica that died mid-run left them
        for job_id, attempts in ((retried.id, 1), (exhausted.id, 3)):
            session.execute(
                update(JobRow)
                .where(JobRow.id == job_id)
                .values(state="running", worker="gone:1:dead", attempts=attempts, lease_expires_at=utcnow())
            )

    runner = make_runner(core, max_job_attempts=3)
    await runner.start()
    try:
        again = await until_done(runner, TENANT, retried.id)
        failed = await until_done(runner, TENANT, exhausted.id)
    finally:
        await runner.stop()
    assert (again.state, job_row(core, retried.id).attempts) == (JobState.SUCCEEDED, 2)
    assert failed.state is JobState.FAILED
    assert "tried 3 times" in failed.error and "GRAFT_MAX_JOB_ATTEMPTS" in failed.error


async def test_stopping_hands_running_jobs_back_and_leaves_queued_ones_for_the_next_replica(core, dataset):
    trainer = HeldTrainer(core.trainer)
    finished = []
    runner = make_runner(core, trainer, on_finished=finished.append)
    await runner.start()
    running = await runner.submit(TENANT, request(dataset, "interrupted", TWO_TRIALS))
    await wait_for(trainer.held)
    queued = await runner.submit(TENANT, request(dataset, "waiting"))

    stopping = asyncio.create_task(runner.stop())
    await asyncio.sleep(0)  # stop() has asked the running job to stop
    trainer.gate.set()
    await stopping

    for job in (running, queued):
        row = job_row(core, job.id)
        assert (row.state, row.attempts, row.worker) == ("queued", 0, None)  # the interrupted run is not counted
    assert finished == []

    restarted = make_runner(core)
    await restarted.start()
    try:
        finals = [await until_done(restarted, TENANT, job.id) for job in (running, queued)]
    finally:
        await restarted.stop()
    assert [final.state for final in finals] == [JobState.SUCCEEDED, JobState.SUCCEEDED]


async def test_leases_are_renewed_while_the_default_executor_is_saturated(core, dataset):
    trainer = HeldTrainer(core.trainer)
    runner = make_runner(core, trainer, job_lease_s=3.0)
    await runner.start()
    release = threading.Event()
    loop = asyncio.get_running_loop()
    try:
        job = await runner.submit(TENANT, request(dataset, "busy-replica"))
        await wait_for(trainer.held)
        leased_until = job_row(core, job.id).lease_expires_at
        # Every default-executor thread busy, as when a replica decodes many images at once.
        blockers = [loop.run_in_executor(None, release.wait) for _ in range(64)]
        with anyio.fail_after(30):
            while job_row(core, job.id).lease_expires_at <= leased_until:  # read on the loop: the pool is full
                await asyncio.sleep(0.1)
    finally:
        release.set()
        trainer.gate.set()
    await asyncio.gather(*blockers)
    await until_done(runner, TENANT, job.id)
    await runner.stop()


async def test_one_tenants_queued_jobs_do_not_delay_another_tenants_first_job(core, dataset, images):
    quiet = core.datasets.create("quiet", "theirs", images)
    trainer = HeldTrainer(core.trainer)
    runner = make_runner(core, trainer, max_concurrent_jobs=1)
    await runner.start()
    try:
        busy_jobs = [await runner.submit(TENANT, request(dataset, "busy-0"))]
        await wait_for(trainer.held)
        busy_jobs += [await runner.submit(TENANT, request(dataset, f"busy-{i}")) for i in (1, 2)]
        quiet_job = await runner.submit("quiet", request(quiet, "quiet-0"))
        trainer.gate.set()
        for job in busy_jobs:
            await until_done(runner, TENANT, job.id)
        await until_done(runner, "quiet", quiet_job.id)
    finally:
        trainer.gate.set()
        await runner.stop()
    assert trainer.order == ["busy-0", "quiet-0", "busy-1", "busy-2"]
