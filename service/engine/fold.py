"""Fold each batch norm of a frozen, eval-mode model into the convolution before it.

In eval mode a batch norm is a fixed per-channel scale and shift, so it can be
multiplied into the preceding convolution's weights and bias: the same
function up to float rounding, one pass over the activations fewer (batch
norm was a fifth of MobileNetV2's CPU time). Only the serving trunk is
folded; training copies its tail from the unfolded model, so fine-tuning
still sees real BatchNorm modules.
"""

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


@torch.no_grad()
def fold_batch_norms(model: nn.Module, example: torch.Tensor) -> int:
    """Fold, in place, every batch norm whose input is a convolution's output; returns how many.

    Which batch norm follows which convolution is read from one forward pass
    over ``example`` (so it works for any architecture's module layout), and
    the folded model is checked against the original on that same input.
    """
    if model.training:
        raise ValueError("only an eval-mode model can have its batch norms folded")
    pairs = _conv_bn_pairs(model, example)
    if not pairs:
        return 0
    expected = model(example)
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    for conv, bn in pairs:
        assert bn.running_mean is not None and bn.running_var is not None  # checked by _foldable
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight, conv.bias = weight.requires_grad_(False), bias.requires_grad_(False)
        parent, name = parents[id(bn)]
        setattr(parent, name, _what_remains(bn))
    folded = model(example)
    if not torch.allclose(folded, expected, rtol=1e-3, atol=1e-3):
        raise RuntimeError(
            f"folding batch norms changed the model's output (max difference "
            f"{(folded - expected).abs().max().item():.2e}): a convolution's output feeds more than its batch norm"
        )
    return len(pairs)


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(convolution, batch norm) where the batch norm's input is exactly that convolution's output tensor."""
    produced: dict[int, tuple[torch.Tensor, nn.Conv2d]] = {}  # the tensor is kept so its id is not reused
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def after_conv(conv: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        produced[id(output)] = (output, conv)  # type: ignore[assignment]

    def before_bn(bn: nn.Module, inputs: tuple) -> None:
        source = produced.get(id(inputs[0]))
        if source is not None and _foldable(source[1], bn):
            pairs.append((source[1], bn))  # type: ignore[arg-type]

    hooks = [
        module.register_forward_hook(after_conv)
        if isinstance(module, nn.Conv2d)
        else module.register_forward_pre_hook(before_bn)
        for module in model.modules()
        if isinstance(module, nn.Conv2d | nn.BatchNorm2d)
    ]
    try:
        model(example)
    finally:
        for hook in hooks:
            hook.remove()
    convs = [conv for conv, _ in pairs]
    bns = [bn for _, bn in pairs]
    # A module run twice in one pass (shared weights) would be folded twice: leave such models alone.
    if len({id(c) for c in convs}) != len(convs) or len({id(b) for b in bns}) != len(bns):
        return []
    return pairs


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and not bn.training
        and bn.running_mean is not None
        and bn.running_var is not None
        and (type(bn) is nn.BatchNorm2d or type(bn) is BatchNormAct2d)
    )


def _what_remains(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of a batch norm once its scale and shift are in the convolution: timm's fused activation."""
    if isinstance(bn, BatchNormAct2d):
        return nn.Sequential(bn.drop, bn.act)
    return nn.Identity()
