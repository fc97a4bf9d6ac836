"""One run of data_prep.py, start to end: check the flags, reuse a finished split of the same
arguments, else build the chosen dataset's tasks in a staging folder, write the manifest last and
move the whole into place; and the one line that reports an error, whatever it was.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mas_data.cifar import prepare_cifar
from mas_data.digits import prepare_digits
from mas_data.flags import check_flags, resolve_flags, split_signature
from mas_data.messages import first_line
from mas_data.mnist import prepare_mnist
from mas_data.split_folder import check_folders, existing_split
from mas_data.staging import publish, remove_stale_staging, staging_dir
from mas_data.tiny_imagenet import TINY_ROOT, prepare_tiny_imagenet
from utils import UserError
from utils.data.manifest import write_manifest

# Each writes the tasks of its dataset into a folder and returns the manifest's description of them.
PREPARERS: dict[str, Callable[[argparse.Namespace, Path], dict]] = {
    "tiny-imagenet": prepare_tiny_imagenet,
    "mnist": prepare_mnist,
    "digits": prepare_digits,
    "cifar10": prepare_cifar,
    "cifar100": prepare_cifar,
}


def prepare(args: argparse.Namespace, defaults: Mapping[str, Any]) -> Path:
    """Build (or find) the split that ``args`` describe; ``defaults`` are the flags' default values."""
    data_dir = Path(args.data_dir)
    check_flags(args, defaults)
    resolve_flags(args)
    check_folders(args)
    signature = split_signature(args)
    remove_stale_staging(data_dir)
    if args.dataset == "tiny-imagenet":
        remove_stale_staging(Path(args.download_dir) / TINY_ROOT)
    if existing_split(data_dir, signature, args.force):
        print(f"{data_dir} already holds this split ({signature}); nothing to do (use --force to rebuild)")
        return data_dir
    with staging_dir(data_dir) as staged:
        fields = PREPARERS[args.dataset](args, staged)
        manifest = write_manifest(fields, signature, staged)  # last: its presence marks a complete split
        publish(staged, data_dir)
    print(f"wrote {manifest['num_tasks']} tasks of {args.dataset} to {data_dir}")
    return data_dir


def error_line(err: BaseException, data_dir: str) -> str:
    """What data_prep.py prints after ``error: `` when ``err`` stopped it."""
    if isinstance(err, KeyboardInterrupt):
        return f"interrupted; {data_dir} is unchanged (run the same command again to finish)"
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError):  # disk full, permissions: the half-built split was removed
        return f"could not write {err.filename or data_dir}: {err.strerror or err}; {data_dir} is unchanged"
    return (
        f"internal error ({type(err).__name__}: {first_line(err)}); {data_dir} is unchanged; "
        "run with --debug for the traceback and report it"
    )
