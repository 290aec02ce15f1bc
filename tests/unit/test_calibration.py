"""Calibrated scores, abstention and conformal prediction sets, on real Fashion-MNIST images and real heads.

A head is trained once per module (the real recipe on MobileNetV2 features);
a second version holds the same weights without calibration, as versions
stored before graft calibrated heads do.
"""

import base64
import math

import grpc
import httpx
import onnxruntime
import pytest
import torch
from pydantic import ValidationError

from adapters.calibration import MAX_TEMPERATURE, MIN_TEMPERATURE, Calibration, calibrate, prediction_set
from adapters.errors import InvalidInput
from adapters.kinds import HeadConfig, HeadKind, load_head
from adapters.search_space import SearchSpace
from adapters.splits import stratified_split
from harness.sample_data import fashion_mnist_pngs
from service.core import Core
from service.engine.head_cache import HeadCache
from service.engine.predictor import Predictor
from service.errors import FailedPrecondition
from service.export import export_onnx
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.prediction_options import PredictOptions
from service.runtime import Runtime
from service.store.heads import HeadVersionInfo
from service.store.images import decode_rgb
from service.training import TrainRequest

pytestmark = pytest.mark.anyio

TENANT = "acme"
ONE_MLP_TRIAL = SearchSpace(lr=[3e-3], weight_decay=[1e-4], hidden=[64])


@pytest.fixture(scope="module")
def core(tmp_path_factory, make_core) -> Core:
    return make_core(tmp_path_factory.mktemp("graft"))


@pytest.fixture(scope="module")
def fashion(core):
    files = fashion_mnist_pngs("train", per_class=12, seed=3)
    return core.datasets.create(TENANT, "fashion", [(f"{i}.png", data, label) for i, (data, label) in enumerate(files)])


@pytest.fixture(scope="module")
def calibrated(core, fashion) -> HeadVersionInfo:
    """An mlp head: chosen and served as fit on the training split, so its hold-out is calibration data it never saw."""
    request = TrainRequest(dataset_id=fashion.id, head_name="fashion", kind="mlp", search=ONE_MLP_TRIAL)
    return core.trainer.train(TENANT, request)


@pytest.fixture(scope="module")
def uncalibrated(core, calibrated) -> HeadVersionInfo:
    """The same weights stored as a version from before calibration: no `calibration` in its config."""
    config = {key: value for key, value in calibrated.config.items() if key != "calibration"}
    return core.heads.create_version(
        TENANT,
        "old",
        tensors=core.heads.load_tensors(calibrated),
        backbone=calibrated.backbone,
        split_point=calibrated.split_point,
        kind=calibrated.kind,
        classes=calibrated.classes,
        config=config,
        hyperparams=calibrated.hyperparams,
        metrics={},
        dataset_id=calibrated.dataset_id,
    )


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [data for data, _ in fashion_mnist_pngs("test", per_class=2, seed=5)]


async def predict(core: Core, images: list[bytes], heads: list[str], **options):
    predictor = Predictor(core.backbones, HeadCache(core.heads, core.backbones, 1 << 30), core.settings)
    try:
        return await predictor.predict(TENANT, images, heads, PredictOptions(**options))
    finally:
        await predictor.stop()


def holdout_logits(core: Core, version: HeadVersionInfo, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored head's raw logits on its own hold-out split, recomputed from cached features."""
    examples = core.datasets.examples(TENANT, dataset.id)
    labels = torch.tensor([version.classes.index(label) for _, label in examples])
    _, holdout = stratified_split(labels.tolist(), 0.2, 0)
    backbone = core.backbones[version.backbone]
    features = core.extractor.features(backbone, backbone.num_blocks, [sha for sha, _ in examples])
    head = load_head(HeadConfig.model_validate(version.config), core.heads.load_tensors(version))
    with torch.no_grad():
        return head(features[holdout]), labels[holdout]


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return float(torch.nn.functional.cross_entropy(logits.double() / temperature, labels))


def test_training_stores_the_nll_minimising_temperature_and_the_sorted_holdout_scores(core, fashion, calibrated):
    calibration = Calibration.model_validate(calibrated.config["calibration"])
    logits, labels = holdout_logits(core, calibrated, fashion)
    assert len(calibration.scores) == len(labels)
    assert calibration.scores == sorted(calibration.scores)
    assert MIN_TEMPERATURE <= calibration.temperature <= MAX_TEMPERATURE
    best = nll(logits, labels, calibration.temperature)
    for nearby in (calibration.temperature * 0.9, calibration.temperature * 1.1, 1.0):
        assert best <= nll(logits, labels, nearby) + 1e-9
    # Each stored score is 1 - the calibrated probability of a hold-out image's true class.
    probabilities = (logits.double() / calibration.temperature).softmax(dim=1)
    expected = sorted((1 - probabilities[range(len(labels)), labels]).tolist())
    assert calibration.scores == pytest.approx(expected, abs=1e-6)


def test_a_linear_head_refit_on_every_example_is_calibrated_on_every_examples_out_of_fold_logits(core, fashion):
    version = core.trainer.train(TENANT, TrainRequest(dataset_id=fashion.id, head_name="refit"))
    calibration = Calibration.model_validate(version.config["calibration"])
    assert (
        len(calibration.scores) == fashion.num_examples
    )  # the search's folds and the hold-out: none seen by its model
    assert version.metrics["calibration"]["conformal_examples"] == fashion.num_examples
    assert version.metrics["served"].startswith("the chosen recipe fit on every example")
    assert version.metrics["num_examples"] == len(holdout_logits(core, version, fashion)[1])  # measured on the hold-out


def test_the_versions_metrics_report_the_calibration_error_before_and_after(core, fashion, calibrated):
    logits, labels = holdout_logits(core, calibrated, fashion)
    report = calibrated.metrics["calibration"]
    assert report["temperature"] == calibrated.config["calibration"]["temperature"]
    assert 0 <= report["ece_after"] <= 1 and 0 <= report["ece_before"] <= 1
    assert report["conformal_examples"] == len(labels)
    assert report["max_coverage"] == pytest.approx(len(labels) / (len(labels) + 1))
    # The headline metrics describe the served (calibrated) scores: their loss is the calibrated NLL.
    assert calibrated.metrics["loss"] == pytest.approx(nll(logits, labels, report["temperature"]), rel=1e-4)
    assert calibrated.metrics["ece"] == pytest.approx(report["ece_after"])


async def test_served_scores_are_the_old_versions_softmax_at_the_stored_temperature(
    core, calibrated, uncalibrated, images
):
    """Same weights, with and without calibration: the served scores differ exactly by the temperature."""
    temperature = calibrated.config["calibration"]["temperature"]
    out = await predict(core, images, ["fashion", "old"], top_k=10)
    for image in out:
        new, old = ({s.label: s.score for s in head.top} for head in image.heads)
        labels = sorted(old)
        raw = torch.tensor([old[label] for label in labels], dtype=torch.float64)
        expected = (raw.log() / temperature).softmax(dim=0)
        assert [new[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-5)
        assert image.heads[0].top[0].label == image.heads[1].top[0].label  # scaling never changes the ranking


async def test_mlp_heads_are_served_at_their_temperature_too(core, fashion, images):
    search = SearchSpace(lr=[3e-3], weight_decay=[1e-4], hidden=[64])
    request = TrainRequest(dataset_id=fashion.id, head_name="fashion-mlp", kind=HeadKind.MLP, search=search)
    version = core.trainer.train(TENANT, request)
    temperature = version.config["calibration"]["temperature"]
    backbone = core.backbones["mobilenet_v2"]
    [image] = await predict(core, images[:1], ["fashion-mlp"], top_k=10, include_embedding=True)
    head = load_head(HeadConfig.model_validate(version.config), core.heads.load_tensors(version))
    with torch.no_grad():
        logits = head(torch.tensor([image.embedding], dtype=torch.float32, device=backbone.placement.device))
    expected = (logits[0].double() / temperature).softmax(dim=0)
    served = {s.label: s.score for s in image.heads[0].top}
    assert [served[label] for label in version.classes] == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.parametrize("scaling", ["none", "l2"])
async def test_a_linear_head_of_every_scaling_is_served_as_its_module_computes(core, fashion, images, scaling):
    """Unscaled and unit-length rows gather into the engine's one matmul like standardised ones (linear default)."""
    request = TrainRequest(dataset_id=fashion.id, head_name=f"fashion-{scaling}", scaling=scaling)
    version = core.trainer.train(TENANT, request)
    assert version.config["scaling"] == scaling
    temperature = version.config["calibration"]["temperature"]
    backbone = core.backbones["mobilenet_v2"]
    [image] = await predict(core, images[:1], [f"fashion-{scaling}"], top_k=10, include_embedding=True)
    head = load_head(HeadConfig.model_validate(version.config), core.heads.load_tensors(version))
    with torch.no_grad():
        logits = head(torch.tensor([image.embedding], dtype=torch.float32, device=backbone.placement.device))
    expected = (logits[0].double() / temperature).softmax(dim=0)
    served = {s.label: s.score for s in image.heads[0].top}
    assert [served[label] for label in version.classes] == pytest.approx(expected.tolist(), abs=1e-5)


async def test_the_exported_model_gives_the_calibrated_scores_the_service_serves(core, calibrated, images):
    backbone = core.backbones[calibrated.backbone]
    onnx_file = export_onnx(
        backbone,
        [calibrated],
        [core.heads.load_tensors(calibrated)],
        images[:2],
        [calibrated.dataset_id],
        max_pixels=1 << 20,
    )
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    batch = torch.stack(
        [
            backbone.preprocess(decode_rgb(data, name="image", max_bytes=1 << 20, max_pixels=1 << 20))
            for data in images[:2]
        ]
    )
    [exported] = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    served = await predict(core, images[:2], ["fashion"], top_k=10)
    for row, image in zip(exported, served, strict=True):
        scores = {s.label: s.score for s in image.heads[0].top}
        assert [scores[label] for label in calibrated.classes] == pytest.approx(row.tolist(), abs=1e-4)


async def test_min_score_abstains_exactly_when_the_top_score_is_below_it(core, calibrated, images):
    plain = await predict(core, images, ["fashion"])
    assert not any(image.heads[0].abstained for image in plain)
    tops = sorted(image.heads[0].top[0].score for image in plain)
    cut = (tops[len(tops) // 2 - 1] + tops[len(tops) // 2]) / 2
    out = await predict(core, images, ["fashion"], min_score=cut)
    assert [image.heads[0].abstained for image in out] == [image.heads[0].top[0].score < cut for image in plain]
    for answer, before in zip(out, plain, strict=True):  # the top list is still there, unchanged
        assert [s.label for s in answer.heads[0].top] == [s.label for s in before.heads[0].top]
        assert [s.score for s in answer.heads[0].top] == pytest.approx([s.score for s in before.heads[0].top], abs=1e-5)
    assert any(image.heads[0].abstained for image in out) and not all(image.heads[0].abstained for image in out)


async def test_a_prediction_set_holds_every_label_past_the_conformal_threshold_likeliest_first(
    core, calibrated, images
):
    calibration = Calibration.model_validate(calibrated.config["calibration"])
    sets = {}
    for coverage in (0.5, 0.8, 0.95):
        threshold = calibration.threshold(coverage)
        out = await predict(core, images, ["fashion"], top_k=10, coverage=coverage)
        sets[coverage] = [image.heads[0].prediction_set for image in out]
        for image in out:
            head = image.heads[0]
            best = head.top[0].label
            passing = [s.label for s in head.top if 1 - s.score <= threshold and s.label != best]
            assert head.prediction_set == [best, *passing]
    for image in range(len(images)):  # a larger coverage never drops a label
        assert set(sets[0.5][image]) <= set(sets[0.8][image]) <= set(sets[0.95][image])
    plain = await predict(core, images[:1], ["fashion"])
    assert plain[0].heads[0].prediction_set is None  # not asked for, not sent


async def test_a_coverage_the_holdout_cannot_promise_is_refused_with_the_largest_it_can(core, calibrated, images):
    n = len(calibrated.config["calibration"]["scores"])
    with pytest.raises(FailedPrecondition, match=rf"calibrated on {n} hold-out images.*at most {n / (n + 1):.4f}"):
        await predict(core, images[:1], ["fashion"], coverage=0.99)


@pytest.mark.parametrize("head", ["old", "imagenet@mobilenet_v2"])
async def test_a_head_without_calibration_serves_as_before_but_cannot_promise_a_coverage(
    core, uncalibrated, images, head
):
    [image] = await predict(core, images[:1], [head], min_score=0.5)
    assert image.heads[0].abstained == (image.heads[0].top[0].score < 0.5)
    with pytest.raises(FailedPrecondition, match="no hold-out calibration"):
        await predict(core, images[:1], [head], coverage=0.5)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"min_score": -0.1}, "min_score"),
        ({"min_score": 1.5}, "min_score"),
        ({"coverage": 0.0}, "coverage"),
        ({"coverage": 1.0}, "coverage"),
        ({"coverage": math.nan}, "coverage"),
    ],
)
def test_out_of_range_options_are_refused_before_a_prediction_starts(options, problem):
    with pytest.raises(ValidationError, match=problem):
        PredictOptions(**options)


def test_the_threshold_is_the_finite_sample_corrected_order_statistic():
    calibration = Calibration(temperature=1.0, scores=[i / 10 for i in range(9)])  # n = 9
    assert calibration.threshold(0.9) == 0.8  # ceil(10 * 0.9) = 9: the largest
    assert calibration.threshold(0.5) == 0.4  # ceil(10 * 0.5) = 5
    with pytest.raises(InvalidInput, match="at most 0.9000"):
        calibration.threshold(0.91)


def test_a_prediction_set_is_never_empty():
    probabilities = torch.tensor([0.5, 0.3, 0.2])
    assert prediction_set(probabilities, threshold=0.0) == [0]
    assert prediction_set(probabilities, threshold=0.75) == [0, 1]


def test_calibration_rejects_logits_and_labels_that_do_not_match():
    with pytest.raises(InvalidInput, match="logits"):
        calibrate(torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(InvalidInput, match="labels must lie"):
        calibrate(torch.zeros(2, 4), torch.tensor([0, 4]))


# -- the doors ------------------------------------------------------------------------------------------------------


@pytest.fixture
def runtime(core) -> Runtime:
    return Runtime.around(core)


@pytest.fixture
def bearer(runtime) -> str:
    if TENANT not in {tenant.name for tenant in runtime.tenants.list_tenants()}:
        runtime.tenants.create_tenant(TENANT)
    return f"Bearer {runtime.tenants.create_key(TENANT).secret}"


async def test_http_predict_takes_min_score_and_coverage_in_json_and_multipart(runtime, bearer, calibrated, images):
    app = create_app(runtime.settings, lambda: runtime)
    headers = {"Authorization": bearer}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://graft") as client:
            body = {
                "images": [base64.b64encode(images[0]).decode()],
                "heads": ["fashion"],
                "min_score": 1.0,
                "coverage": 0.8,
            }
            answer = await client.post("/v1/predict", json=body, headers=headers)
            assert answer.status_code == 200, answer.text
            [head] = answer.json()["predictions"][0]["heads"]
            assert head["abstained"] is True and head["prediction_set"][0] == head["top"][0]["label"]

            form = {"heads": "fashion", "min_score": "0", "coverage": "0.8"}
            answer = await client.post(
                "/v1/predict:upload", data=form, files=[("files", ("a.png", images[0]))], headers=headers
            )
            assert answer.status_code == 200, answer.text
            [head] = answer.json()["predictions"][0]["heads"]
            assert head["abstained"] is False and head["prediction_set"][0] == head["top"][0]["label"]

            for bad in ({"coverage": 1.0}, {"min_score": -1}):
                answer = await client.post("/v1/predict", json=body | bad, headers=headers)
                assert answer.status_code == 422 and answer.json()["code"] == "invalid_argument"
            answer = await client.post("/v1/predict", json=body | {"coverage": 0.99}, headers=headers)
            assert answer.status_code == 409 and "at most" in answer.json()["message"]
    finally:
        await runtime.predictor.stop()


async def test_grpc_predict_and_stream_predict_take_min_score_and_coverage(runtime, bearer, calibrated, images):
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    metadata = [("authorization", bearer)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = rpc.PredictionServiceStub(channel)
            reply = await stub.Predict(
                api.PredictRequest(images=images[:1], heads=["fashion"], min_score=1.0, coverage=0.8), metadata=metadata
            )
            [head] = reply.predictions[0].heads
            assert head.abstained and head.prediction_set[0] == head.top[0].label

            plain = await stub.Predict(api.PredictRequest(images=images[:1], heads=["fashion"]), metadata=metadata)
            assert not plain.predictions[0].heads[0].abstained and not plain.predictions[0].heads[0].prediction_set

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Predict(
                    api.PredictRequest(images=images[:1], heads=["fashion"], coverage=1.5), metadata=metadata
                )
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            requests = [
                api.StreamPredictRequest(request_id=name, image=images[0], heads=["fashion"], coverage=coverage)
                for name, coverage in (("a", 0.8), ("b", 0.99))
            ]
            answers = {r.request_id: r async for r in stub.StreamPredict(iter(requests), metadata=metadata)}
            assert answers["a"].prediction.heads[0].prediction_set
            assert answers["b"].error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    finally:
        await server.stop(grace=1)
        await runtime.predictor.stop()
