"""The training loader with and without the data cache (``--cache``), beside AlexNet's training step, at 224.

    python3 benchmarks/loader.py                    # about 5 minutes on 2 CPU cores

It writes a Tiny-ImageNet-shaped stand-in to a temporary folder (64x64 RGB JPEGs, 2 tasks x 10 classes
x 100 training and 20 test images, data_prep.py's layout, a manifest with ``augment: true``, ImageNet's
mean and std, ``default_arch`` alexnet) and measures, in this process:

- the training loader of task 1 as main.py builds it (RandomResizedCrop to 224, flip, normalise; shuffled),
  in images per second over one epoch, for ``--cache off`` (PIL decodes every JPEG every epoch) and
  ``--cache ram`` (decoded once beforehand, then the same PIL transforms of each image), at ``--num_workers``
  0, 1, 2 and 4 and batch sizes 8 and 64; and how long decoding the task once takes;
- one AlexNet training step at 224 (forward, backward, SGD with momentum; random weights, the first 2
  convolutions frozen as main.py's default), in images per second at batch 8 and 64, on 2 torch threads.

Whichever rate is lower limits a run. Variants alternate in rounds; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository runs from its folder

from model_class import TaskModel, build_head, build_shared_model, create_freeze_layers, trainable_parameters  # noqa: E402
from optimizer_lib import LocalSgd  # noqa: E402
from utils.cli import at_least  # noqa: E402
from utils.data.cache import RunCache  # noqa: E402
from utils.data.tasks import make_task_data, read_manifest, task_dirs  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SIZE, STORED = 224, 64


def write_standin(root: Path, tasks: int = 2, classes: int = 10, train: int = 100, test: int = 20) -> Path:
    """JPEGs of smooth random colour fields with noise (about 2 KB each, as Tiny-ImageNet's)."""
    rng = np.random.default_rng(0)
    entries = []
    for t in range(1, tasks + 1):
        names = [f"n{t:02d}{k:06d}" for k in range(classes)]
        for split, count in (("train", train), ("test", test)):
            for name in names:
                folder = root / f"Task_{t}" / split / name
                folder.mkdir(parents=True)
                for i in range(count):
                    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((STORED, STORED))
                    noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (STORED, STORED, 3))
                    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{name}_{i}.JPEG", quality=75)
        entries.append(
            {"name": f"Task_{t}", "classes": names, "num_train": train * classes, "num_test": test * classes}
        )
    manifest = {"dataset": "tiny-imagenet-standin", "tasks": entries, "image_size": STORED, "channels": 3}
    manifest |= {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "augment": True, "default_arch": "alexnet"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def training_task(data: Path, cache: str, workers: int, batch_size: int):
    """Task 1's loaders as main.py builds them, with its images decoded if the cache holds them."""
    manifest = read_manifest(data)
    task = make_task_data(
        task_dirs(data, manifest)[0], manifest, 3, SIZE, batch_size, workers, cache=RunCache(cache, workers)
    )
    if cache == "ram":
        task.train.prepare()  # decoded now, outside the timed epochs
    return task


def training_loader(data: Path, cache: str, workers: int, batch_size: int):
    """Task 1's training loader (see training_task)."""
    return training_task(data, cache, workers, batch_size).train


def epoch_rate(loader) -> float:
    """Images per second over one pass of ``loader``."""
    tic, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += len(images)
    return seen / (time.perf_counter() - tic)


def decode_seconds(data: Path, workers: int) -> float:
    tic = time.perf_counter()
    training_loader(data, "ram", workers, 8)  # decodes task 1's train and test splits
    return time.perf_counter() - tic


def alexnet_to_train(classes: int = 10) -> tuple[TaskModel, LocalSgd]:
    """AlexNet at 224 as task 1 of main.py trains it: random weights, the first 2 convolutions frozen
    (the default --num_freeze_layers), LocalSgd with momentum (no importance yet: plain SGD)."""
    torch.manual_seed(0)
    shared = build_shared_model("alexnet", 3, SIZE, pretrained=False)
    create_freeze_layers(shared, 2)
    model = TaskModel(shared, build_head(shared, classes)).train()
    return model, LocalSgd(trainable_parameters(model).values(), lr=0.001, reg_lambda=0.0, momentum=0.9)


def step_rate(batch_size: int, steps: int) -> float:
    """Images per second of AlexNet training steps at 224 (after one warm-up step)."""
    model, optimizer = alexnet_to_train()
    images, labels = torch.randn(batch_size, 3, SIZE, SIZE), torch.randint(0, 10, (batch_size,))
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(images), labels).backward()
        optimizer.step()

    step()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - tic)


def measure_loaders(data: Path, workers: list[int], batch_sizes: list[int], rounds: int) -> dict:
    """Median images/s of every (cache, workers, batch size), the variants alternated round by round."""
    loaders = {(c, w, b): training_loader(data, c, w, b) for w in workers for b in batch_sizes for c in ("off", "ram")}
    rates = {key: [] for key in loaders}
    for _ in range(rounds):
        for key, loader in loaders.items():
            rates[key].append(epoch_rate(loader))
    return {key: statistics.median(r) for key, r in rates.items()}


def table(rates: dict, steps: dict, decode: dict, workers: list[int], batch_sizes: list[int]) -> list[str]:
    head = " | ".join(f"off, batch {b} | ram, batch {b} | ram / off" for b in batch_sizes)
    lines = [f"| --num_workers | {head} |", "| ---: |" + " ---: |" * 3 * len(batch_sizes)]
    for w in workers:
        cells = [
            f"{rates['off', w, b]:.0f} | {rates['ram', w, b]:.0f} | {rates['ram', w, b] / rates['off', w, b]:.1f}x"
            for b in batch_sizes
        ]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("AlexNet training step at 224: " + ", ".join(f"batch {b}: {r:.1f} images/s" for b, r in steps.items()))
    lines.append(
        "decoding task 1 once (1000 train + 200 test JPEGs): "
        + ", ".join(f"{s:.2f} s with --num_workers {w}" for w, s in decode.items())
    )
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--workers", type=at_least(0, int), nargs="+", default=[0, 1, 2, 4], help="--num_workers (default: %(default)s)"
    )
    p.add_argument(
        "--batch_sizes", type=at_least(1, int), nargs="+", default=[8, 64], help="batch sizes (default: %(default)s)"
    )
    p.add_argument("--rounds", type=at_least(1, int), default=2, help="epochs per variant (default: %(default)s)")
    p.add_argument("--steps", type=at_least(1, int), default=6, help="AlexNet steps timed (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", "This DataLoader will create")  # 4 workers on 2 cores: measured on purpose
    torch.set_num_threads(2)
    load = os.getloadavg()
    print(
        f"# loader vs AlexNet step at {SIZE}: torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"2 torch threads; load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = write_standin(Path(tmp) / "Data")
        decode = {w: decode_seconds(data, w) for w in args.workers}
        rates = measure_loaders(data, args.workers, args.batch_sizes, args.rounds)
    steps = {b: step_rate(b, args.steps) for b in args.batch_sizes}
    print(
        "\n".join(["", "training loader, images/s:", "", *table(rates, steps, decode, args.workers, args.batch_sizes)])
    )
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
