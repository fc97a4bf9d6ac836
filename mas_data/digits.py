"""Digit sequences for the MLP, shared by scikit-learn's 8x8 digits (here) and MNIST (``mnist``):
``split`` (5 tasks of 2 digits), ``permuted`` (Permuted MNIST: all 10 digits in every task, each
task's pixels in a fixed random order drawn with --seed, task 1 unpermuted) and ``rotated`` (all
10 digits, each task rotated by its angle). The digits themselves are 1797 real images bundled
with scikit-learn (no download), split 70/30 train/test, stratified, with --seed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from mas_data.image_tasks import Split, TaskSpec, histogram_stats, write_tasks

DIGIT_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
ALL_DIGITS = {d: str(d) for d in range(10)}
DIGITS_SOURCE = "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, 8x8)"


def grey_stats(train: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean/std of the uint8 training pixels of a split sequence, summed in floating point as
    before the scenarios existed, so that its manifest stays byte-identical."""
    scaled = train.astype(np.float64) / 255.0  # the 0..1 scale of ToTensor
    return [float(scaled.mean())], [float(scaled.std())]


def digit_manifest(dataset: str, source: str, tasks: list[dict], size: int, stats: tuple) -> dict:
    """The manifest of a grey digit sequence (main.py's presets for it are in presets.py)."""
    return {
        "dataset": dataset,
        "source": source,
        "tasks": tasks,
        "image_size": size,
        "channels": 1,
        "mean": stats[0],
        "std": stats[1],
        "augment": False,
    }


def permutations(num_tasks: int, num_pixels: int, seed: int) -> list[np.ndarray]:
    """Task 1 keeps the pixel order; every later task gets its own random order, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    return [np.arange(num_pixels)] + [rng.permutation(num_pixels) for _ in range(num_tasks - 1)]


def permute(order: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Images whose flattened pixel j is pixel ``order[j]`` of the source image."""
    return lambda pixels: pixels.reshape(len(pixels), -1)[:, order].reshape(pixels.shape)


def rotate(angle: float) -> Callable[[np.ndarray], np.ndarray]:
    """Images rotated by ``angle`` degrees counter-clockwise about their centre (PIL's
    ``Image.rotate``, bilinear, same size, black where the corners come from outside)."""

    def apply(pixels: np.ndarray) -> np.ndarray:
        rotated = [np.asarray(Image.fromarray(p).rotate(angle, resample=Image.Resampling.BILINEAR)) for p in pixels]
        return np.stack(rotated) if rotated else pixels

    return apply


def variant_specs(args: argparse.Namespace, size: int) -> tuple[list[TaskSpec], str]:
    """The permuted or rotated tasks (all 10 digits each) and what the source note adds."""
    if args.scenario == "permuted":
        orders = permutations(args.num_tasks, size * size, args.seed)
        specs = [TaskSpec(ALL_DIGITS, permute(order), {"permutation": order.tolist()}) for order in orders]
        return specs, "each task's pixels in the row-major order of its 'permutation' (task 1 unpermuted)"
    specs = [TaskSpec(ALL_DIGITS, rotate(angle), {"angle": angle}) for angle in args.angles]
    return specs, "each task rotated by its 'angle' (degrees counter-clockwise, PIL bilinear, black corners)"


def prepare_digit_sequence(
    args: argparse.Namespace, out: Path, splits: dict[str, Split], source: str, width: int
) -> dict:
    """Split (5 tasks of 2 digits), permuted or rotated tasks of grey digit images."""
    size = splits["train"][0].shape[1]
    if args.scenario == "split":
        tasks, _ = write_tasks(out, splits, [TaskSpec({d: str(d) for d in pair}) for pair in DIGIT_PAIRS], width)
        return digit_manifest(args.dataset, source, tasks, size, grey_stats(splits["train"][0]))
    specs, note = variant_specs(args, size)
    tasks, histograms = write_tasks(out, splits, specs, width)
    manifest = digit_manifest(args.dataset, f"{source}; {note}", tasks, size, histogram_stats(histograms))
    return {"dataset": args.dataset, "scenario": args.scenario, **manifest}


def prepare_digits(args: argparse.Namespace, out: Path) -> dict:
    """scikit-learn's 8x8 digits, stratified 70/30 split drawn with ``--seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are 0..16: scale to 0..255 grey levels.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(index, test_size=0.3, stratify=labels, random_state=args.seed)
    splits = {name: (pixels[idx], labels[idx], idx) for name, idx in (("train", train_idx), ("test", test_idx))}
    return prepare_digit_sequence(args, out, splits, DIGITS_SOURCE, 4)
