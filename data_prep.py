"""Prepare the task sequences of the Memory Aware Synapses experiments (Aljundi et al., ECCV 2018).

Writes ``<data_dir>/Task_i/{train,test}/<class>/<image>`` plus ``<data_dir>/manifest.json``:

- ``tiny-imagenet`` (the default): downloads ``tiny-imagenet-200.zip`` (about 237 MB) into
  ``--download_dir``, resuming a partial download and checking its MD5, extracts it there
  (refusing members that would land outside the folder, and links), shuffles the 200
  classes with ``--seed`` and cuts them into ``--num_tasks`` tasks (4 of 50). Each task
  trains on ``train/<wnid>/images`` and is tested on the labelled ``val`` set; the
  unlabelled ``test`` set is not used. The task folders hard-link the extracted images.
- ``mnist``: MNIST through torchvision (which checks the MD5 of every file), with the
  official 60000/10000 train/test split, as PNG files.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 real images, no
  download), stratified 70/30 train/test split.
- ``cifar10`` / ``cifar100``: CIFAR through torchvision, official 50000/10000 split, as PNG
  files: Split CIFAR-10 (5 tasks of 2 classes) and Split CIFAR-100 (``--num_tasks`` 10).

``--scenario`` makes three sequences of the digits and of MNIST: ``split`` (5 tasks of 2
digits), ``permuted`` (Permuted MNIST: all 10 digits in every task, each task's pixels in a
fixed random order, task 1 unpermuted) and ``rotated`` (all 10 digits, each task rotated by
a fixed angle).

The folder is built beside its destination and moved into place only when complete,
with the manifest written last, so an interrupted run never leaves a half-written
``Data/``; the hidden folders of a run that was killed are removed by the next one.
A second run with the same arguments finds the finished split and does nothing;
``--force`` rebuilds it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import http.client
import lzma
import os
import pickle
import random
import re
import shutil
import socket
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeVar

import numpy as np
import requests
from PIL import Image
from tqdm import tqdm

from utils import UserError
from utils.io_utils import load_json, save_json, save_text, shared_mode

DATASETS = ("tiny-imagenet", "mnist", "digits", "cifar10", "cifar100")
SCENARIOS = ("split", "permuted", "rotated")
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
RETRY_DELAY = 1.0  # seconds before the second attempt of a download; doubled after each failure
MAX_RETRY_DELAY = 60.0

MAX_SEED = 2**32 - 1  # numpy's and scikit-learn's random_state take seeds below 2**32
MAX_TASKS = 200  # Tiny-ImageNet's 200 classes: no dataset makes more tasks
MAX_RETRIES = 100
# --num_tasks when not given: Tiny-ImageNet as the paper, the others as the literature's sequences.
DEFAULT_NUM_TASKS = {"tiny-imagenet": 4, "mnist": 10, "digits": 5, "cifar100": 10}

# Flags that only some datasets (and scenarios) read: giving one elsewhere is a mistake worth reporting.
ALL, SPLIT, VARIANTS = SCENARIOS, ("split",), ("permuted", "rotated")
DATASET_SCENARIOS = {"mnist": ALL, "digits": ALL}  # the others are split only
_DOWNLOADED = {"tiny-imagenet": SPLIT, "mnist": ALL, "cifar10": SPLIT, "cifar100": SPLIT}
FLAG_SCOPE: dict[str, dict[str, tuple[str, ...]]] = {
    "scenario": {"mnist": ALL, "digits": ALL},
    "seed": {"tiny-imagenet": SPLIT, "mnist": ("permuted",), "digits": ALL},
    "num_tasks": {"tiny-imagenet": SPLIT, "mnist": VARIANTS, "digits": VARIANTS, "cifar100": SPLIT},
    "classes_per_task": {"tiny-imagenet": SPLIT},
    "angles": {"mnist": ("rotated",), "digits": ("rotated",)},
    "url": {"tiny-imagenet": SPLIT},
    "md5": {"tiny-imagenet": SPLIT},
    "archive": {"tiny-imagenet": SPLIT},
    "download_dir": _DOWNLOADED,
    "retries": _DOWNLOADED,
}
# Of those, the ones that change the content of the split (recorded in the manifest).
CONTENT_FLAGS = ("seed", "num_tasks", "classes_per_task", "angles")

T = TypeVar("T")


# --- Command line -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"error: {message} (see --help)\n")


def _whole_number(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # also '', 'nan', '1e3' and numbers of more than 4300 digits
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {text}")
        return value

    return parse


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
    p = _Parser(prog="data_prep.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="tiny-imagenet",
        help="which task sequence to prepare (default: %(default)s)",
    )
    p.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="split",
        help="mnist and digits: split = 5 tasks of 2 digits; permuted = all 10 digits in every task, "
        "each task's pixels in a fixed random order (task 1 unpermuted); rotated = all 10 digits, "
        "each task rotated by a fixed angle (default: %(default)s)",
    )
    p.add_argument("--data_dir", default="Data", help="where the task folders and manifest go (default: %(default)s)")
    p.add_argument(
        "--download_dir",
        default="downloads",
        help="where the downloaded archives and their extracted copies are kept (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=_whole_number(0, MAX_SEED),
        default=0,
        help="seed of the class split (tiny-imagenet), of the train/test split (digits) and of the "
        "permutations (--scenario permuted) (default: %(default)s)",
    )
    p.add_argument(
        "--num_tasks",
        type=_whole_number(1, MAX_TASKS),
        default=None,
        help="number of tasks; when not given 4 for tiny-imagenet (equal groups of the 200 classes), "
        "10 for mnist and 5 for digits (--scenario permuted or rotated), 10 for cifar100 (a divisor "
        "of 100) (default: %(default)s)",
    )
    p.add_argument(
        "--classes_per_task",
        type=_whole_number(1, MAX_TASKS),
        default=None,
        help="tiny-imagenet: keep only the first N classes of each group; all of them when not given "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--angles",
        type=_angle,
        nargs="+",
        default=None,
        metavar="DEGREES",
        help="--scenario rotated: the angle of each task, counter-clockwise; when not given task k of "
        "--num_tasks T is rotated by 180*(k-1)/T degrees (default: %(default)s)",
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
    p.add_argument(
        "--retries",
        type=_whole_number(1, MAX_RETRIES),
        default=3,
        help="attempts of a download that breaks off or times out, with a growing pause between them; "
        "each resumes what is on disk where the server allows (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="rebuild an existing split (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors (default: %(default)s)")
    return p


def _applies(flag: str, args: argparse.Namespace) -> bool:
    return args.scenario in FLAG_SCOPE[flag].get(args.dataset, ())


def _scope_text(scope: dict[str, tuple[str, ...]]) -> str:
    """'tiny-imagenet, mnist --scenario permuted, digits': where a flag applies."""
    where = []
    for dataset in DATASETS:
        if dataset in scope:
            whole = scope[dataset] == DATASET_SCENARIOS.get(dataset, SPLIT)
            where.append(dataset if whole else f"{dataset} --scenario {'/'.join(scope[dataset])}")
    return ", ".join(where)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse a flag that the chosen dataset (and scenario) would silently ignore."""
    parser = build_parser()
    chosen = f"--dataset {args.dataset}"
    if args.dataset in DATASET_SCENARIOS:
        chosen += f" --scenario {args.scenario}"
    for flag, scope in FLAG_SCOPE.items():
        if not _applies(flag, args) and getattr(args, flag) != parser.get_default(flag):
            raise UserError(f"--{flag} does not apply to {chosen} (only to {_scope_text(scope)})")


def resolve_flags(args: argparse.Namespace) -> None:
    """Fill in the dataset-dependent defaults (--num_tasks, --angles) and check what needs no data."""
    if args.angles is not None:
        if args.num_tasks is not None and args.num_tasks != len(args.angles):
            raise UserError(
                f"--num_tasks {args.num_tasks} does not match the {len(args.angles)} --angles given; "
                "give one angle per task, or leave out --num_tasks"
            )
        args.num_tasks = len(args.angles)
    if args.num_tasks is None and _applies("num_tasks", args):
        args.num_tasks = DEFAULT_NUM_TASKS[args.dataset]
    if args.scenario == "rotated" and args.angles is None:
        args.angles = [180 * k / args.num_tasks for k in range(args.num_tasks)]
    if args.dataset == "cifar100" and 100 % args.num_tasks:
        raise UserError(
            f"--num_tasks {args.num_tasks} does not divide CIFAR-100's 100 classes into equal groups "
            "(10 or 20 as in the literature, 5 as Hsu et al. 2018)"
        )


def split_signature(args: argparse.Namespace) -> dict:
    """The arguments that decide the content of the split (recorded in the manifest).

    ``scenario`` is recorded only when it is not ``split``, so that a split made before the
    scenarios existed is still recognised as the same one.
    """
    signature: dict = {"dataset": args.dataset}
    if args.scenario != "split":
        signature["scenario"] = args.scenario
    signature.update({flag: getattr(args, flag) for flag in CONTENT_FLAGS if _applies(flag, args)})
    return signature


# --- Staging folders: built beside the destination, locked while alive ---------------------------


def _lock(fd: int) -> bool:
    """Take the flock of an open folder without waiting; False when another process holds it
    (or when the file system has no locks, where nobody can tell whether its owner lives)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _flocked(folder: Path) -> Iterator[None]:
    """Hold the flock of ``folder`` (by its inode, so across renames) for the block."""
    fd = None
    with contextlib.suppress(OSError):  # not a folder (any more): nothing to hold
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if fd is not None:
            _lock(fd)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


@contextlib.contextmanager
def staging_dir(data_dir: Path) -> Iterator[Path]:
    """A scratch folder ``.<name>.building-*`` beside ``data_dir`` (same file system, so the final
    move is a rename), flock-ed for its whole life: the kernel drops the lock when this process
    dies, however it dies, which is how a later run tells an abandoned folder from a live one.
    It is made under another name and renamed once locked, so that no run ever sees it unlocked."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{data_dir.name}.new-"
    fresh = Path(tempfile.mkdtemp(prefix=prefix, dir=data_dir.parent))
    staged = data_dir.with_name(f".{data_dir.name}.building-{fresh.name[len(prefix) :]}")
    with _flocked(fresh):
        try:
            fresh.rename(staged)
        except OSError:
            fresh.rmdir()
            raise
        try:
            staged.chmod(shared_mode(directory=True))  # mkdtemp makes 0700 folders; the data is shared
            yield staged
        finally:
            shutil.rmtree(staged, ignore_errors=True)


def publish(staged: Path, data_dir: Path) -> None:
    """Move a complete split into place; an old one (``--force``) is removed only afterwards.

    The old split stays locked while it is ``.<name>.old-*``, so no other run removes it in the
    instant when it is the only copy."""
    if not data_dir.exists():
        staged.rename(data_dir)
        return
    old = data_dir.with_name(f".{data_dir.name}.old-{staged.name}")
    with _flocked(data_dir):
        data_dir.rename(old)
        try:
            staged.rename(data_dir)
        except BaseException:  # an error, or Ctrl-C between the two renames: the old split goes back
            old.rename(data_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_staging(target: Path) -> None:
    """Remove the ``.<name>.building-*`` and ``.<name>.old-*`` folders beside ``target`` that a
    killed data_prep.py left; a folder whose owner is alive (its lock is held) is left alone."""
    prefixes = (f".{target.name}.building-", f".{target.name}.old-")
    try:
        entries = [e for e in os.scandir(target.parent) if e.name.startswith(prefixes)]
    except OSError:  # no such folder: nothing was left there
        return
    for entry in entries:
        folder = target.parent / entry.name
        if not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if _lock(fd):
                print(f"removing {folder}, left behind by an interrupted data_prep.py")
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)


def check_folders(args: argparse.Namespace) -> None:
    """A folder flag that names a file would fail deep inside; say so first."""
    flags = ["data_dir"] + (["download_dir"] if _applies("download_dir", args) else [])
    for flag in flags:
        path = Path(getattr(args, flag))
        nearest = next((p for p in (path, *path.parents) if p.exists()), None)  # itself, or what holds it
        if nearest is not None and not nearest.is_dir():
            where = f"{path} is" if nearest == path else f"{path}: {nearest} is"
            raise UserError(f"--{flag} {where} a file, not a folder; choose another --{flag}")


def existing_split(data_dir: Path, signature: dict, force: bool) -> bool:
    """True when ``data_dir`` already holds this split; an error when it holds something else.

    ``--force`` replaces a split of this program, nothing else: a folder with anything besides
    ``manifest.json`` and ``Task_<n>`` folders is refused, with or without it (it may be the
    user's own data, a models folder or their home)."""
    if not data_dir.exists():
        return False
    manifest = check_only_a_split(data_dir)
    if force or manifest is None:  # None: an empty folder
        return False
    prepared = manifest["prepared_with"]
    if prepared != signature:
        raise UserError(
            f"{data_dir} already holds a split made with {prepared}, not {signature}; "
            "pass --force to replace it, or choose another --data_dir"
        )
    return True


def check_only_a_split(data_dir: Path) -> dict | None:
    """An error unless ``data_dir`` is empty or holds only what data_prep.py writes there; its
    manifest (None when empty)."""
    entries = sorted(os.scandir(data_dir), key=lambda e: e.name)
    if not entries:
        return None
    if MANIFEST not in {e.name for e in entries}:
        raise UserError(
            f"{data_dir} exists and holds no {MANIFEST}: it is not a split of data_prep.py, "
            "so it is not replaced; move it away or choose another --data_dir"
        )
    manifest = load_json(data_dir / MANIFEST)
    if not isinstance(manifest, dict) or "prepared_with" not in manifest:
        raise UserError(
            f"{data_dir / MANIFEST} was not written by data_prep.py, so {data_dir} is not replaced; "
            "move it away or choose another --data_dir"
        )
    for entry in entries:
        is_task = entry.is_dir(follow_symlinks=False) and re.fullmatch(r"Task_\d+", entry.name)
        if not (is_task or (entry.name == MANIFEST and entry.is_file(follow_symlinks=False))):
            raise UserError(
                f"{data_dir} holds {entry.name}, which data_prep.py does not write there, so it is not "
                "replaced; move that away, or choose another --data_dir"
            )
    return manifest


# --- Retries -----------------------------------------------------------------------------------


def with_retries(attempt: Callable[[], T], retries: int, retry_reason: Callable[[Exception], str | None]) -> T:
    """``attempt()`` up to ``retries`` times, pausing RETRY_DELAY, then twice as long each time.

    ``retry_reason`` says why an error is worth another attempt (a dropped connection, a
    timeout), or None for one that would fail again (a missing file); the last error is raised.
    """
    for number in range(1, retries + 1):
        try:
            return attempt()
        except Exception as err:
            reason = retry_reason(err)
            if number == retries or reason is None:
                raise
            delay = min(RETRY_DELAY * 2 ** (number - 1), MAX_RETRY_DELAY)
            print(f"download failed ({reason}); attempt {number + 1} of {retries} in {delay:g} s")
            time.sleep(delay)
    raise AssertionError("unreachable: retries >= 1")


def _retryable_status(status: int) -> bool:
    """Server errors and 'too many requests' may pass; other HTTP errors will not."""
    return status >= 500 or status in (408, 429)


# --- Download with resume and MD5 -------------------------------------------------------------


def _errno_reason(text: str) -> str:
    """'Connection refused' out of the nested wrappers of urllib3 and urllib."""
    found = re.search(r"\[Errno -?\d+\] ([^'\"<>()\]\[]+)", text)
    return found.group(1).strip() if found else " ".join(text.split())[:200]


def _request_reason(err: requests.RequestException) -> str:
    malformed = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema)
    if isinstance(err, malformed):
        return "not a valid http:// or https:// address"  # our words: requests' own wording changes between releases
    if isinstance(err, requests.HTTPError) and err.response is not None:
        return f"HTTP {err.response.status_code} {err.response.reason}"
    if isinstance(err, requests.Timeout) or "Read timed out" in str(err):  # a stall mid-body: a ConnectionError
        return "the server did not answer in time"
    if isinstance(err, requests.exceptions.ChunkedEncodingError):
        return "the connection broke off during the transfer"
    return _errno_reason(str(err))


def _request_retry_reason(err: Exception) -> str | None:
    if isinstance(err, requests.HTTPError):
        status = err.response.status_code if err.response is not None else 0
        return _request_reason(err) if _retryable_status(status) else None
    if isinstance(err, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        return _request_reason(err)
    return None


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


def download(url: str, dest: Path, expected_md5: str, retries: int = 1) -> None:
    """Download ``url`` to ``dest`` through ``dest.part``; a transfer that breaks off or stalls is
    attempted ``retries`` times in all, each resuming from what is on disk (and so is a rerun)."""
    part = dest.with_name(dest.name + ".part")
    try:
        got = with_retries(lambda: _download_part(url, part).hexdigest(), retries, _request_retry_reason)
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
    download(args.url, archive, args.md5, args.retries)
    return archive


# --- torchvision's downloaders (MNIST, CIFAR): a timeout and retries around them ----------------

# What urllib raises when the network fails; torchvision lets most of them through.
NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)
# What a damaged .gz or .tar.gz raises while it is unpacked.
UNPACK_ERRORS = (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error)
TORCHVISION_MD5_ERROR = "File not found or corrupted."  # torchvision's words for an MD5 mismatch
MD5_NOTE = "the file is incomplete or damaged: its MD5 does not match"


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """torchvision's urllib calls take no timeout: every socket opened meanwhile gets this one."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _urllib_reason(err: BaseException) -> str:
    """'Connection refused', 'HTTP 404 Not Found', ... out of what urllib and torchvision raise."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException):
        err = err.reason
    text = str(err)
    if isinstance(err, RuntimeError):  # MNIST's: each mirror tried and its error, the last one last
        text = ([line for line in text.splitlines() if line.strip()] or [text])[-1]
    if isinstance(err, TimeoutError) or text.endswith("timed out>") or text == "timed out":
        return "the server did not answer in time"
    if isinstance(err, (http.client.IncompleteRead, ConnectionResetError)):
        return "the connection broke off during the transfer"
    return _errno_reason(text)


def _torchvision_retry_reason(err: Exception) -> str | None:
    if isinstance(err, urllib.error.HTTPError):
        return _urllib_reason(err) if _retryable_status(err.code) else None
    if isinstance(err, NETWORK_ERRORS):
        return _urllib_reason(err)
    text = str(err) if isinstance(err, RuntimeError) else ""
    if text.startswith("Error downloading"):  # MNIST's summary of its mirrors
        statuses = [int(code) for code in re.findall(r"got:\nHTTP Error (\d+)", text)]
        tried = text.count("got:\n")
        if statuses and len(statuses) == tried and not any(map(_retryable_status, statuses)):
            return None
        reason = _urllib_reason(err)
        return MD5_NOTE if reason == TORCHVISION_MD5_ERROR else reason
    # urllib ends a body cut short without an error: the MD5 check is where it shows.
    return MD5_NOTE if text.startswith(TORCHVISION_MD5_ERROR) else None


def fetch_torchvision(build: Callable[[], T], retries: int) -> T:
    """``build()`` (a torchvision dataset with download=True) with a socket timeout and retries."""
    with socket_timeout(max(TIMEOUT)):
        return with_retries(build, retries, _torchvision_retry_reason)


# --- Safe extraction ----------------------------------------------------------------------------

# What reading a damaged zip member raises: bad CRC or header, a broken deflate / bzip2 / lzma
# stream (bz2 raises OSError), an unsupported method or flag, an encrypted member.
MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, NotImplementedError, RuntimeError)


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


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path, src=None):
    """``zf.open(info)`` (without ``src``), else the next chunk of ``src``; an error names the member."""
    try:
        return zf.open(info) if src is None else src.read(CHUNK)
    except MEMBER_ERRORS as err:
        raise UserError(
            f"could not read member {info.filename!r} of {archive} ({_first_line(err)}); the archive is "
            "damaged: delete it to download it again, or give another --archive"
        ) from err


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, archive: Path) -> None:
    """Copy one member; errors while writing (the disk, not the archive) pass unchanged."""
    with _read_member(zf, info, archive) as src, open(dest, "wb") as out:
        while chunk := _read_member(zf, info, archive, src):
            out.write(chunk)


def _extract(zf: zipfile.ZipFile, target: Path, archive: Path) -> None:
    made: set[Path] = set()
    for info in zf.infolist():
        inner = _wanted(info)
        if inner is None:
            continue
        dest = target / inner
        if dest.parent not in made:
            dest.parent.mkdir(parents=True, exist_ok=True)
            made.add(dest.parent)
        _copy_member(zf, info, dest, archive)


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
                _extract(zf, tmp, archive)
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
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not text: the archive is damaged") from err
    return [line.split("\t") for line in text.splitlines() if line.strip()]


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


# --- Writing image tasks (digits, MNIST, CIFAR) ------------------------------------------------


def save_png(pixels: np.ndarray, path: Path) -> None:
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


# --- Digit sequences: MNIST and scikit-learn's digits, split / permuted / rotated ------------------

ALL_DIGITS = {d: str(d) for d in range(10)}
DIGITS_SOURCE = "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, 8x8)"
MNIST_SOURCE = "torchvision.datasets.MNIST (official 60000/10000 train/test split)"
# Binary digit tasks are easy: with the seed's lr 0.001 and 10 epochs fine-tuning forgets
# nothing, so these defaults make forgetting (and what MAS prevents) visible.
DIGITS_DEFAULTS = {"init_lr": 0.02, "num_epochs": 30}


def grey_stats(train: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean/std of the uint8 training pixels of a split sequence, summed in floating point as
    before the scenarios existed, so that its manifest stays byte-identical."""
    scaled = train.astype(np.float64) / 255.0  # the 0..1 scale of ToTensor
    return [float(scaled.mean())], [float(scaled.std())]


def digit_manifest(dataset: str, source: str, tasks: list[dict], size: int, stats: tuple, extra: dict) -> dict:
    """The manifest of a grey digit sequence for the MLP."""
    return {
        "dataset": dataset,
        "source": source,
        "tasks": tasks,
        "image_size": size,
        "channels": 1,
        "mean": stats[0],
        "std": stats[1],
        "augment": False,
        "default_arch": "mlp",
        "defaults": {"pretrained": False, "num_freeze_layers": 0, "num_workers": 0, **extra},
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
    args: argparse.Namespace, out: Path, splits: dict[str, Split], source: str, width: int, defaults: dict
) -> dict:
    """Split (5 tasks of 2 digits), permuted or rotated tasks of grey digit images."""
    size = splits["train"][0].shape[1]
    if args.scenario == "split":
        tasks, _ = write_tasks(out, splits, [TaskSpec({d: str(d) for d in pair}) for pair in DIGIT_PAIRS], width)
        return digit_manifest(args.dataset, source, tasks, size, grey_stats(splits["train"][0]), defaults)
    specs, note = variant_specs(args, size)
    tasks, histograms = write_tasks(out, splits, specs, width)
    manifest = digit_manifest(args.dataset, f"{source}; {note}", tasks, size, histogram_stats(histograms), defaults)
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
    return prepare_digit_sequence(args, out, splits, DIGITS_SOURCE, 4, DIGITS_DEFAULTS)


def _mnist_error(err: Exception, raw: Path) -> UserError:
    """One line for whatever torchvision's MNIST raised (its messages span lines)."""
    from torchvision.datasets import MNIST

    text = str(err)
    if isinstance(err, RuntimeError) and text.startswith("Error downloading"):
        what = f"MNIST's {text.splitlines()[0].removeprefix('Error downloading ').rstrip(':')}"
    elif isinstance(err, NETWORK_ERRORS):  # a transfer that broke off or stalled: torchvision lets it through
        what = "the MNIST files"
    elif isinstance(err, UNPACK_ERRORS):
        return UserError(
            f"could not unpack the MNIST .gz files in {raw} ({_first_line(err)}); delete them to download them again"
        )
    elif isinstance(err, RuntimeError):
        return UserError(
            f"could not read the MNIST files in {raw} ({_first_line(err)}); delete them to download them again"
        )
    elif isinstance(err, (AssertionError, KeyError, ValueError)):  # torchvision's checks of the IDX headers
        return UserError(f"the MNIST files in {raw} are corrupt; delete them to download them again")
    else:
        return UserError(f"could not write {raw}: {getattr(err, 'strerror', None) or err}")
    return UserError(
        f"could not download {what} from {', '.join(MNIST.mirrors)} ({_urllib_reason(err)}); run again when "
        f"online, copy the four MNIST .gz files into {raw}, or use --dataset digits for the offline demo"
    )


def load_mnist(root: Path, train: bool, retries: int = 1) -> Split:
    """The official train or test set through torchvision (downloaded once, MD5-checked)."""
    from torchvision.datasets import MNIST

    try:
        dataset = fetch_torchvision(lambda: MNIST(str(root), train=train, download=True), retries)
    except (RuntimeError, AssertionError, KeyError, ValueError, *UNPACK_ERRORS, *NETWORK_ERRORS, OSError) as err:
        raise _mnist_error(err, root / "MNIST" / "raw") from err
    pixels, labels = dataset.data.numpy(), dataset.targets.numpy()
    return pixels, labels, np.arange(len(labels))


def prepare_mnist(args: argparse.Namespace, out: Path) -> dict:
    """MNIST, official train/test split, 28x28 grey PNG files; split (Split-MNIST), permuted or rotated."""
    root = Path(args.download_dir)
    splits = {"train": load_mnist(root, True, args.retries), "test": load_mnist(root, False, args.retries)}
    # main.py's learning rate and epochs (0.001, 10) are kept: not tuned on the real MNIST.
    return prepare_digit_sequence(args, out, splits, MNIST_SOURCE, 5, {})


# --- Split CIFAR-10 / CIFAR-100 -----------------------------------------------------------------

# A class folder name: CIFAR's names are words with '_' (aquarium_fish); refuse anything else.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_ -]*")
# Neither tuned on the real data (not reachable from this repository's machine): SGD with momentum
# 0.9 from scratch, lr x0.1 after 20 epochs as main.py schedules it.
CIFAR_DEFAULTS = {"pretrained": False, "num_freeze_layers": 0, "init_lr": 0.01, "num_epochs": 30, "batch_size": 64}
# What a damaged archive, or damaged files unpacked from it, raise while torchvision reads them.
CIFAR_DAMAGE = (*UNPACK_ERRORS, pickle.UnpicklingError, KeyError, ValueError, TypeError, IndexError, AttributeError)


def _cifar_class(dataset: str):
    from torchvision.datasets import CIFAR10, CIFAR100

    return CIFAR10 if dataset == "cifar10" else CIFAR100


def _cifar_error(err: Exception, cls, root: Path) -> UserError:
    archive, folder = root / cls.filename, root / cls.base_folder
    if isinstance(err, RuntimeError) and str(err).startswith(TORCHVISION_MD5_ERROR) and archive.is_file():
        got = hash_file(archive).hexdigest()
        archive.unlink()
        return UserError(
            f"the file downloaded from {cls.url} has MD5 {got}, not the expected {cls.tgz_md5}; deleted it; "
            "run again to download it anew"
        )
    if isinstance(err, NETWORK_ERRORS):
        return UserError(
            f"could not download {cls.url} ({_urllib_reason(err)}); run again to retry, copy {cls.filename} into "
            f"{root} from a machine that has it, or use --dataset digits for the offline demo"
        )
    if isinstance(err, (*CIFAR_DAMAGE, RuntimeError)):  # RuntimeError: an unpacked file fails its MD5
        return UserError(
            f"could not read {archive} or the files unpacked from it in {folder} ({_first_line(err)}); "
            "they are damaged: delete both to download them again"
        )
    return UserError(f"could not write {root}: {getattr(err, 'strerror', None) or err}")


def load_cifar(dataset: str, root: Path, train: bool, retries: int) -> tuple[Split, list[str]]:
    """CIFAR's official train or test set (HWC uint8 images) and its class names, through torchvision."""
    cls = _cifar_class(dataset)
    try:
        data = fetch_torchvision(lambda: cls(str(root), train=train, download=True), retries)
    except (RuntimeError, *CIFAR_DAMAGE, *NETWORK_ERRORS, OSError) as err:
        raise _cifar_error(err, cls, root) from err
    pixels, labels, names = np.asarray(data.data), np.asarray(data.targets), list(data.classes)
    count = 10 if dataset == "cifar10" else 100
    sane = len(names) == len(set(names)) == count and all(isinstance(n, str) and SAFE_NAME.fullmatch(n) for n in names)
    if not sane or pixels.dtype != np.uint8 or len(labels) != len(pixels) or not np.isin(labels, range(count)).all():
        raise UserError(
            f"the CIFAR files in {root / cls.base_folder} are not CIFAR's; delete them to download them again"
        )
    return (pixels, labels, np.arange(len(labels))), names


def prepare_cifar(args: argparse.Namespace, out: Path) -> dict:
    """Split CIFAR-10 (5 tasks of 2 classes) or CIFAR-100 (--num_tasks equal groups), classes in label order."""
    root = Path(args.download_dir)
    train, names = load_cifar(args.dataset, root, True, args.retries)
    test, _ = load_cifar(args.dataset, root, False, args.retries)
    num_tasks = 5 if args.dataset == "cifar10" else args.num_tasks
    group = len(names) // num_tasks
    specs = [TaskSpec({label: names[label] for label in range(k * group, (k + 1) * group)}) for k in range(num_tasks)]
    tasks, histograms = write_tasks(out, {"train": train, "test": test}, specs, width=5)
    mean, std = histogram_stats(histograms)
    return {
        "dataset": args.dataset,
        "source": f"torchvision.datasets.{_cifar_class(args.dataset).__name__} (official 50000/10000 train/test split)",
        "tasks": tasks,
        "image_size": 32,
        "channels": 3,
        "mean": mean,
        "std": std,
        "augment": False,
        "default_arch": "convnet",
        "defaults": dict(CIFAR_DEFAULTS),
    }


PREPARERS: dict[str, Callable[[argparse.Namespace, Path], dict]] = {
    "tiny-imagenet": prepare_tiny_imagenet,
    "mnist": prepare_mnist,
    "digits": prepare_digits,
    "cifar10": prepare_cifar,
    "cifar100": prepare_cifar,
}


def prepare(args: argparse.Namespace) -> Path:
    data_dir = Path(args.data_dir)
    check_flags(args)
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
        manifest = PREPARERS[args.dataset](args, staged)
        manifest = {**manifest, "num_tasks": len(manifest["tasks"]), "prepared_with": signature}
        save_json(manifest, staged / MANIFEST)  # last: its presence marks a complete split
        publish(staged, data_dir)
    print(f"wrote {manifest['num_tasks']} tasks of {args.dataset} to {data_dir}")
    return data_dir


def _error_line(err: BaseException, data_dir: str) -> str:
    if isinstance(err, KeyboardInterrupt):
        return f"interrupted; {data_dir} is unchanged (run the same command again to finish)"
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError):  # disk full, permissions: the half-built split was removed
        return f"could not write {err.filename or data_dir}: {err.strerror or err}; {data_dir} is unchanged"
    return (
        f"internal error ({type(err).__name__}: {_first_line(err)}); {data_dir} is unchanged; "
        "run with --debug for the traceback and report it"
    )


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    try:
        return prepare(args)
    except (Exception, KeyboardInterrupt) as err:
        if args.debug:
            raise
        print(f"error: {_error_line(err, args.data_dir)}", file=sys.stderr)
        raise SystemExit(130 if isinstance(err, KeyboardInterrupt) else 1) from None


if __name__ == "__main__":
    main()
