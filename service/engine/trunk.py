"""Choose a backbone's trunk runtime by measurement, and check every graph it compiles against torch.

At start-up each runtime that runs the placement's device and precision compiles the
pooled trunk; its features of the shipped photos are compared with torch's float32 ones
(refused above the precision's tolerance), its images/s are timed the way serving calls
it (``Lanes``), and the fastest serves. The graphs of other split points are compiled by
the chosen runtime when first needed, and checked the same way.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel

from service.engine.runtimes import RUNTIMES, CompiledTrunk, Lanes, Precision, RuntimeSpec, TrunkGraph

log = logging.getLogger(__name__)

# How long each candidate is timed at start-up, after one warm-up call per lane.
TIMING_SECONDS = 0.4


@dataclass(frozen=True)
class Tolerance:
    """How far a trunk's features may be from torch's float32 ones: ``|a - b| <= atol + rtol * |b|`` everywhere
    (float32 only), and every image's cosine similarity at least ``min_cosine``."""

    min_cosine: float
    atol: float | None = None
    rtol: float = 0.0


TOLERANCES: dict[Precision, Tolerance] = {
    Precision.FP32: Tolerance(min_cosine=0.99999, atol=1e-4, rtol=1e-4),
    # Reduced precision is asked for knowing its features differ (its accuracy cost is measured:
    # benchmarks/runtime.py); these bounds only refuse a runtime that computes something else.
    Precision.BF16: Tolerance(min_cosine=0.95),
    Precision.FP16: Tolerance(min_cosine=0.95),
    Precision.INT8: Tolerance(min_cosine=0.9),
}


class TrunkReport(BaseModel):
    """How a backbone's trunk runs here: what ``GET /v1/backbones`` shows of it."""

    runtime: str
    precision: Precision
    images_per_second: float  # the pooled trunk alone, as serving calls it, measured at start-up
    max_abs_diff: float  # against torch's float32 features of the shipped photos
    min_cosine: float


@dataclass(frozen=True)
class Reference:
    """A range's inputs (the shipped photos, through the blocks before it) and torch's float32 outputs."""

    inputs: torch.Tensor
    expected: torch.Tensor


@dataclass(frozen=True)
class Checked:
    trunk: CompiledTrunk
    max_abs_diff: float
    min_cosine: float


class RuntimeRefused(RuntimeError):
    """No runtime may serve this placement (none installed, or none within tolerance)."""


def check(spec: RuntimeSpec, graph: TrunkGraph, precision: Precision, lanes: Lanes, reference: Reference) -> Checked:
    """``graph`` compiled by ``spec``, its features compared with torch's; RuntimeRefused beyond the tolerance."""
    trunk = spec.compile(graph, precision, lanes)
    got = trunk(reference.inputs).float().cpu().flatten(1)
    expected = reference.expected.float().cpu().flatten(1)
    difference = (got - expected).abs()
    max_abs_diff = float(difference.max())
    min_cosine = float(torch.nn.functional.cosine_similarity(got.double(), expected.double(), dim=1).min())
    tolerance = TOLERANCES[precision]
    beyond = min_cosine < tolerance.min_cosine
    if tolerance.atol is not None:
        beyond |= bool((difference > tolerance.atol + tolerance.rtol * expected.abs()).any())
    if beyond:
        raise RuntimeRefused(
            f"{spec.name} {precision} on {graph.label}: features differ from torch's by up to {max_abs_diff:.3g} "
            f"(lowest cosine {min_cosine:.6f}); the tolerance is {tolerance}"
        )
    return Checked(trunk, max_abs_diff, min_cosine)


def choose(
    graph: TrunkGraph,
    precision: Precision,
    lanes: Lanes,
    reference: Reference,
    batch: int,
    requested: str = "auto",
) -> tuple[RuntimeSpec, CompiledTrunk, TrunkReport]:
    """The fastest runtime within tolerance on ``graph`` (``requested``: only that one), timed on
    ``lanes.count`` side-by-side calls of ``batch`` images."""
    if requested != "auto" and requested not in RUNTIMES:
        raise RuntimeRefused(f"unknown trunk runtime '{requested}'; known: auto, {', '.join(RUNTIMES)}")
    device_type = graph.device.type
    candidates = [spec for name, spec in RUNTIMES.items() if requested in ("auto", name)]
    measured: list[tuple[float, RuntimeSpec, Checked]] = []
    refusals: list[str] = []
    for spec in candidates:
        why = spec.missing()
        if why is None and not spec.runs(device_type, precision):
            why = f"{spec.name} does not run {precision} on {device_type}"
        if why is None:
            try:
                checked = check(spec, graph, precision, lanes, reference)
            except RuntimeRefused as exc:
                why = str(exc)
            except Exception as exc:  # a runtime that cannot compile this graph is not a candidate
                why = f"{spec.name} failed on {graph.label}: {exc!r}"
        if why is not None:
            refusals.append(why)
            continue
        sync = torch.cuda.synchronize if device_type == "cuda" else None
        rate = images_per_second(checked.trunk, reference.inputs[:batch], lanes.count, sync=sync)
        log.info("%s: %s %s runs %.0f images/s", graph.label, spec.name, precision, rate)
        measured.append((rate, spec, checked))
    if not measured:
        raise RuntimeRefused(f"no runtime can serve {graph.label} in {precision}: " + "; ".join(refusals))
    for why in refusals:
        log.info("%s: not a candidate: %s", graph.label, why)
    rate, spec, checked = max(measured, key=lambda entry: entry[0])
    report = TrunkReport(
        runtime=spec.name,
        precision=precision,
        images_per_second=round(rate, 1),
        max_abs_diff=checked.max_abs_diff,
        min_cosine=checked.min_cosine,
    )
    return spec, checked.trunk, report


def images_per_second(
    trunk: CompiledTrunk,
    batch: torch.Tensor,
    callers: int,
    seconds: float = TIMING_SECONDS,
    sync: Callable[[], None] | None = None,
) -> float:
    """Images/s of ``callers`` threads each calling ``trunk`` on ``batch`` back to back for ``seconds``."""
    done = [0] * callers
    clock = {"began": 0.0}

    def open_the_window() -> None:  # run once, as the last lane arrives: every lane then times the same window
        clock["began"] = time.perf_counter()

    start = threading.Barrier(callers, action=open_the_window)

    def call(lane: int) -> None:
        trunk(batch)  # warm-up: first-call allocations
        if sync:
            sync()
        start.wait()
        while time.perf_counter() < clock["began"] + seconds:
            trunk(batch)
            if sync:
                sync()
            done[lane] += len(batch)

    threads = [threading.Thread(target=call, args=(lane,), daemon=True) for lane in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - clock["began"])
