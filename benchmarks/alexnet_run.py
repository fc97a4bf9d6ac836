"""A whole ``main.py`` run of AlexNet on a Tiny-ImageNet-shaped stand-in, with and without the data cache.

    python3 benchmarks/alexnet_run.py                               # about 15 minutes on 2 CPU cores
    python3 benchmarks/alexnet_run.py --before /path/to/older/checkout

The stand-in is ``benchmarks/loader.py``'s (64x64 RGB JPEGs, 2 tasks x 10 classes x 50 training and 10
test images, augmentation on, upsampled to 224 by RandomResizedCrop). Each variant is one
``python3 main.py --no-pretrained --num_epochs 2 --num_workers 2 --batch_size 16 --reg_lambda 0.01``
process, alternated in rounds (each round starts with the next variant); reported per variant (median
over rounds): the training images per second of the epochs (from ``results.json``'s epoch times) and
the wall time of the process.
``--before DIR`` adds the ``main.py`` of another checkout (for instance the commit before the cache,
whose ``main.py`` has no ``--cache`` flag) as a variant, so that the ratio says whether a change made a
Tiny-ImageNet run slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.loader import write_standin  # noqa: E402
from utils.cli import at_least  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS = 50
FLAGS = ["--no-pretrained", "--num_epochs", "2", "--num_workers", "2", "--batch_size", "16", "--reg_lambda", "0.01"]


def run(program: Path, data: Path, models: Path, extra: list[str]) -> tuple[float, float]:
    """(training images/s over every epoch of the run, wall seconds of the process)."""
    argv = [sys.executable, str(program / "main.py"), "--data_dir", str(data), "--models_dir", str(models)]
    start = time.perf_counter()
    subprocess.run([*argv, *FLAGS, "--overwrite", *extra], check=True, cwd=program, capture_output=True)
    wall = time.perf_counter() - start
    results = json.loads((models / "results.json").read_text())
    epochs = [(len(t["classes"]), e["seconds"]) for t in results["tasks"] for e in t["history"]]
    images = sum(classes * TRAIN_PER_CLASS for classes, _ in epochs)
    return images / sum(seconds for _, seconds in epochs), wall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--rounds", type=at_least(1, int), default=2, help="runs per variant, alternated (default: %(default)s)"
    )
    p.add_argument("--before", type=Path, default=None, help="another checkout's main.py as a variant (default: none)")
    args = p.parse_args(argv)
    variants = {"--cache ram": (REPO, ["--cache", "ram"]), "--cache off": (REPO, ["--cache", "off"])}
    if args.before is not None:
        variants[f"{args.before.name} (before)"] = (args.before.resolve(), [])
    with tempfile.TemporaryDirectory() as tmp:
        data = write_standin(Path(tmp) / "Data", train=TRAIN_PER_CLASS, test=10)
        measured: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        names = list(variants)
        for round_no in range(args.rounds):
            for name in names[round_no % len(names) :] + names[: round_no % len(names)]:  # each first in turn
                program, extra = variants[name]
                rate, wall = run(program, data, Path(tmp) / "models", extra)
                measured[name].append((rate, wall))
                print(f"round {round_no + 1}: {name}: {rate:.1f} images/s, {wall:.1f} s", flush=True)
    reference = statistics.median(r for r, _ in measured["--cache off"])
    print("| variant | training images/s | / --cache off | process wall time (s) |\n| --- | ---: | ---: | ---: |")
    for name, values in measured.items():
        rate = statistics.median(r for r, _ in values)
        walls = ", ".join(f"{w:.1f}" for _, w in values)
        print(f"| {name} | {rate:.1f} | {rate / reference:.2f}x | {walls} |")


if __name__ == "__main__":
    main()
