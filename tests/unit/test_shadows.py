"""Shadow versions: scored in the served version's batch, compared over every replica, set and cleared by both
doors, and dropped with their versions."""

import grpc
import httpx
import pytest
import torch
from prometheus_client import REGISTRY

from adapters.kinds import HeadKind
from service.calls import Calls, KeyCheck
from service.errors import NotFound
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.metrics import PrometheusMetrics
from service.prediction_options import PredictOptions
from service.runtime import Runtime
from tests.unit.test_engine import TENANT, png, save_random_head

pytestmark = pytest.mark.anyio


def calls(runtime: Runtime, tenant: str = TENANT) -> Calls:
    return Calls(runtime, KeyCheck(runtime, None, tenant, 60.0))


@pytest.fixture
def runtime(make_core, tmp_path) -> Runtime:
    """Head 'h': version 1 (aliased prod) and version 2, the same four classes, different weights."""
    core = make_core(tmp_path)
    save_random_head(core, "h", HeadKind.LINEAR, seed=1)
    save_random_head(core, "h", HeadKind.LINEAR, seed=2)
    core.heads.set_alias(TENANT, "h", "prod", 1)
    return Runtime.around(core)


IMAGES = [png(seed) for seed in range(6)]


async def test_a_shadow_is_scored_in_the_served_versions_batch_and_returned_only_when_asked(runtime):
    api_calls = calls(runtime)
    await api_calls.set_shadow("h", 2)
    batcher = runtime.predictor.batchers["mobilenet_v2"]

    plain = await api_calls.predict(IMAGES, ["h:prod"], PredictOptions(), door="test")
    assert batcher.stats.images == len(IMAGES)  # one trunk pass per image: the shadow rode the same rows
    assert all(p.heads[0].version == 1 and p.heads[0].shadow is None for p in plain)

    asked = await api_calls.predict(IMAGES, ["h:prod"], PredictOptions(include_shadow=True), door="test")
    alone = await api_calls.predict(IMAGES, ["h@2"], PredictOptions(), door="test")
    for with_shadow, direct in zip(asked, alone, strict=True):
        shadow = with_shadow.heads[0].shadow
        assert shadow is not None and shadow.version == 2
        assert [t.label for t in shadow.top] == [t.label for t in direct.heads[0].top]
        assert shadow.top[0].score == pytest.approx(direct.heads[0].top[0].score, abs=1e-5)


async def test_a_head_without_shadow_or_served_as_its_shadow_answers_a_null_shadow_and_compares_nothing(runtime):
    api_calls = calls(runtime)
    [none] = await api_calls.predict(IMAGES[:1], ["h"], PredictOptions(include_shadow=True), door="test")
    assert none.heads[0].shadow is None
    await api_calls.set_shadow("h", 2)
    [itself] = await api_calls.predict(IMAGES[:1], ["h@2"], PredictOptions(include_shadow=True), door="test")
    assert itself.heads[0].shadow is None
    assert (await api_calls.compare_head_versions("h")).comparisons == []


async def test_compare_counts_agreement_confusion_and_the_mean_top_score_difference(runtime):
    api_calls = calls(runtime)
    await api_calls.set_shadow("h", 2)
    answers = await api_calls.predict(IMAGES, ["h:prod"], PredictOptions(include_shadow=True), door="test")

    [comparison] = (await api_calls.compare_head_versions("heads/h")).comparisons
    served = [a.heads[0].top[0] for a in answers]
    shadow = [a.heads[0].shadow.top[0] for a in answers]  # type: ignore[union-attr]
    assert (comparison.served_version, comparison.shadow_version, comparison.compared) == (1, 2, len(IMAGES))
    agreed = sum(s.label == t.label for s, t in zip(served, shadow, strict=True))
    assert comparison.agreement == pytest.approx(agreed / len(IMAGES))
    expected = sum(t.score - s.score for s, t in zip(served, shadow, strict=True)) / len(IMAGES)
    assert comparison.mean_top_score_difference == pytest.approx(expected, abs=1e-6)
    assert comparison.labels == ["c0", "c1", "c2", "c3"]
    for s, t in zip(served, shadow, strict=True):
        comparison.confusion[comparison.labels.index(s.label)][comparison.labels.index(t.label)] -= 1
    assert all(count == 0 for row in comparison.confusion for count in row)
    assert (comparison.labelled, comparison.served_accuracy, comparison.shadow_accuracy) == (0, None, None)


async def test_two_replicas_on_one_database_add_up_to_one_comparison(runtime, make_core, tmp_path):
    other = Runtime.around(make_core(tmp_path))  # the same data_dir: the same registry database
    await calls(runtime).set_shadow("h", 2)
    await calls(runtime).predict(IMAGES[:2], ["h:prod"], PredictOptions(), door="test")
    await calls(other).predict(IMAGES[2:5], ["h:prod"], PredictOptions(), door="test")
    await other.monitor.flush()
    [comparison] = (await calls(runtime).compare_head_versions("h")).comparisons
    assert comparison.compared == 5
    assert sum(map(sum, comparison.confusion)) == 5


async def test_clearing_the_shadow_keeps_the_figures_and_deleting_its_version_drops_them(runtime):
    api_calls = calls(runtime)
    head = await api_calls.set_shadow("h", 2)
    assert head.shadow_version == 2
    await api_calls.predict(IMAGES[:2], ["h:prod"], PredictOptions(), door="test")
    assert (await api_calls.clear_shadow("h")).shadow_version is None
    assert [c.compared for c in (await api_calls.compare_head_versions("h")).comparisons] == [2]

    await api_calls.set_shadow("h", 2)
    await api_calls.delete_head_version("heads/h/versions/2")
    assert (await api_calls.get_head("h")).shadow_version is None
    assert (await api_calls.compare_head_versions("h")).comparisons == []


async def test_over_http_a_shadow_is_set_read_cleared_and_bad_targets_are_refused(runtime):
    runtime.tenants.create_tenant(TENANT)
    key = runtime.tenants.create_key(TENANT)
    app = create_app(runtime.settings, lambda: runtime)
    headers = {"Authorization": f"Bearer {key.secret}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://graft") as client:
        put = await client.put("/v1/heads/h:shadow", json={"version": 2}, headers=headers)
        assert put.status_code == 200 and put.json()["shadow_version"] == 2
        assert (await client.get("/v1/heads/h", headers=headers)).json()["shadow_version"] == 2
        unknown = await client.put("/v1/heads/h:shadow", json={"version": 9}, headers=headers)
        assert unknown.status_code == 404 and "no version 9" in unknown.text
        assert (await client.put("/v1/heads/nope:shadow", json={"version": 1}, headers=headers)).status_code == 404
        zero = await client.put("/v1/heads/h:shadow", json={"version": 0}, headers=headers)
        assert zero.status_code == 422 and zero.json()["code"] == "invalid_argument"  # graft's malformed body
        compare = await client.get("/v1/heads/h:compare", headers=headers)
        assert compare.status_code == 200 and compare.json() == {"head": "h", "comparisons": []}
        cleared = await client.delete("/v1/heads/h:shadow", headers=headers)
        assert cleared.status_code == 200 and cleared.json()["shadow_version"] is None
        assert (await client.get("/v1/heads/nope:compare", headers=headers)).status_code == 404


async def test_over_grpc_a_shadow_is_set_predicted_with_and_compared(runtime):
    runtime.tenants.create_tenant(TENANT)
    key = runtime.tenants.create_key(TENANT)
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    metadata = (("authorization", f"Bearer {key.secret}"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            heads = rpc.HeadServiceStub(channel)
            head = await heads.SetHeadShadow(api.SetHeadShadowRequest(name="heads/h", version=2), metadata=metadata)
            assert head.HasField("shadow_version") and head.shadow_version == 2
            predict = api.PredictRequest(images=IMAGES[:3], heads=["h:prod"], include_shadow=True)
            response = await rpc.PredictionServiceStub(channel).Predict(predict, metadata=metadata)
            assert all(p.heads[0].shadow.version == 2 for p in response.predictions)
            compared = await heads.CompareHeadVersions(
                api.CompareHeadVersionsRequest(name="heads/h"), metadata=metadata
            )
            [comparison] = compared.comparisons
            assert compared.head == "h" and comparison.compared == 3
            assert sum(sum(row.counts) for row in comparison.confusion) == 3
            cleared = await heads.ClearHeadShadow(api.ClearHeadShadowRequest(name="heads/h"), metadata=metadata)
            assert not cleared.HasField("shadow_version")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await heads.SetHeadShadow(api.SetHeadShadowRequest(name="heads/h", version=7), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(grace=1)


async def test_prometheus_counts_shadow_predictions_and_feedback_without_a_label_per_head_or_tenant(
    make_core, tmp_path
):
    core = make_core(tmp_path)
    save_random_head(core, "h", HeadKind.LINEAR, seed=1)
    save_random_head(core, "h", HeadKind.LINEAR, seed=2)
    runtime = Runtime.around(core, PrometheusMetrics())
    before = {name: REGISTRY.get_sample_value(name, labels) or 0.0 for name, labels in SERIES}
    await calls(runtime).set_shadow("h", 2)
    answers = await calls(runtime).predict(IMAGES[:3], ["h@1"], PredictOptions(), door="test")
    await calls(runtime).report_feedback(answers[0].prediction_id or "", answers[0].heads[0].top[0].label)
    after = {name: REGISTRY.get_sample_value(name, labels) or 0.0 for name, labels in SERIES}
    assert [after[name] - before[name] for name, _ in SERIES] == [3, 1]
    for family in REGISTRY.collect():
        if family.name in ("graft_shadow_predictions", "graft_feedback"):
            assert all(set(s.labels) <= {"outcome"} for s in family.samples)


SERIES = [("graft_shadow_predictions_total", {}), ("graft_feedback_total", {"outcome": "correct"})]


async def test_a_tenant_can_neither_see_nor_set_nor_feel_another_tenants_shadow(runtime):
    await calls(runtime).set_shadow("h", 2)
    await calls(runtime).predict(IMAGES[:2], ["h:prod"], PredictOptions(), door="test")
    other = calls(runtime, "other")
    with pytest.raises(NotFound):
        await other.set_shadow("h", 2)
    with pytest.raises(NotFound):
        await other.compare_head_versions("h")
    with pytest.raises(NotFound):
        await other.clear_shadow("h")

    # the other tenant's own 'h' (same name, same version numbers) has no shadow and compares nothing of acme's
    for seed in (3, 4):
        runtime.core.heads.create_version(
            "other", "h", **{**_stored(runtime, TENANT, "h", 1), "tensors": _tensors(runtime, seed)}
        )
    [answer] = await other.predict(IMAGES[:1], ["h@1"], PredictOptions(include_shadow=True), door="test")
    assert answer.heads[0].shadow is None
    assert (await other.compare_head_versions("h")).comparisons == []
    assert [c.compared for c in (await calls(runtime).compare_head_versions("h")).comparisons] == [2]


def _stored(runtime: Runtime, tenant: str, name: str, version: int) -> dict:
    info = runtime.core.heads.describe(tenant, f"{name}@{version}")
    fields = ("backbone", "split_point", "kind", "classes", "config", "hyperparams", "metrics", "dataset_id")
    return {field: getattr(info, field) for field in fields}


def _tensors(runtime: Runtime, seed: int) -> dict:
    info = runtime.core.heads.resolve(TENANT, "h@1")
    torch.manual_seed(seed)
    return {key: torch.randn_like(t) for key, t in runtime.core.heads.load_tensors(info).items()}
