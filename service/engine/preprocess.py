"""Request images -> backbone-ready tensors, rejecting bad images with a clear error.

Decoding goes through the same validator as uploads (byte and pixel limits,
bomb guard, full decode), so a prediction request can never do more than an
upload can.
"""

import torch

from service.engine.backbones import Backbone
from service.store.images import decode_rgb


def prepare_image(backbone: Backbone, data: bytes, *, name: str, max_bytes: int, max_pixels: int) -> torch.Tensor:
    """Validate, decode (first frame, RGB) and apply the backbone's own transforms -> [3, H, W]."""
    return backbone.preprocess(decode_rgb(data, name=name, max_bytes=max_bytes, max_pixels=max_pixels))
