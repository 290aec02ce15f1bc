"""The head kinds: one record per kind, one registry, one lookup.

Whatever graft does differently for a kind is a field of its record
(`HeadKindSpec`): how a head of it is built and trained, its default
hyper-parameters and search space, how the engine serves it, which features it
reads, and whether kind 'auto' may try it. Training, serving, export and
'auto' look the record up (`get_kind`) rather than test a kind's name, so a
new kind is its module plus one entry in `KINDS` (and its HEAD_KIND_<NAME> in
the protos): docs/maintaining.md says what to write.

`HeadConfig` is the shape of one head (stored as JSON beside its weights);
`build_head` and `load_head` turn it back into the kind's module.
"""

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from adapters.calibration import Calibration
from adapters.errors import InvalidInput
from adapters.heads import FinetuneHead, GatheredWeights, LinearHead, MLPHead, PrototypeHead
from adapters.prototype import fit_prototype
from adapters.recipe import SCALINGS, Scaling
from adapters.search_space import SearchSpace
from adapters.trainer import CancelCheck, FitResult, HyperParams, Progress, fit_finetune, fit_linear, fit_mlp

# Finetuning a few blocks from fewer examples than this per class overfits more
# than it gains over a head on frozen features; auto leaves it out below it.
AUTO_FINETUNE_MIN_PER_CLASS = 20

H = TypeVar("H", bound=nn.Module)
H_contra = TypeVar("H_contra", bound=nn.Module, contravariant=True)


class Fit(Protocol[H_contra]):
    """How a kind trains a built head in place with one trial's hyper-parameters, leaving it in eval mode.

    The features are what the kind reads: pooled [N, D], or the feature maps
    [N, C, H, W] at the split point for a kind that copies the tail. A kind
    ignores what it has no use for (a closed form needs no validation data).
    """

    def __call__(
        self,
        head: H_contra,
        x_train: Tensor,
        y_train: Tensor,
        hp: HyperParams,
        /,
        *,
        x_val: Tensor | None = None,
        y_val: Tensor | None = None,
        class_weights: Tensor | None = None,
        progress: Progress | None = None,
        cancelled: CancelCheck | None = None,
        seed: int = 0,
    ) -> FitResult | None: ...


@dataclass(frozen=True)
class AutoRule:
    """When kind 'auto' trains a kind among its candidates."""

    rank: int  # auto tries its candidates by rank, cheapest first, and a tie on the hold-out goes to the lower
    opt_in: bool = False  # only when the request asks for the costly kinds too (auto_finetune)
    min_per_class: int = 0  # only when every class has at least this many training examples


@dataclass(frozen=True)
class HeadKindSpec(Generic[H]):
    """One head kind, whole: what it is called, how it is built, trained, searched and served.

    ``H`` is the kind's module class; it ties ``build``, ``fit`` and
    ``gather`` to the same class. Export (service/export.py) runs the module
    ``build`` makes, so a kind exports as its module computes; the engine
    serves the same numbers, from ``gather`` or the module.
    """

    name: str  # the JSON value; the protos spell it HEAD_KIND_<NAME>
    description: str  # one line, for whoever chooses a kind
    build: "Callable[[HeadConfig, nn.Module | None], H]"  # an untrained head; the copied tail when copies_tail
    fit: Fit[H]
    hyperparams: HyperParams  # the defaults; a request's overrides go on top
    search_space: SearchSpace  # searched on the hold-out when a request names none
    # False: nothing to search (a closed form): a request may set neither search nor hyperparams, and with no
    # hold-out the head is fit on every example instead of being refused.
    searched: bool = True
    # Its search scores every scaling x class weighting x weight decay by k folds of the training split
    # (adapters/crossval.py's search_linear) instead of on the hold-out: a fit is cheap on cached features.
    cross_validate: bool = False
    # The scalings its search tries unless a request names one (adapters/recipe.py; the first when it is not
    # searched); empty: it reads the features as they are (a copied tail, or its own normalisation).
    scalings: tuple[str, ...] = ()
    # How its loss weighs classes: 'searched' (both weightings, by k folds), 'objective' (the request's
    # objective's weighting), None (it has no loss to weigh).
    class_weighting: Literal["searched", "objective"] | None = None
    # How the engine serves it: its weights gathered into one batched matmul with every other such head of the
    # batch; None: its own module runs on its rows.
    gather: Callable[[H], GatheredWeights] | None = None
    # It trains a copy of the backbone's last blocks (`finetune_blocks` of them), so it reads the feature maps
    # where they start instead of the pooled features, and HeadConfig records the tail's shape.
    copies_tail: bool = False
    hidden_layer: bool = False  # it has a hidden layer: HeadConfig.hidden is its width, and a search may vary it
    dropout: float | None = None  # the default dropout; None: it has none
    auto: AutoRule | None = None  # None: 'auto' never tries it

    @property
    def feature_dims(self) -> int:
        """Dimensions of what it reads: feature maps [N, C, H, W] behind a copied tail, else pooled [N, D]."""
        return 4 if self.copies_tail else 2


def _linear(config: "HeadConfig", tail: nn.Module | None) -> LinearHead:
    assert config.scaling is not None  # HeadConfig requires it of a kind with scalings
    return LinearHead(config.in_features, config.num_classes, config.scaling.value)


def _mlp(config: "HeadConfig", tail: nn.Module | None) -> MLPHead:
    assert config.hidden is not None and config.scaling is not None  # HeadConfig requires them
    return MLPHead(config.in_features, config.hidden, config.num_classes, config.dropout, config.scaling.value)


def _finetune(config: "HeadConfig", tail: nn.Module | None) -> FinetuneHead:
    assert tail is not None and config.tail_out_channels is not None  # build_head and HeadConfig check them
    return FinetuneHead(tail, config.tail_out_channels, config.num_classes, config.dropout)


def _prototype(config: "HeadConfig", tail: nn.Module | None) -> PrototypeHead:
    return PrototypeHead(config.in_features, config.num_classes)


LINEAR = HeadKindSpec(
    name="linear",
    description="logistic regression on the pooled features, its recipe chosen by k-fold cross-validation",
    build=_linear,
    fit=fit_linear,
    hyperparams=HyperParams(lr=1.0, weight_decay=1e-3, epochs=10, batch_size=4096),
    # L2 strength is what matters for logistic regression: decades, which the search extends past an edge that
    # holds the best and refines by half a decade around the best (lr is unused by its solver).
    search_space=SearchSpace(lr=[1.0], weight_decay=[1e-4, 1e-3, 1e-2, 0.1, 1.0]),
    cross_validate=True,
    scalings=tuple(SCALINGS),
    class_weighting="searched",
    gather=LinearHead.gathered,
    auto=AutoRule(rank=1),
)
MLP = HeadKindSpec(
    name="mlp",
    description="one hidden ReLU layer on the pooled features, trained by AdamW",
    build=_mlp,
    fit=fit_mlp,
    hyperparams=HyperParams(lr=1e-3, weight_decay=1e-4, epochs=60, batch_size=64, hidden=512, patience=10),
    search_space=SearchSpace(lr=[1e-3, 3e-3], weight_decay=[1e-4, 1e-2], hidden=[256, 512]),
    scalings=("standardise",),
    class_weighting="objective",
    hidden_layer=True,
    dropout=0.2,
    auto=AutoRule(rank=2),
)
FINETUNE = HeadKindSpec(
    name="finetune",
    description="the backbone's last blocks trained again, with a linear classifier on top",
    build=_finetune,
    fit=fit_finetune,
    hyperparams=HyperParams(lr=1e-3, weight_decay=1e-4, epochs=15, batch_size=64, label_smoothing=0.1, patience=15),
    search_space=SearchSpace(lr=[1e-3, 3e-3], weight_decay=[1e-4]),  # finetuning is expensive: two runs
    class_weighting="objective",
    copies_tail=True,
    dropout=0.2,
    auto=AutoRule(rank=3, opt_in=True, min_per_class=AUTO_FINETUNE_MIN_PER_CLASS),
)
PROTOTYPE = HeadKindSpec(
    name="prototype",
    description="the nearest class mean of the normalised pooled features, from one image per class up",
    build=_prototype,
    fit=fit_prototype,
    # Nothing here is used: a prototype head is fit in closed form, its temperature inside; one trial.
    hyperparams=HyperParams(lr=1.0, weight_decay=0.0, epochs=1, batch_size=4096),
    search_space=SearchSpace(lr=[1.0], weight_decay=[0.0]),
    searched=False,
    gather=PrototypeHead.gathered,
    auto=AutoRule(rank=0),
)

# Every kind, in the protos' order (HEAD_KIND_LINEAR = 1, ...), which the API's enums keep.
KINDS: dict[str, HeadKindSpec[Any]] = {spec.name: spec for spec in (LINEAR, MLP, FINETUNE, PROTOTYPE)}

# The kinds as the enum pydantic models and their JSON schema use (each kind's description is in the schema's).
# mypy cannot see members made from data, so checked code makes them from names: HeadKind("linear").
HeadKind = Enum("HeadKind", {name.upper(): name for name in KINDS}, type=str)  # type: ignore[misc]
HeadKind.__doc__ = "A head's kind.\n\n" + "\n".join(f"- {spec.name}: {spec.description}" for spec in KINDS.values())


def get_kind(kind: str | HeadKind) -> HeadKindSpec[Any]:
    """The record of ``kind`` (a name, or its HeadKind member); an unknown name is refused, naming the known kinds."""
    name = kind.value if isinstance(kind, HeadKind) else kind
    try:
        return KINDS[name]
    except KeyError:
        raise InvalidInput(
            f"unknown head kind {name!r}; the known kinds are {', '.join(KINDS)}", kind=name, known=list(KINDS)
        ) from None


class HeadConfig(BaseModel):
    """Shape of a head: enough to rebuild the module before loading its weights.

    `in_features` is the channel count at the split point (the pooled feature
    size for kinds that read pooled features). A kind that copies the tail gets
    the tail itself from the backbone: `tail_blocks` records how many trailing
    blocks the caller copied and `tail_out_channels` how many channels those
    blocks emit. `scaling` is how a kind with scalings scales the pooled
    features (versions stored before graft searched it were standardised).
    `calibration` is how to read its logits
    (adapters/calibration.py); versions stored before graft calibrated heads
    have none and serve their raw softmax.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: HeadKind
    in_features: int = Field(ge=1)
    num_classes: int = Field(ge=2)
    hidden: int | None = Field(default=None, ge=1, le=8192)
    dropout: float = Field(ge=0.0, lt=0.9)
    tail_blocks: int | None = Field(default=None, ge=1)
    tail_out_channels: int | None = Field(default=None, ge=1)
    scaling: Scaling | None = None
    calibration: Calibration | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_dropout(cls, data: Any) -> Any:
        """Dropout defaults to the kind's (none for a kind without dropout)."""
        if isinstance(data, dict) and data.get("dropout") is None and isinstance(data.get("kind"), str):
            spec = KINDS.get(data["kind"])  # an unknown kind fails the field's own validation
            if spec is not None:
                data = {**data, "dropout": 0.0 if spec.dropout is None else spec.dropout}
        if isinstance(data, dict) and data.get("scaling") is None and isinstance(data.get("kind"), str):
            spec = KINDS.get(data["kind"])
            if spec is not None and spec.scalings:
                data = {**data, "scaling": "standardise"}
        return data

    @model_validator(mode="after")
    def _fields_match_kind(self) -> "HeadConfig":
        spec = get_kind(self.kind)
        if spec.hidden_layer and self.hidden is None:
            raise ValueError(f"a {spec.name} head needs `hidden` (the hidden layer width)")
        if not spec.hidden_layer and self.hidden is not None:
            raise ValueError(f"`hidden` only applies to heads with a hidden layer, not {spec.name}")
        if bool(spec.scalings) != (self.scaling is not None):
            raise ValueError(f"`scaling` applies to heads on scaled pooled features only, not {spec.name}")
        if spec.dropout is None and self.dropout != 0.0:
            raise ValueError(f"a {spec.name} head has no dropout: it is fit in closed form or convex")
        for name in ("tail_blocks", "tail_out_channels"):
            if spec.copies_tail and getattr(self, name) is None:
                raise ValueError(f"a {spec.name} head needs `{name}`")
            if not spec.copies_tail and getattr(self, name) is not None:
                raise ValueError(f"`{name}` only applies to heads that copy the backbone's tail, not {spec.name}")
        return self


def build_head(config: HeadConfig, tail: nn.Module | None = None) -> nn.Module:
    """An untrained head of the configured kind (a kind that copies the tail needs the copied blocks)."""
    spec = get_kind(config.kind)
    if spec.copies_tail and tail is None:
        raise InvalidInput(f"a {spec.name} head needs the tail blocks copied from the backbone")
    if not spec.copies_tail and tail is not None:
        raise InvalidInput(f"a {spec.name} head takes no tail; only kinds that copy the backbone's tail do")
    return spec.build(config, tail)


def load_head(config: HeadConfig, tensors: dict[str, Tensor], tail: nn.Module | None = None) -> nn.Module:
    """Rebuild a trained head from its config and stored tensors, in eval mode."""
    head = build_head(config, tail)
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise InvalidInput(f"stored weights do not match the head config: {error}") from error
    return head.eval()
