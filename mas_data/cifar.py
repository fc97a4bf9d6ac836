"""Split CIFAR-10 (5 tasks of 2 classes) and Split CIFAR-100 (--num_tasks equal groups of its 100
classes) through torchvision, the official 50000/10000 train/test split, classes in label order,
written as 32x32 RGB PNG files; the class names become the folder names, so they are checked.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import numpy as np

from mas_data.download import hash_file
from mas_data.image_tasks import Split, TaskSpec, histogram_stats, write_tasks
from mas_data.messages import first_line
from mas_data.torchvision_fetch import (
    NETWORK_ERRORS,
    TORCHVISION_MD5_ERROR,
    UNPACK_ERRORS,
    fetch_torchvision,
    urllib_reason,
)
from utils import UserError

# A class folder name: CIFAR's names are words with '_' (aquarium_fish); refuse anything else.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_ -]*")
# Neither tuned on the real data (not reachable from this repository's machine): SGD with momentum
# 0.9 from scratch, lr x0.1 after 20 epochs as main.py schedules it.
# What a damaged archive, or damaged files unpacked from it, raise while torchvision reads them.
CIFAR_DAMAGE = (*UNPACK_ERRORS, pickle.UnpicklingError, KeyError, ValueError, TypeError, IndexError, AttributeError)


def _cifar_class(dataset: str):
    """torchvision's class of ``dataset`` (cifar10 or cifar100)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    return CIFAR10 if dataset == "cifar10" else CIFAR100


def _cifar_error(err: Exception, cls, root: Path) -> UserError:
    """One line for whatever torchvision's CIFAR raised while downloading or reading ``root``."""
    archive, folder = root / cls.filename, root / cls.base_folder
    if isinstance(err, RuntimeError) and str(err).startswith(TORCHVISION_MD5_ERROR) and archive.is_file():
        got = hash_file(archive).hexdigest()
        archive.unlink()
        return UserError(
            f"the file downloaded from {cls.url} has MD5 {got}, not the expected {cls.tgz_md5}; deleted it; "
            "run again to download it anew"
        )
    if isinstance(err, NETWORK_ERRORS):
        return UserError(
            f"could not download {cls.url} ({urllib_reason(err)}); run again to retry, copy {cls.filename} into "
            f"{root} from a machine that has it, or use --dataset digits for the offline demo"
        )
    if isinstance(err, (*CIFAR_DAMAGE, RuntimeError)):  # RuntimeError: an unpacked file fails its MD5
        return UserError(
            f"could not read {archive} or the files unpacked from it in {folder} ({first_line(err)}); "
            "they are damaged: delete both to download them again"
        )
    return UserError(f"could not write {root}: {getattr(err, 'strerror', None) or err}")


def load_cifar(dataset: str, root: Path, train: bool, retries: int) -> tuple[Split, list[str]]:
    """CIFAR's official train or test set (HWC uint8 images) and its class names, through torchvision."""
    cls = _cifar_class(dataset)
    try:
        data = fetch_torchvision(lambda: cls(str(root), train=train, download=True), retries)
    except (RuntimeError, *CIFAR_DAMAGE, *NETWORK_ERRORS, OSError) as err:
        raise _cifar_error(err, cls, root) from err
    pixels, labels, names = np.asarray(data.data), np.asarray(data.targets), list(data.classes)
    count = 10 if dataset == "cifar10" else 100
    sane = len(names) == len(set(names)) == count and all(isinstance(n, str) and SAFE_NAME.fullmatch(n) for n in names)
    if not sane or pixels.dtype != np.uint8 or len(labels) != len(pixels) or not np.isin(labels, range(count)).all():
        raise UserError(
            f"the CIFAR files in {root / cls.base_folder} are not CIFAR's; delete them to download them again"
        )
    return (pixels, labels, np.arange(len(labels))), names


def prepare_cifar(args: argparse.Namespace, out: Path) -> dict:
    """Split CIFAR-10 (5 tasks of 2 classes) or CIFAR-100 (--num_tasks equal groups), classes in label order."""
    root = Path(args.download_dir)
    train, names = load_cifar(args.dataset, root, True, args.retries)
    test, _ = load_cifar(args.dataset, root, False, args.retries)
    num_tasks = 5 if args.dataset == "cifar10" else args.num_tasks
    group = len(names) // num_tasks
    specs = [TaskSpec({label: names[label] for label in range(k * group, (k + 1) * group)}) for k in range(num_tasks)]
    tasks, histograms = write_tasks(out, {"train": train, "test": test}, specs, width=5)
    mean, std = histogram_stats(histograms)
    return {
        "dataset": args.dataset,
        "source": f"torchvision.datasets.{_cifar_class(args.dataset).__name__} (official 50000/10000 train/test split)",
        "tasks": tasks,
        "image_size": 32,
        "channels": 3,
        "mean": mean,
        "std": std,
        "augment": False,
    }
