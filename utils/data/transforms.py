"""The transforms of images held in memory by the data cache: the file path's own, so that ``--cache ram``
and ``--cache off`` feed the network bit-identical tensors, augmentation included.

- Data that is not augmented (digits, MNIST): the cache decoded each image with the file path's PIL resize
  to the model size, so what is left of ``ResizeAndNormalise`` is ``normalise``, on the whole batch.
- Augmented data (Tiny-ImageNet): the cache holds the images as decoded, at full size. Each one becomes
  again the PIL image that the file path reads (``as_pil``: exact) and goes through the file path's very
  transform object (torchvision's PIL RandomResizedCrop and flip, or resize and centre crop; ToTensor,
  Normalize), sample by sample in batch order, so that the random parameters come from the same RNG in
  the same order. PIL resamples in integer fixed-point arithmetic: the same pixels on every CPU, which
  torch's SIMD-specific antialiased uint8 kernels do not promise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

_TEST_RESIZE_RATIO = 256 / 224  # the seed resized to 256 and centre-cropped 224 at test time

BatchTransform = Callable[[torch.Tensor], torch.Tensor]  # uint8 N x C x H x W -> float32 N x C x S x S


def test_resize(image_size: int) -> int:
    """The shorter side before the centre crop at test time: the seed's 256/224 ratio at any size."""
    return round(image_size * _TEST_RESIZE_RATIO)


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 C x H x W or N x C x H x W to float: ToTensor's ``x.float().div(255)``, then Normalize's
    ``(x - mean) / std`` per channel, in that order and in float32, as the file path computes them."""
    per_channel = (-1, 1, 1)
    return images.float().div(255).sub(mean.view(per_channel)).div(std.view(per_channel))


def as_pil(image: torch.Tensor) -> Image.Image:
    """uint8 C x H x W (C = 1 or 3) -> the PIL image ("L" or "RGB") whose pixels these are."""
    pixels = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(pixels.numpy()))


class NormaliseBatch:
    """``normalise`` of a batch already at the model size (decoded with the file path's resize)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean, self.std = mean, std  # float32, one value per channel

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return normalise(images, self.mean, self.std)


class PilPerSample:
    """The file path's transform of PIL images, applied to each image of a uint8 batch in order."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # default_collate, as the file path: in a worker it stacks straight into shared memory (no extra copy)
        return default_collate([self.transform(as_pil(image)) for image in images])
