"""Export heads as one standalone file a user can run without graft: ONNX, or a ``torch.export`` program (.pt2).

The file holds the frozen backbone and one or more heads trained on it, one
output of class probabilities [N, C] per head. It takes images already
resized, centre-cropped and normalised the backbone's way; the file's own
metadata says how (``graft.json``: the same document in both formats), with
each output's class names and where its head came from.

Before a file is returned it is run, by ONNX Runtime or by torch.export's own
module, on real images of the heads' own datasets and compared with PyTorch:
a file that would answer differently from graft is an internal error, never a
download.
"""

import importlib.metadata
import io
import logging
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import onnx
import onnxruntime
import torch
from pydantic import BaseModel, Field
from torch import nn

from adapters.calibration import TemperatureScaled
from adapters.kinds import HeadConfig, get_kind, load_head
from service.engine.backbones import Backbone
from service.errors import GraftError, InvalidArgument, NotFound
from service.store.datasets import DatasetStore
from service.store.heads import ServedVersion
from service.store.images import decode_rgb

log = logging.getLogger(__name__)

MAX_ABS_DIFF = 1e-4  # largest probability difference a returned file may show against PyTorch
INPUT_NAME = "images"
CHECK_IMAGES = 16  # at most this many stored images check a file before it is returned
MAX_HEADS = 16  # heads in one file (outputs)
MAX_BATCH = 4096  # the exported batch axis is dynamic up to this
METADATA_KEY = "graft.json"  # ONNX metadata_props key and .pt2 extra file name


class ExportCheckFailed(GraftError):
    """The exported file does not reproduce PyTorch: graft's defect, never the caller's."""

    code = "internal"


class InputSpec(BaseModel):
    """How to turn an image file into the model's input, the same way graft does."""

    name: str = INPUT_NAME
    layout: str = "NCHW"
    dtype: str = "float32"
    color: str = "RGB"
    resize: int = Field(description="resize the shorter side to this many pixels (antialiased)")
    interpolation: str
    crop: int = Field(description="then centre-crop a square of this size")
    scale: str = "pixel values / 255, then (x - mean) / std per channel"
    mean: list[float]
    std: list[float]


class OutputSpec(BaseModel):
    """One output: a head's class probabilities, in the order of ``classes``, and the head's provenance."""

    name: str
    classes: list[str]
    head: str
    version: int
    kind: str
    backbone: str
    weights_sha256: str
    dataset: str
    job: str | None
    created_at: datetime


class CheckSpec(BaseModel):
    """What the file was checked on before it was returned."""

    images: int
    source: str
    max_abs_diff: float


class Manifest(BaseModel):
    """The ``graft.json`` every exported file carries."""

    graft_version: str
    format: str
    input: InputSpec
    outputs: list[OutputSpec]
    check: CheckSpec | None = None


class ExportModel(nn.Module):
    """Backbone blocks once, then each head at its own split point, softmax per head.

    A head is the module its kind's record builds (adapters/kinds.py), whatever the kind: a file computes what
    the module computes, which is what the engine serves.
    """

    def __init__(
        self, backbone: Backbone, heads: Sequence[ServedVersion], tensors: Sequence[dict[str, torch.Tensor]]
    ) -> None:
        super().__init__()
        n = backbone.num_blocks
        self.splits = [n if info.split_point is None else info.split_point for info in heads]  # None: pooled
        self.num_blocks = n
        self.trunk = backbone.cpu_copy(0, max(self.splits))
        modules = []
        for info, weights, split in zip(heads, tensors, self.splits, strict=True):
            config = HeadConfig.model_validate(info.config)
            tail = backbone.fresh_tail(split).requires_grad_(False) if get_kind(config.kind).copies_tail else None
            head: nn.Module = load_head(config, weights, tail)
            if config.calibration is not None:  # the calibrated scores the service serves
                head = TemperatureScaled(head, config.calibration.temperature)
            modules.append(head)
        self.heads = nn.ModuleList(modules)
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        at_split: dict[int, torch.Tensor] = {}
        x = images
        for index, block in enumerate(self.trunk):
            if index in self.splits:
                at_split[index] = x
            x = block(x)
        end = len(self.trunk)  # the deepest split point: always a head's
        at_split[end] = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1) if end == self.num_blocks else x
        return tuple(
            torch.softmax(head(at_split[split]), dim=1) for head, split in zip(self.heads, self.splits, strict=True)
        )


def stored_check_images(datasets: DatasetStore, tenant: str, dataset_ids: Sequence[str]) -> list[bytes]:
    """Up to CHECK_IMAGES images of the heads' datasets, every class's first images before any class's second."""
    ranked: list[tuple[int, str]] = []
    for dataset_id in dict.fromkeys(dataset_ids):
        try:
            examples = datasets.examples(tenant, dataset_id)
        except NotFound:  # deleted since the head was trained: the head lives on
            continue
        seen: dict[str, int] = {}
        for sha, label in examples:
            seen[label] = seen.get(label, 0) + 1
            ranked.append((seen[label], sha))
    ranked.sort(key=lambda pair: pair[0])  # stable: upload order within a rank
    shas = list(dict.fromkeys(sha for _, sha in ranked))[:CHECK_IMAGES]
    return [datasets.read_image(sha) for sha in shas]


def check_inputs(
    backbone: Backbone, stored: Sequence[bytes], datasets: Sequence[str], max_pixels: int
) -> tuple[torch.Tensor, str]:
    """The images a file is checked on, decoded and transformed as graft predicts, [N, 3, H, W], and what they are.

    ``stored``: images of the heads' ``datasets``. With none (those datasets were
    deleted), seeded noise: the arithmetic is still compared, on inputs of the right shape.
    """
    where = ", ".join(f"datasets/{d}" for d in dict.fromkeys(datasets))
    if stored:
        images = [backbone.preprocess(decode_rgb(data, max_pixels=max_pixels)) for data in stored]
        return torch.stack(images), f"{len(images)} images of {where}"
    size = backbone.spec.crop_size
    noise = torch.randn(CHECK_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(0))
    return noise, f"{CHECK_IMAGES} seeded random inputs ({where} no longer exist)"


def file_bytes(backbone: Backbone, heads: Sequence[ServedVersion]) -> int:
    """What a file of ``heads`` carries, known before anything is loaded: the trunk up to the deepest split
    point (float32, as ExportModel copies it) and each head's stored parameters (a fine-tune's own tail
    blocks included). The build holds a few times this while it traces, serialises and checks the file."""
    deepest = max(backbone.num_blocks if info.split_point is None else info.split_point for info in heads)
    return backbone.block_bytes(0, deepest) + sum(info.param_bytes for info in heads)


def check_file_size(backbone: Backbone, heads: Sequence[ServedVersion], limit: int) -> None:
    """Refuse, before any weight is loaded, a file over ``limit`` bytes (GRAFT_MAX_EXPORT_BYTES)."""
    size = file_bytes(backbone, heads)
    if size > limit:
        largest = max(heads, key=lambda info: info.param_bytes)
        raise InvalidArgument(
            f"this export would carry {size:,} bytes of weights ({backbone.name} up to its deepest split point "
            f"and {len(heads)} head(s); the largest, {largest.name}@{largest.version}, {largest.param_bytes:,}), "
            f"over the limit of {limit:,} (GRAFT_MAX_EXPORT_BYTES); export fewer heads per file"
        )


def output_names(heads: Sequence[ServedVersion]) -> list[str]:
    """``{head}_v{version}`` per head; the same version named twice is the caller's mistake."""
    names = [f"{info.name}_v{info.version}" for info in heads]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InvalidArgument(f"export names the same head version more than once: {', '.join(twice)}")
    return names


def check_same_backbone(heads: Sequence[ServedVersion]) -> None:
    backbones = {info.backbone for info in heads}
    if len(backbones) > 1:
        listed = ", ".join(f"{info.name}@{info.version} on {info.backbone}" for info in heads)
        raise InvalidArgument(f"heads exported together must share one backbone; got {listed}")


def manifest(backbone: Backbone, heads: Sequence[ServedVersion], format: str) -> Manifest:
    spec = backbone.spec
    return Manifest(
        graft_version=_graft_version(),
        format=format,
        input=InputSpec(
            resize=spec.resize_size,
            interpolation=spec.interpolation.value,
            crop=spec.crop_size,
            mean=list(spec.mean),
            std=list(spec.std),
        ),
        outputs=[
            OutputSpec(
                name=name,
                classes=info.classes,
                head=info.name,
                version=info.version,
                kind=info.kind,
                backbone=info.backbone,
                weights_sha256=info.weights_sha256,
                dataset=info.dataset_id,
                job=info.job_id,
                created_at=info.created_at,
            )
            for name, info in zip(output_names(heads), heads, strict=True)
        ],
    )


def export_onnx(
    backbone: Backbone,
    heads: Sequence[ServedVersion],
    tensors: Sequence[dict[str, torch.Tensor]],
    stored: Sequence[bytes],
    datasets: Sequence[str],
    max_pixels: int,
) -> bytes:
    """One ONNX file (weights inside, dynamic batch), checked in ONNX Runtime against PyTorch on ``stored`` images."""
    model = ExportModel(backbone, heads, tensors)
    meta = manifest(backbone, heads, "onnx")
    names = [output.name for output in meta.outputs]
    program = torch.onnx.export(
        model,
        (_example(backbone),),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=names,
        dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}},
        verbose=False,
    )
    assert program is not None  # no file argument: the exporter returns the program
    proto = program.model_proto
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    images, source = check_inputs(backbone, stored, datasets, max_pixels)
    got = [torch.from_numpy(np.asarray(out)) for out in session.run(names, {INPUT_NAME: images.numpy()})]
    meta.check = check_against_pytorch(model, images, got, source, "ONNX")
    onnx.helper.set_model_props(proto, {METADATA_KEY: meta.model_dump_json()})
    proto.producer_name, proto.producer_version = "graft", meta.graft_version
    proto.doc_string = _doc(meta)
    return proto.SerializeToString()


def export_pt2(
    backbone: Backbone,
    heads: Sequence[ServedVersion],
    tensors: Sequence[dict[str, torch.Tensor]],
    stored: Sequence[bytes],
    datasets: Sequence[str],
    max_pixels: int,
) -> bytes:
    """A ``torch.export`` program (dynamic batch) with ``graft.json``, checked against PyTorch on ``stored`` images."""
    model = ExportModel(backbone, heads, tensors)
    meta = manifest(backbone, heads, "pt2")
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(model, (_example(backbone),), dynamic_shapes={INPUT_NAME: {0: batch}})
    images, source = check_inputs(backbone, stored, datasets, max_pixels)
    with torch.no_grad():
        got = list(program.module()(images))
    meta.check = check_against_pytorch(model, images, got, source, "torch.export")
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_KEY: meta.model_dump_json()})
    return buffer.getvalue()


def _graft_version() -> str:
    """The installed package's version; a Bento carries graft's sources without the package metadata."""
    try:
        return importlib.metadata.version("graft")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed as a package)"


def _example(backbone: Backbone) -> torch.Tensor:
    """What the exporters trace with: a batch of two, so that the batch axis stays dynamic (1 would be specialised)."""
    size = backbone.spec.crop_size
    return torch.zeros(2, 3, size, size)


def check_against_pytorch(
    model: ExportModel, images: torch.Tensor, got: list[torch.Tensor], source: str, exporter: str
) -> CheckSpec:
    """``got`` (the exported file's outputs on ``images``) against ``model``'s; over MAX_ABS_DIFF it raises."""
    with torch.no_grad():
        want = model(images)
    diff = max(float((g.float() - w).abs().max()) for g, w in zip(got, want, strict=True))
    if not diff <= MAX_ABS_DIFF:  # NaN fails too
        log.error("%s export differs from PyTorch by %.3g on %s", exporter, diff, source)
        raise ExportCheckFailed(
            f"the {exporter} file differs from PyTorch by {diff:.3g} in a probability on {source} "
            f"(allowed {MAX_ABS_DIFF}); it was not returned. Try the other format, and please report this",
            max_abs_diff=diff,
        )
    return CheckSpec(images=len(images), source=source, max_abs_diff=diff)


def _doc(meta: Manifest) -> str:
    heads = ", ".join(f"{o.name} ({len(o.classes)} classes)" for o in meta.outputs)
    spec = meta.input
    return (
        f"graft {meta.graft_version}: {meta.outputs[0].backbone} + {heads}. Input '{spec.name}': {spec.dtype} "
        f"{spec.layout} {spec.color}, resize {spec.resize} ({spec.interpolation}), centre crop {spec.crop}, "
        f"{spec.scale}, mean {spec.mean}, std {spec.std}. Outputs: class probabilities. "
        f"Class names and provenance: metadata_props['{METADATA_KEY}']."
    )
