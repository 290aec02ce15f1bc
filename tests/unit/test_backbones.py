"""Real pretrained backbones: verified weights, ImageNet sanity, split points."""

import dataclasses
import hashlib

import pytest
import skimage.data
import timm
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models

from service.engine.backbones import BACKBONES, Backbone, BackboneSpec, get_spec, load_backbone, registered
from service.engine.device import choose_placement
from service.engine.fold import fold_batch_norms
from service.engine.weights import PinnedWeights, WeightsUnavailable, ensure_weights, sha256_of
from service.errors import InvalidArgument, NotFound


def top5(backbone: Backbone, image) -> list[str]:
    x = backbone.preprocess(Image.fromarray(image).convert("RGB"))[None]
    indices = backbone.imagenet_logits(x)[0].topk(5).indices
    return [backbone.spec.categories[i] for i in indices]


@pytest.mark.parametrize(
    ("photo", "expected", "within_top"),
    [
        ("chelsea", {"tabby", "tiger cat", "Egyptian cat"}, 1),
        ("coffee", {"espresso", "cup", "coffee mug"}, 1),
        ("camera", {"tripod", "reflex camera", "Polaroid camera"}, 1),
        ("rocket", {"space shuttle", "missile", "projectile"}, 5),
    ],
)
def test_pretrained_mobilenet_recognises_real_photos(mobilenet, photo, expected, within_top):
    predictions = top5(mobilenet, getattr(skimage.data, photo)())
    assert expected & set(predictions[:within_top]), predictions


def test_pooled_features_have_the_documented_size(mobilenet):
    x = torch.randn(2, 3, 224, 224)
    assert mobilenet.features(x).shape == (2, 1280)


def test_trunk_then_fresh_tail_equals_the_whole_trunk(mobilenet):
    """A finetune adapter's untrained tail continues exactly where the frozen trunk stopped."""
    x = torch.randn(2, 3, 224, 224)
    split = mobilenet.split_for_blocks(4)
    tail = mobilenet.fresh_tail(split).eval()
    with torch.no_grad():
        continued = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(tail(mobilenet.features(x, split)), 1), 1)
    torch.testing.assert_close(continued, mobilenet.features(x), rtol=1e-4, atol=1e-4)


def test_features_can_resume_from_a_split_point(mobilenet):
    x = torch.randn(1, 3, 224, 224)
    mid = mobilenet.features(x, 15)
    assert mid.shape == (1, 160, 7, 7)
    torch.testing.assert_close(mobilenet.features(mid, start=15), mobilenet.features(x), rtol=1e-4, atol=1e-4)


def test_the_pooled_path_answers_every_batch_size_as_the_blocks_do_one_by_one(mobilenet):
    """The pooled path runs as one frozen graph traced on a batch of 2: other sizes must give the same features."""
    for size in (1, 3, 7):
        x = torch.randn(size, 3, 224, 224)
        one_by_one = mobilenet.features(mobilenet.features(x, 1), start=1)
        torch.testing.assert_close(mobilenet.features(x), one_by_one, rtol=1e-4, atol=1e-4)


def test_frozen_trunk_has_no_trainable_parameters(mobilenet):
    assert not any(p.requires_grad for p in mobilenet.model.parameters())
    assert all(p.requires_grad for p in mobilenet.fresh_tail(15).parameters())


def test_split_points_are_validated(mobilenet):
    assert mobilenet.split_for_blocks(4) == 15
    assert mobilenet.info().split_points[-1] == mobilenet.num_blocks
    with pytest.raises(InvalidArgument, match="finetune_blocks must be in"):
        mobilenet.split_for_blocks(40)
    with pytest.raises(InvalidArgument, match="split point 3 is not valid"):
        mobilenet.check_split(3)


def test_unknown_backbone_is_not_found():
    with pytest.raises(NotFound, match="unknown backbone 'resnet9000'"):
        get_spec("resnet9000")


def test_untrained_plumbing_backbone_says_so(untrained_backbone):
    backbone = load_backbone(untrained_backbone, choose_placement("cpu"))
    info = backbone.info()
    assert not info.pretrained and "untrained" in info.weights_source
    assert backbone.features(torch.randn(1, 3, 224, 224)).shape == (1, 576)


# -- The registry: what every tenant may pick, with figures checked against the models -----------------------------


def stated_figures(spec: BackboneSpec) -> dict[str, int | float]:
    return {
        "num_params": spec.num_params,
        "num_blocks": spec.num_blocks,
        "pooled_channels": spec.feature_dim,
        "classifier_inputs": spec.feature_dim,
        "gflops": spec.gflops,
    }


def measured_figures(spec: BackboneSpec) -> dict[str, int | float]:
    """The spec's figures recomputed from its built model, by the convention of BackboneSpec's docstring."""
    model = spec.build().eval()
    image = torch.zeros(1, 3, spec.crop_size, spec.crop_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    blocks = spec.blocks(model)
    with torch.no_grad():
        for block in blocks:
            image = block(image)
    return {
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_blocks": len(blocks),
        "pooled_channels": image.shape[1],
        "classifier_inputs": spec.classifier(model).in_features,
        "gflops": round(counter.get_total_flops() / 2 / 1e9, 3),  # it counts a multiply-add as 2 flops
    }


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbones_stated_figures_are_its_models(name):
    """Hand-typed figures drift (a library upgrade, a copied number): each is recomputed, as torchvision does."""
    spec = get_spec(name)
    assert measured_figures(spec) == stated_figures(spec)


def test_the_test_only_backbones_figures_are_its_models_too(untrained_backbone):
    spec = get_spec(untrained_backbone)
    assert measured_figures(spec) == stated_figures(spec)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_split_point_leaves_a_frozen_trunk(name):
    spec = get_spec(name)
    assert 1 <= spec.min_finetune_blocks <= spec.max_finetune_blocks < spec.num_blocks


def test_mobilenet_v2_states_what_its_torchvision_weights_publish():
    weights, spec = models.MobileNet_V2_Weights.IMAGENET1K_V1, get_spec("mobilenet_v2")
    transforms = weights.transforms()
    assert (spec.num_params, spec.gflops) == (weights.meta["num_params"], weights.meta["_ops"])
    assert ([spec.crop_size], [spec.resize_size]) == (transforms.crop_size, transforms.resize_size)
    assert (list(spec.mean), list(spec.std)) == (transforms.mean, transforms.std)
    assert spec.interpolation == transforms.interpolation


def test_graft_ships_only_pretrained_backbones():
    """Whatever the registry holds, any tenant may train on: random weights would be a silent trap."""
    assert all(spec.pretrained for spec in BACKBONES.values())
    assert "mobilenet_v3_small-untrained" not in BACKBONES


def test_a_registered_backbone_is_gone_after_its_block():
    spec = dataclasses.replace(get_spec("mobilenet_v2"), name="mobilenet_v2-copy")
    with registered(spec):
        assert get_spec("mobilenet_v2-copy") is spec
    with pytest.raises(NotFound, match="unknown backbone 'mobilenet_v2-copy'"):
        get_spec("mobilenet_v2-copy")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="'mobilenet_v2' is already registered"):
        with registered(get_spec("mobilenet_v2")):
            pass
    assert BACKBONES["mobilenet_v2"].pretrained  # the shipped spec is untouched


def test_corrupt_cached_checkpoint_is_replaced_by_a_verified_copy(tmp_path, monkeypatch):
    real = ensure_weights(get_spec("mobilenet_v2").weights, allow_download=False)
    pin = PinnedWeights(filename="m.pth", sha256=sha256_of(real), url=real.as_uri())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "m.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the checkpoint")
    assert ensure_weights(pin) == cached
    assert sha256_of(cached) == pin.sha256


def test_checkpoint_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    source = tmp_path / "evil.pth"
    source.write_bytes(b"tampered")
    pin = PinnedWeights(filename="evil.pth", sha256=hashlib.sha256(b"genuine").hexdigest(), url=source.as_uri())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with pytest.raises(WeightsUnavailable, match="does not match the pin"):
        ensure_weights(pin)
    assert not (tmp_path / "home" / "hub" / "checkpoints" / "evil.pth").exists()


# -- EfficientNet-Lite2: a third-party conversion of the TensorFlow checkpoint, on timm's architecture ----------


@pytest.fixture(scope="module")
def efficientnet() -> Backbone:
    return load_backbone("efficientnet_lite2", choose_placement("cpu"))


@pytest.mark.parametrize(
    ("photo", "expected"),
    [
        ("chelsea", {"tabby", "tiger cat", "Egyptian cat"}),
        ("coffee", {"espresso"}),
        ("camera", {"tripod"}),
    ],
)
def test_converted_efficientnet_lite2_names_real_photos(efficientnet, photo, expected):
    predictions = top5(efficientnet, getattr(skimage.data, photo)())
    assert predictions[0] in expected, predictions


def test_efficientnet_lite2_preprocesses_like_timm():
    config = timm.data.resolve_data_config({}, model=timm.create_model("tf_efficientnet_lite2", pretrained=False))
    spec = get_spec("efficientnet_lite2")
    assert (3, spec.crop_size, spec.crop_size) == config["input_size"]
    assert spec.resize_size == int(spec.crop_size / config["crop_pct"])
    assert (spec.mean, spec.std) == (config["mean"], config["std"])
    assert spec.interpolation.value == config["interpolation"]


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite2"])
def test_imagenet_classifier_on_pooled_features_is_the_whole_model(request, name):
    backbone = request.getfixturevalue({"mobilenet_v2": "mobilenet", "efficientnet_lite2": "efficientnet"}[name])
    x = backbone.preprocess(Image.fromarray(skimage.data.coffee()))[None]
    weight, bias = backbone.imagenet_classifier()
    torch.testing.assert_close(backbone.features(x) @ weight.T + bias, backbone.imagenet_logits(x))


def test_efficientnet_lite2_finetunes_its_last_blocks(efficientnet):
    x = torch.randn(1, 3, 260, 260)
    split = efficientnet.split_for_blocks(4)
    assert split in efficientnet.info().split_points and efficientnet.info().pretrained
    tail = efficientnet.fresh_tail(split).eval()
    with torch.no_grad():
        continued = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(tail(efficientnet.features(x, split)), 1), 1)
    torch.testing.assert_close(continued, efficientnet.features(x), rtol=1e-4, atol=1e-4)


def test_a_checkpoint_of_another_architecture_is_refused_by_the_conversion(mobilenet):
    spec = get_spec("efficientnet_lite2")
    with pytest.raises(ValueError, match="checkpoint has"):
        spec.convert(spec.build(), mobilenet.model.state_dict())


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite2"])
def test_every_pinned_checkpoint_is_cached_and_verified(name):
    pin = get_spec(name).weights
    assert sha256_of(ensure_weights(pin, allow_download=False)) == pin.sha256


def test_tampered_efficientnet_checkpoint_is_refused(tmp_path, monkeypatch):
    """One flipped byte of the real file: the pinned hash refuses it, from the cache and from a source."""
    pin = get_spec("efficientnet_lite2").weights
    tampered = bytearray(ensure_weights(pin, allow_download=False).read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    cached = tmp_path / "home" / "hub" / "checkpoints" / pin.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(tampered)
    with pytest.raises(WeightsUnavailable, match="make weights"):
        ensure_weights(pin, allow_download=False)
    source = tmp_path / "source.pth"
    source.write_bytes(tampered)
    from_source = PinnedWeights(filename=pin.filename, sha256=pin.sha256, url=source.as_uri())
    with pytest.raises(WeightsUnavailable, match="does not match the pin"):
        ensure_weights(from_source)
    assert cached.read_bytes() == tampered  # never replaced by an unverified copy


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite2"])
def test_missing_checkpoint_of_any_backbone_names_the_fix(tmp_path, monkeypatch, name):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailable, match=f"missing checkpoint {get_spec(name).weights.filename}.*make weights"):
        ensure_weights(get_spec(name).weights, allow_download=False)


# -- The serving trunk's batch norms, folded into its convolutions ------------------------------------------------


def photos(backbone: Backbone) -> torch.Tensor:
    names = ("chelsea", "coffee", "camera", "astronaut", "rocket")
    return torch.stack([backbone.preprocess(Image.fromarray(getattr(skimage.data, n)()).convert("RGB")) for n in names])


def published_pooled(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    """Pooled features from the model as published (unfolded, real batch norms)."""
    with torch.no_grad():
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(backbone.cpu_copy(0)(x), 1), 1)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite2"])
def test_folded_serving_trunk_matches_the_published_model_on_real_photos(request, name):
    backbone = request.getfixturevalue({"mobilenet_v2": "mobilenet", "efficientnet_lite2": "efficientnet"}[name])
    x = photos(backbone)
    assert backbone.folded_batch_norms > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.model.modules())
    torch.testing.assert_close(backbone.features(x), published_pooled(backbone, x), rtol=1e-4, atol=1e-4)
    split = backbone.split_for_blocks(3)
    with torch.no_grad():
        mid = backbone.cpu_copy(0, split)(x)
    torch.testing.assert_close(backbone.features(x, split), mid, rtol=1e-4, atol=1e-4)


def test_training_tails_keep_real_batch_norms_that_learn_running_statistics(mobilenet):
    tail = mobilenet.fresh_tail(mobilenet.split_for_blocks(2))
    norms = [m for m in tail.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(p.requires_grad for p in tail.parameters())
    before = norms[0].running_mean.clone()
    tail.train()(mobilenet.features(photos(mobilenet), mobilenet.split_for_blocks(2)).clone())
    assert not torch.equal(norms[0].running_mean, before)


def test_folding_refuses_a_model_in_training_mode():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="only an eval-mode model"):
        fold_batch_norms(model, torch.randn(1, 3, 8, 8))


class _ConvFeedsTwo(torch.nn.Module):
    """A convolution whose output feeds its batch norm and a skip connection: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3)
        self.bn.running_mean.uniform_(-1, 1)
        self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_folding_refuses_a_convolution_whose_output_is_also_used_elsewhere():
    with pytest.raises(RuntimeError, match="changed the model's output"):
        fold_batch_norms(_ConvFeedsTwo().eval(), torch.randn(1, 3, 8, 8))
