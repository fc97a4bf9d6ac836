"""MNIST through torchvision (which checks the MD5 of every file; we add a timeout and retries), the
official 60000/10000 train/test split, written as 28x28 grey PNG files in the scenarios of
``digits``: Split-MNIST, Permuted MNIST or Rotated MNIST. torchvision's many failures (a mirror
down, a corrupt .gz, a damaged IDX header) become one line that says what to do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mas_data.digits import prepare_digit_sequence
from mas_data.image_tasks import Split
from mas_data.messages import first_line
from mas_data.torchvision_fetch import NETWORK_ERRORS, UNPACK_ERRORS, fetch_torchvision, urllib_reason
from utils import UserError

MNIST_SOURCE = "torchvision.datasets.MNIST (official 60000/10000 train/test split)"


def _mnist_error(err: Exception, raw: Path) -> UserError:
    """One line for whatever torchvision's MNIST raised (its messages span lines)."""
    from torchvision.datasets import MNIST

    text = str(err)
    if isinstance(err, RuntimeError) and text.startswith("Error downloading"):
        what = f"MNIST's {text.splitlines()[0].removeprefix('Error downloading ').rstrip(':')}"
    elif isinstance(err, NETWORK_ERRORS):  # a transfer that broke off or stalled: torchvision lets it through
        what = "the MNIST files"
    elif isinstance(err, UNPACK_ERRORS):
        return UserError(
            f"could not unpack the MNIST .gz files in {raw} ({first_line(err)}); delete them to download them again"
        )
    elif isinstance(err, RuntimeError):
        return UserError(
            f"could not read the MNIST files in {raw} ({first_line(err)}); delete them to download them again"
        )
    elif isinstance(err, (AssertionError, KeyError, ValueError)):  # torchvision's checks of the IDX headers
        return UserError(f"the MNIST files in {raw} are corrupt; delete them to download them again")
    else:
        return UserError(f"could not write {raw}: {getattr(err, 'strerror', None) or err}")
    return UserError(
        f"could not download {what} from {', '.join(MNIST.mirrors)} ({urllib_reason(err)}); run again when "
        f"online, copy the four MNIST .gz files into {raw}, or use --dataset digits for the offline demo"
    )


def load_mnist(root: Path, train: bool, retries: int = 1) -> Split:
    """The official train or test set through torchvision (downloaded once, MD5-checked)."""
    from torchvision.datasets import MNIST

    try:
        dataset = fetch_torchvision(lambda: MNIST(str(root), train=train, download=True), retries)
    except (RuntimeError, AssertionError, KeyError, ValueError, *UNPACK_ERRORS, *NETWORK_ERRORS, OSError) as err:
        raise _mnist_error(err, root / "MNIST" / "raw") from err
    pixels, labels = dataset.data.numpy(), dataset.targets.numpy()
    return pixels, labels, np.arange(len(labels))


def prepare_mnist(args: argparse.Namespace, out: Path) -> dict:
    """MNIST, official train/test split, 28x28 grey PNG files; split (Split-MNIST), permuted or rotated."""
    root = Path(args.download_dir)
    splits = {"train": load_mnist(root, True, args.retries), "test": load_mnist(root, False, args.retries)}
    return prepare_digit_sequence(args, out, splits, MNIST_SOURCE, 5)
