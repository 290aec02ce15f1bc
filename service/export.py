"""Export a head as a standalone model: backbone + head in one TorchScript file.

The exported module takes normalised images [N, 3, 224, 224] (the backbone's
own transforms, listed in the file's ``graft.json``) and returns class
probabilities [N, C]; it needs torch alone, not graft.
"""

import io
import json

import torch
from torch import nn

from adapters.calibration import TemperatureScaled
from adapters.heads import HeadConfig, HeadKind, load_head
from service.engine.backbones import Backbone
from service.store.heads import HeadVersionInfo


class StandaloneModel(nn.Module):
    def __init__(self, trunk: nn.Sequential, split_is_pooled: bool, head: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.pool = split_is_pooled
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.trunk(images)
        if self.pool:
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return torch.softmax(self.head(x), dim=1)


def export_torchscript(backbone: Backbone, info: HeadVersionInfo, tensors: dict[str, torch.Tensor]) -> bytes:
    config = HeadConfig.model_validate(info.config)
    split = backbone.num_blocks if info.split_point is None else info.split_point  # None: the pooled features
    tail = backbone.fresh_tail(split) if config.kind is HeadKind.FINETUNE else None
    head: nn.Module = load_head(config, tensors, tail)
    if config.calibration is not None:  # the calibrated scores the service serves
        head = TemperatureScaled(head, config.calibration.temperature)
    model = StandaloneModel(backbone.cpu_copy(0, split), split == backbone.num_blocks, head).eval()
    size = backbone.spec.crop_size
    with torch.no_grad():
        scripted = torch.jit.trace(model, torch.zeros(1, 3, size, size))
    meta = {
        "head": info.name,
        "version": info.version,
        "backbone": info.backbone,
        "classes": info.classes,
        "input": {
            "size": size,
            "resize": backbone.spec.resize_size,
            "mean": backbone.spec.mean,
            "std": backbone.spec.std,
        },
        "output": "class probabilities [N, C] in the order of 'classes'",
    }
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer, _extra_files={"graft.json": json.dumps(meta)})
    return buffer.getvalue()
