"""The task data written by ``data_prep.py``: layout, manifest, transforms and loaders.

Layout (torchvision's ImageFolder per split)::

    Data/manifest.json
    Data/Task_1/{train,test}/<class>/<image>
    ...

Tasks are trained in numeric order (Task_10 after Task_9). A task's train and
test folders must hold the same classes, since one head is trained on the first
and scored on the second.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from utils import UserError
from utils.artefacts.files import load_json
from utils.data.batches import CachedLoader, SplitDataset
from utils.data.cache import RunCache, SplitStore
from utils.data.decode import IMAGE_EXTENSIONS, ImageFiles, as_tensor, not_a_link, pil_resize, read_image
from utils.data.manifest import MANIFEST, check_manifest
from utils.data.transforms import BatchTransform, NormaliseBatch, PilPerSample, normalise, test_resize
from utils.data.validation import hold_out_validation
from utils.runtime import distributed
from utils.runtime.interrupt import InterruptibleLoader

_TASK_DIR = re.compile(r"^Task_(\d+)$")


@dataclass
class TaskData:
    """Everything one task needs: its classes and the three loaders."""

    name: str
    classes: list[str]
    train: DataLoader  # training transforms, shuffled
    importance: DataLoader  # training images with test transforms (no augmentation), as the authors
    test: DataLoader
    validation: DataLoader | None = None  # held-out training images, test transforms (--val_fraction)


@dataclass(frozen=True)
class LoaderSettings:
    """How a task's loaders serve their batches (``main.py``'s --batch_size, --num_workers,
    --importance_batch_size, --cache)."""

    batch_size: int
    num_workers: int
    importance_batch_size: int | None = None  # None: batch_size
    cache: RunCache | None = None  # None: the files every epoch (--cache off)
    pin_memory: bool = False  # CUDA: batches in pinned memory, copied to the device with non_blocking
    val_fraction: float = 0.0  # training images held out per class as validation (utils/data/validation.py)
    seed: int = 0  # the run's --seed, which seeds the validation split


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data folder {data_dir} does not exist; run `python3 data_prep.py` first")
    path = data_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} is missing; run `python3 data_prep.py` to (re)build {data_dir}")
    return check_manifest(load_json(path), path)


def data_fingerprint(manifest: dict[str, Any]) -> str:
    """What identifies the data of a run, whatever its path: a resumed run must see the same split."""
    keys = ("dataset", "prepared_with", "tasks", "image_size", "channels", "mean", "std", "augment")
    text = json.dumps({k: manifest.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def task_dirs(data_dir: str | Path, manifest: dict[str, Any]) -> list[Path]:
    """Task folders in numeric order; they must be exactly the manifest's tasks, and not links."""
    data_dir = Path(data_dir)
    found = {int(m.group(1)): p for p in data_dir.iterdir() if (m := _TASK_DIR.match(p.name)) and p.is_dir()}
    names = [task["name"] for task in manifest["tasks"]]
    expected = [f"Task_{i}" for i in range(1, len(names) + 1)]
    if names != expected:
        raise UserError(f"{data_dir / MANIFEST} lists tasks {names}, expected {expected}")
    missing = [n for i, n in enumerate(expected, 1) if i not in found]
    if missing:
        raise UserError(f"task folder {data_dir / missing[0]} is missing (the manifest lists {len(names)} tasks)")
    extra = sorted(i for i in found if i > len(names))
    if extra:
        raise UserError(f"{data_dir} holds Task_{extra[0]}, which its manifest does not list")
    for i in range(1, len(names) + 1):
        not_a_link(str(found[i]))  # the data folder itself may be a link, its task folders not
    return [found[i] for i in range(1, len(names) + 1)]


def _class_folders(split_dir: Path, task: str) -> list[str]:
    if not split_dir.is_dir():
        raise UserError(f"{task}: folder {split_dir} is missing")
    not_a_link(str(split_dir))
    for entry in split_dir.iterdir():
        not_a_link(str(entry))
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{task}: {split_dir} holds no class folders")
    for name in classes:
        _check_class_name(name, split_dir, task)
        if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in (split_dir / name).iterdir()):
            raise UserError(f"{task}: class folder {split_dir / name} holds no images")
    return classes


def _check_class_name(name: str, split_dir: Path, task: str) -> None:
    """A class name is written as one line of Task_N/classes.txt (UTF-8) and into results.json: it must be
    a name, without path separators, line breaks, control characters or bytes that are not UTF-8."""
    unusable = (
        name in ("", ".", "..")
        or any(sep in name for sep in ("/", "\\"))
        or name.splitlines() != [name]
        or any(unicodedata.category(char) in ("Cc", "Cs") for char in name)  # Cs: undecodable bytes
    )
    if unusable:
        raise UserError(
            f"{task}: class folder {name!r} in {split_dir} cannot name a class: a class name is one line of "
            "classes.txt, without path separators, line breaks, control characters or bytes that are not UTF-8; "
            "rename the folder"
        )


def check_task(task_dir: Path, manifest_classes: list[str]) -> list[str]:
    """The task's classes; train, test and manifest must agree on them."""
    task = task_dir.name
    train = _class_folders(task_dir / "train", task)
    test = _class_folders(task_dir / "test", task)
    if train != test:
        only_train = sorted(set(train) - set(test))
        only_test = sorted(set(test) - set(train))
        raise UserError(
            f"{task}: train and test hold different classes "
            f"(only in train: {only_train or 'none'}; only in test: {only_test or 'none'})"
        )
    if sorted(manifest_classes) != train:
        raise UserError(f"{task}: the folders hold classes {train} but the manifest lists {sorted(manifest_classes)}")
    return train


def image_loader(mode: str) -> Callable[[str], Image.Image]:
    """A PIL loader that names the file when an image is corrupt, truncated or declares a huge size."""
    return functools.partial(read_image, mode=mode)


class ResizeAndNormalise:
    """torchvision's Compose([Resize((size, size)), ToTensor(), Normalize(mean, std)]) for data that is not
    augmented, with the same arithmetic, and no torchvision import (it costs two seconds per process)."""

    def __init__(self, image_size: int, mean: list[float], std: list[float]) -> None:
        self.size = image_size
        self.mean, self.std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return normalise(as_tensor(pil_resize(image, self.size)), self.mean, self.std)


def build_transforms(image_size: int, mean: list[float], std: list[float], augment: bool, train: bool):
    """The seed's ImageNet-style transforms when ``augment`` (RandomResizedCrop + flip for
    training, resize + centre crop for testing); a plain resize otherwise (digits)."""
    if not augment:
        return ResizeAndNormalise(image_size, mean, std)
    from torchvision import transforms  # only augmented data needs torchvision's transforms

    normalise = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if train:
        return transforms.Compose(
            [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), *normalise]
        )
    return transforms.Compose(
        [transforms.Resize(test_resize(image_size)), transforms.CenterCrop(image_size), *normalise]
    )


def sampling(dataset, batch_size: int, shuffle: bool) -> dict[str, Any]:
    """DataLoader arguments for this process's share of a split. One process: the batch size and a
    shuffle (RandomSampler). Under torchrun, ``batch_size`` is the global batch, and the ranks together
    take exactly one process's batches: for training each rank takes its interleaved part of every
    shuffled batch (GlobalBatchSampler, which also gives the loss weights); for the importance pass and
    the tests each rank takes whole batches of the unshuffled order (WholeBatchSampler)."""
    rank, size = distributed.rank(), distributed.world_size()
    if size == 1:
        return {"batch_size": batch_size, "shuffle": shuffle}
    sampler = distributed.GlobalBatchSampler if shuffle else distributed.WholeBatchSampler
    return {"batch_sampler": sampler(dataset, batch_size, rank, size)}


def _loader(dataset: ImageFiles, batch_size: int, shuffle: bool, settings: LoaderSettings) -> DataLoader:
    return InterruptibleLoader(
        dataset,
        **sampling(dataset, batch_size, shuffle),
        num_workers=settings.num_workers,
        pin_memory=settings.pin_memory,
        # Workers are restarted every epoch and seeded from the main RNG, which checkpoints
        # restore: a resumed run sees the same augmentations even with --num_workers > 0.
        persistent_workers=False,
    )


def make_task_data(
    task_dir: Path,
    manifest: dict[str, Any],
    channels: int,
    image_size: int,
    batch_size: int,
    num_workers: int,
    *,
    importance_batch_size: int | None = None,
    cache: RunCache | None = None,
    pin_memory: bool = False,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> TaskData:
    """Loaders for one task. ``channels`` is what the model wants (AlexNet: 3); the importance loader
    takes ``importance_batch_size`` (default ``batch_size``); the others: see LoaderSettings."""
    settings = LoaderSettings(batch_size, num_workers, importance_batch_size, cache, pin_memory, val_fraction, seed)
    entry = next(t for t in manifest["tasks"] if t["name"] == task_dir.name)
    classes = check_task(task_dir, entry["classes"])
    mean, std = _stats_for(manifest, channels)
    augment = bool(manifest.get("augment", False))
    mode = "RGB" if channels == 3 else "L"
    train_tf = build_transforms(image_size, mean, std, augment, train=True)
    test_tf = build_transforms(image_size, mean, std, augment, train=False)
    specs = {  # loader: (folder, transform of the file path, batch size, shuffle)
        "train": (task_dir / "train", train_tf, settings.batch_size, True),
        "importance": (task_dir / "train", test_tf, settings.importance_batch_size or settings.batch_size, False),
        "test": (task_dir / "test", test_tf, settings.batch_size, False),
    }
    if settings.val_fraction > 0:
        specs["validation"] = (task_dir / "train", test_tf, settings.batch_size, False)
    files = {k: ImageFiles(str(f), mode, tf) for k, (f, tf, *_) in specs.items()}
    task_no = manifest["tasks"].index(entry) + 1
    hold_out_validation(files, settings.val_fraction, settings.seed, task_no, task_dir.name)
    if settings.cache is None or settings.cache.mode == "off":
        loaders = {k: _loader(files[k], bs, shuffle, settings) for k, (_, _, bs, shuffle) in specs.items()}
    else:
        loaders = _cached_loaders(task_dir.name, files, specs, None if augment else image_size, settings)
    return TaskData(name=task_dir.name, classes=classes, **loaders)


def _cached_loaders(
    task: str,
    files: dict[str, ImageFiles],
    specs: dict[str, tuple],
    resize_to: int | None,
    settings: LoaderSettings,
) -> dict[str, CachedLoader]:
    """The loaders of ``specs`` over the run's cache: a train, a test (and a validation) split, the
    importance loader sharing the train split's images. ``resize_to``: data that is not augmented is resized once, while
    decoding, by the file path's own PIL resize (None: augmented, kept as decoded)."""
    resize = None if resize_to is None else functools.partial(pil_resize, size=resize_to)
    splits = [k for k in specs if k != "importance"]
    stores = {s: SplitStore(f"{task} {s}", files[s].samples, files[s].mode, resize) for s in splits}
    settings.cache.add(task, stores)
    loaders = {}
    for kind, (_, file_transform, batch_size, shuffle) in specs.items():
        split = "train" if kind == "importance" else kind
        dataset = SplitDataset(files[kind], stores[split], _memory_transform(file_transform, resize_to is None))
        loaders[kind] = CachedLoader(
            dataset,
            functools.partial(settings.cache.prepare, task, split),
            **sampling(dataset, batch_size, shuffle),
            num_workers=settings.num_workers,
            pin_memory=settings.pin_memory,
            persistent_workers=False,  # as _loader: workers seeded from the main RNG every epoch
        )
    return loaders


def _memory_transform(file_transform, augment: bool) -> BatchTransform:
    """The file path's transform for images held in memory (see utils/data/transforms.py): the same
    PIL transform object for augmented data; else, the resize done while decoding, ``normalise``."""
    if augment:
        return PilPerSample(file_transform)
    return NormaliseBatch(file_transform.mean, file_transform.std)


def _stats_for(manifest: dict[str, Any], channels: int) -> tuple[list[float], list[float]]:
    mean, std = list(manifest["mean"]), list(manifest["std"])
    if len(mean) == 1 and channels == 3:  # grey-scale data fed to an RGB model
        mean, std = mean * 3, std * 3
    if len(mean) != channels:
        raise UserError(f"the manifest's mean/std have {len(mean)} channels but the model takes {channels}")
    return mean, std
