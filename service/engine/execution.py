"""One heterogeneous batch: the trunk once for all rows, then every head on its rows.

Rows may ask for any mix of heads and kinds (DESIGN.md decisions 2 and 3):
- the trunk runs once up to the earliest split point any head needs, and on to
  the pooled output when a linear or mlp head (or an embedding) needs it;
- a finetune head's rows continue from there to its own split point, then
  through its tail;
- all linear (row, head) pairs are one batched matmul over gathered weights,
  so a batch of 1,000 different linear heads costs about as much as one.
"""

from dataclasses import dataclass

import torch

from adapters.heads import HeadKind
from service.engine.backbones import Backbone
from service.engine.head_cache import LoadedHead


@dataclass
class BatchOutput:
    """Per row, per requested head (in request order): logits over that head's classes."""

    logits: list[list[torch.Tensor]]
    embeddings: torch.Tensor | None  # [N, D] pooled features, when asked for


@torch.inference_mode()
def run_batch(
    backbone: Backbone, images: torch.Tensor, row_heads: list[list[LoadedHead]], want_embeddings: bool
) -> BatchOutput:
    n = backbone.num_blocks
    pairs = [(row, slot, head) for row, heads in enumerate(row_heads) for slot, head in enumerate(heads)]
    needs_pooled = want_embeddings or any(head.kind is not HeadKind.FINETUNE for _, _, head in pairs)
    first = min([head.split_point for _, _, head in pairs] + ([n] if needs_pooled else []))
    stem = backbone.features(images, first)
    pooled = (stem if first == n else backbone.features(stem, n, start=first)) if needs_pooled else None

    logits: list[list[torch.Tensor | None]] = [[None] * len(heads) for heads in row_heads]
    linear = [(row, slot, head) for row, slot, head in pairs if head.kind is HeadKind.LINEAR]
    if linear:
        for (row, slot, _), row_logits in zip(linear, _gathered_linear(pooled, linear), strict=True):
            logits[row][slot] = row_logits

    by_head: dict[int, list[tuple[int, int]]] = {}
    modules: dict[int, LoadedHead] = {}
    for row, slot, head in pairs:
        if head.kind is not HeadKind.LINEAR:
            by_head.setdefault(id(head), []).append((row, slot))
            modules[id(head)] = head
    for head_id, places in by_head.items():
        head = modules[head_id]
        rows = torch.tensor([row for row, _ in places], device=stem.device)
        if head.kind is HeadKind.MLP:
            inputs = pooled[rows]
        else:
            inputs = stem[rows] if head.split_point == first else backbone.features(stem[rows], head.split_point, start=first)
        out = head.module(inputs.float())
        for (row, slot), row_logits in zip(places, out, strict=True):
            logits[row][slot] = row_logits

    return BatchOutput(logits=logits, embeddings=pooled if want_embeddings else None)  # type: ignore[arg-type]


def _gathered_linear(pooled: torch.Tensor, pairs: list[tuple[int, int, LoadedHead]]) -> list[torch.Tensor]:
    """Logits of every (row, linear head) pair from one batched matmul.

    The distinct heads' weights are padded to the widest head and stacked once
    per batch; each pair then indexes its head's slice. Padding classes get a
    bias of -inf and are cut off before anyone sees them.
    """
    distinct: dict[int, int] = {}
    heads: list[LoadedHead] = []
    for _, _, head in pairs:
        if id(head) not in distinct:
            distinct[id(head)] = len(heads)
            heads.append(head)
    widest = max(head.weight.shape[0] for head in heads)
    dim = pooled.shape[1]
    weights = pooled.new_zeros((len(heads), widest, dim))
    biases = pooled.new_full((len(heads), widest), float("-inf"))
    for i, head in enumerate(heads):
        classes = head.weight.shape[0]
        weights[i, :classes] = head.weight
        biases[i, :classes] = head.bias
    which = torch.tensor([distinct[id(head)] for _, _, head in pairs], device=pooled.device)
    rows = torch.tensor([row for row, _, _ in pairs], device=pooled.device)
    out = torch.baddbmm(biases[which].unsqueeze(2), weights[which], pooled[rows].unsqueeze(2)).squeeze(2)
    return [out[i, : len(head.classes)] for i, (_, _, head) in enumerate(pairs)]
