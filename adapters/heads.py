"""The trainable heads that sit on top of frozen backbone features.

Each kind's module is here (linear, mlp, finetune, prototype); its record in
adapters/kinds.py says how to build, train and serve it, and `HeadConfig`
there holds the shapes to rebuild one from its stored weights (safetensors).
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from adapters.recipe import get_scaling, scaled


class GatheredWeights(NamedTuple):
    """A head the engine runs as one batched matmul with other heads: logits = inputs @ weight.T + bias.

    The inputs are the pooled features, centred on ``centre`` and L2-normalised
    first when it is set (a prototype head); a per-image step, so it costs the
    shared matmul nothing.
    """

    weight: Tensor  # [C, D]
    bias: Tensor  # [C]
    centre: Tensor | None  # [D]


class _ScaledHead(nn.Module):
    """Base for heads on pooled features: carries its own scaling (adapters/recipe.py's SCALINGS).

    Keeping mean/std as buffers (zero and one when the scaling does not
    standardise) makes the stored head self-contained: whoever loads it feeds
    raw pooled features and never needs a separate scaler.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, in_features: int, num_classes: int, scaling: str) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scaling = get_scaling(scaling).name
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))

    @torch.no_grad()
    def set_scaling_stats(self, mean: Tensor, std: Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def scale(self, x: Tensor) -> Tensor:
        return scaled(x, self.scaling, self.mean, self.std)


class LinearHead(_ScaledHead):
    """Scaling + one linear layer: multinomial logistic regression."""

    def __init__(self, in_features: int, num_classes: int, scaling: str = "standardise") -> None:
        super().__init__(in_features, num_classes, scaling)
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.scale(x))

    @torch.no_grad()
    def gathered(self) -> GatheredWeights:
        """The scaling folded into (W', b'), which the engine stacks with other heads' into one batched matmul.

        A per-feature scaling folds into the weights whole; rows scaled to unit
        length are the engine's per-image normalisation (a zero centre), with
        the sqrt(D) folded in.
        """
        weight = self.linear.weight / self.std
        bias = self.linear.bias - weight @ self.mean
        if not get_scaling(self.scaling).unit_rows:
            return GatheredWeights(weight, bias, centre=None)
        return GatheredWeights(weight * math.sqrt(weight.shape[1]), bias, centre=torch.zeros_like(self.mean))


class MLPHead(_ScaledHead):
    """Scaling + one hidden ReLU layer with dropout."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float, scaling: str = "standardise"):
        super().__init__(in_features, num_classes, scaling)
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.scale(x))


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

    def gathered(self) -> GatheredWeights:
        """The scaled prototypes, a zero bias and the centre the engine normalises inputs around first."""
        weight = self.scaled_prototypes()
        return GatheredWeights(weight, weight.new_zeros(weight.shape[0]), centre=self.centre)


def normalised(x: Tensor, centre: Tensor) -> Tensor:
    """Rows of x [N, D] centred and scaled to unit length (a zero row stays zero)."""
    return nn.functional.normalize(x - centre, dim=-1)


def head_state(head: nn.Module) -> dict[str, Tensor]:
    """The head's weights as independent, contiguous CPU tensors (safetensors-ready)."""
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in head.state_dict().items()}
