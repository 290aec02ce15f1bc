"""One heterogeneous batch: the trunk once for all rows, then every head on its rows.

Rows may ask for any mix of heads and kinds (docs/architecture.md, decisions 2 and 3):
- the trunk runs once up to the earliest split point any head needs, and on to
  the pooled output when a head that reads it (linear, mlp, prototype), or an
  embedding, needs it;
- a finetune head's rows continue from there to its own split point, then
  through its tail;
- (row, head) pairs of the kinds the engine gathers (linear, prototype: their
  record's ``gather``) are batched matmuls over gathered weights (a prototype
  pair's features normalised around its head's centre first), so a batch of
  1,000 different linear heads costs about as much as one. Any other head runs
  its own module on its rows. Heads are grouped by size class (class count rounded up to a power of
  two) and each step gathers at most ``GATHER_BUDGET_BYTES`` of weights, so one tenant's
  1,000-class head neither pads everybody's 2-class heads nor balloons memory.

A head whose computation fails fails only the rows that asked for it; the
other rows of the batch still get their answers.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adapters.heads import normalised
from service.engine.backbones import Backbone
from service.engine.head_cache import LoadedHead
from service.errors import FailedPrecondition

log = logging.getLogger(__name__)

GATHER_BUDGET_BYTES = 32 * 1024 * 1024  # gathered linear weights one step may hold

Pair = tuple[int, int, LoadedHead]  # (row, slot in that row's heads, head)


@dataclass
class BatchOutput:
    """Per row, per requested head (in request order): logits over that head's classes.

    ``errors[row]`` is set when a head that row asked for failed; its logits
    are then incomplete and must not be used.
    """

    logits: list[list[torch.Tensor | None]]
    embeddings: torch.Tensor | None  # [N, D] pooled features, when asked for or computed for a head anyway
    errors: list[FailedPrecondition | None]


@torch.inference_mode()
def run_batch(
    backbone: Backbone, images: torch.Tensor, row_heads: list[list[LoadedHead]], want_embeddings: bool
) -> BatchOutput:
    n = backbone.num_blocks
    pairs = [(row, slot, head) for row, heads in enumerate(row_heads) for slot, head in enumerate(heads)]
    needs_pooled = want_embeddings or any(head.split_point == n for _, _, head in pairs)
    first = min([head.split_point for _, _, head in pairs] + ([n] if needs_pooled else []))
    stem = backbone.features(images, first)
    pooled = (stem if first == n else backbone.features(stem, n, start=first)) if needs_pooled else None

    logits: list[list[torch.Tensor | None]] = [[None] * len(heads) for heads in row_heads]
    failures: dict[int, FailedPrecondition] = {}  # id(head) -> why it failed

    linear = [pair for pair in pairs if pair[2].gathered]
    if linear:
        assert pooled is not None  # gathered heads read the pooled features, so they were computed
        for chunk in linear_chunks(linear, pooled.shape[1], pooled.element_size()):
            _run_linear_chunk(pooled, chunk, logits, failures)

    by_head: dict[int, list[tuple[int, int]]] = {}
    modules: dict[int, LoadedHead] = {}
    for row, slot, head in pairs:
        if not head.gathered:
            by_head.setdefault(id(head), []).append((row, slot))
            modules[id(head)] = head
    for head_id, places in by_head.items():
        head = modules[head_id]
        rows = torch.tensor([row for row, _ in places], device=stem.device)

        def forward(head: LoadedHead = head, rows: torch.Tensor = rows) -> torch.Tensor:
            if head.split_point == n:
                assert pooled is not None  # a head at the last split point reads the pooled features
                inputs = pooled[rows]
            elif head.split_point == first:
                inputs = stem[rows]
            else:
                inputs = backbone.features(stem[rows], head.split_point, start=first)
            return head.logits(inputs)

        out = _guarded(head, len(places), forward, failures)
        if out is not None:
            for (row, slot), row_logits in zip(places, out, strict=True):
                logits[row][slot] = row_logits

    errors: list[FailedPrecondition | None] = [None] * len(row_heads)
    for row, _, head in pairs:
        if errors[row] is None and id(head) in failures:
            errors[row] = failures[id(head)]
    return BatchOutput(logits=logits, embeddings=pooled, errors=errors)


def linear_chunks(pairs: list[Pair], dim: int, element_size: int, budget: int | None = None) -> list[list[Pair]]:
    """Split linear pairs into steps: one size class per step, at most ``budget`` bytes of gathered weights.

    Within a size class a head is padded to at most twice its width. A step
    holds the distinct heads' stacked weights and one gathered copy per pair,
    each at most ``budget`` (default ``GATHER_BUDGET_BYTES``); a single pair
    over the budget is a step of its own.
    """
    budget = GATHER_BUDGET_BYTES if budget is None else budget
    by_class: dict[int, list[Pair]] = {}
    for pair in sorted(pairs, key=lambda pair: id(pair[2])):  # a head's pairs together: fewer distinct per step
        by_class.setdefault(_size_class(pair[2]), []).append(pair)
    chunks: list[list[Pair]] = []
    for size_class in sorted(by_class):
        group = by_class[size_class]
        widest = max(len(head.classes) for _, _, head in group)
        per_step = max(1, budget // (widest * dim * element_size))
        chunks += [group[i : i + per_step] for i in range(0, len(group), per_step)]
    return chunks


def _size_class(head: LoadedHead) -> int:
    """ceil(log2(classes)): heads within a class differ in width by less than 2x."""
    return (len(head.classes) - 1).bit_length()


def _run_linear_chunk(
    pooled: torch.Tensor,
    chunk: list[Pair],
    logits: list[list[torch.Tensor | None]],
    failures: dict[int, FailedPrecondition],
) -> None:
    """One batched matmul for the chunk; if it fails, each head alone so only a broken one fails."""
    try:
        outputs = _gathered_linear(pooled, chunk)
    except Exception:
        heads = {id(head): head for _, _, head in chunk}
        for head_id, head in heads.items():
            places = [(row, slot) for row, slot, other in chunk if id(other) == head_id]
            rows = torch.tensor([row for row, _ in places], device=pooled.device)

            def forward(head: LoadedHead = head, rows: torch.Tensor = rows) -> torch.Tensor:
                return head.logits(pooled[rows])

            out = _guarded(head, len(places), forward, failures)
            if out is not None:
                for (row, slot), row_logits in zip(places, out, strict=True):
                    logits[row][slot] = row_logits
        return
    for (row, slot, _), row_logits in zip(chunk, outputs, strict=True):
        logits[row][slot] = row_logits


def _gathered_linear(pooled: torch.Tensor, pairs: list[Pair]) -> list[torch.Tensor]:
    """Logits of every (row, linear head) pair from one batched matmul.

    The distinct heads' weights are padded to the widest head and stacked once;
    each pair then indexes its head's slice. Padding classes get a bias of -inf
    and are cut off before anyone sees them.
    """
    distinct: dict[int, int] = {}
    heads: list[LoadedHead] = []
    for _, _, head in pairs:
        if id(head) not in distinct:
            distinct[id(head)] = len(heads)
            heads.append(head)
    widest = max(head.linear[0].shape[0] for head in heads)
    dim = pooled.shape[1]
    weights = pooled.new_zeros((len(heads), widest, dim))
    biases = pooled.new_full((len(heads), widest), float("-inf"))
    for i, head in enumerate(heads):
        weight, bias = head.linear
        classes = weight.shape[0]
        weights[i, :classes] = weight
        biases[i, :classes] = bias
    which = torch.tensor([distinct[id(head)] for _, _, head in pairs], device=pooled.device)
    rows = torch.tensor([row for row, _, _ in pairs], device=pooled.device)
    inputs = pooled[rows]
    if any(head.centre is not None for head in heads):
        centres = pooled.new_zeros((len(heads), dim), dtype=torch.float32)
        centred = torch.zeros(len(heads), dtype=torch.bool, device=pooled.device)
        for i, head in enumerate(heads):
            if head.centre is not None:
                centres[i], centred[i] = head.centre, True
        unit = normalised(inputs.float(), centres[which]).to(inputs.dtype)
        inputs = torch.where(centred[which, None], unit, inputs)
    out = torch.baddbmm(biases[which].unsqueeze(2), weights[which], inputs.unsqueeze(2)).squeeze(2)
    return [out[i, : len(head.classes)] for i, (_, _, head) in enumerate(pairs)]


def _guarded(
    head: LoadedHead, rows: int, forward: Callable[[], torch.Tensor], failures: dict[int, FailedPrecondition]
) -> torch.Tensor | None:
    """Run one head's ``forward`` on its rows; on any failure record a client-safe error and return None."""
    try:
        out = forward()
        if tuple(out.shape) != (rows, len(head.classes)):
            raise ValueError(f"output shape {tuple(out.shape)}, expected {(rows, len(head.classes))}")
        return out
    except Exception as exc:
        log.warning("head %s failed in a batch; only its requests fail", head.key, exc_info=exc)
        failures[id(head)] = FailedPrecondition(
            f"head '{head.name}' version {head.version} could not be run: its stored weights do not fit "
            f"backbone '{head.backbone}' or are damaged; delete this version and train it again",
            head=head.name,
            version=head.version,
        )
        return None
