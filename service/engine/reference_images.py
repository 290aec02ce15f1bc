"""The photos graft ships (``service/engine/photos``), as preprocessed batches.

What a trunk runtime is checked against torch on at start-up, and what an int8 trunk is
calibrated on: fixed, natural images that belong to graft, never a tenant's.
"""

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

PHOTOS = Path(__file__).parent / "photos"

Preprocess = Callable[[Image.Image], torch.Tensor]


def photos() -> list[Image.Image]:
    """The shipped photos, RGB, in name order."""
    return [Image.open(path).convert("RGB") for path in sorted(PHOTOS.glob("*.jpg"))]


def check_batch(preprocess: Preprocess) -> torch.Tensor:
    """Every photo once, as the backbone preprocesses it: [12, 3, H, W]."""
    return torch.stack([preprocess(photo) for photo in photos()])


def calibration_batch(preprocess: Preprocess, count: int = 64, seed: int = 0) -> torch.Tensor:
    """``count`` square crops (half to all of the short side, seeded positions and sizes, every other one
    mirrored) of the photos in turn, preprocessed: [count, 3, H, W]."""
    generator = torch.Generator().manual_seed(seed)
    images = photos()
    crops = []
    for index in range(count):
        photo = images[index % len(images)]
        width, height = photo.size
        fraction, left, top = torch.rand(3, generator=generator).tolist()
        side = int(min(width, height) * (0.5 + 0.5 * fraction))
        x, y = int(left * (width - side)), int(top * (height - side))
        crop = photo.crop((x, y, x + side, y + side))
        if index % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crops.append(preprocess(crop))
    return torch.stack(crops)
