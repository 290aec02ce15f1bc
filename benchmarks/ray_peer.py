"""The Ray Serve peer: per-customer linear heads served the way Ray Serve's documentation recommends.

- ``@serve.multiplexed``: each replica keeps an LRU of loaded heads, keyed by
  the model id the client sends in the ``serve_multiplexed_model_id`` header;
  a miss reads the head's safetensors file (the very file graft stores);
- ``@serve.batch``: requests for any head are batched for the shared trunk,
  then each row goes through its own head.
The trunk (``RayPeerConfig.trunk``) is either the published MobileNetV2 in
eager torch (``torch``: what Ray's documentation writes, given graft's CPU
micro-batching), or graft's own ``Backbone`` (``graft``: the same runtime
graft chose at start-up, the same folded weights), so the second comparison
measures serving architecture alone. Both use graft's preprocessing. Decoding and the trunk run in threads, so the
replica's event loop keeps accepting requests while a batch runs; decoding
gets graft's own decode pool (half the cores, torch single-threaded in it:
``use_one_torch_thread``), so Ray does not pay for the thread contention graft
fixed in its own engine.
"""

import asyncio
import base64
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch
from engine_setup import published_trunk
from pydantic import BaseModel
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from service.engine.backbones import Backbone, load_backbone
from service.engine.device import choose_placement, use_one_torch_thread
from service.engine.predictor import decode_workers
from service.store.images import decode_rgb

MAX_BATCH_SIZE = 32  # Ray's best measured here: with 8 (graft's CPU default) it ran 47.3 images/s, with 32 47.7
BATCH_WAIT_TIMEOUT_S = 0.002  # graft's GRAFT_MAX_LATENCY_MS
MAX_MODELS_PER_REPLICA = 1000  # the LRU holds every head measured: Ray never reloads a head


class RayPeerConfig(BaseModel):
    """Ray's configuration for the run; reported beside its figures."""

    device: str = "cpu"
    cpus: int = 2  # the Ray cluster's CPUs: the machine's
    gpus: int = 0
    num_replicas: int = 1  # one replica owns the cores, as graft's one worker does
    torch_threads: int = 2
    max_ongoing_requests: int = 256  # above the highest concurrency measured: no proxy-side queueing
    head_files: dict[str, str] = {}  # model id -> safetensors path
    trunk: Literal["torch", "graft"] = "torch"

    @classmethod
    def for_device(cls, device: str, head_files: dict[str, str]) -> "RayPeerConfig":
        cpus = len(os.sched_getaffinity(0))
        return cls(device=device, cpus=cpus, gpus=int(device == "cuda"), torch_threads=cpus, head_files=head_files)

    def described(self) -> dict:
        return {
            **self.model_dump(exclude={"head_files"}),
            "max_batch_size": MAX_BATCH_SIZE,
            "batch_wait_timeout_s": BATCH_WAIT_TIMEOUT_S,
            "max_num_models_per_replica": MAX_MODELS_PER_REPLICA,
        }


@dataclass(frozen=True)
class _Head:
    weight: torch.Tensor
    bias: torch.Tensor
    classes: list[str]


@serve.deployment
class HeadServer:
    def __init__(self, config: RayPeerConfig) -> None:
        torch.set_num_threads(config.torch_threads)
        self.backbone = load_backbone("mobilenet_v2", choose_placement(config.device))
        self.device = self.backbone.placement.device
        placed = self.backbone
        self.features = (
            graft_trunk(placed) if config.trunk == "graft" else published_trunk(placed, placed.placement.micro_batch)
        )
        self.files = config.head_files
        self.decode = ThreadPoolExecutor(decode_workers(), "decode", initializer=use_one_torch_thread)

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_head(self, model_id: str) -> _Head:
        """Read the head's file and fold its standardisation into the linear layer, as graft's cache does."""
        tensors = await asyncio.to_thread(safetensors.torch.load_file, self.files[model_id])
        weight = tensors["linear.weight"] / tensors["std"]
        bias = tensors["linear.bias"] - weight @ tensors["mean"]
        return _Head(weight.to(self.device), bias.to(self.device), [f"class-{c}" for c in range(weight.shape[0])])

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def classify(self, images: list[torch.Tensor], heads: list[_Head], top_ks: list[int]) -> list[list[dict]]:
        pooled = await asyncio.to_thread(self.features, torch.stack(images))
        answers = []
        for row, head, k in zip(pooled, heads, top_ks, strict=True):
            best = torch.softmax(row @ head.weight.T + head.bias, dim=0).topk(k)
            scores, indices = best.values.tolist(), best.indices.tolist()
            answers.append([{"label": head.classes[i], "score": s} for s, i in zip(scores, indices, strict=True)])
        return answers

    async def __call__(self, request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        head = await self.get_head(serve.get_multiplexed_model_id())
        data = base64.b64decode(body["images"][0])
        image = await asyncio.get_running_loop().run_in_executor(self.decode, self._prepare, data)
        top = await self.classify(image, head, min(int(body.get("top_k", 5)), len(head.classes)))
        return JSONResponse({"predictions": [{"top": top}]})

    def _prepare(self, data: bytes) -> torch.Tensor:
        return self.backbone.preprocess(decode_rgb(data, name="image", max_bytes=20 << 20, max_pixels=40_000_000))


def graft_trunk(backbone: Backbone) -> Callable[[torch.Tensor], torch.Tensor]:
    """graft's serving runtime, its micro-batches spread over every core (Ray calls it from one thread at a time)."""
    return lambda images: backbone.features(images, side_by_side=True)


def start(port: int) -> None:
    """Start Ray Serve's HTTP proxy on loopback ``port``."""
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def deploy(config: RayPeerConfig, route: str) -> None:
    """The peer deployment, its trunk as configured, at ``route`` (e.g. "/torch")."""
    app = HeadServer.options(
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0, "num_gpus": config.gpus / config.num_replicas},
    ).bind(config)
    serve.run(app, name=f"peer-{config.trunk}", route_prefix=route, blocking=False)


def head_file(blob_root: Path, blob_key: str) -> str:
    """Where graft's blob store keeps a named blob (``BlobStore`` layout: ``<root>/named/<key>``)."""
    return str(blob_root / "named" / blob_key)
