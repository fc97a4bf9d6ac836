"""Tasks of small images (digits, MNIST, CIFAR) written as PNG files: ``Task_i/{train,test}/<class>/
<number>.png``, named by the image's number in the source set, with each task's manifest entry,
and the per-channel mean/std of the training pixels computed exactly from their histograms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


def save_png(pixels: np.ndarray, path: Path) -> None:
    """One uint8 image (H,W) or (H,W,3) as a PNG file."""
    Image.fromarray(pixels).save(path)


Split = tuple[np.ndarray, np.ndarray, np.ndarray]  # uint8 images (N,H,W[,3]), their labels, their file numbers


@dataclass
class TaskSpec:
    """One task: its classes (label -> folder name), how its images are made from the source
    images (None: as they are), and what its manifest entry records besides."""

    classes: dict[int, str]
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    extra: dict = field(default_factory=dict)


def write_classes(
    folder: Path, images: np.ndarray, labels: np.ndarray, ids: np.ndarray, spec: TaskSpec, width: int
) -> int:
    """``folder/<class>/<id>.png`` for the images of the task's classes; how many were written."""
    count = 0
    for label, name in spec.classes.items():
        (folder / name).mkdir(parents=True)
        for k in np.flatnonzero(labels == label):
            save_png(images[k], folder / name / f"{ids[k]:0{width}d}.png")
            count += 1
    return count


def pixel_histograms(images: np.ndarray) -> np.ndarray:
    """(channels, 256) counts of every grey level of uint8 images (N,H,W) or (N,H,W,C)."""
    channels = images.reshape(*images.shape[:3], -1)
    return np.stack([np.bincount(channels[..., c].ravel(), minlength=256) for c in range(channels.shape[-1])])


def histogram_stats(counts: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on ToTensor's 0..1 scale, exact from the counts of each level."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(axis=1)
    mean = (counts * levels).sum(axis=1) / total
    var = (counts * (levels - mean[:, None]) ** 2).sum(axis=1) / total
    return [float(m) for m in mean], [float(s) for s in np.sqrt(var)]


def write_tasks(
    out: Path, splits: dict[str, Split], specs: list[TaskSpec], width: int
) -> tuple[list[dict], np.ndarray]:
    """The tasks' folders as PNG files named by their number in the source set; their manifest
    entries and the pixel histograms of every training image written."""
    tasks, histograms = [], 0
    for task_no, spec in enumerate(specs, start=1):
        entry = {"name": f"Task_{task_no}", "classes": list(spec.classes.values())}
        for split, (pixels, labels, ids) in splits.items():
            images = spec.transform(pixels) if spec.transform else pixels
            entry[f"num_{split}"] = write_classes(out / entry["name"] / split, images, labels, ids, spec, width)
            if split == "train":
                histograms = histograms + pixel_histograms(images[np.isin(labels, list(spec.classes))])
        tasks.append({**entry, **spec.extra})
    return tasks, histograms
