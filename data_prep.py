"""The command line of the data preparation (``python3 data_prep.py --help``): parses the flags and hands
over to ``mas_data.build.prepare``; the datasets and mechanisms are the modules of ``mas_data/``. An error
the user can cause is one line, ``error: ...``, exit status 1 (2 for a malformed flag, 130 for Ctrl-C)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mas_data.build import error_line, prepare
from mas_data.flags import DATASETS, MAX_RETRIES, MAX_TASKS, SCENARIOS
from mas_data.tiny_imagenet import TINY_MD5, TINY_URL
from utils.cli import OneLineParser, int_between, seed

DESCRIPTION = """\
Prepare the task sequences of the Memory Aware Synapses experiments (Aljundi et al., ECCV 2018):
<data_dir>/Task_1 ... Task_T, each with train/ and test/ holding one folder per class, and
<data_dir>/manifest.json, which main.py reads.

  tiny-imagenet  the paper's sequence (default): the 200 classes shuffled with --seed into 4 tasks
                 of 50; downloads tiny-imagenet-200.zip (about 237 MB, MD5-checked, a broken
                 download resumes) or takes --archive; tested on the labelled val set
  mnist          MNIST through torchvision, official 60000/10000 split, as PNG files
  digits         scikit-learn's 8x8 digits: 1797 real images, no download (the offline demo)
  cifar10/100    Split CIFAR-10 (5 tasks of 2 classes) / Split CIFAR-100, official 50000/10000 split

The split is built beside --data_dir and moved into place only when complete, so an interrupted
run leaves nothing half-written. Run again with the same flags and nothing is done; --force
rebuilds, and only ever replaces a split that this program wrote.

examples:
  python3 data_prep.py                                      # Tiny-ImageNet, as in the paper
  python3 data_prep.py --dataset digits                     # offline, in seconds
  python3 data_prep.py --dataset mnist --scenario permuted  # Permuted MNIST, 10 tasks
"""
CIFAR_HELP = "cifar10 is always 5 tasks of 2 classes;\ncifar100 takes --num_tasks (10, 20 or another divisor of 100)"


def _angle(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not -360 <= value <= 360:  # also false for nan
        raise argparse.ArgumentTypeError(f"expected an angle in degrees from -360 to 360, got {text!r}")
    return value


def _md5_hex(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{32}", text):
        raise argparse.ArgumentTypeError(f"an MD5 is 32 hexadecimal digits, got {text!r}")
    return text.lower()


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        error_prefix="error:",
        prog="data_prep.py",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    general = p.add_argument_group("general")
    general.add_argument(
        "--dataset",
        choices=DATASETS,
        default="tiny-imagenet",
        help="which task sequence to prepare (default: %(default)s)",
    )
    general.add_argument(
        "--data_dir", default="Data", help="where the task folders and manifest go (default: %(default)s)"
    )
    general.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="seed of the class split (tiny-imagenet), of the train/test split (digits) and of the "
        "permutations (--scenario permuted) (default: %(default)s)",
    )
    general.add_argument(
        "--num_tasks",
        type=int_between(1, MAX_TASKS),
        default=None,
        help="number of tasks; when not given 4 for tiny-imagenet (equal groups of the 200 classes), "
        "10 for mnist and 5 for digits (--scenario permuted or rotated), 10 for cifar100 (a divisor "
        "of 100) (default: %(default)s)",
    )
    general.add_argument("--force", action="store_true", help="rebuild an existing split (default: %(default)s)")
    general.add_argument("--debug", action="store_true", help="show tracebacks of errors (default: %(default)s)")
    tiny = p.add_argument_group("Tiny-ImageNet only")
    tiny.add_argument(
        "--classes_per_task",
        type=int_between(1, MAX_TASKS),
        default=None,
        help="keep only the first N classes of each group; all of them when not given (default: %(default)s)",
    )
    tiny.add_argument("--url", default=TINY_URL, help="where to download the Tiny-ImageNet zip (default: %(default)s)")
    tiny.add_argument(
        "--md5", type=_md5_hex, default=TINY_MD5, help="expected MD5 of the Tiny-ImageNet zip (default: %(default)s)"
    )
    tiny.add_argument(
        "--archive",
        default=None,
        help="use this copy of tiny-imagenet-200.zip instead of downloading it (default: %(default)s)",
    )
    digits = p.add_argument_group("digits and MNIST scenarios")
    digits.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="split",
        help="split = 5 tasks of 2 digits; permuted = all 10 digits in every task, each task's pixels in a fixed "
        "random order (task 1 unpermuted); rotated = all 10 digits, each task rotated by a fixed angle "
        "(default: %(default)s)",
    )
    digits.add_argument(
        "--angles",
        type=_angle,
        nargs="+",
        default=None,
        metavar="DEGREES",
        help="--scenario rotated: the angle of each task, counter-clockwise; when not given task k of "
        "--num_tasks T is rotated by 180*(k-1)/T degrees (default: %(default)s)",
    )
    p.add_argument_group("CIFAR", CIFAR_HELP)  # no flag of its own: where --num_tasks applies
    download = p.add_argument_group("download (tiny-imagenet, mnist, cifar10, cifar100)")
    download.add_argument(
        "--download_dir",
        default="downloads",
        help="where the downloaded archives and their extracted copies are kept (default: %(default)s)",
    )
    download.add_argument(
        "--retries",
        type=int_between(1, MAX_RETRIES),
        default=3,
        help="attempts of a download that breaks off or times out, with a growing pause between them; "
        "each resumes what is on disk where the server allows (default: %(default)s)",
    )
    return p


def main(argv: list[str] | None = None) -> Path:
    """Run data_prep.py on ``argv`` (the command line when None); the folder of the split."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return prepare(args, vars(parser.parse_args([])))
    except (Exception, KeyboardInterrupt) as err:
        if args.debug:
            raise
        print(f"error: {error_line(err, args.data_dir)}", file=sys.stderr)
        raise SystemExit(130 if isinstance(err, KeyboardInterrupt) else 1) from None


if __name__ == "__main__":
    main()
