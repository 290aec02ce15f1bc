"""Trunk runtimes: what runs a backbone's frozen blocks, as data, in one registry.

A runtime compiles a *trunk graph* (a range of a backbone's folded blocks, pooled when it
ends at the last one) into a :data:`CompiledTrunk`: a callable from float32 images to
float32 features that any number of threads may call at once, and that holds the GIL
only to hand its tensors over. Which runtime serves a backbone is measured at start-up
(``service/engine/trunk.py``); this module only says what each one can run and how.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.engine.onnx_graphs import GraphCache

CompiledTrunk = Callable[[torch.Tensor], torch.Tensor]


class Precision(StrEnum):
    """The numbers a trunk computes in. Its features are float32 whatever it computes in."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"  # CUDA devices without bfloat16
    INT8 = "int8"  # static quantization, calibrated on the photos graft ships


@dataclass(frozen=True)
class Lanes:
    """How a trunk is called: ``count`` calls at once (side-by-side serving batches), each on ``threads`` threads."""

    count: int
    threads: int


@dataclass
class TrunkGraph:
    """One range of a backbone's folded blocks, in the forms the runtimes compile."""

    label: str  # e.g. "mobilenet_v2[0:19]+pool": names its files in the graph cache
    # On the placement's device, in its dtype and memory format: what torch runs, and what is exported to ONNX
    # for the runtimes that read it (CPU runtimes, where the placement is float32).
    module: nn.Module
    example: torch.Tensor  # one float32 CPU input batch of two: fixes every dimension but the batch
    calibration: Callable[[], torch.Tensor]  # this range's inputs for the calibration photos (int8 only)
    cache: GraphCache
    device: torch.device
    dtype: torch.dtype  # the placement's: what torch runs ``module`` in
    channels_last: bool

    def onnx(self, precision: Precision) -> Path:
        """The graph as an ONNX file: float32, or quantized to int8."""
        float32 = self.cache.float32(self.label, self.module, self.example)
        return self.cache.int8(float32, self.calibration()) if precision == Precision.INT8 else float32


@dataclass(frozen=True)
class RuntimeSpec:
    """One runtime: where it runs, in which precisions, and how it compiles a trunk graph."""

    name: str
    device_types: frozenset[str]
    precisions: Callable[[str], frozenset[Precision]]  # device type -> the precisions it runs there
    missing: Callable[[], str | None]  # why it cannot run in this process (not installed...), None if it can
    compile: Callable[[TrunkGraph, Precision, Lanes], CompiledTrunk]
    notes: str

    def runs(self, device_type: str, precision: Precision) -> bool:
        return device_type in self.device_types and precision in self.precisions(device_type)


def _torch_precisions(device_type: str) -> frozenset[Precision]:
    if device_type == "cuda":
        return frozenset({Precision.FP32, Precision.BF16, Precision.FP16})
    return frozenset({Precision.FP32})


def _compile_torch(graph: TrunkGraph, precision: Precision, lanes: Lanes) -> CompiledTrunk:
    """The folded module run eagerly, as placed (the only runtime on CUDA)."""
    module = graph.module

    @torch.inference_mode()
    def run(images: torch.Tensor) -> torch.Tensor:
        x = images.to(graph.device, graph.dtype, non_blocking=True)
        if graph.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return module(x).float()

    return run


def _cpu_array(images: torch.Tensor) -> np.ndarray:
    """The images as the ONNX runtimes read them: a contiguous float32 NCHW array in host memory."""
    return images.detach().to("cpu", torch.float32).contiguous().numpy()


def _onnxruntime_missing() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc})"
    return None


def _compile_onnxruntime(graph: TrunkGraph, precision: Precision, lanes: Lanes) -> CompiledTrunk:
    """One ONNX Runtime session: its ``run`` releases the GIL and may be called from several threads at once."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = lanes.threads
    options.inter_op_num_threads = 1
    # Idle pool threads sleep instead of spinning: the cores are shared with decoding and the event loop.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(graph.onnx(precision)), options, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": _cpu_array(images)})[0])

    return run


@cache
def _openvino_cpu_capabilities() -> frozenset[str]:
    import openvino

    return frozenset(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def _openvino_missing() -> str | None:
    try:
        _openvino_cpu_capabilities()
    except Exception as exc:  # not installed, or no CPU plugin in this build
        return f"openvino cannot run here ({exc})"
    return None


def _openvino_precisions(device_type: str) -> frozenset[Precision]:
    if device_type != "cpu" or _openvino_missing():
        return frozenset()
    # Not int8: on the QDQ graph graft makes, OpenVINO's features are far from torch's (cosine 0.27 on the
    # shipped photos, MobileNetV2), where ONNX Runtime's are within 0.94 (docs/architecture.md, decision 9).
    bf16 = {Precision.BF16} if "BF16" in _openvino_cpu_capabilities() else set()
    return frozenset({Precision.FP32, *bf16})


def _compile_openvino(graph: TrunkGraph, precision: Precision, lanes: Lanes) -> CompiledTrunk:
    """One compiled model with a stream per lane; each calling thread has its own infer request."""
    assert precision in (Precision.FP32, Precision.BF16)
    import openvino

    compiled = openvino.Core().compile_model(
        str(graph.onnx(precision)),
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == Precision.BF16 else "f32",
            "NUM_STREAMS": str(lanes.count),
            "INFERENCE_NUM_THREADS": str(lanes.count * lanes.threads),
            # Leave the cores unpinned: the decode threads and the event loop share them.
            "ENABLE_CPU_PINNING": "NO",
        },
    )
    requests = threading.local()

    def run(images: torch.Tensor) -> torch.Tensor:
        if not hasattr(requests, "request"):
            requests.request = compiled.create_infer_request()
        return torch.from_numpy(requests.request.infer({0: _cpu_array(images)})[0].copy())

    return run


RUNTIMES: dict[str, RuntimeSpec] = {
    spec.name: spec
    for spec in (
        RuntimeSpec(
            name="onnxruntime",
            device_types=frozenset({"cpu"}),
            precisions=lambda device_type: frozenset({Precision.FP32, Precision.INT8}),
            missing=_onnxruntime_missing,
            compile=_compile_onnxruntime,
            notes="ONNX Runtime's CPU provider on the exported graph; int8 from the QDQ graph",
        ),
        RuntimeSpec(
            name="openvino",
            device_types=frozenset({"cpu"}),
            precisions=_openvino_precisions,
            missing=_openvino_missing,
            compile=_compile_openvino,
            notes="OpenVINO's CPU plugin on the exported graph; bf16 where the CPU has it",
        ),
        RuntimeSpec(
            name="torch",
            device_types=frozenset({"cpu", "cuda"}),
            precisions=_torch_precisions,
            missing=lambda: None,
            compile=_compile_torch,
            notes="the folded torch module, run eagerly: the runtime on CUDA, the fallback on a CPU",
        ),
    )
}
