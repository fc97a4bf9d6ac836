"""Tiny-ImageNet, the paper's task sequence: ``tiny-imagenet-200.zip`` (downloaded with resume, or
``--archive``, MD5-checked), extracted once into ``--download_dir`` (stamped with the archive's MD5),
its 200 classes shuffled with ``--seed`` and cut into ``--num_tasks`` equal groups. Each task trains
on ``train/<wnid>/images`` and is tested on the labelled ``val`` set (the unlabelled ``test`` set is
not used); the task folders hard-link the extracted images (copies across file systems).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from mas_data.download import download, verify_md5
from mas_data.extract import check_members, extract_members
from mas_data.staging import publish, staging_dir
from utils import UserError
from utils.artefacts.files import save_text

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_ROOT = "tiny-imagenet-200"  # the archive's top folder, and the name of the extracted copy
TINY_ZIP = f"{TINY_ROOT}.zip"
EXTRACTED_STAMP = ".extracted-from-md5"  # written last into the extracted copy
# The AlexNet trunk starts from ImageNet weights, so its inputs are normalised as ImageNet's.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# How to do without the download, at the end of its error.
OFFLINE_HINT = (
    f"pass --archive PATH to use a copy of {TINY_ZIP} you already have, or use --dataset digits for the offline demo"
)


def tiny_archive(args: argparse.Namespace) -> Path:
    """The verified Tiny-ImageNet zip: ``--archive``, the one downloaded before, or a new download."""
    if args.archive:
        archive = Path(args.archive)
        if archive.is_dir():
            raise UserError(f"--archive {archive} is a folder; give the path of a copy of {TINY_ZIP}")
        if not archive.is_file():
            raise UserError(f"--archive {archive}: no such file (give the path of a copy of {TINY_ZIP})")
        verify_md5(archive, args.md5, "it is not the expected Tiny-ImageNet archive")
        return archive
    archive = Path(args.download_dir) / TINY_ZIP
    if archive.is_file():
        verify_md5(archive, args.md5, "delete it to download it again")
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    download(args.url, archive, args.md5, args.retries, OFFLINE_HINT)
    return archive


def _wanted(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The member's path inside ``tiny-imagenet-200/``, or None for what the split never reads."""
    path = PurePosixPath(info.filename)
    if info.is_dir() or path.parts[:1] != (TINY_ROOT,):
        return None
    inner = path.relative_to(TINY_ROOT)
    return None if inner.parts[:1] == ("test",) else inner  # the unlabelled test set is not used


def extract_tiny(archive: Path, md5: str, download_dir: Path) -> Path:
    """``<download_dir>/tiny-imagenet-200``, extracted from ``archive`` unless already done from it."""
    dest = download_dir / TINY_ROOT
    stamp = dest / EXTRACTED_STAMP
    if stamp.is_file() and stamp.read_text().strip() == md5:
        return dest
    try:
        with zipfile.ZipFile(archive) as zf:
            check_members(zf, archive)
            with staging_dir(dest) as tmp:
                print(f"extracting {archive} to {dest}")
                extract_members(zf, tmp, archive, _wanted)
                if not (tmp / "wnids.txt").is_file():
                    raise UserError(f"{archive} holds no {TINY_ROOT}/wnids.txt: it is not the Tiny-ImageNet archive")
                save_text(md5 + "\n", tmp / EXTRACTED_STAMP)  # last: marks a complete extraction
                publish(tmp, dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        raise UserError(f"could not read {archive}: {err}; the archive is damaged") from err
    except OSError as err:
        raise UserError(f"could not extract {archive}: {err.strerror or err}") from err
    return dest


def _read_lines(path: Path) -> list[list[str]]:
    """Tab-separated fields of every non-blank line."""
    if not path.is_file():
        raise UserError(f"{path} is missing: the archive is not a complete Tiny-ImageNet")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not text: the archive is damaged") from err
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def read_wnids(root: Path) -> list[str]:
    """The class ids of wnids.txt, each once."""
    wnids = [fields[0] for fields in _read_lines(root / "wnids.txt")]
    if len(set(wnids)) != len(wnids):
        raise UserError(f"{root / 'wnids.txt'} lists a class twice: the archive is damaged")
    return wnids


def read_val_labels(root: Path, wnids: list[str]) -> dict[str, list[str]]:
    """wnid -> file names of its labelled validation images (the tasks' test sets)."""
    val: dict[str, list[str]] = {wnid: [] for wnid in wnids}
    path = root / "val" / "val_annotations.txt"
    for fields in _read_lines(path):
        if len(fields) < 2 or fields[1] not in val:
            raise UserError(f"{path}: unexpected line {chr(9).join(fields)!r}")
        if not (root / "val" / "images" / fields[0]).is_file():
            raise UserError(f"{path} lists {fields[0]}, which is not in {root / 'val' / 'images'}")
        val[fields[1]].append(fields[0])
    empty = [wnid for wnid, files in val.items() if not files]
    if empty:
        raise UserError(f"{path} labels no image of class {empty[0]}")
    return val


def read_class_names(root: Path, wnids: list[str]) -> dict[str, str]:
    """wnid -> its human-readable name from words.txt (which lists all 82115 ImageNet synsets)."""
    names = {fields[0]: fields[1] for fields in _read_lines(root / "words.txt") if len(fields) >= 2}
    missing = [wnid for wnid in wnids if wnid not in names]
    if missing:
        raise UserError(f"{root / 'words.txt'} has no name for class {missing[0]}")
    return {wnid: names[wnid] for wnid in wnids}


def split_classes(wnids: list[str], seed: int, num_tasks: int, per_task: int | None) -> list[list[str]]:
    """Shuffle the classes with ``seed``, cut them into equal groups, keep the first ``per_task``."""
    if len(wnids) % num_tasks:
        raise UserError(f"--num_tasks {num_tasks} does not divide the {len(wnids)} classes into equal groups")
    group = len(wnids) // num_tasks
    if per_task is not None and per_task > group:
        raise UserError(
            f"--classes_per_task {per_task} is more than the {group} classes of each of the {num_tasks} tasks"
        )
    order = sorted(wnids)  # independent of the order of wnids.txt
    random.Random(seed).shuffle(order)
    return [sorted(order[start : start + (per_task or group)]) for start in range(0, len(order), group)]


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link costs no disk; across file systems (or where links are refused) copy instead."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_all(files: Iterable[Path], folder: Path) -> int:
    """Link (or copy) ``files`` into a new ``folder``; how many."""
    folder.mkdir(parents=True)
    count = 0
    for src in files:
        link_or_copy(src, folder / src.name)
        count += 1
    return count


def _train_images(root: Path, wnid: str) -> list[Path]:
    folder = root / "train" / wnid / "images"
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() == ".jpeg") if folder.is_dir() else []
    if not files:
        raise UserError(f"{folder} holds no JPEG images: the archive is incomplete")
    return files


def write_tiny_task(root: Path, out: Path, name: str, wnids: list[str], val: dict, names: dict) -> dict:
    """Link one task's train images and labelled val images; its manifest entry."""
    entry = {"name": name, "classes": wnids, "class_names": [names[w] for w in wnids], "num_train": 0, "num_test": 0}
    for wnid in wnids:
        entry["num_train"] += link_all(_train_images(root, wnid), out / name / "train" / wnid)
        entry["num_test"] += link_all((root / "val" / "images" / f for f in val[wnid]), out / name / "test" / wnid)
    return entry


def prepare_tiny_imagenet(args: argparse.Namespace, out: Path) -> dict:
    """Tasks of Tiny-ImageNet classes: train from train/<wnid>/images, test from the labelled val set."""
    archive = tiny_archive(args)
    root = extract_tiny(archive, args.md5, Path(args.download_dir))
    wnids = read_wnids(root)
    names = read_class_names(root, wnids)
    val = read_val_labels(root, wnids)
    groups = split_classes(wnids, args.seed, args.num_tasks, args.classes_per_task)
    tasks = [write_tiny_task(root, out, f"Task_{i}", g, val, names) for i, g in enumerate(groups, start=1)]
    return {
        "dataset": "tiny-imagenet",
        "source": f"{TINY_ZIP} (MD5 {args.md5}): train/<wnid>/images for training, the labelled val set for testing",
        "tasks": tasks,
        "image_size": 64,
        "channels": 3,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "augment": True,
    }
