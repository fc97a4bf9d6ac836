"""``--val_fraction``: a validation set held out of each task's training images, for choosing
hyperparameters without looking at the test set (``--hparam_search``, hparam_search.py).

Per class, ``round(F * n)`` of its ``n`` training images are held out (at least one when F > 0 and
the class has two or more; never all of them). Which ones is drawn by a permutation from a
``torch.Generator`` seeded from the run's ``--seed`` and the task's number: the run's results depend
on the global RNG stream (every task seeds it, checkpoints restore it), which the split leaves alone.
The held-out images are neither trained on nor seen by the importance pass; they are scored with
the test transforms.
"""

from __future__ import annotations

import hashlib

import torch

from utils import UserError
from utils.data.decode import ImageFiles, Samples


def validation_seed(seed: int, task_no: int) -> int:
    """The seed of task ``task_no``'s split: a stream of its own, apart from every task's training stream."""
    digest = hashlib.sha256(f"validation split, seed {seed}, task {task_no}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes 63 bits here


def held_out_count(fraction: float, n_images: int) -> int:
    """How many of a class's ``n_images`` training images are held out."""
    count = round(fraction * n_images)
    return max(count, 1) if fraction > 0 and n_images >= 2 else count


def split_samples(
    samples: Samples, classes: list[str], fraction: float, seed: int, task_no: int, task: str
) -> tuple[Samples, Samples]:
    """(training, validation) samples, each in the order of ``samples`` (ImageFolder's)."""
    generator = torch.Generator().manual_seed(validation_seed(seed, task_no))
    held: set[int] = set()
    for label, name in enumerate(classes):
        indices = [i for i, (_, lab) in enumerate(samples) if lab == label]
        count = held_out_count(fraction, len(indices))
        if count >= len(indices) and count > 0:
            raise UserError(
                f"{task}: --val_fraction {fraction:g} would hold out all {len(indices)} training images of class "
                f"{name}, leaving none to train on; lower --val_fraction"
            )
        order = torch.randperm(len(indices), generator=generator).tolist()
        held.update(indices[k] for k in order[:count])
    if not held:
        raise UserError(f"{task}: --val_fraction {fraction:g} holds out no training image; raise it")
    training = [s for i, s in enumerate(samples) if i not in held]
    return training, [s for i, s in enumerate(samples) if i in held]


def hold_out_validation(files: dict[str, ImageFiles], fraction: float, seed: int, task_no: int, task: str) -> None:
    """Give ``files["validation"]`` its held-out images and take them from the training and importance
    splits (which list the same training folder); nothing changes when there is no validation split."""
    if "validation" not in files:
        return
    training, validation = split_samples(files["train"].samples, files["train"].classes, fraction, seed, task_no, task)
    files["train"].samples = files["importance"].samples = training
    files["validation"].samples = validation
