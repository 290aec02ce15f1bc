"""The inference engine: heterogeneous batches, the head cache, the batcher and predict."""

import asyncio
import dataclasses
import io
import threading

import pytest
import torch
from PIL import Image
from sqlalchemy import update
from torch import nn

from adapters.heads import head_state
from adapters.kinds import HeadConfig, HeadKind, build_head
from service.core import Core
from service.engine import execution
from service.engine.batcher import Batcher
from service.engine.execution import linear_chunks, run_batch
from service.engine.head_cache import HeadCache, HeadKey, LoadedHead, materialise
from service.engine.predictor import Predictor
from service.engine.priority import TrunkPriority
from service.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from service.prediction_options import PredictOptions
from service.store.db import HeadVersionRow

TENANT = "acme"
pytestmark = pytest.mark.anyio


@pytest.fixture
def core(tmp_path, make_core) -> Core:
    return make_core(tmp_path)


def save_random_head(
    core: Core, name: str, kind: HeadKind, *, classes: int = 4, seed: int = 0, blocks: int = 2, prefix: str = "c"
):
    """A head with random weights in the registry: enough to check the engine's arithmetic."""
    torch.manual_seed(seed)
    backbone = core.backbones["mobilenet_v2"]
    finetune = kind is HeadKind.FINETUNE
    split = backbone.num_blocks - blocks if finetune else backbone.num_blocks
    config = HeadConfig(
        kind=kind,
        in_features=1280 if not finetune else backbone.features(torch.zeros(1, 3, 224, 224), split).shape[1],
        num_classes=classes,
        hidden=64 if kind is HeadKind.MLP else None,
        tail_blocks=blocks if finetune else None,
        tail_out_channels=1280 if finetune else None,
    )
    head = build_head(config, backbone.fresh_tail(split) if finetune else None)
    if kind is not HeadKind.FINETUNE:
        head.set_scaling_stats(torch.randn(1280) * 0.1, torch.rand(1280) + 0.5)
    return core.heads.create_version(
        TENANT,
        name,
        tensors=head_state(head),
        backbone="mobilenet_v2",
        split_point=split,
        kind=kind.value,
        classes=[f"{prefix}{i}" for i in range(classes)],
        config=config.model_dump(mode="json"),
        hyperparams={},
        metrics={},
        dataset_id="ds_test",
    )


def loaded(core: Core, info):
    return materialise(info, core.heads.load_tensors(info), core.backbones["mobilenet_v2"])


def png(seed: int) -> bytes:
    torch.manual_seed(seed)
    pixels = (torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_a_mixed_batch_gives_the_same_logits_as_one_image_and_one_head_at_a_time(core):
    backbone = core.backbones["mobilenet_v2"]
    heads = [
        loaded(core, save_random_head(core, "lin-a", HeadKind.LINEAR, classes=3, seed=1)),
        loaded(core, save_random_head(core, "lin-b", HeadKind.LINEAR, classes=7, seed=2)),
        loaded(core, save_random_head(core, "mlp", HeadKind.MLP, classes=5, seed=3)),
        loaded(core, save_random_head(core, "ft2", HeadKind.FINETUNE, classes=4, seed=4, blocks=2)),
        loaded(core, save_random_head(core, "ft4", HeadKind.FINETUNE, classes=6, seed=5, blocks=4)),
    ]
    images = torch.randn(6, 3, 224, 224)
    row_heads = [heads, [heads[0]], [heads[1], heads[3]], [heads[4]], [heads[2], heads[0]], [heads[3], heads[1]]]

    batched = run_batch(backbone, images, row_heads, want_embeddings=True)

    for row, wanted in enumerate(row_heads):
        for slot, head in enumerate(wanted):
            alone = run_batch(backbone, images[row : row + 1], [[head]], want_embeddings=False).logits[0][0]
            assert batched.logits[row][slot].shape == (len(head.classes),)
            torch.testing.assert_close(batched.logits[row][slot], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched.embeddings, backbone.features(images), rtol=1e-4, atol=1e-4)


def test_gathered_linear_heads_equal_the_stored_head_module(core):
    """The folded, gathered matmul reproduces the trained module's own forward pass."""
    backbone = core.backbones["mobilenet_v2"]
    info = save_random_head(core, "lin", HeadKind.LINEAR, classes=5)
    module = build_head(HeadConfig.model_validate(info.config))
    module.load_state_dict(core.heads.load_tensors(info))
    images = torch.randn(3, 224 // 1, 224).expand(2, 3, 224, 224)
    logits = run_batch(backbone, images, [[loaded(core, info)]] * 2, want_embeddings=False).logits
    with torch.no_grad():
        expected = module.eval()(backbone.features(images))
    torch.testing.assert_close(torch.stack([row[0] for row in logits]), expected, rtol=1e-4, atol=1e-4)


async def test_a_moved_alias_is_picked_up_on_the_next_request(core):
    save_random_head(core, "shop", HeadKind.LINEAR, seed=1)
    save_random_head(core, "shop", HeadKind.LINEAR, seed=2)
    cache = HeadCache(core.heads, core.backbones, max_bytes=1 << 30)
    core.heads.set_alias(TENANT, "shop", "prod", 1)
    assert (await cache.get(TENANT, "shop:prod")).version == 1
    core.heads.set_alias(TENANT, "shop", "prod", 2)
    assert (await cache.get(TENANT, "shop:prod")).version == 2


async def test_a_deleted_head_is_not_found_even_when_cached(core):
    save_random_head(core, "gone", HeadKind.LINEAR)
    cache = HeadCache(core.heads, core.backbones, max_bytes=1 << 30)
    await cache.get(TENANT, "gone")
    core.heads.delete_head(TENANT, "gone")
    with pytest.raises(NotFound):
        await cache.get(TENANT, "gone")


async def test_the_cache_evicts_least_recently_used_heads_by_bytes(core):
    for i in range(3):
        save_random_head(core, f"h{i}", HeadKind.LINEAR, classes=4, seed=i)
    one_head = (1280 * 4 + 4) * 4
    cache = HeadCache(core.heads, core.backbones, max_bytes=2 * one_head)
    first = await cache.get(TENANT, "h0")
    await cache.get(TENANT, "h1")
    await cache.get(TENANT, "h0")  # h0 is now the most recently used
    await cache.get(TENANT, "h2")  # evicts h1
    assert len(cache) == 2 and cache.bytes <= 2 * one_head
    assert await cache.get(TENANT, "h0") is first
    assert {key.name for key in cache._heads} == {"h0", "h2"}


async def test_concurrent_first_requests_load_a_head_once(core):
    save_random_head(core, "popular", HeadKind.LINEAR)
    cache = HeadCache(core.heads, core.backbones, max_bytes=1 << 30)
    heads = await asyncio.gather(*(cache.get(TENANT, "popular") for _ in range(5)))
    assert all(head is heads[0] for head in heads)


async def test_a_full_queue_refuses_new_work_with_resource_exhausted(core):
    head = loaded(core, save_random_head(core, "busy", HeadKind.LINEAR))
    batcher = Batcher(core.backbones["mobilenet_v2"], max_batch_size=2, max_queue=2)
    image = torch.randn(3, 224, 224)
    results = await asyncio.gather(*(batcher.submit(image, [head]) for _ in range(4)), return_exceptions=True)
    await batcher.stop()
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert len(refused) == 2 and "GRAFT_MAX_QUEUE_IMAGES" in str(refused[0]) and refused[0].retry_after_s > 0
    assert all(len(r.logits) == 1 for r in results if not isinstance(r, Exception))


async def test_batcher_groups_concurrent_requests_into_shared_batches(core):
    heads = [loaded(core, save_random_head(core, f"t{i}", HeadKind.LINEAR, seed=i)) for i in range(4)]
    batcher = Batcher(core.backbones["mobilenet_v2"], max_batch_size=8, max_latency_ms=50)
    image = torch.randn(3, 224, 224)
    await asyncio.gather(*(batcher.submit(image, [heads[i % 4]]) for i in range(8)))
    await batcher.stop()
    assert batcher.stats.images == 8 and batcher.stats.batches < 8


async def test_predict_returns_top_k_per_image_per_head_and_the_embedding(core):
    save_random_head(core, "colours", HeadKind.LINEAR, classes=6)
    save_random_head(core, "shapes", HeadKind.MLP, classes=3)
    predictor = Predictor(core.backbones, HeadCache(core.heads, core.backbones, 1 << 30), core.settings)
    try:
        out = await predictor.predict(
            TENANT, [png(1), png(2)], ["colours", "shapes@1"], PredictOptions(top_k=2, include_embedding=True)
        )
    finally:
        await predictor.stop()
    assert len(out) == 2
    assert [p.head for p in out[0].heads] == ["colours", "shapes"]
    assert [len(p.top) for p in out[0].heads] == [2, 2]
    assert out[0].heads[0].top[0].score >= out[0].heads[0].top[1].score
    assert len(out[0].embedding) == 1280


async def test_predict_rejects_bad_requests_before_doing_any_work(core):
    save_random_head(core, "ok", HeadKind.LINEAR)
    predictor = Predictor(core.backbones, HeadCache(core.heads, core.backbones, 1 << 30), core.settings)
    try:
        with pytest.raises(InvalidArgument, match="not a decodable image"):
            await predictor.predict(TENANT, [b"this is text"], ["ok"])
        with pytest.raises(InvalidArgument, match="empty"):
            await predictor.predict(TENANT, [b""], ["ok"])
        with pytest.raises(InvalidArgument, match="at least one head"):
            await predictor.predict(TENANT, [png(1)], [])
        with pytest.raises(InvalidArgument, match="images in one request"):
            await predictor.predict(TENANT, [png(1)] * 65, ["ok"])
        with pytest.raises(InvalidArgument, match="malformed|invalid|head reference"):
            await predictor.predict(TENANT, [png(1)], ["Bad Ref!!"])
        with pytest.raises(NotFound):
            await predictor.predict("other-tenant", [png(1)], ["ok"])
    finally:
        await predictor.stop()


def test_training_work_waits_while_a_prediction_batch_holds_the_trunk():
    priority = TrunkPriority(max_wait_s=60)
    went_ahead = threading.Event()
    worker = threading.Thread(target=lambda: (priority.yield_to_serving(), went_ahead.set()))
    with priority.serving():
        worker.start()
        assert not went_ahead.wait(0.3)  # still waiting while the batch runs
    assert went_ahead.wait(10)  # released as soon as it ends
    worker.join()


def test_training_is_never_starved_by_constant_prediction_load():
    """While a batch holds the trunk for good, training's wait ends at its bound instead of blocking for ever."""
    priority = TrunkPriority(max_wait_s=0.01)
    went_ahead = threading.Event()
    worker = threading.Thread(target=lambda: (priority.yield_to_serving(), went_ahead.set()))
    with priority.serving():
        worker.start()
        assert went_ahead.wait(10)  # the batch has not ended: only the bound let it through
    worker.join()


def predictor_for(core: Core, **settings) -> Predictor:
    return Predictor(
        core.backbones, HeadCache(core.heads, core.backbones, 1 << 30), core.settings.model_copy(update=settings)
    )


async def test_a_deleted_version_is_never_answered_after_the_head_is_trained_again(core):
    """Train twice, predict, delete version 2, train on new classes."""
    save_random_head(core, "h", HeadKind.LINEAR, seed=1, prefix="old")
    save_random_head(core, "h", HeadKind.LINEAR, seed=2, prefix="old")
    predictor = predictor_for(core)
    try:
        (before,) = await predictor.predict(TENANT, [png(1)], ["h"], PredictOptions(top_k=4))
        assert before.heads[0].version == 2
        core.heads.delete_version(TENANT, "h", 2)
        retrained = save_random_head(core, "h", HeadKind.LINEAR, classes=5, seed=3, prefix="new")
        (after,) = await predictor.predict(TENANT, [png(1)], ["h"], PredictOptions(top_k=5))
    finally:
        await predictor.stop()
    assert retrained.version == 3
    assert after.heads[0].version == 3
    assert {score.label for score in after.heads[0].top} == {f"new{i}" for i in range(5)}


async def test_a_version_whose_weights_changed_is_not_served_from_the_cache(core):
    """The cache follows the weights' identity, not the version number (e.g. a registry restored from backup)."""
    save_random_head(core, "h", HeadKind.LINEAR, seed=1, prefix="old")
    replacement = save_random_head(core, "other", HeadKind.LINEAR, seed=2, prefix="new")
    predictor = predictor_for(core)
    try:
        (before,) = await predictor.predict(TENANT, [png(1)], ["h@1"])
        with core.db.session() as session:
            session.execute(
                update(HeadVersionRow)
                .where(HeadVersionRow.name == "h")
                .values(
                    blob_key=replacement.blob_key,
                    weights_sha256=replacement.weights_sha256,
                    classes=replacement.classes,
                )
            )
        (after,) = await predictor.predict(TENANT, [png(1)], ["h@1"])
    finally:
        await predictor.stop()
    assert before.heads[0].top[0].label.startswith("old")
    assert after.heads[0].top[0].label.startswith("new")


async def test_references_to_one_version_run_once_and_answer_in_request_order(core, monkeypatch):
    save_random_head(core, "h", HeadKind.LINEAR, seed=1)
    save_random_head(core, "g", HeadKind.LINEAR, seed=2)
    core.heads.set_alias(TENANT, "h", "prod", 1)
    predictor = predictor_for(core)
    batcher = predictor.batchers["mobilenet_v2"]
    submitted: list[list[HeadKey]] = []
    real_submit = batcher.submit

    async def recording_submit(image, heads, include_embedding=False, keep_pooled=False):
        submitted.append([head.key for head in heads])
        return await real_submit(image, heads, include_embedding, keep_pooled)

    monkeypatch.setattr(batcher, "submit", recording_submit)
    refs = ["h", "g", "h@1", "h:latest", "h:prod", "h"]
    try:
        (answer,) = await predictor.predict(TENANT, [png(1)], refs, PredictOptions(top_k=4))
    finally:
        await predictor.stop()
    assert [(p.head, p.version) for p in answer.heads] == [("h", 1), ("g", 1), ("h", 1), ("h", 1), ("h", 1), ("h", 1)]
    assert all(p.top == answer.heads[0].top for p in answer.heads if p.head == "h")
    assert [[key.name for key in keys] for keys in submitted] == [["h", "g"]]


async def test_over_the_prediction_rate_is_refused_before_any_head_is_resolved(core):
    save_random_head(core, "ok", HeadKind.LINEAR)
    predictor = predictor_for(core, quota_predict_burst=2, quota_predict_images_per_s=0.01)
    try:
        await predictor.predict(TENANT, [png(1), png(2)], ["ok"])
        with pytest.raises(ResourceExhausted, match="GRAFT_QUOTA_PREDICT_IMAGES_PER_S") as refused:
            await predictor.predict(TENANT, [png(1)], ["no-such-head"])
        assert refused.value.retry_after_s > 0
        with pytest.raises(NotFound):  # another tenant has its own bucket
            await predictor.predict("other-tenant", [png(1)], ["ok"])
    finally:
        await predictor.stop()


def fake_linear(classes: int, dim: int = 1280, name: str = "h") -> LoadedHead:
    """A linear head straight from tensors: enough for planning the gathered matmul."""
    return LoadedHead(
        key=HeadKey(TENANT, name, 1, f"sha-{name}"),
        backbone="mobilenet_v2",
        kind=HeadKind.LINEAR,
        split_point=0,
        classes=tuple(f"c{i}" for i in range(classes)),
        weight=torch.randn(classes, dim),
        bias=torch.randn(classes),
        module=None,
        nbytes=0,
    )


def test_linear_steps_keep_size_classes_apart_and_within_the_gather_budget():
    huge = fake_linear(1000, name="huge")
    small = [fake_linear(2, name=f"small-{i}") for i in range(40)]
    pairs = [(row, 0, huge) for row in range(32)] + [(row, 1, small[row % 40]) for row in range(32)]
    budget = 8 * 1024 * 1024
    chunks = linear_chunks(pairs, dim=1280, element_size=4, budget=budget)
    assert sorted(pair for chunk in chunks for pair in chunk) == sorted(pairs, key=lambda p: (p[0], p[1]))
    for chunk in chunks:
        widths = {len(head.classes) for _, _, head in chunk}
        assert widths in ({2}, {1000})
        assert len(chunk) * max(widths) * 1280 * 4 <= budget


def test_a_batch_of_huge_and_small_linear_heads_gives_the_same_logits_as_one_head_at_a_time(core, monkeypatch):
    monkeypatch.setattr(execution, "GATHER_BUDGET_BYTES", 4 * 1024 * 1024)  # several steps even in a small test
    backbone = core.backbones["mobilenet_v2"]
    huge = loaded(core, save_random_head(core, "huge", HeadKind.LINEAR, classes=1000, seed=1))
    small = [loaded(core, save_random_head(core, f"s{i}", HeadKind.LINEAR, classes=2 + i, seed=i)) for i in range(5)]
    images = torch.randn(4, 3, 224, 224)
    row_heads = [[huge, small[0]], [small[1], small[2], huge], [small[3]], [small[4], small[0], huge]]

    batched = run_batch(backbone, images, row_heads, want_embeddings=False)

    assert batched.errors == [None] * 4
    for row, wanted in enumerate(row_heads):
        for slot, head in enumerate(wanted):
            alone = run_batch(backbone, images[row : row + 1], [[head]], want_embeddings=False).logits[0][0]
            torch.testing.assert_close(batched.logits[row][slot], alone, rtol=1e-4, atol=1e-4)


def broken_heads(core: Core) -> tuple[LoadedHead, LoadedHead]:
    """A linear head whose weights do not fit the backbone, and an mlp head whose module does not."""
    linear = loaded(core, save_random_head(core, "broken-lin", HeadKind.LINEAR, seed=7))
    mlp = loaded(core, save_random_head(core, "broken-mlp", HeadKind.MLP, seed=8))
    return dataclasses.replace(linear, weight=torch.randn(4, 100)), dataclasses.replace(mlp, module=nn.Linear(7, 4))


def test_a_broken_head_fails_only_the_rows_that_asked_for_it(core):
    backbone = core.backbones["mobilenet_v2"]
    good = loaded(core, save_random_head(core, "good", HeadKind.LINEAR, seed=1))
    good_mlp = loaded(core, save_random_head(core, "good-mlp", HeadKind.MLP, seed=2))
    bad_linear, bad_mlp = broken_heads(core)
    images = torch.randn(4, 3, 224, 224)
    row_heads = [[good], [good, bad_linear], [good_mlp, bad_mlp], [good_mlp, good]]

    out = run_batch(backbone, images, row_heads, want_embeddings=False)

    assert out.errors[0] is None and out.errors[3] is None
    assert isinstance(out.errors[1], FailedPrecondition) and "'broken-lin' version 1" in str(out.errors[1])
    assert isinstance(out.errors[2], FailedPrecondition) and "'broken-mlp' version 1" in str(out.errors[2])
    for row in (0, 3):
        for slot, head in enumerate(row_heads[row]):
            alone = run_batch(backbone, images[row : row + 1], [[head]], want_embeddings=False).logits[0][0]
            torch.testing.assert_close(out.logits[row][slot], alone, rtol=1e-4, atol=1e-4)


async def test_a_broken_head_in_a_shared_batch_fails_only_its_own_request(core):
    good = loaded(core, save_random_head(core, "good", HeadKind.LINEAR, seed=1))
    bad_linear, bad_mlp = broken_heads(core)
    batcher = Batcher(core.backbones["mobilenet_v2"], max_batch_size=8, max_latency_ms=200)
    image = torch.randn(3, 224, 224)
    try:
        results = await asyncio.gather(
            batcher.submit(image, [good]),
            batcher.submit(image, [bad_linear]),
            batcher.submit(image, [good]),
            batcher.submit(image, [bad_mlp]),
            return_exceptions=True,
        )
    finally:
        await batcher.stop()
    assert [type(r).__name__ for r in results] == ["RowResult", "FailedPrecondition", "RowResult", "FailedPrecondition"]
    assert "delete this version and train it again" in str(results[1])


async def test_corrupt_stored_weights_fail_the_prediction_with_a_clear_error(core):
    info = save_random_head(core, "rotten", HeadKind.LINEAR)
    path = core.blobs.root / "named" / info.blob_key
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    predictor = predictor_for(core)
    try:
        with pytest.raises(FailedPrecondition, match="corrupt"):
            await predictor.predict(TENANT, [png(1)], ["rotten"])
    finally:
        await predictor.stop()
