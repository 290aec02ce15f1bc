"""Prediction ids and feedback: each image's answer can be given its true label once, within the TTL, by the
tenant that made it; live accuracy per version and per shadow comparison follow."""

import base64
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import update

from service.errors import AlreadyExists, InvalidArgument, NotFound
from service.http.app import create_app
from service.prediction_options import PredictOptions
from service.runtime import Runtime
from service.store.db import PredictionRecordRow, utcnow
from tests.unit.test_engine import TENANT
from tests.unit.test_shadows import IMAGES, calls, runtime  # noqa: F401 (the fixture)

pytestmark = pytest.mark.anyio


async def predicted(runtime: Runtime, ref: str = "h:prod", images: list[bytes] = IMAGES):  # noqa: F811
    return await calls(runtime).predict(images, [ref], PredictOptions(include_shadow=True), door="test")


async def test_each_image_gets_its_own_url_safe_prediction_id(runtime):  # noqa: F811
    answers = await predicted(runtime)
    ids = [a.prediction_id for a in answers]
    assert len(set(ids)) == len(IMAGES)
    assert all(i and len(i) <= 64 and i.replace("-", "").replace("_", "").isalnum() for i in ids)


async def test_feedback_counts_the_served_and_shadow_answers_right_or_wrong(runtime):  # noqa: F811
    await calls(runtime).set_shadow("h", 2)
    [answer] = await predicted(runtime, images=IMAGES[:1])
    served, shadow = answer.heads[0].top[0].label, answer.heads[0].shadow.top[0].label  # type: ignore[union-attr]

    feedback = await calls(runtime).report_feedback(f"predictions/{answer.prediction_id}", served)
    [verdict] = feedback.heads
    assert (verdict.head, verdict.version, verdict.correct) == ("h", 1, True)
    assert (verdict.shadow_version, verdict.shadow_correct) == (2, shadow == served)
    assert runtime.monitor.observations.live_accuracy(TENANT, "h", 1) == (1, 1.0)
    [comparison] = (await calls(runtime).compare_head_versions("h")).comparisons
    assert (comparison.labelled, comparison.served_accuracy) == (1, 1.0)
    assert comparison.shadow_accuracy == (1.0 if shadow == served else 0.0)


async def test_a_wrong_label_counts_as_incorrect(runtime):  # noqa: F811
    [answer] = await predicted(runtime, "h@1", IMAGES[:1])
    wrong = next(c for c in ("c0", "c1", "c2", "c3") if c != answer.heads[0].top[0].label)
    [verdict] = (await calls(runtime).report_feedback(answer.prediction_id or "", wrong)).heads
    assert verdict.correct is False and verdict.shadow_version is None
    assert runtime.monitor.observations.live_accuracy(TENANT, "h", 1) == (1, 0.0)


async def test_feedback_twice_is_a_conflict_and_a_label_that_is_no_class_is_invalid(runtime):  # noqa: F811
    [answer] = await predicted(runtime, images=IMAGES[:1])
    with pytest.raises(InvalidArgument, match="not a class"):
        await calls(runtime).report_feedback(answer.prediction_id or "", "zebra")
    await calls(runtime).report_feedback(answer.prediction_id or "", "c1")
    with pytest.raises(AlreadyExists, match="already has feedback"):
        await calls(runtime).report_feedback(answer.prediction_id or "", "c2")


async def test_an_unknown_expired_or_other_tenants_id_is_the_same_not_found(runtime):  # noqa: F811
    [answer] = await predicted(runtime, images=IMAGES[:1])
    prediction_id = answer.prediction_id or ""
    messages = []
    for tenant, which in (("other", prediction_id), (TENANT, "no-such-id"), (TENANT, "x" * 500)):
        with pytest.raises(NotFound) as refused:
            await calls(runtime, tenant).report_feedback(which, "c1")
        messages.append(str(refused.value).split("'")[2])
    with runtime.core.db.session() as session:
        session.execute(update(PredictionRecordRow).values(expires_at=utcnow() - timedelta(seconds=1)))
    with pytest.raises(NotFound) as expired:
        await calls(runtime).report_feedback(prediction_id, "c1")
    assert {*messages, str(expired.value).split("'")[2]} == {messages[0]}  # nothing tells them apart
    assert runtime.monitor.observations.collect_expired() == 1


async def test_a_tenant_keeps_only_its_newest_records(runtime):  # noqa: F811
    runtime.monitor.observations.records_per_tenant = 4
    answers = await predicted(runtime)
    await runtime.monitor.flush()
    with pytest.raises(NotFound):
        await calls(runtime).report_feedback(answers[0].prediction_id or "", "c1")
    await calls(runtime).report_feedback(answers[-1].prediction_id or "", "c1")


async def test_over_http_feedback_answers_200_404_409_and_400(runtime):  # noqa: F811
    runtime.tenants.create_tenant(TENANT)
    key = runtime.tenants.create_key(TENANT)
    headers = {"Authorization": f"Bearer {key.secret}"}
    app = create_app(runtime.settings, lambda: runtime)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://graft") as client:
        body = {"images": [base64.b64encode(IMAGES[0]).decode()], "heads": ["h"]}
        [prediction] = (await client.post("/v1/predict", json=body, headers=headers)).json()["predictions"]
        url = f"/v1/predictions/{prediction['prediction_id']}:feedback"
        assert (await client.post(url, json={"label": "zebra"}, headers=headers)).status_code == 400
        ok = await client.post(url, json={"label": "c0"}, headers=headers)
        assert ok.status_code == 200 and ok.json()["prediction_id"] == prediction["prediction_id"]
        assert ok.json()["heads"][0] | {"correct": None} == {
            "head": "h",
            "version": 2,
            "correct": None,
            "shadow_version": None,
            "shadow_correct": None,
        }
        assert (await client.post(url, json={"label": "c0"}, headers=headers)).status_code == 409
        missing = await client.post("/v1/predictions/nope:feedback", json={"label": "c0"}, headers=headers)
        assert missing.status_code == 404
