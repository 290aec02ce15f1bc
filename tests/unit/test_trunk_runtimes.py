"""The trunk runtimes: each registered one recomputed against torch, and the start-up choice among them."""

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from service.engine.backbones import Backbone, TrunkOptions, load_backbone
from service.engine.device import choose_placement
from service.engine.runtimes import RUNTIMES, Lanes, Precision
from service.engine.trunk import TOLERANCES, RuntimeRefused, check, choose

REPO = Path(__file__).resolve().parents[2]

CPU_RUNS = [
    (name, precision)
    for name, spec in RUNTIMES.items()
    if spec.missing() is None
    for precision in sorted(spec.precisions("cpu"))
]


@pytest.mark.parametrize(("runtime", "precision"), CPU_RUNS, ids=[f"{r}-{p}" for r, p in CPU_RUNS])
def test_every_registered_runtime_reproduces_torchs_pooled_features_within_its_precisions_tolerance(
    mobilenet: Backbone, runtime: str, precision: Precision
) -> None:
    n = mobilenet.num_blocks
    reference = mobilenet.reference(0, n)
    checked = check(RUNTIMES[runtime], mobilenet.graph(0, n), precision, mobilenet.lanes, reference)

    got = checked.trunk(reference.inputs)
    assert got.shape == (len(reference.inputs), mobilenet.spec.feature_dim) and got.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(got.double(), reference.expected.double(), dim=1)
    assert float(cosine.min()) == pytest.approx(checked.min_cosine, abs=1e-6)
    assert float(cosine.min()) >= TOLERANCES[precision].min_cosine
    if precision == Precision.FP32:
        torch.testing.assert_close(got, reference.expected, atol=1e-4, rtol=1e-4)


def test_every_registered_runtime_runs_the_cpu_in_float32_or_says_why_not() -> None:
    for spec in RUNTIMES.values():
        why = spec.missing()
        assert why is not None or Precision.FP32 in spec.precisions("cpu") or "cpu" not in spec.device_types
        assert spec.notes


def test_the_serving_runtime_is_the_fastest_candidate_measured_at_start_up(mobilenet: Backbone) -> None:
    report = mobilenet.trunk
    assert report.runtime in RUNTIMES and report.precision == Precision.FP32
    assert report.images_per_second > 0
    assert report.max_abs_diff <= 1e-4 and report.min_cosine >= TOLERANCES[Precision.FP32].min_cosine
    assert mobilenet.info().trunk == report


def test_a_runtime_beyond_its_tolerance_is_refused_even_when_it_is_the_fastest(mobilenet: Backbone) -> None:
    """A runtime whose features drift (here: torch's, scaled by 1.001) never serves, however fast."""
    torch_runtime = RUNTIMES["torch"]

    def drifting(graph, precision, lanes):  # type: ignore[no-untyped-def]
        exact = torch_runtime.compile(graph, precision, lanes)
        return lambda images: exact(images) * 1.001

    n = mobilenet.num_blocks
    graph, reference = mobilenet.graph(0, n), mobilenet.reference(0, n)
    with pytest.raises(RuntimeRefused, match="differ from torch's"):
        check(replace(torch_runtime, name="drifting", compile=drifting), graph, Precision.FP32, Lanes(1, 1), reference)

    RUNTIMES["drifting"] = replace(torch_runtime, name="drifting", compile=drifting)
    try:
        spec, _, report = choose(graph, Precision.FP32, Lanes(1, 1), reference, batch=4)
    finally:
        del RUNTIMES["drifting"]
    assert spec.name != "drifting" and report.runtime != "drifting"


def test_a_named_runtime_that_cannot_run_the_precision_stops_the_start_up_with_the_reason(mobilenet) -> None:
    n = mobilenet.num_blocks
    with pytest.raises(RuntimeRefused, match="torch does not run int8 on cpu"):
        choose(mobilenet.graph(0, n), Precision.INT8, Lanes(1, 1), mobilenet.reference(0, n), 4, requested="torch")
    with pytest.raises(RuntimeRefused, match="unknown trunk runtime 'tensorflow'"):
        choose(mobilenet.graph(0, n), Precision.FP32, Lanes(1, 1), mobilenet.reference(0, n), 4, requested="tensorflow")


def test_split_point_graphs_are_compiled_by_the_serving_runtime_and_continue_to_the_same_features(
    mobilenet: Backbone,
) -> None:
    n = mobilenet.num_blocks
    images = mobilenet.reference(0, n).inputs[:3]
    split = mobilenet.split_for_blocks(2)
    stem = mobilenet.features(images, split)
    assert stem.shape == (3, *mobilenet.feature_shape(split))
    continued = mobilenet.features(stem, n, start=split)
    torch.testing.assert_close(continued, mobilenet.features(images), atol=1e-4, rtol=1e-4)
    assert mobilenet.feature_key(split) == f"block{split}.{mobilenet.trunk.runtime}-fp32"


def test_side_by_side_micro_batches_give_the_same_features_in_order(mobilenet: Backbone) -> None:
    images = mobilenet.reference(0, mobilenet.num_blocks).inputs
    torch.testing.assert_close(mobilenet.features(images, side_by_side=True), mobilenet.features(images))


@pytest.fixture(scope="module")
def int8_mobilenet(tmp_path_factory) -> Backbone:
    return load_backbone(
        "mobilenet_v2",
        choose_placement("cpu", Precision.INT8),
        options=TrunkOptions(cache_dir=tmp_path_factory.mktemp("trunks")),
    )


def test_an_int8_trunk_is_calibrated_on_the_shipped_photos_and_keys_its_features_apart(
    mobilenet: Backbone, int8_mobilenet: Backbone
) -> None:
    report = int8_mobilenet.trunk
    assert (report.runtime, report.precision) == ("onnxruntime", Precision.INT8)
    assert TOLERANCES[Precision.INT8].min_cosine <= report.min_cosine < 0.9999  # reduced: close, not equal
    n = mobilenet.num_blocks
    assert int8_mobilenet.feature_key(n) == "pooled.onnxruntime-int8" != mobilenet.feature_key(n)
    assert any(path.name.endswith(".onnx") and "-int8-" in path.name for path in int8_mobilenet.graphs.folder.iterdir())


def test_graft_runs_no_torchscript() -> None:
    """TorchScript is deprecated: no module of graft's calls torch.jit."""
    for path in [*REPO.glob("service/**/*.py"), *REPO.glob("adapters/**/*.py"), *REPO.glob("benchmarks/*.py")]:
        if "gen" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        uses = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "jit"]
        assert not uses, f"{path.relative_to(REPO)} uses torch.jit"
