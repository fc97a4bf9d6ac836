"""The transforms of ``data_utils.build_transforms`` on uint8 image tensors (torchvision.transforms.v2),
for images held in memory by the data cache; on a batch, on any device.

- ``augment`` data, training: RandomResizedCrop to the model size and a horizontal flip, each sample
  with its own random parameters (the seed's augmentation);
- ``augment`` data, testing: resize the shorter side to round(size * 256 / 224), centre crop;
- other data (digits, MNIST): a resize to the model size, a no-op for images that the cache decoded
  at that size (it applies the file path's own PIL resize while decoding, see data_utils).

Then ``normalise``: ToTensor's and Normalize's arithmetic exactly, so that a batch from memory is
bit for bit the batch read from the files whenever the geometric part is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

_TEST_RESIZE_RATIO = 256 / 224  # the seed resized to 256 and centre-cropped 224 at test time


def test_resize(image_size: int) -> int:
    """The shorter side before the centre crop at test time: the seed's 256/224 ratio at any size."""
    return round(image_size * _TEST_RESIZE_RATIO)


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 C x H x W or N x C x H x W to float: ToTensor's ``x.float().div(255)``, then Normalize's
    ``(x - mean) / std`` per channel, in that order and in float32, as the file path computes them."""
    per_channel = (-1, 1, 1)
    return images.float().div(255).sub(mean.view(per_channel)).div(std.view(per_channel))


def geometric_transform(image_size: int, augment: bool, train: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The uint8 -> uint8 part of build_transforms (antialiased, as PIL's resize)."""
    if not augment:
        return ResizeTo(image_size)
    from torchvision.transforms import v2  # only augmented data (and other sizes) need torchvision

    if train:
        return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])
    return v2.Compose([v2.Resize(test_resize(image_size), antialias=True), v2.CenterCrop(image_size)])


class ResizeTo:
    """v2.Resize((size, size)) that returns images already of that size untouched, without entering v2's
    dispatch: for data that is not augmented the cache decodes at the model size, and on small images
    (digits: 8x8, a batch in microseconds) that dispatch would cost more than the rest of the batch."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] == (self.size, self.size):
            return images
        from torchvision.transforms import v2

        return v2.Resize((self.size, self.size), antialias=True)(images)


@dataclass(frozen=True)
class TensorTransform:
    """A geometric transform, then ``normalise``, applied to a uint8 batch N x C x H x W on its device."""

    geometric: Callable[[torch.Tensor], torch.Tensor]
    mean: torch.Tensor  # float32, one value per channel
    std: torch.Tensor
    per_sample: bool  # random parameters: each sample draws its own, in batch order

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        # Random parameters are drawn per sample; a deterministic transform takes the batch in one call.
        shaped = torch.stack([self.geometric(x) for x in images]) if self.per_sample else self.geometric(images)
        device = images.device
        return normalise(shaped, self.mean.to(device, non_blocking=True), self.std.to(device, non_blocking=True))


def tensor_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], augment: bool, train: bool
) -> TensorTransform:
    """build_transforms(image_size, mean, std, augment, train) for uint8 tensors."""
    return TensorTransform(
        geometric_transform(image_size, augment, train),
        torch.tensor(mean, dtype=torch.float32),
        torch.tensor(std, dtype=torch.float32),
        per_sample=augment and train,
    )
