"""How exactly an exported ONNX file reproduces graft: ONNX Runtime against graft's own predictions on Fashion-MNIST.

A linear head on MobileNetV2, trained on 2,000 Fashion-MNIST training images
(200 per class, stratified, seed 0), is exported as ONNX the way the service
does it (built, then checked on the head's dataset before it is returned).
ONNX Runtime (CPU) and graft's predict path (decode, transforms, batched
trunk, the folded head, softmax) then both answer the 2,000 test images;
``onnx_max_abs_diff`` is the largest difference of any class probability
(target <= 1e-4). Run on CPU: that is where both answer in float32.

    python benchmarks/accuracy_export.py            # prints one JSON object last
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from harness.sample_data import fashion_mnist_pngs
from service import export
from service.config import Settings
from service.core import Core
from service.engine.head_cache import HeadCache
from service.engine.predictor import Predictor
from service.prediction_options import PredictOptions
from service.store.images import decode_rgb
from service.training import TrainRequest

TENANT = "bench"
BATCH = 64  # images per ONNX Runtime run and per graft predict call (graft's per-request limit)


def graft_probabilities(core: Core, head: str, images: list[bytes], classes: list[str]) -> np.ndarray:
    """[N, C] probabilities from graft's own predict path, in the order of ``classes``."""

    async def predict() -> np.ndarray:
        predictor = Predictor(core.backbones, HeadCache(core.heads, core.backbones, 1 << 30), core.settings)
        out = np.zeros((len(images), len(classes)), dtype=np.float32)
        try:
            for start in range(0, len(images), BATCH):
                batch = images[start : start + BATCH]
                answers = await predictor.predict(TENANT, batch, [head], PredictOptions(top_k=len(classes)))
                for i, answer in enumerate(answers, start):
                    for score in answer.heads[0].top:
                        out[i, classes.index(score.label)] = score.score
        finally:
            await predictor.stop()
        return out

    return asyncio.run(predict())


def onnx_probabilities(core: Core, data: bytes, backbone: str, images: list[bytes]) -> np.ndarray:
    """[N, C] probabilities from ONNX Runtime, fed the transforms the file's metadata lists, as graft applies them."""
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    trunk = core.backbones[backbone]
    parts = []
    for start in range(0, len(images), BATCH):
        tensors = [
            trunk.preprocess(decode_rgb(image, max_pixels=core.settings.max_image_pixels))
            for image in images[start : start + BATCH]
        ]
        (probabilities,) = session.run(None, {export.INPUT_NAME: torch.stack(tensors).numpy()})
        parts.append(probabilities)
    return np.concatenate(parts)


def measure_export(core: Core, train_id: str, test_id: str, head: str | None = None) -> dict[str, float | int]:
    """``onnx_max_abs_diff`` of ``head`` (default: a linear head trained on ``train_id``) on ``test_id``'s images."""
    if head is None:
        head = "fmnist-export"
        core.trainer.train(TENANT, TrainRequest(dataset_id=train_id, head_name=head))
    info = core.heads.resolve(TENANT, head)
    backbone = core.backbones[info.backbone]
    started = time.perf_counter()
    stored = export.stored_check_images(core.datasets, TENANT, [info.dataset_id])
    data = export.export_onnx(
        backbone, [info], [core.heads.load_tensors(info)], stored, [info.dataset_id], core.settings.max_image_pixels
    )
    export_s = time.perf_counter() - started
    images = [core.datasets.read_image(sha) for sha, _ in core.datasets.examples(TENANT, test_id)]
    got = onnx_probabilities(core, data, info.backbone, images)
    want = graft_probabilities(core, head, images, info.classes)
    return {
        "onnx_max_abs_diff": float(np.abs(got - want).max()),
        "onnx_top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
        "onnx_test_images": len(images),
        "onnx_export_s": round(export_s, 1),
        "onnx_file_mb": round(len(data) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=200, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=200, help="test images per class")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep graft's storage (and feature cache) here")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="graft-export-"))
    core = Core.open(Settings(data_dir=data_dir, device="cpu", backbones=["mobilenet_v2"]))
    datasets = {}
    for split, per_class in (("train", args.per_class), ("test", args.test_per_class)):
        files = fashion_mnist_pngs(split, per_class, seed=0)
        examples = [(f"{split}/{i}.png", data, label) for i, (data, label) in enumerate(files)]
        datasets[split] = core.datasets.create(TENANT, f"fmnist-{split}", examples)
    result = measure_export(core, datasets["train"].id, datasets["test"].id)
    print(f"ONNX Runtime vs graft on {result['onnx_test_images']} images: {result}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
