"""Each backbone's own ImageNet classifier, served as the read-only head `imagenet@<backbone>` to every tenant."""

import io

import pytest
import skimage.data
from PIL import Image
from pydantic import ValidationError
from test_engine import save_random_head

from adapters.kinds import HeadKind
from service.core import Core
from service.engine.backbones import Backbone, load_backbone
from service.engine.device import choose_placement
from service.engine.head_cache import HeadCache
from service.engine.predictor import Predictor
from service.errors import InvalidArgument, NotFound
from service.http.predict import PredictRequest
from service.prediction_options import PredictOptions
from service.resources import head_ref

pytestmark = pytest.mark.anyio


class CountingMetrics:
    """The engine's own metrics hook: how many images each backbone's trunk ran on."""

    def __init__(self) -> None:
        self.trunk_images: dict[str, int] = {}

    def batch(self, backbone: str, size: int, queue_depth: int) -> None:
        self.trunk_images[backbone] = self.trunk_images.get(backbone, 0) + size

    def predictions(self, kind: str, door: str, count: int) -> None:
        pass


@pytest.fixture(scope="module")
def efficientnet() -> Backbone:
    return load_backbone("efficientnet_lite2", choose_placement("cpu"))


@pytest.fixture
def core(tmp_path, make_core, efficientnet) -> Core:
    core = make_core(tmp_path)
    core.backbones[efficientnet.name] = efficientnet
    return core


def jpeg(photo: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(getattr(skimage.data, photo)()).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def predictor_for(core: Core, metrics: CountingMetrics | None = None) -> Predictor:
    return Predictor(core.backbones, HeadCache(core.heads, core.backbones, 1 << 30), core.settings, metrics)


async def test_imagenet_heads_name_photos_with_imagenet_categories(core):
    predictor = predictor_for(core)
    try:
        answers = await predictor.predict(
            "anyone", [jpeg("coffee"), jpeg("camera")], ["imagenet@mobilenet_v2", "imagenet@efficientnet_lite2"]
        )
    finally:
        await predictor.stop()
    coffee, camera = ([head.top[0].label for head in answer.heads] for answer in answers)
    assert coffee == ["espresso", "espresso"]
    assert camera == ["tripod", "tripod"]
    assert [(h.head, h.version) for h in answers[0].heads] == [
        ("imagenet@mobilenet_v2", 1),
        ("imagenet@efficientnet_lite2", 1),
    ]


async def test_an_imagenet_head_rides_a_tenants_request_without_another_trunk_pass(core):
    save_random_head(core, "colours", HeadKind.LINEAR)
    metrics = CountingMetrics()
    predictor = predictor_for(core, metrics)
    try:
        (answer,) = await predictor.predict(
            "acme", [jpeg("chelsea")], ["colours", "imagenet@mobilenet_v2"], PredictOptions(top_k=3)
        )
    finally:
        await predictor.stop()
    assert [head.head for head in answer.heads] == ["colours", "imagenet@mobilenet_v2"]
    assert answer.heads[1].top[0].label in {"tabby", "tiger cat", "Egyptian cat"}
    assert metrics.trunk_images == {"mobilenet_v2": 1}  # one image, one trunk pass, two heads


async def test_every_tenant_gets_the_same_imagenet_head(core):
    predictor = predictor_for(core)
    try:
        (first,) = await predictor.predict("acme", [jpeg("coffee")], ["imagenet@mobilenet_v2"])
        (second,) = await predictor.predict("globex", [jpeg("coffee")], ["imagenet@mobilenet_v2"])
    finally:
        await predictor.stop()
    assert first == second


async def test_imagenet_heads_of_backbones_not_loaded_or_untrained_are_not_found(core, untrained_backbone):
    core.backbones[untrained_backbone] = load_backbone(untrained_backbone, choose_placement("cpu"))
    cache = HeadCache(core.heads, core.backbones, 1 << 30)
    with pytest.raises(
        NotFound, match="'resnet50' is not loaded.*'imagenet@efficientnet_lite2', 'imagenet@mobilenet_v2'"
    ):
        await cache.get("acme", "imagenet@resnet50")
    with pytest.raises(NotFound, match="untrained: it has no ImageNet classifier"):
        await cache.get("acme", f"imagenet@{untrained_backbone}")


def test_imagenet_heads_are_read_only_and_their_name_is_reserved(core):
    with pytest.raises(InvalidArgument, match="own ImageNet classifier: use it in predictions"):
        core.heads.resolve("acme", "imagenet@mobilenet_v2")  # what export, aliases and head pages resolve through
    with pytest.raises(InvalidArgument, match="'imagenet' is reserved"):
        save_random_head(core, "imagenet", HeadKind.LINEAR)


def test_both_doors_accept_a_reference_to_a_backbones_imagenet_classifier():
    """The JSON body's schema, the multipart form and gRPC (head_ref) all let `imagenet@mobilenet_v2` through, and
    still refuse what is neither a tenant's reference nor a built-in head."""
    json_body = {"images": ["AAAA"], "heads": ["imagenet@mobilenet_v2", "weave@2", "weave:prod"]}
    assert PredictRequest.model_validate(json_body).heads == json_body["heads"]
    assert head_ref("imagenet@efficientnet_lite2") == "imagenet@efficientnet_lite2"
    for bad in ("imagenet@", "weave@mobilenet_v2", "Imagenet@mobilenet_v2", "weave:Prod"):
        with pytest.raises(InvalidArgument):
            head_ref(bad)
        with pytest.raises(ValidationError):
            PredictRequest.model_validate({"images": ["AAAA"], "heads": [bad]})
