"""Prepare the task sequences of the Memory Aware Synapses experiments (Aljundi et al., ECCV 2018).

Writes ``<data_dir>/Task_i/{train,test}/<class>/<image>`` plus ``<data_dir>/manifest.json``:

- ``tiny-imagenet`` (the default): downloads ``tiny-imagenet-200.zip`` (about 237 MB) into
  ``--download_dir``, resuming a partial download and checking its MD5, extracts it there
  (refusing members that would land outside the folder, and links), shuffles the 200
  classes with ``--seed`` and cuts them into ``--num_tasks`` tasks (4 of 50). Each task
  trains on ``train/<wnid>/images`` and is tested on the labelled ``val`` set; the
  unlabelled ``test`` set is not used. The task folders hard-link the extracted images.
- ``mnist``: Split-MNIST, downloaded through torchvision (which checks the MD5 of every
  file), 5 tasks of 2 digits with the official 60000/10000 train/test split, as PNG files.
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
import hashlib
import os
import random
import re
import shutil
import stat
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import requests
from PIL import Image
from tqdm import tqdm

from utils import UserError
from utils.io_utils import load_json, save_json, save_text, shared_mode

DATASETS = ("tiny-imagenet", "mnist", "digits")
DIGIT_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
MANIFEST = "manifest.json"

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_ROOT = "tiny-imagenet-200"  # the archive's top folder, and the name of the extracted copy
TINY_ZIP = f"{TINY_ROOT}.zip"
EXTRACTED_STAMP = ".extracted-from-md5"  # written last into the extracted copy
# The AlexNet trunk starts from ImageNet weights, so its inputs are normalised as ImageNet's.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CHUNK = 1 << 20
TIMEOUT = (15, 60)  # seconds to connect, and to wait for each piece of the answer

# Flags that only some datasets read: giving one to another dataset is a mistake worth reporting.
DATASET_FLAGS = {
    "seed": ("tiny-imagenet", "digits"),
    "num_tasks": ("tiny-imagenet",),
    "classes_per_task": ("tiny-imagenet",),
    "url": ("tiny-imagenet",),
    "md5": ("tiny-imagenet",),
    "archive": ("tiny-imagenet",),
    "download_dir": ("tiny-imagenet", "mnist"),
}
# Of those, the ones that change the content of the split (recorded in the manifest).
CONTENT_FLAGS = ("seed", "num_tasks", "classes_per_task")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _md5_hex(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{32}", text):
        raise argparse.ArgumentTypeError(f"an MD5 is 32 hexadecimal digits, got {text!r}")
    return text.lower()


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
    p.add_argument(
        "--download_dir",
        default="downloads",
        help="where the Tiny-ImageNet zip, its extracted copy and the MNIST files are kept (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the class split (tiny-imagenet) or of the train/test split (digits) (default: %(default)s)",
    )
    p.add_argument(
        "--num_tasks",
        type=_positive_int,
        default=4,
        help="tiny-imagenet: number of tasks, equal groups of the 200 classes (default: %(default)s)",
    )
    p.add_argument(
        "--classes_per_task",
        type=_positive_int,
        default=None,
        help="tiny-imagenet: keep only the first N classes of each group; all of them when not given "
        "(default: %(default)s)",
    )
    p.add_argument("--url", default=TINY_URL, help="where to download the Tiny-ImageNet zip (default: %(default)s)")
    p.add_argument(
        "--md5", type=_md5_hex, default=TINY_MD5, help="expected MD5 of the Tiny-ImageNet zip (default: %(default)s)"
    )
    p.add_argument(
        "--archive",
        default=None,
        help="use this copy of tiny-imagenet-200.zip instead of downloading it (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="rebuild an existing split (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors (default: %(default)s)")
    return p


def check_flags(args: argparse.Namespace) -> None:
    """Refuse a flag that the chosen dataset would silently ignore."""
    parser = build_parser()
    for flag, datasets in DATASET_FLAGS.items():
        if args.dataset not in datasets and getattr(args, flag) != parser.get_default(flag):
            raise UserError(f"--{flag} does not apply to --dataset {args.dataset} (only to {', '.join(datasets)})")


def split_signature(args: argparse.Namespace) -> dict:
    """The arguments that decide the content of the split (recorded in the manifest)."""
    used = {flag: getattr(args, flag) for flag in CONTENT_FLAGS if args.dataset in DATASET_FLAGS[flag]}
    return {"dataset": args.dataset, **used}


@contextlib.contextmanager
def staging_dir(data_dir: Path) -> Iterator[Path]:
    """A scratch folder beside ``data_dir`` (same file system, so the final move is a rename)."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.building-", dir=data_dir.parent))
    tmp.chmod(shared_mode(directory=True))  # mkdtemp makes 0700 folders; the data is shared
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


# --- Download with resume and MD5 -------------------------------------------------------------


def _errno_reason(text: str) -> str:
    """'Connection refused' out of the nested wrappers of urllib3 and urllib."""
    found = re.search(r"\[Errno -?\d+\] ([^'\"<>()\]\[]+)", text)
    return found.group(1).strip() if found else " ".join(text.split())[:200]


def _request_reason(err: requests.RequestException) -> str:
    if isinstance(err, requests.HTTPError) and err.response is not None:
        return f"HTTP {err.response.status_code} {err.response.reason}"
    if isinstance(err, requests.Timeout):
        return "the server did not answer in time"
    if isinstance(err, requests.exceptions.ChunkedEncodingError):
        return "the connection broke off during the transfer"
    return _errno_reason(str(err))


def hash_file(path: Path) -> hashlib._Hash:
    """MD5 of a file, read in chunks (never whole in memory)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest


def verify_md5(path: Path, expected: str, hint: str) -> None:
    """Hash an existing file once; a mismatch is an error that ends with ``hint``."""
    got = hash_file(path).hexdigest()
    if got != expected:
        raise UserError(
            f"{path} has MD5 {got}, not the expected {expected}; {hint}, or pass --md5 {got} if you trust it"
        )


def _open_part(response: requests.Response, part: Path, done: int) -> int:
    """How many bytes of ``part`` the answer continues: ``done`` for a resume, 0 for the whole file."""
    if done and response.status_code == 206:
        start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        if start and int(start.group(1)) == done:
            return done
        raise UserError(f"{response.url} answered the resume request with another range; delete {part} and retry")
    return 0  # a plain 200: the server ignored the Range header, so start again


def _stream(response: requests.Response, part: Path, digest: hashlib._Hash, done: int) -> None:
    """Append the body to ``part``, hashing it on the way, with a progress bar in bytes."""
    size = response.headers.get("Content-Length")
    total = int(size) + done if size and size.isdigit() else None
    with (
        open(part, "ab" if done else "wb") as out,
        tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name) as bar,
    ):
        for chunk in response.iter_content(CHUNK):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))


def _download_part(url: str, part: Path) -> hashlib._Hash:
    """Bring ``part`` up to the whole file; returns the MD5 of all its bytes."""
    done = part.stat().st_size if part.exists() else 0
    # The bytes already there are hashed once, so the digest covers the whole file at the end.
    digest = hash_file(part) if done else hashlib.md5()
    headers = {"Range": f"bytes={done}-"} if done else {}
    with requests.get(url, stream=True, timeout=TIMEOUT, headers=headers) as response:
        if done and response.status_code == 416:  # the part already holds the whole file
            return digest
        response.raise_for_status()
        kept = _open_part(response, part, done)
        if kept != done:
            digest = hashlib.md5()
        _stream(response, part, digest, kept)
    return digest


def download(url: str, dest: Path, expected_md5: str) -> None:
    """Download ``url`` to ``dest`` through ``dest.part`` (resumed on the next run if cut off)."""
    part = dest.with_name(dest.name + ".part")
    try:
        got = _download_part(url, part).hexdigest()
    except requests.RequestException as err:
        raise UserError(
            f"could not download {url} ({_request_reason(err)}); run again to retry (a partial download "
            f"resumes where it stopped), pass --archive PATH to use a copy of {TINY_ZIP} you already have, "
            "or use --dataset digits for the offline demo"
        ) from err
    except OSError as err:
        raise UserError(f"could not write {part}: {err.strerror or err}; free some space and run again") from err
    if got != expected_md5:
        part.unlink()
        raise UserError(
            f"the file downloaded from {url} has MD5 {got}, not the expected {expected_md5}; deleted it; "
            "run again to download it anew, or check --url and --md5"
        )
    part.rename(dest)


def tiny_archive(args: argparse.Namespace) -> Path:
    """The verified Tiny-ImageNet zip: ``--archive``, the one downloaded before, or a new download."""
    if args.archive:
        archive = Path(args.archive)
        if not archive.is_file():
            raise UserError(f"--archive {archive}: no such file (give the path of a copy of {TINY_ZIP})")
        verify_md5(archive, args.md5, "it is not the expected Tiny-ImageNet archive")
        return archive
    archive = Path(args.download_dir) / TINY_ZIP
    if archive.is_file():
        verify_md5(archive, args.md5, "delete it to download it again")
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    download(args.url, archive, args.md5)
    return archive


# --- Safe extraction ----------------------------------------------------------------------------


def check_member(info: zipfile.ZipInfo, archive: Path) -> None:
    """Refuse (never sanitise) a member that is a link or whose path leaves the target folder."""
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        why = "is a symbolic link"
    elif name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        why = "has an absolute path"
    elif ".." in re.split(r"[\\/]", name):
        why = "has a '..' component that escapes the target folder"
    else:
        return
    raise UserError(f"refusing to extract {archive}: member {name!r} {why}; the archive is damaged or malicious")


def _wanted(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The member's path inside ``tiny-imagenet-200/``, or None for what the split never reads."""
    path = PurePosixPath(info.filename)
    if info.is_dir() or path.parts[:1] != (TINY_ROOT,):
        return None
    inner = path.relative_to(TINY_ROOT)
    return None if inner.parts[:1] == ("test",) else inner  # the unlabelled test set is not used


def _extract(zf: zipfile.ZipFile, target: Path) -> None:
    made: set[Path] = set()
    for info in zf.infolist():
        inner = _wanted(info)
        if inner is None:
            continue
        dest = target / inner
        if dest.parent not in made:
            dest.parent.mkdir(parents=True, exist_ok=True)
            made.add(dest.parent)
        with zf.open(info) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)


def extract_tiny(archive: Path, md5: str, download_dir: Path) -> Path:
    """``<download_dir>/tiny-imagenet-200``, extracted from ``archive`` unless already done from it."""
    dest = download_dir / TINY_ROOT
    stamp = dest / EXTRACTED_STAMP
    if stamp.is_file() and stamp.read_text().strip() == md5:
        return dest
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():  # all of them, before anything is written
                check_member(info, archive)
            with staging_dir(dest) as tmp:
                print(f"extracting {archive} to {dest}")
                _extract(zf, tmp)
                if not (tmp / "wnids.txt").is_file():
                    raise UserError(f"{archive} holds no {TINY_ROOT}/wnids.txt: it is not the Tiny-ImageNet archive")
                save_text(md5 + "\n", tmp / EXTRACTED_STAMP)  # last: marks a complete extraction
                publish(tmp, dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        raise UserError(f"could not read {archive}: {err}; the archive is damaged") from err
    except OSError as err:
        raise UserError(f"could not extract {archive}: {err.strerror or err}") from err
    return dest


# --- Tiny-ImageNet split ------------------------------------------------------------------------


def _read_lines(path: Path) -> list[list[str]]:
    """Tab-separated fields of every non-blank line."""
    if not path.is_file():
        raise UserError(f"{path} is missing: the archive is not a complete Tiny-ImageNet")
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def read_wnids(root: Path) -> list[str]:
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
        "default_arch": "alexnet",
        "defaults": {},  # main.py's built-in defaults are the AlexNet ones
    }


# --- Digit sequences: Split-MNIST and scikit-learn's digits -------------------------------------


def save_png(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels).save(path)


Split = tuple[np.ndarray, np.ndarray, np.ndarray]  # grey uint8 images, their labels, their file numbers


def write_digit_pairs(out: Path, splits: dict[str, Split], width: int) -> list[dict]:
    """The 5 tasks of 2 digits as PNG files named by their number in the source set."""
    tasks = []
    for task_no, pair in enumerate(DIGIT_PAIRS, start=1):
        entry = {"name": f"Task_{task_no}", "classes": [str(d) for d in pair]}
        for split, (pixels, labels, ids) in splits.items():
            count = 0
            for digit in pair:
                folder = out / entry["name"] / split / str(digit)
                folder.mkdir(parents=True)
                for k in np.flatnonzero(labels == digit):
                    save_png(pixels[k], folder / f"{ids[k]:0{width}d}.png")
                    count += 1
            entry[f"num_{split}"] = count
        tasks.append(entry)
    return tasks


def digit_manifest(dataset: str, source: str, tasks: list[dict], size: int, train: np.ndarray, extra: dict) -> dict:
    """The manifest of a grey digit sequence for the MLP; mean/std from the uint8 training pixels."""
    scaled = train.astype(np.float64) / 255.0  # the 0..1 scale of ToTensor
    return {
        "dataset": dataset,
        "source": source,
        "tasks": tasks,
        "image_size": size,
        "channels": 1,
        "mean": [float(scaled.mean())],
        "std": [float(scaled.std())],
        "augment": False,
        "default_arch": "mlp",
        "defaults": {"pretrained": False, "num_freeze_layers": 0, "num_workers": 0, **extra},
    }


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
    splits = {name: (pixels[idx], labels[idx], idx) for name, idx in (("train", train_idx), ("test", test_idx))}
    tasks = write_digit_pairs(out, splits, width=4)
    source = "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, 8x8)"
    # Binary digit tasks are easy: with the seed's lr 0.001 and 10 epochs fine-tuning forgets
    # nothing, so these defaults make forgetting (and what MAS prevents) visible.
    defaults = {"init_lr": 0.02, "num_epochs": 30}
    return digit_manifest("digits", source, tasks, 8, pixels[train_idx], defaults)


def _mnist_download_error(err: RuntimeError, raw: Path) -> UserError:
    from torchvision.datasets import MNIST

    # torchvision's message spans lines: the file, then each mirror tried and its error.
    lines = [line for line in str(err).splitlines() if line.strip()]
    what = lines[0].removeprefix("Error downloading ").rstrip(":")
    return UserError(
        f"could not download MNIST's {what} from {', '.join(MNIST.mirrors)} ({_errno_reason(lines[-1])}); "
        f"run again when online, copy the four MNIST .gz files into {raw}, "
        "or use --dataset digits for the offline demo"
    )


def load_mnist(root: Path, train: bool) -> Split:
    """The official train or test set through torchvision (downloaded once, MD5-checked)."""
    from torchvision.datasets import MNIST

    raw = root / "MNIST" / "raw"
    try:
        dataset = MNIST(str(root), train=train, download=True)
    except RuntimeError as err:
        if str(err).startswith("Error downloading"):
            raise _mnist_download_error(err, raw) from err
        raise UserError(f"could not read the MNIST files in {raw} ({err}); delete them to download them again") from err
    except (AssertionError, KeyError, ValueError) as err:  # torchvision's checks of the IDX headers
        raise UserError(f"the MNIST files in {raw} are corrupt; delete them to download them again") from err
    except OSError as err:
        raise UserError(f"could not write {raw}: {err.strerror or err}") from err
    pixels, labels = dataset.data.numpy(), dataset.targets.numpy()
    return pixels, labels, np.arange(len(labels))


def prepare_mnist(args: argparse.Namespace, out: Path) -> dict:
    """Split-MNIST: 5 tasks of 2 digits, official train/test split, 28x28 grey PNG files."""
    root = Path(args.download_dir)
    splits = {"train": load_mnist(root, train=True), "test": load_mnist(root, train=False)}
    tasks = write_digit_pairs(out, splits, width=5)
    source = "torchvision.datasets.MNIST (official 60000/10000 train/test split)"
    # main.py's learning rate and epochs (0.001, 10) are kept: not tuned on the real MNIST.
    return digit_manifest("mnist", source, tasks, 28, splits["train"][0], {})


PREPARERS: dict[str, Callable[[argparse.Namespace, Path], dict]] = {
    "tiny-imagenet": prepare_tiny_imagenet,
    "mnist": prepare_mnist,
    "digits": prepare_digits,
}


def prepare(args: argparse.Namespace) -> Path:
    data_dir = Path(args.data_dir)
    check_flags(args)
    signature = split_signature(args)
    if existing_split(data_dir, signature, args.force):
        print(f"{data_dir} already holds this split ({signature}); nothing to do (use --force to rebuild)")
        return data_dir
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
    except (UserError, OSError) as err:
        if args.debug:
            raise
        if isinstance(err, OSError):  # disk full, permissions: the half-built split was removed
            err = (
                f"could not write {err.filename or args.data_dir}: {err.strerror or err}; {args.data_dir} is unchanged"
            )
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
