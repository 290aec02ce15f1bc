"""Heads, loaded lazily from the registry and kept in an LRU bounded by bytes.

A head is cached under the identity of its weights (their sha256, with the
tenant, name and version it was loaded as), and a reference (``name``,
``name@3``, ``name:prod``) is resolved against the registry on every request,
so moving an alias takes effect on the next request, a deleted head is "not
found" at once, and weights that were deleted or replaced are never served.
Loading runs in a worker thread: it never blocks other requests' batches.

``imagenet@<backbone>`` is the backbone's own ImageNet classifier: a linear
head on the pooled features, built once from the backbone's weights and shared
by every tenant, outside the LRU. It rides the batch's gathered linear heads,
so asking for it beside a tenant's heads costs no extra trunk pass.
"""

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from adapters.calibration import Calibration, TemperatureScaled
from adapters.errors import InvalidInput
from adapters.heads import normalised
from adapters.kinds import HeadConfig, HeadKind, get_kind, load_head
from adapters.monitoring import MonitoringReference
from service.engine.backbones import Backbone
from service.errors import FailedPrecondition, NotFound
from service.store.heads import HeadRegistry, ServedVersion, imagenet_backbone

log = logging.getLogger(__name__)

IMAGENET_TENANT = ""  # no tenant's name is empty: built-in heads never collide with a tenant's
IMAGENET_VERSION = 1  # the classifier as published; it never changes


class HeadKey(NamedTuple):
    """What a loaded head is: the weights' identity, and the version it answers as."""

    tenant: str
    name: str
    version: int
    weights_sha256: str


@dataclass(eq=False, slots=True)
class LoadedHead:
    """A head ready to run on its backbone's device.

    A head of a kind the engine gathers (its record's ``gather``: linear,
    prototype) keeps only its weight and bias, which the engine stacks into one
    batched matmul with other heads', and the centre a prototype head's inputs
    are normalised around first (exact: the normalisation is per image, the
    rest is a matmul); other kinds (mlp, finetune) keep their module. Either
    way the logits are already divided by the version's temperature, so their
    softmax is the calibrated score; ``calibration`` also holds the hold-out
    scores prediction sets need (None: an ImageNet head or an old version).
    """

    key: HeadKey
    backbone: str
    kind: HeadKind
    split_point: int
    classes: tuple[str, ...]
    weight: torch.Tensor | None  # gathered: [C, D] (linear: standardisation folded in; prototype: scaled prototypes)
    bias: torch.Tensor | None  # gathered: [C]
    module: nn.Module | None  # not gathered
    nbytes: int
    centre: torch.Tensor | None = None  # gathered with one: [D], inputs are centred and L2-normalised first
    calibration: Calibration | None = None
    monitoring: MonitoringReference | None = None  # what its traffic is compared with (None: none, or off)

    @property
    def name(self) -> str:
        return self.key.name

    @property
    def version(self) -> int:
        return self.key.version

    @property
    def gathered(self) -> bool:
        """Whether the engine runs this head as gathered weights (linear, prototype) rather than a module."""
        return self.weight is not None

    @property
    def linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A gathered head's (weight [C, D], bias [C]), applied to its inputs (see ``inputs``)."""
        if self.weight is None or self.bias is None:
            raise TypeError(f"head {self.name} is {self.kind.value}, which the engine does not gather")
        return self.weight, self.bias

    def inputs(self, pooled: torch.Tensor) -> torch.Tensor:
        """What ``linear`` multiplies: the pooled features, normalised around the centre for a prototype head."""
        if self.centre is None:
            return pooled
        return normalised(pooled.float(), self.centre.float()).to(pooled.dtype)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Calibrated logits of ``features`` at the head's split point, on its device, one head alone (the engine
        gathers linear heads of a batch into one matmul instead)."""
        if self.weight is not None and self.bias is not None:
            return self.inputs(features.to(self.weight.dtype)) @ self.weight.T + self.bias
        return self.layers(features.float())

    @property
    def layers(self) -> nn.Module:
        """The module of a head the engine does not gather (mlp, finetune)."""
        if self.module is None:
            raise TypeError(f"head {self.name} is {self.kind.value}, which the engine gathers: it has no module")
        return self.module


def materialise(info: ServedVersion, tensors: dict[str, torch.Tensor], backbone: Backbone) -> LoadedHead:
    """Registry row + stored tensors -> a LoadedHead on the backbone's device."""
    config = HeadConfig.model_validate(info.config)
    if config.num_classes != len(info.classes):
        raise FailedPrecondition(
            f"head '{info.name}' version {info.version} is inconsistent: {config.num_classes} outputs but "
            f"{len(info.classes)} class names; delete this version and train it again"
        )
    split = backbone.num_blocks if info.split_point is None else info.split_point  # None: the pooled features
    spec = get_kind(config.kind)
    tail = backbone.fresh_tail(split) if spec.copies_tail else None
    head = load_head(config, tensors, tail).to(backbone.placement.device)
    head.requires_grad_(False)
    weight = bias = module = centre = None
    temperature = config.calibration.temperature if config.calibration else 1.0
    if spec.gather is not None:
        gathered = spec.gather(head)
        # (x @ W.T + b) / T == x @ (W / T).T + b / T: calibration costs the gathered matmul nothing
        weight, bias = (t.div(temperature).contiguous() for t in (gathered.weight, gathered.bias))
        centre = gathered.centre
        nbytes = sum(t.nbytes for t in (weight, bias, centre) if t is not None)
    else:
        module = TemperatureScaled(head, temperature) if config.calibration else head
        nbytes = sum(t.nbytes for t in head.state_dict().values())
    return LoadedHead(
        key=head_key(info),
        backbone=info.backbone,
        kind=config.kind,
        split_point=split,
        classes=tuple(info.classes),
        weight=weight,
        bias=bias,
        module=module,
        nbytes=nbytes,
        centre=centre,
        calibration=config.calibration,
    )


def head_key(info: ServedVersion) -> HeadKey:
    return HeadKey(info.tenant, info.name, info.version, info.weights_sha256)


class HeadCache:
    def __init__(
        self, registry: HeadRegistry, backbones: dict[str, Backbone], max_bytes: int, *, monitoring: bool = False
    ) -> None:
        """``monitoring``: load each version's monitoring reference with it (GRAFT_MONITORING); it counts
        towards ``max_bytes`` like the weights."""
        self.registry = registry
        self.monitoring = monitoring
        self.backbones = backbones
        self.max_bytes = max_bytes
        self.bytes = 0
        self._heads: OrderedDict[HeadKey, LoadedHead] = OrderedDict()
        self._loading: dict[HeadKey, asyncio.Future[LoadedHead]] = {}
        self._imagenet: dict[str, LoadedHead] = {}

    def __len__(self) -> int:
        return len(self._heads)

    async def get(self, tenant: str, ref: str) -> LoadedHead:
        if (backbone := imagenet_backbone(ref)) is not None:
            return self.imagenet(backbone)
        return await self._loaded(await asyncio.to_thread(self.registry.resolve, tenant, ref))

    async def get_served(self, tenant: str, ref: str) -> tuple[LoadedHead, LoadedHead | None]:
        """``ref``'s head and its head's shadow version (None: no shadow, or the one served), resolved together."""
        if (backbone := imagenet_backbone(ref)) is not None:
            return self.imagenet(backbone), None
        info, shadow = await asyncio.to_thread(self.registry.resolve_served, tenant, ref)
        return await self._loaded(info), None if shadow is None else await self._loaded(shadow)

    async def _loaded(self, info: ServedVersion) -> LoadedHead:
        key = head_key(info)
        head = self._heads.get(key)
        if head is not None:
            self._heads.move_to_end(key)
            return head
        if key in self._loading:  # another request is loading it: share that load
            return await asyncio.shield(self._loading[key])
        future: asyncio.Future[LoadedHead] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            head = await asyncio.to_thread(self._load, info)
            self._insert(head)
            future.set_result(head)
            return head
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            del self._loading[key]

    def _load(self, info: ServedVersion) -> LoadedHead:
        backbone = self.backbones.get(info.backbone)
        if backbone is None:
            raise FailedPrecondition(
                f"head '{info.name}' needs backbone '{info.backbone}', which this service does not load"
            )
        head = materialise(info, self.registry.load_tensors(info), backbone)
        if self.monitoring:
            head.monitoring = self._reference(info)
            if head.monitoring is not None:
                head.nbytes += sum(t.nbytes for t in head.monitoring.to_tensors().values())
        return head

    def _reference(self, info: ServedVersion) -> MonitoringReference | None:
        """The version's monitoring reference; a damaged one is logged and the version served unmonitored."""
        tensors = self.registry.load_monitoring(info)
        if tensors is None:
            return None
        try:
            return MonitoringReference.from_tensors(tensors)
        except InvalidInput:
            log.exception(
                "the monitoring reference of %s version %d is damaged; not monitored", info.name, info.version
            )
            return None

    def _insert(self, head: LoadedHead) -> None:
        self._heads[head.key] = head
        self.bytes += head.nbytes
        while self.bytes > self.max_bytes and len(self._heads) > 1:
            _, evicted = self._heads.popitem(last=False)
            self.bytes -= evicted.nbytes

    def imagenet(self, backbone_name: str) -> LoadedHead:
        """``imagenet@<backbone>``: the backbone's own 1,000-class classifier as a shared linear head."""
        head = self._imagenet.get(backbone_name)
        if head is not None:
            return head
        backbone = self.backbones.get(backbone_name)
        usable = sorted(name for name, b in self.backbones.items() if b.spec.pretrained)
        if backbone is None or backbone.spec.weights is None:
            why = "is not loaded by this service" if backbone is None else "is untrained: it has no ImageNet classifier"
            raise NotFound(
                f"backbone '{backbone_name}' {why}; ImageNet heads here: "
                + (", ".join(f"'imagenet@{name}'" for name in usable) or "none")
            )
        weights = backbone.spec.weights
        weight, bias = backbone.imagenet_classifier()
        head = LoadedHead(
            key=HeadKey(IMAGENET_TENANT, f"imagenet@{backbone_name}", IMAGENET_VERSION, weights.sha256),
            backbone=backbone_name,
            kind=HeadKind("linear"),
            split_point=backbone.num_blocks,
            classes=backbone.spec.categories,
            weight=weight,
            bias=bias,
            module=None,
            nbytes=weight.nbytes + bias.nbytes,
        )
        self._imagenet[backbone_name] = head
        return head
