"""Background training jobs on a real backbone and real images: run, watch, list, cancel, recover."""

import asyncio
import socket
import subprocess
import sys
import threading
from datetime import timedelta

import anyio
import pytest

from adapters.heads import HeadKind
from adapters.tuning import SearchSpace
from sample_data import fashion_mnist_pngs
from service.core import Core
from service.errors import FailedPrecondition, InvalidArgument, NotFound
from service.jobs import RESTARTED, JobInfo, JobRunner, JobState
from service.store.db import JobRow, utcnow
from service.training import Trainer, TrainRequest

pytestmark = pytest.mark.anyio

TENANT = "acme"
ONE_TRIAL = SearchSpace(lr=[1.0], weight_decay=[1e-3])
TWO_TRIALS = SearchSpace(lr=[1.0], weight_decay=[1e-3, 1e-2])  # the cancel flag is checked between trials


@pytest.fixture(scope="module")
def core(tmp_path_factory, make_core) -> Core:
    return make_core(tmp_path_factory.mktemp("graft"))


@pytest.fixture(scope="module")
def images():
    """Two classes x 6 real Fashion-MNIST PNGs."""
    files = fashion_mnist_pngs("train", per_class=6, seed=5)
    return [(f"{i}.png", data, label) for i, (data, label) in enumerate(files) if label in ("trouser", "bag")]


@pytest.fixture(scope="module")
def dataset(core, images):
    return core.datasets.create(TENANT, "two-classes", images)


@pytest.fixture
async def runner(core):
    runner = JobRunner(core.db, core.trainer)
    await runner.start()
    yield runner
    await runner.stop()


class GatedTrainer(Trainer):
    """The real trainer, except that a job holds at its first progress report until the gate opens."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer.backbones, trainer.datasets, trainer.extractor, trainer.heads)
        self.started = threading.Event()
        self.gate = threading.Event()

    def train(self, tenant, request, *, progress=None, cancelled=None, **kwargs):
        self.cancelled = cancelled

        def held(event):
            self.started.set()
            self.gate.wait(timeout=60)
            progress(event)

        return super().train(tenant, request, progress=held, cancelled=cancelled, **kwargs)


@pytest.fixture
async def gated(core):
    """A runner with one training slot whose trainer is a GatedTrainer."""
    trainer = GatedTrainer(core.trainer)
    runner = JobRunner(core.db, trainer, heartbeat_s=0.05)
    await runner.start()
    yield runner, trainer
    trainer.gate.set()
    await runner.stop()


async def wait_until_held(trainer: GatedTrainer) -> None:
    assert await anyio.to_thread.run_sync(trainer.started.wait, 60), "the job never started"


async def until_done(runner: JobRunner, tenant: str, job_id: str) -> list[JobInfo]:
    return [update async for update in runner.watch(tenant, job_id)]


def request(dataset, head_name: str, search: SearchSpace = ONE_TRIAL, **fields) -> TrainRequest:
    return TrainRequest(dataset_id=dataset.id, head_name=head_name, search=search, **fields)


# -- running and watching --------------------------------------------------------------


async def test_a_job_reports_rising_progress_and_ends_with_a_stored_head(core, dataset, runner):
    job = await runner.submit(TENANT, request(dataset, "watched"))
    assert job.state is JobState.QUEUED and not job.done

    updates = await until_done(runner, TENANT, job.id)

    progress = [update.progress for update in updates]
    assert progress == sorted(progress)
    assert JobState.RUNNING in {update.state for update in updates}
    final = updates[-1]
    assert final.state is JobState.SUCCEEDED and final.done and final.progress == 1.0
    assert final.head_version == core.heads.get(TENANT, "watched").latest_version
    assert 0.0 <= final.metrics["accuracy"] <= 1.0
    assert final.error is None and final.started_at <= final.finished_at
    assert JobRunner(core.db, core.trainer).get(TENANT, job.id) == final  # watchers saw what was stored


async def test_watching_a_finished_job_yields_its_final_state_once(dataset, runner):
    job = await runner.submit(TENANT, request(dataset, "rewatched"))
    final = (await until_done(runner, TENANT, job.id))[-1]
    assert await until_done(runner, TENANT, job.id) == [final]


async def test_jobs_are_listed_newest_first_in_pages(core, images, runner):
    tenant = "lister"
    mine = core.datasets.create(tenant, "mine", images)
    submitted = [(await runner.submit(tenant, request(mine, f"listed-{i}"))).id for i in range(3)]

    first, token = runner.list(tenant, page_size=2)
    second, end = runner.list(tenant, page_size=2, page_token=token)

    assert [job.id for job in first + second] == submitted[::-1]
    assert end is None
    for job_id in submitted:
        await until_done(runner, tenant, job_id)


async def test_a_malformed_page_token_is_an_invalid_argument(runner):
    with pytest.raises(InvalidArgument, match="page_token"):
        runner.list(TENANT, page_token="not-a-token")


# -- bad requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant", "change", "error"),
    [
        (TENANT, {"dataset_id": "ds_missing"}, NotFound),
        ("intruder", {}, NotFound),  # another tenant's dataset
        (TENANT, {"head_name": "Bad_Name"}, InvalidArgument),
        (TENANT, {"kind": HeadKind.FINETUNE, "finetune_blocks": 99}, InvalidArgument),
        (TENANT, {"backbone": "resnet50"}, InvalidArgument),  # not loaded
    ],
)
async def test_bad_requests_fail_at_submit_and_store_no_job(dataset, runner, tenant, change, error):
    bad = request(dataset, "rejected").model_copy(update=change)
    before, _ = runner.list(tenant)
    with pytest.raises(error):
        await runner.submit(tenant, bad)
    assert runner.list(tenant)[0] == before


async def test_another_tenants_job_is_not_found(dataset, runner):
    job = await runner.submit(TENANT, request(dataset, "private"))
    with pytest.raises(NotFound):
        runner.get("intruder", job.id)
    with pytest.raises(NotFound):
        await runner.cancel("intruder", job.id)
    with pytest.raises(NotFound):
        await anext(runner.watch("intruder", job.id))
    await until_done(runner, TENANT, job.id)


class BrokenTrainer(Trainer):
    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer.backbones, trainer.datasets, trainer.extractor, trainer.heads)

    def train(self, tenant, request, **kwargs):
        raise ZeroDivisionError("a bug")


async def test_an_unexpected_error_fails_the_job_with_its_type_and_message(core, dataset, caplog):
    runner = JobRunner(core.db, BrokenTrainer(core.trainer))
    await runner.start()
    try:
        job = await runner.submit(TENANT, request(dataset, "broken"))
        final = (await until_done(runner, TENANT, job.id))[-1]
    finally:
        await runner.stop()
    assert (final.state, final.error) == (JobState.FAILED, "internal error: ZeroDivisionError: a bug")
    assert "ZeroDivisionError" in caplog.text  # logged with its traceback


# -- cancelling ----------------------------------------------------------------------------


async def test_a_queued_job_is_cancelled_at_once_and_a_running_one_at_its_next_check(core, dataset, gated):
    runner, trainer = gated
    running = await runner.submit(TENANT, request(dataset, "cancelled-running", TWO_TRIALS))
    queued = await runner.submit(TENANT, request(dataset, "cancelled-queued"))
    await wait_until_held(trainer)

    assert (await runner.cancel(TENANT, queued.id)).state is JobState.CANCELLED
    assert (await runner.cancel(TENANT, running.id)).state is JobState.RUNNING  # until the trainer notices
    trainer.gate.set()

    final = (await until_done(runner, TENANT, running.id))[-1]
    assert final.state is JobState.CANCELLED and final.error is None and final.head_version is None
    assert runner.get(TENANT, queued.id).state is JobState.CANCELLED
    for name in ("cancelled-running", "cancelled-queued"):
        with pytest.raises(NotFound):
            core.heads.get(TENANT, name)
    with pytest.raises(FailedPrecondition, match="job is already cancelled"):
        await runner.cancel(TENANT, running.id)


async def test_cancelling_a_finished_job_is_refused(dataset, runner):
    job = await runner.submit(TENANT, request(dataset, "finished"))
    await until_done(runner, TENANT, job.id)
    with pytest.raises(FailedPrecondition, match="job is already succeeded"):
        await runner.cancel(TENANT, job.id)


async def test_a_job_running_in_another_replica_is_cancelled_and_watched_through_the_database(
    core, dataset, gated
):
    owner, trainer = gated
    other = JobRunner(core.db, core.trainer)
    await other.start()
    try:
        job = await owner.submit(TENANT, request(dataset, "elsewhere", TWO_TRIALS))
        await wait_until_held(trainer)
        assert (await other.cancel(TENANT, job.id)).state is JobState.RUNNING
        with anyio.fail_after(30):
            while not trainer.cancelled():  # until the owner's heartbeat has picked up the cancel
                await asyncio.sleep(0.05)
        trainer.gate.set()
        updates = await until_done(other, TENANT, job.id)
    finally:
        await other.stop()
    assert updates[-1].state is JobState.CANCELLED


async def test_stopping_fails_running_and_queued_jobs_so_they_can_be_submitted_again(core, dataset):
    trainer = GatedTrainer(core.trainer)
    finished = []
    runner = JobRunner(core.db, trainer, on_finished=finished.append)
    await runner.start()
    running = await runner.submit(TENANT, request(dataset, "stopped-running", TWO_TRIALS))
    queued = await runner.submit(TENANT, request(dataset, "stopped-queued"))
    await wait_until_held(trainer)

    stopping = asyncio.create_task(runner.stop())
    await asyncio.sleep(0)  # stop() has asked the running job to cancel
    trainer.gate.set()
    await stopping

    for job in (running, queued):
        info = runner.get(TENANT, job.id)
        assert (info.state, info.error) == (JobState.FAILED, RESTARTED)
    assert [job.state for job in finished] == [JobState.FAILED, JobState.FAILED]
    with pytest.raises(FailedPrecondition, match="shutting down"):
        await runner.submit(TENANT, request(dataset, "too-late"))


# -- recovery after a restart -----------------------------------------------------------------


def unfinished_row(core, dataset, *, worker: str, heartbeat_age: timedelta, state: str = "running") -> str:
    """A job row as a process would have left it, written straight to the database."""
    now = utcnow()
    row = JobRow(
        id=f"job_{worker.replace(':', '-')}-{state}-{int(heartbeat_age.total_seconds())}",
        tenant="recovery", state=state, phase="search", progress=0.7, message="trial 1/1",
        request=request(dataset, "recovered").model_dump(mode="json"), metrics={}, head_name="recovered",
        worker=worker, heartbeat_at=now - heartbeat_age, created_at=now - heartbeat_age,
    )
    with core.db.session() as session:
        session.add(row)
    return row.id


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


async def test_starting_fails_the_jobs_of_dead_processes_and_leaves_live_ones_alone(core, dataset):
    host = socket.gethostname()
    stale = unfinished_row(core, dataset, worker="gone:1", heartbeat_age=timedelta(minutes=5))
    stale_queued = unfinished_row(core, dataset, worker="gone:1", heartbeat_age=timedelta(minutes=5), state="queued")
    dead_here = unfinished_row(core, dataset, worker=f"{host}:{dead_pid()}", heartbeat_age=timedelta(0))
    alive_elsewhere = unfinished_row(core, dataset, worker="busy:1", heartbeat_age=timedelta(seconds=1))

    runner = JobRunner(core.db, core.trainer)
    await runner.start()
    try:
        for job_id in (stale, stale_queued, dead_here):
            job = runner.get("recovery", job_id)
            assert (job.state, job.error, job.done) == (JobState.FAILED, RESTARTED, True)
        assert runner.get("recovery", alive_elsewhere).state is JobState.RUNNING
    finally:
        await runner.stop()


async def test_running_replicas_also_fail_jobs_whose_heartbeat_goes_stale_later(core, dataset):
    runner = JobRunner(core.db, core.trainer, heartbeat_s=0.05)
    await runner.start()
    try:
        orphan = unfinished_row(core, dataset, worker="crashed:7", heartbeat_age=timedelta(minutes=2))
        with anyio.fail_after(30):
            while not runner.get("recovery", orphan).done:
                await asyncio.sleep(0.05)
    finally:
        await runner.stop()
    assert runner.get("recovery", orphan).error == RESTARTED
