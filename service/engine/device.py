"""Pick the device and numeric precision the trunks run with (docs/architecture.md, decision 9)."""

import ctypes
import logging
import os
from dataclasses import dataclass

import torch

from service.engine.runtimes import Precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where a frozen trunk lives and in what precision it runs."""

    device: torch.device
    dtype: torch.dtype  # what torch holds the folded trunk in (the ONNX runtimes read it as float32)
    # What the trunk computes in: the runtime is chosen among those that run it (service/engine/trunk.py).
    precision: Precision
    # Activations in NHWC: oneDNN's CPU convolutions and cuDNN's tensor cores both
    # prefer it (README, "Serving throughput": `benchmarks/serving.py --one-head`).
    channels_last: bool
    # Largest number of images per trunk call. On CPU, throughput per image
    # falls as batches grow (activations leave the caches), so a batch runs as
    # consecutive micro-batches: with the CPU runtimes, 2 per call was the best
    # measured (README, "Trunk runtimes": `benchmarks/runtime.py`,
    # `tuning_mobilenet_ips`). None: the whole batch at once (GPU).
    micro_batch: int | None = None
    # Images per serving batch unless GRAFT_MAX_BATCH_SIZE says otherwise. A batch as large as the
    # requests in flight leaves the trunk idle while their answers go back and the next requests
    # come in; on CPU, where a batch runs as micro-batches anyway, 8 keeps that pipeline full
    # (README, "HTTP under load": `benchmarks/http_load.py`).
    serving_batch: int = 32
    # Serving batches run side by side, one per torch thread and each single-threaded, instead of
    # one at a time as wide as torch's threads. On a CPU a wide batch stalls at every OpenMP
    # barrier whenever the decode thread or the event loop holds one of the cores (README, "HTTP
    # under load": `benchmarks/trunk_workers.py`). A GPU runs its kernels in order anyway.
    parallel_batches: bool = False
    # Stack each serving batch in page-locked host memory, so its copy to the
    # device is asynchronous (CUDA only: on CPU it would be a wasted copy).
    pin_memory: bool = False


def choose_placement(requested: str = "auto", precision: Precision | None = None) -> Placement:
    """CUDA when asked or available (bf16/fp16, channels_last, pinned batches), else the CPU, channels_last.

    ``precision`` (GRAFT_TRUNK_PRECISION) unset: float32 on a CPU (reduced precision changes the
    features, so it is only ever asked for), bf16 or else fp16 on CUDA.
    """
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("GRAFT_DEVICE=cuda but no CUDA device is visible to torch")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if precision is None:
            precision = Precision.BF16 if torch.cuda.is_bf16_supported() else Precision.FP16
        dtypes = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}
        if precision not in dtypes:
            raise RuntimeError(f"GRAFT_TRUNK_PRECISION={precision} does not run on CUDA; use one of {list(dtypes)}")
        return Placement(torch.device("cuda"), dtypes[precision], precision, channels_last=True, pin_memory=True)
    return Placement(
        torch.device("cpu"),
        torch.float32,
        precision or Precision.FP32,
        channels_last=True,
        micro_batch=2,
        serving_batch=8,
        parallel_batches=True,
    )


def configure_cpu_threads(threads: int | None) -> int:
    """Use the cores this process may run on (a container's CPU set), not the host's count."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def use_one_torch_thread() -> None:
    """Run torch's operators single-threaded on the calling thread only (an executor's initializer).

    For the threads that decode and preprocess images beside the trunk: each of
    their small operators would otherwise open a parallel region as wide as the
    trunk's, and on a busy machine the two sets of OpenMP threads spin-wait on
    each other (README, "One head against the raw model"). ``torch.set_num_threads``
    cannot do this: it also changes the width that every thread started later
    inherits, the trunk's included; OpenMP's own setting is per thread.
    """
    torch.get_num_threads()  # torch copies its global setting into a thread on first use: do that first
    try:
        openmp = ctypes.CDLL("libgomp.so.1")  # the OpenMP runtime torch's Linux wheels ship (already loaded)
    except OSError:  # another platform's build: keep torch's width rather than fail every decode
        log.warning("no libgomp in this process: decode threads keep torch's default thread count")
        return
    openmp.omp_set_num_threads(1)
