"""Decoding image files: every failure is one line naming the file, and a whole split can be decoded
once into a uint8 tensor N x C x H x W (the data cache, ``utils/data/cache.py``).

``read_image`` is the one place where a file is decoded, for the file path (ImageFolder, every epoch)
and for the cache (``decode_split``, once per run), so both name a bad file the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from utils import UserError
from utils.runtime.interrupt import InterruptibleLoader

DECODE_BATCH = 64  # images a worker decodes before handing them over
Samples = list[tuple[str, int]]  # (file, label) in ImageFolder's order
PilTransform = Callable[[Image.Image], Image.Image]


class MixedSizes(UserError):
    """The images of a split differ in size, so they cannot be stacked into one tensor."""


def read_image(path: str, mode: str) -> Image.Image:
    """The image at ``path`` converted to ``mode`` ("L" or "RGB") and fully decoded; any failure is
    one UserError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()  # decodes the whole file, so a truncated one fails here
            return img if img.mode == mode else img.convert(mode)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, DecompressionBombError
        # (a header declaring a huge size), ...: each means that the file cannot be used
        raise UserError(f"corrupt or unreadable image {path}: {err or type(err).__name__}") from err


@dataclass
class DecodedSplit:
    """A split in memory: every image at one size, in the order of its files."""

    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes


class _DecodeFiles(Dataset):
    """Image ``i`` as a uint8 C x H x W tensor, or the error message naming its file: a worker hands
    the message over rather than raising, so the main process reports it as one line."""

    def __init__(self, samples: Samples, mode: str, pil_transform: PilTransform | None) -> None:
        self.samples, self.mode, self.pil_transform = samples, mode, pil_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> torch.Tensor | str:
        try:
            image = read_image(self.samples[index][0], self.mode)
        except UserError as err:
            return str(err)
        if self.pil_transform is not None:
            image = self.pil_transform(image)
        return as_tensor(image)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def not_a_link(path: str) -> None:
    """Task folders are read without following links: a link in a split (to a file, or to a folder such
    as ``..``, which would read the data again and again) is one UserError naming it."""
    if os.path.islink(path):
        raise UserError(
            f"{path} is a symbolic link; the task folders are read without following links: "
            "put the file or folder itself there"
        )


def list_images(root: str) -> tuple[list[str], Samples]:
    """The classes (sorted sub-folders) of a split and its (file, class index) pairs, in the order of
    torchvision's ImageFolder: classes sorted, then each class folder walked with its folders and files
    sorted. Unlike ImageFolder, links are refused (``not_a_link``), not followed. Written out so that
    reading a split needs no torchvision import."""
    not_a_link(root)
    with os.scandir(root) as entries:
        entries = list(entries)
    for entry in entries:
        not_a_link(entry.path)
    classes = sorted(entry.name for entry in entries if entry.is_dir())
    samples = []
    for index, name in enumerate(classes):
        for folder, folders, files in sorted(os.walk(os.path.join(root, name))):
            for entry in sorted(folders + files):
                not_a_link(os.path.join(folder, entry))
            samples += [(os.path.join(folder, f), index) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return classes, samples


class ImageFiles(Dataset):
    """A split read from its files, image by image (torchvision's ImageFolder with ``read_image``)."""

    def __init__(self, root: str, mode: str, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.root, self.mode, self.transform = root, mode, transform
        self.classes, self.samples = list_images(root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(read_image(path, self.mode)), label


def pil_resize(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize((size, size)) of a PIL image: PIL's bilinear resize."""
    return image.resize((size, size), Image.BILINEAR)


def as_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 C x H x W: torchvision's pil_to_tensor without its copies (a third of the time of decoding)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # H x W or H x W x C, a writable copy
    return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)


def first_image(samples: Samples, mode: str, pil_transform: PilTransform | None) -> torch.Tensor:
    """The split's first image as decode_split stores it (its shape sizes the split)."""
    image = _DecodeFiles(samples[:1], mode, pil_transform)[0]
    if isinstance(image, str):
        raise UserError(image)
    return image


def _as_list(batch: list) -> list:
    return batch


def decode_split(
    samples: Samples, mode: str, pil_transform: PilTransform | None, num_workers: int, desc: str
) -> DecodedSplit:
    """Decode every file of a split once, in ``num_workers`` processes (0: in this one). The loader
    has its own torch.Generator: the run's results depend on the global RNG stream, which decoding
    must not advance. Raises UserError naming a bad file, MixedSizes if the sizes differ."""
    loader = InterruptibleLoader(
        _DecodeFiles(samples, mode, pil_transform),
        batch_size=DECODE_BATCH,
        num_workers=num_workers,
        collate_fn=_as_list,
        generator=torch.Generator(),
    )
    images, filled = None, 0
    with tqdm(total=len(samples), desc=f"decoding {desc}", unit="img", leave=False, disable=None) as bar:
        for batch in loader:
            for image in batch:
                if isinstance(image, str):
                    raise UserError(image)
                if images is None:
                    images = torch.empty((len(samples), *image.shape), dtype=torch.uint8)
                _check_size(image, images, samples, filled, desc)
                images[filled] = image
                filled += 1
            bar.update(len(batch))
    return DecodedSplit(images, torch.tensor([label for _, label in samples], dtype=torch.int64))


def _check_size(image: torch.Tensor, images: torch.Tensor, samples: Samples, index: int, desc: str) -> None:
    if image.shape != images.shape[1:]:
        first, this = (f"{s[-1]}x{s[-2]}" for s in (images.shape, image.shape))
        raise MixedSizes(
            f"{desc}: {samples[index][0]} is {this} pixels but {samples[0][0]} is {first}, and the images "
            "of a split must have one size to be held in memory"
        )
