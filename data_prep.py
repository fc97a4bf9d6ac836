"""Prepare the task sequences of the Memory Aware Synapses experiments (Aljundi et al., ECCV 2018).

Writes ``<data_dir>/Task_i/{train,test}/<class>/<image>`` plus ``<data_dir>/manifest.json``:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 real images, no
  download), stratified 70/30 train/test split, 5 tasks of 2 digits.

The folder is built beside its destination and moved into place only when complete,
with the manifest written last, so an interrupted run never leaves a half-written
``Data/``. A second run with the same arguments finds the finished split and does
nothing; ``--force`` rebuilds it.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from utils import UserError
from utils.io_utils import load_json, save_json

DATASETS = ("tiny-imagenet", "mnist", "digits")
DIGIT_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
MANIFEST = "manifest.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="data_prep.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="tiny-imagenet",
        help="which task sequence to prepare (default: %(default)s)",
    )
    p.add_argument("--data_dir", default="Data", help="where the task folders and manifest go (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="rebuild an existing split (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors (default: %(default)s)")
    return p


def split_signature(args: argparse.Namespace) -> dict:
    """The arguments that decide the content of the split (recorded in the manifest)."""
    return {"dataset": args.dataset, "seed": args.seed}


@contextlib.contextmanager
def staging_dir(data_dir: Path) -> Iterator[Path]:
    """A scratch folder beside ``data_dir`` (same file system, so the final move is a rename)."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.building-", dir=data_dir.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: Path, data_dir: Path) -> None:
    """Move a complete split into place; an old one (``--force``) is removed only afterwards."""
    old = None
    if data_dir.exists():
        old = data_dir.with_name(f".{data_dir.name}.old-{staged.name}")
        data_dir.rename(old)
    staged.rename(data_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def existing_split(data_dir: Path, signature: dict, force: bool) -> bool:
    """True when ``data_dir`` already holds this split; an error when it holds something else."""
    if not data_dir.exists() or force:
        return False
    manifest_path = data_dir / MANIFEST
    if not manifest_path.is_file():
        if any(data_dir.iterdir()):
            raise UserError(f"{data_dir} exists and holds no {MANIFEST}; move it away or pass --force")
        return False
    prepared = load_json(manifest_path).get("prepared_with")
    if prepared != signature:
        raise UserError(
            f"{data_dir} already holds a split made with {prepared}, not {signature}; "
            "pass --force to replace it, or choose another --data_dir"
        )
    return True


def save_png(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels).save(path)


def prepare_digits(args: argparse.Namespace, out: Path) -> dict:
    """5 tasks of 2 digits from scikit-learn's 8x8 digits, stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are 0..16: scale to 0..255 grey levels.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(index, test_size=0.3, stratify=labels, random_state=args.seed)
    tasks = []
    for task_no, pair in enumerate(DIGIT_PAIRS, start=1):
        entry = {"name": f"Task_{task_no}", "classes": [str(d) for d in pair]}
        for split, chosen in (("train", train_idx), ("test", test_idx)):
            count = 0
            for digit in pair:
                folder = out / entry["name"] / split / str(digit)
                folder.mkdir(parents=True)
                for i in chosen[labels[chosen] == digit]:
                    save_png(pixels[i], folder / f"{i:04d}.png")
                    count += 1
            entry[f"num_{split}"] = count
        tasks.append(entry)
    train_pixels = pixels[train_idx].astype(np.float64) / 255.0
    return {
        "dataset": "digits",
        "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, 8x8)",
        "tasks": tasks,
        "image_size": 8,
        "channels": 1,
        "mean": [float(train_pixels.mean())],
        "std": [float(train_pixels.std())],
        "augment": False,
        "default_arch": "mlp",
        # Binary digit tasks are easy: with the seed's lr 0.001 and 10 epochs fine-tuning forgets
        # nothing, so these defaults make forgetting (and what MAS prevents) visible.
        "defaults": {"pretrained": False, "num_freeze_layers": 0, "num_workers": 0, "init_lr": 0.02, "num_epochs": 30},
    }


PREPARERS: dict[str, Callable[[argparse.Namespace, Path], dict]] = {"digits": prepare_digits}


def prepare(args: argparse.Namespace) -> Path:
    data_dir = Path(args.data_dir)
    signature = split_signature(args)
    if existing_split(data_dir, signature, args.force):
        print(f"{data_dir} already holds this split ({signature}); nothing to do (use --force to rebuild)")
        return data_dir
    if args.dataset not in PREPARERS:
        raise UserError(f"--dataset {args.dataset} is not available yet; use --dataset digits")
    with staging_dir(data_dir) as staged:
        manifest = PREPARERS[args.dataset](args, staged)
        manifest = {**manifest, "num_tasks": len(manifest["tasks"]), "prepared_with": signature}
        save_json(manifest, staged / MANIFEST)  # last: its presence marks a complete split
        publish(staged, data_dir)
    print(f"wrote {manifest['num_tasks']} tasks of {args.dataset} to {data_dir}")
    return data_dir


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    try:
        return prepare(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
