"""The trainable heads that sit on top of frozen backbone features.

A head is described by a `HeadConfig` (stored as JSON in the database) and its
weights (stored as safetensors). `build_head` turns a config into an untrained
module; `load_head` turns config + tensors back into the trained module. The
config therefore holds everything needed to rebuild the module's shapes.
"""

from enum import Enum
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from adapters.calibration import Calibration
from adapters.errors import InvalidInput

# A feature whose spread is below this is treated as constant: it is centred but
# not scaled, the same rule as scikit-learn's StandardScaler.
_MIN_STD = 1e-6


class HeadKind(str, Enum):
    LINEAR = "linear"
    MLP = "mlp"
    FINETUNE = "finetune"
    PROTOTYPE = "prototype"


# Kinds fit as one closed-form or convex problem: no dropout.
_NO_DROPOUT = (HeadKind.LINEAR, HeadKind.PROTOTYPE)


class HeadConfig(BaseModel):
    """Shape of a head: enough to rebuild the module before loading its weights.

    `in_features` is the channel count at the split point (the pooled feature
    size for linear/mlp). For finetune, the tail itself comes from the backbone:
    `tail_blocks` records how many trailing blocks the caller copied and
    `tail_out_channels` how many channels those blocks emit. `calibration` is
    how to read its logits (adapters/calibration.py); versions stored before
    graft calibrated heads have none and serve their raw softmax.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: HeadKind
    in_features: int = Field(ge=1)
    num_classes: int = Field(ge=2)
    hidden: int | None = Field(default=None, ge=1, le=8192)
    dropout: float = Field(ge=0.0, lt=0.9)
    tail_blocks: int | None = Field(default=None, ge=1)
    tail_out_channels: int | None = Field(default=None, ge=1)
    calibration: Calibration | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_dropout(cls, data: Any) -> Any:
        """Dropout defaults by kind: none for the linear and prototype heads, 0.2 otherwise."""
        if isinstance(data, dict) and data.get("dropout") is None and "kind" in data:
            data = {**data, "dropout": 0.0 if data["kind"] in _NO_DROPOUT else 0.2}
        return data

    @model_validator(mode="after")
    def _fields_match_kind(self) -> "HeadConfig":
        if self.kind is HeadKind.MLP and self.hidden is None:
            raise ValueError("an mlp head needs `hidden` (the hidden layer width)")
        if self.kind is not HeadKind.MLP and self.hidden is not None:
            raise ValueError(f"`hidden` only applies to mlp heads, not {self.kind.value}")
        if self.kind in _NO_DROPOUT and self.dropout != 0.0:
            raise ValueError(f"a {self.kind.value} head has no dropout: it is fit in closed form or convex")
        is_finetune = self.kind is HeadKind.FINETUNE
        for name in ("tail_blocks", "tail_out_channels"):
            if is_finetune and getattr(self, name) is None:
                raise ValueError(f"a finetune head needs `{name}`")
            if not is_finetune and getattr(self, name) is not None:
                raise ValueError(f"`{name}` only applies to finetune heads")
        return self


def standardisation_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std of x [N, D]; constant features get std 1."""
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std < _MIN_STD, torch.ones_like(std), std)
    return mean, std


class _StandardisedHead(nn.Module):
    """Base for heads on pooled features: carries its own standardisation.

    Keeping mean/std as buffers makes the stored head self-contained: whoever
    loads it feeds raw pooled features and never needs a separate scaler.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))

    @torch.no_grad()
    def set_standardisation(self, mean: Tensor, std: Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def standardise(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class LinearHead(_StandardisedHead):
    """Standardisation + one linear layer: multinomial logistic regression."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, num_classes)
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.standardise(x))

    @torch.no_grad()
    def effective_weight_bias(self) -> tuple[Tensor, Tensor]:
        """Fold the standardisation into (W', b') so that logits = x @ W'.T + b'.

        The inference engine stacks many linear heads into one batched matmul;
        folding removes the per-head standardisation step from that path.
        """
        weight = self.linear.weight / self.std
        bias = self.linear.bias - weight @ self.mean
        return weight, bias


class MLPHead(_StandardisedHead):
    """Standardisation + one hidden ReLU layer with dropout."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__(in_features, num_classes)
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.standardise(x))


class FinetuneHead(nn.Module):
    """A trainable copy of the backbone's last blocks, then pool + classifier.

    Input is the feature map at the split point [N, C_s, H, W]. The tail is
    made trainable here because it is usually copied from a frozen backbone.
    """

    def __init__(self, tail: nn.Module, tail_out_channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.tail = tail.requires_grad_(True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(tail_out_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.flatten(self.pool(self.tail(x)), 1)
        return self.classifier(self.dropout(pooled))


class PrototypeHead(nn.Module):
    """Nearest class mean on centred, L2-normalised features (SimpleShot), with a temperature.

    logits = temperature * cos(x - centre, prototype_c). The prototypes are
    unit rows, so the scores are proper cosines whatever the class sizes; the
    temperature only sharpens the softmax (it never changes the argmax) and is
    fit by adapters/prototype.py.
    """

    centre: Tensor
    prototypes: Tensor
    temperature: Tensor

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("centre", torch.zeros(in_features))
        self.register_buffer("prototypes", torch.zeros(num_classes, in_features))
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return normalised(x, self.centre) @ self.scaled_prototypes().T

    @torch.no_grad()
    def scaled_prototypes(self) -> Tensor:
        """temperature * prototypes [C, D]: logits = normalised(x, centre) @ this.T.

        The engine gathers these like a linear head's folded weights; only the
        per-image normalisation step comes before the matmul.
        """
        return self.temperature * self.prototypes


def normalised(x: Tensor, centre: Tensor) -> Tensor:
    """Rows of x [N, D] centred and scaled to unit length (a zero row stays zero)."""
    return nn.functional.normalize(x - centre, dim=-1)


Head = LinearHead | MLPHead | FinetuneHead | PrototypeHead  # every trainable head kind


def build_head(config: HeadConfig, tail: nn.Module | None = None) -> Head:
    """An untrained head of the configured kind (finetune needs the copied tail)."""
    if config.kind is HeadKind.FINETUNE:
        if tail is None:
            raise InvalidInput("a finetune head needs the tail blocks copied from the backbone")
        assert config.tail_out_channels is not None  # guaranteed by HeadConfig
        return FinetuneHead(tail, config.tail_out_channels, config.num_classes, config.dropout)
    if tail is not None:
        raise InvalidInput(f"a {config.kind.value} head takes no tail; only finetune heads do")
    if config.kind is HeadKind.MLP:
        assert config.hidden is not None  # guaranteed by HeadConfig
        return MLPHead(config.in_features, config.hidden, config.num_classes, config.dropout)
    if config.kind is HeadKind.PROTOTYPE:
        return PrototypeHead(config.in_features, config.num_classes)
    return LinearHead(config.in_features, config.num_classes)


def head_state(head: nn.Module) -> dict[str, Tensor]:
    """The head's weights as independent, contiguous CPU tensors (safetensors-ready)."""
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in head.state_dict().items()}


def load_head(config: HeadConfig, tensors: dict[str, Tensor], tail: nn.Module | None = None) -> Head:
    """Rebuild a trained head from its config and stored tensors, in eval mode."""
    head = build_head(config, tail)
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise InvalidInput(f"stored weights do not match the head config: {error}") from error
    return head.eval()
