"""The trainable heads that sit on top of frozen backbone features.

Each kind's module is here (linear, mlp, finetune, prototype); its record in
adapters/kinds.py says how to build, train and serve it, and `HeadConfig`
there holds the shapes to rebuild one from its stored weights (safetensors).
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn

# A feature whose spread is below this is treated as constant: it is centred but
# not scaled, the same rule as scikit-learn's StandardScaler.
_MIN_STD = 1e-6


class GatheredWeights(NamedTuple):
    """A head the engine runs as one batched matmul with other heads: logits = inputs @ weight.T + bias.

    The inputs are the pooled features, centred on ``centre`` and L2-normalised
    first when it is set (a prototype head); a per-image step, so it costs the
    shared matmul nothing.
    """

    weight: Tensor  # [C, D]
    bias: Tensor  # [C]
    centre: Tensor | None  # [D]


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

    def gathered(self) -> GatheredWeights:
        """The folded weight and bias, which the engine stacks with other heads' into one batched matmul."""
        weight, bias = self.effective_weight_bias()
        return GatheredWeights(weight, bias, centre=None)


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
