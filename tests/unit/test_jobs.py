"""Background training jobs on a real backbone and real images: run, watch, list, cancel, refuse."""

import base64
import json
import threading

import anyio
import pytest
from sqlalchemy import event

from adapters.kinds import HeadKind
from adapters.search_space import SearchSpace
from harness.sample_data import fashion_mnist_pngs
from service import resources
from service.core import Core
from service.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from service.grpc import convert
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.jobs import JobInfo, JobRunner, JobState
from service.quotas import Quotas
from service.store.pages import encode_token
from service.training import FEATURE_BYTES, FEATURE_COPIES, HyperParamOverrides, Trainer, TrainRequest

pytestmark = pytest.mark.anyio

TENANT = "acme"
ONE_TRIAL = SearchSpace(lr=[1.0], weight_decay=[1e-3])
TWO_TRIALS = SearchSpace(lr=[1.0], weight_decay=[1e-3, 1e-2])  # the cancel flag is checked between trials


@pytest.fixture
def core(tmp_path, make_core) -> Core:
    """Fresh storage per test: jobs a test leaves queued must not be claimed by the next test's runner."""
    return make_core(tmp_path)


@pytest.fixture(scope="module")
def images():
    """Two classes x 6 real Fashion-MNIST PNGs."""
    files = fashion_mnist_pngs("train", per_class=6, seed=5)
    return [(f"{i}.png", data, label) for i, (data, label) in enumerate(files) if label in ("trouser", "bag")]


@pytest.fixture
def dataset(core, images):
    return core.datasets.create(TENANT, "two-classes", images)


def make_runner(core: Core, trainer: Trainer | None = None, **settings) -> JobRunner:
    """A replica on ``core``'s database; ``settings`` override core's (e.g. a short lease)."""
    changed = core.settings.model_copy(update=settings)
    return JobRunner(core.db, trainer or core.trainer, changed, Quotas(changed))


@pytest.fixture
async def runner(core):
    runner = make_runner(core)
    await runner.start()
    yield runner
    await runner.stop()


class GatedTrainer(Trainer):
    """The real trainer, except that a run holds at its first progress report until the gate opens."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(
            trainer.backbones, trainer.datasets, trainer.extractor, trainer.heads, trainer.default_backbone
        )
        self.started = threading.Event()
        self.gate = threading.Event()
        self.order: list[str] = []  # head names, in the order their runs started

    def train(self, tenant, request, *, progress=None, cancelled=None, **kwargs):
        self.cancelled = cancelled
        self.order.append(request.head_name)

        def held(event):
            self.started.set()
            self.gate.wait(timeout=60)
            progress(event)

        return super().train(tenant, request, progress=held, cancelled=cancelled, **kwargs)


@pytest.fixture
async def gated(core):
    """A replica with one training slot whose trainer is a GatedTrainer; leases renewed every second."""
    trainer = GatedTrainer(core.trainer)
    runner = make_runner(core, trainer, job_lease_s=3.0)
    await runner.start()
    yield runner, trainer
    trainer.gate.set()
    await runner.stop()


async def wait_until_held(trainer: GatedTrainer) -> None:
    assert await anyio.to_thread.run_sync(trainer.started.wait, 60), "the job never started"


async def until_done(runner: JobRunner, tenant: str, job_id: str) -> list[JobInfo]:
    with anyio.fail_after(300):
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
    assert make_runner(core).get(TENANT, job.id) == final  # watchers saw what was stored


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


@pytest.mark.parametrize(
    "token",
    [
        "not-a-token",
        encode_token("9999-12-31T23:59:59-12:00", "job_x"),  # past the largest datetime once in UTC
        encode_token("yesterday", "job_x"),
        base64.urlsafe_b64encode(b"[" * 2000).decode(),  # nested deeper than json.loads can recurse
    ],
)
async def test_a_malformed_page_token_is_an_invalid_argument(core, token):
    with pytest.raises(InvalidArgument, match="page_token"):
        make_runner(core).list(TENANT, page_token=token)


async def test_two_replicas_run_each_job_exactly_once(core, dataset):
    replicas = [make_runner(core), make_runner(core)]
    for replica in replicas:
        await replica.start()
    try:
        jobs = [await replicas[i % 2].submit(TENANT, request(dataset, f"once-{i}")) for i in range(4)]
        finals = [(await until_done(replicas[0], TENANT, job.id))[-1] for job in jobs]
    finally:
        for replica in replicas:
            await replica.stop()
    assert [final.state for final in finals] == [JobState.SUCCEEDED] * 4
    assert [len(core.heads.get(TENANT, f"once-{i}").versions) for i in range(4)] == [1] * 4


# -- bad requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant", "change", "error"),
    [
        (TENANT, {"dataset_id": "ds_missing"}, NotFound),
        ("intruder", {}, NotFound),  # another tenant's dataset
        (TENANT, {"head_name": "Bad_Name"}, InvalidArgument),
        (TENANT, {"kind": HeadKind.FINETUNE, "finetune_blocks": 99}, InvalidArgument),
        (TENANT, {"backbone": "resnet50"}, NotFound),  # not loaded
    ],
)
async def test_bad_requests_fail_at_submit_and_store_no_job(dataset, runner, tenant, change, error):
    bad = request(dataset, "rejected").model_copy(update=change)
    before, _ = runner.list(tenant)
    with pytest.raises(error):
        await runner.submit(tenant, bad)
    assert runner.list(tenant)[0] == before


async def test_a_job_costing_more_than_the_work_limit_is_refused_at_submit(core, dataset):
    runner = make_runner(core, max_job_work=10_000)
    costly = request(
        dataset,
        "costly",
        SearchSpace(lr=[1.0], weight_decay=[1e-3, 1e-2]),
        hyperparams=HyperParamOverrides(lr=1.0, weight_decay=1e-3, epochs=500, batch_size=64),
    )
    with pytest.raises(InvalidArgument) as refused:
        await runner.submit(TENANT, costly)
    assert refused.value.message == (
        f"this job would train 500 epochs x {dataset.num_examples} images x 2 trials = "
        f"{500 * dataset.num_examples * 2:,}, over the limit of 10,000 per job (GRAFT_MAX_JOB_WORK); "
        "use fewer epochs, fewer search trials or a smaller dataset"
    )
    assert runner.list(TENANT)[0] == []


def finetune(dataset, head_name: str, blocks: int) -> TrainRequest:
    return request(dataset, head_name, kind=HeadKind.FINETUNE, finetune_blocks=blocks)


async def test_a_finetune_whose_features_exceed_the_memory_limit_is_refused_before_any_work(core, dataset):
    """6 blocks of MobileNetV2 hold 96x14x14 maps per image; 1 block, 320x7x7 (smaller)."""
    per_image = 96 * 14 * 14 * FEATURE_BYTES * FEATURE_COPIES
    limit = per_image * dataset.num_examples - 1  # one byte short of the 6-block fine-tune
    runner = make_runner(core, max_job_memory_bytes=limit)
    with pytest.raises(InvalidArgument) as refused:
        await runner.submit(TENANT, finetune(dataset, "too-big", 6))
    assert refused.value.message == (
        f"this job would hold {per_image * dataset.num_examples:,} bytes of mobilenet_v2 features "
        f"({dataset.num_examples} images x 18,816 values at block13 x 4 bytes x 3 copies), over the limit of "
        f"{limit:,} per job (GRAFT_MAX_JOB_MEMORY_BYTES); fine-tune fewer blocks (finetune_blocks: a later split "
        "point holds smaller maps) or train on fewer images"
    )
    assert runner.list(TENANT)[0] == []
    small = await runner.submit(TENANT, finetune(dataset, "fits", 1))  # a small one passes
    assert small.state is JobState.QUEUED


async def test_a_replica_refuses_to_start_a_job_over_its_own_memory_limit_and_fails_it_untrained(core, dataset):
    """The bound is checked again when a run starts: a job queued under a larger limit (another replica's, or
    before the setting changed) fails with the reason instead of dying of memory and being requeued."""
    job = await make_runner(core).submit(TENANT, finetune(dataset, "queued-big", 6))
    trainer = GatedTrainer(core.trainer)
    trainer.gate.set()
    runner = make_runner(core, trainer, max_job_memory_bytes=1024)
    await runner.start()
    try:
        final = (await until_done(runner, TENANT, job.id))[-1]
    finally:
        await runner.stop()
    assert final.state is JobState.FAILED and "GRAFT_MAX_JOB_MEMORY_BYTES" in final.error
    assert trainer.order == []  # refused before training: the trainer never ran


async def test_a_tenant_over_its_queued_jobs_quota_is_refused(core, dataset):
    runner = make_runner(core, quota_queued_jobs=2)  # not started: its jobs stay queued
    for i in range(2):
        await runner.submit(TENANT, request(dataset, f"queued-{i}"))
    with pytest.raises(ResourceExhausted, match="GRAFT_QUOTA_QUEUED_JOBS"):
        await runner.submit(TENANT, request(dataset, "one-too-many"))
    assert len(runner.list(TENANT)[0]) == 2


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
        super().__init__(
            trainer.backbones, trainer.datasets, trainer.extractor, trainer.heads, trainer.default_backbone
        )

    def train(self, tenant, request, **kwargs):
        raise ZeroDivisionError("a bug with a secret path /srv/x")


async def test_an_unexpected_error_fails_the_job_with_a_reference_and_logs_the_details(core, dataset, caplog):
    runner = make_runner(core, BrokenTrainer(core.trainer))
    await runner.start()
    try:
        job = await runner.submit(TENANT, request(dataset, "broken"))
        final = (await until_done(runner, TENANT, job.id))[-1]
    finally:
        await runner.stop()
    assert final.state is JobState.FAILED
    assert final.error.startswith("internal error (reference ") and "secret" not in final.error
    reference = final.error.removeprefix("internal error (reference ").removesuffix(")")
    assert reference in caplog.text and "ZeroDivisionError: a bug with a secret path" in caplog.text


async def test_a_diverged_trial_leaves_every_job_update_encodable_as_json_and_protobuf(core, dataset, runner):
    diverging = request(
        dataset,
        "diverged",
        SearchSpace(lr=[10.0, 1e-3], weight_decay=[10.0]),
        kind=HeadKind.MLP,
        hyperparams=HyperParamOverrides(lr=1e-3, weight_decay=0.0, epochs=5, batch_size=4, hidden=16),
    )
    job = await runner.submit(TENANT, diverging)
    updates = await until_done(runner, TENANT, job.id)

    assert updates[-1].state is JobState.SUCCEEDED
    assert None in [trial["val_loss"] for trial in core.heads.describe(TENANT, "diverged").metrics["trials"]]
    for update in updates + [runner.get(TENANT, job.id)]:
        json.dumps(update.model_dump(mode="json"), allow_nan=False)
        convert.message(resources.Job.of(update), pb.Job)  # the gRPC door's encoding of the job


# -- cost bounds -------------------------------------------------------------------------------


async def test_a_run_past_the_wall_clock_limit_fails_naming_the_setting(core, dataset):
    runner = make_runner(core, max_job_seconds=0.001)
    await runner.start()
    try:
        job = await runner.submit(TENANT, request(dataset, "slow"))
        final = (await until_done(runner, TENANT, job.id))[-1]
    finally:
        await runner.stop()
    assert final.state is JobState.FAILED and "GRAFT_MAX_JOB_SECONDS" in final.error
    with pytest.raises(NotFound):
        core.heads.get(TENANT, "slow")


# -- cancelling ----------------------------------------------------------------------------


async def test_a_queued_job_is_cancelled_at_once_and_a_running_one_at_its_next_check(core, dataset, gated):
    runner, trainer = gated
    running = await runner.submit(TENANT, request(dataset, "cancelled-running", TWO_TRIALS))
    await wait_until_held(trainer)
    queued = await runner.submit(TENANT, request(dataset, "cancelled-queued"))

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


async def test_a_job_running_in_another_replica_is_cancelled_and_watched_through_the_database(core, dataset, gated):
    owner, trainer = gated
    job = await owner.submit(TENANT, request(dataset, "elsewhere", TWO_TRIALS))
    await wait_until_held(trainer)
    other = make_runner(core)  # not started: it claims nothing, but answers calls like any replica
    assert (await other.cancel(TENANT, job.id)).state is JobState.RUNNING
    with anyio.fail_after(30):
        while not trainer.cancelled():  # until the owner's heartbeat has picked up the cancel
            await anyio.sleep(0.05)
    trainer.gate.set()
    updates = await until_done(other, TENANT, job.id)
    assert updates[-1].state is JobState.CANCELLED


async def test_the_async_methods_never_touch_the_database_on_the_event_loop(core, dataset, gated):
    runner, trainer = gated
    loop_thread = threading.get_ident()
    queries_on_loop = []

    def record(*args):
        if threading.get_ident() == loop_thread:
            queries_on_loop.append(args[2])

    event.listen(core.db.engine, "before_cursor_execute", record)
    try:
        job = await runner.submit(TENANT, request(dataset, "off-loop", TWO_TRIALS))
        await wait_until_held(trainer)
        await runner.cancel(TENANT, job.id)
        trainer.gate.set()
        await until_done(runner, TENANT, job.id)
    finally:
        event.remove(core.db.engine, "before_cursor_execute", record)
    assert queries_on_loop == []


async def test_stopping_is_refused_for_new_jobs_with_unavailable(core, dataset):
    runner = make_runner(core)
    await runner.start()
    await runner.stop()
    with pytest.raises(Unavailable, match="shutting down"):
        await runner.submit(TENANT, request(dataset, "too-late"))
