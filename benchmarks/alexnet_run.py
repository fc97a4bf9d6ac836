"""A whole ``main.py`` run of AlexNet on a Tiny-ImageNet-shaped stand-in, with and without the data cache.

    python3 benchmarks/alexnet_run.py                               # about 20 minutes on 2 CPU cores
    python3 benchmarks/alexnet_run.py --before /path/to/older/checkout
    python3 benchmarks/alexnet_run.py --paired 10                    # about 8 minutes

The stand-in is ``benchmarks/loader.py``'s (64x64 RGB JPEGs, 2 tasks x 10 classes x 50 training and 10
test images, augmentation on, upsampled to 224 by RandomResizedCrop). Each variant is one
``python3 main.py --no-pretrained --num_epochs 2 --num_workers 2 --batch_size 16 --reg_lambda 0.01``
process, alternated in rounds (each round starts with the next variant); reported per variant (median
over rounds): the training images per second of the epochs (from ``results.json``'s epoch times) and
the wall time of the process.
``--before DIR`` adds the ``main.py`` of another checkout (for instance the commit before the cache,
whose ``main.py`` has no ``--cache`` flag) as a variant, so that the ratio says whether a change made a
Tiny-ImageNet run slower.

``--paired N`` measures the same question with less noise (whole processes on a shared 2-core machine
vary by 10 % from run to run): in this process, N pairs of training epochs of task 1 (``train_one_epoch``:
the loader with 2 workers and AlexNet's step, batch 16), one epoch from memory and one from the files,
alternated, the same model continuing; it prints each pair's ratio memory / files and their median.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.loader import alexnet_to_train, training_task, write_standin  # noqa: E402
from model_train import train_one_epoch  # noqa: E402
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


def paired_epochs(data: Path, pairs: int) -> list[float]:
    """Ratios (images/s from memory) / (images/s from the files) of alternated training epochs."""
    tasks = {mode: training_task(data, mode, workers=2, batch_size=16) for mode in ("ram", "off")}
    model, optimizer = alexnet_to_train(len(tasks["ram"].classes))
    cpu = torch.device("cpu")
    train_one_epoch(model, optimizer, tasks["ram"], cpu, "warm-up")
    ratios = []
    for pair in range(pairs):
        rate = {}
        for mode in ("ram", "off") if pair % 2 == 0 else ("off", "ram"):  # each first in turn
            tic = time.perf_counter()
            train_one_epoch(model, optimizer, tasks[mode], cpu, mode)
            rate[mode] = len(tasks[mode].train.dataset) / (time.perf_counter() - tic)
        ratios.append(rate["ram"] / rate["off"])
        print(f"pair {pair + 1}: memory {rate['ram']:.1f}, files {rate['off']:.1f} images/s, ratio {ratios[-1]:.3f}")
    return ratios


def print_paired(ratios: list[float]) -> None:
    above = sum(r >= 1 for r in ratios)
    median = statistics.median(ratios)
    print(
        f"memory / files: median {median:.3f}, {min(ratios):.3f}-{max(ratios):.3f}, {above} of {len(ratios)} pairs >= 1"
    )


def alternated_runs(data: Path, models: Path, variants: dict, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """(images/s, wall s) of each variant's runs, in rounds, each variant first in turn."""
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    names = list(variants)
    for round_no in range(rounds):
        for name in names[round_no % len(names) :] + names[: round_no % len(names)]:
            program, extra = variants[name]
            rate, wall = run(program, data, models, extra)
            measured[name].append((rate, wall))
            print(f"round {round_no + 1}: {name}: {rate:.1f} images/s, {wall:.1f} s", flush=True)
    return measured


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--rounds", type=at_least(1, int), default=2, help="runs per variant, alternated (default: %(default)s)"
    )
    p.add_argument("--before", type=Path, default=None, help="another checkout's main.py as a variant (default: none)")
    p.add_argument(
        "--paired",
        type=at_least(0, int),
        default=0,
        help="pairs of epochs in one process instead (default: %(default)s)",
    )
    args = p.parse_args(argv)
    variants = {"--cache ram": (REPO, ["--cache", "ram"]), "--cache off": (REPO, ["--cache", "off"])}
    if args.before is not None:
        variants[f"{args.before.name} (before)"] = (args.before.resolve(), [])
    with tempfile.TemporaryDirectory() as tmp:
        data = write_standin(Path(tmp) / "Data", train=TRAIN_PER_CLASS, test=10)
        if args.paired:
            return print_paired(paired_epochs(data, args.paired))
        measured = alternated_runs(data, Path(tmp) / "models", variants, args.rounds)
    reference = statistics.median(r for r, _ in measured["--cache off"])
    print("| variant | training images/s | / --cache off | process wall time (s) |\n| --- | ---: | ---: | ---: |")
    for name, values in measured.items():
        rate = statistics.median(r for r, _ in values)
        walls = ", ".join(f"{w:.1f}" for _, w in values)
        print(f"| {name} | {rate:.1f} | {rate / reference:.2f}x | {walls} |")


if __name__ == "__main__":
    main()
