"""data_prep.py --dataset tiny-imagenet on a small archive with the real Tiny-ImageNet structure,
served from 127.0.0.1 (download, resume, MD5, zip safety, split, idempotence, main.py on it)."""

from __future__ import annotations

import errno
import hashlib
import http.server
import io
import json
import os
import re
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_prep as dp
from conftest import RangeRequestHandler
from main import main as train_main
from mas_data import download
from mas_data.tiny_imagenet import TINY_ROOT, TINY_ZIP, split_classes
from utils.data.tasks import check_task

# Eight real Tiny-ImageNet classes, listed in wnids.txt out of order as in the real file.
CLASS_NAMES = {
    "n01443537": "goldfish, Carassius auratus",
    "n01629819": "European fire salamander, Salamandra salamandra",
    "n01641577": "bullfrog, Rana catesbeiana",
    "n01644900": "tailed frog, bell toad, ribbed toad, tailed toad, Ascaphus trui",
    "n01698640": "American alligator, Alligator mississipiensis",
    "n01742172": "boa constrictor, Constrictor constrictor",
    "n01768244": "trilobite",
    "n01770393": "scorpion",
}
WNIDS = ["n01768244", "n01443537", "n01770393", "n01629819", "n01742172", "n01641577", "n01698640", "n01644900"]
N_TRAIN, N_VAL = 3, 2
# What --seed 0 --num_tasks 2 gives on these classes (random.Random(0) shuffles the sorted wnids).
SEED0_SPLIT = [
    ["n01629819", "n01641577", "n01698640", "n01742172"],
    ["n01443537", "n01644900", "n01768244", "n01770393"],
]
ROOT = TINY_ROOT


def _jpeg(seed: int, grey: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (64, 64) if grey else (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _val_labels() -> list[tuple[str, str]]:
    """(file, wnid) of the labelled val set, classes interleaved as in the real file."""
    return [(f"val_{i}.JPEG", WNIDS[i % len(WNIDS)]) for i in range(N_VAL * len(WNIDS))]


def write_tiny_zip(path: Path, extra: dict[str | zipfile.ZipInfo, bytes] | None = None) -> Path:
    """tiny-imagenet-200/{wnids.txt, words.txt, train/, val/, test/} with real tiny JPEGs."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{ROOT}/", "")
        zf.writestr(f"{ROOT}/wnids.txt", "".join(f"{w}\n" for w in WNIDS))
        words = {"n00001740": "entity", **CLASS_NAMES, "n15102894": "driftwood"}  # words.txt lists more
        zf.writestr(f"{ROOT}/words.txt", "".join(f"{w}\t{n}\n" for w, n in words.items()))
        for k, wnid in enumerate(WNIDS):
            images = [f"{wnid}_{i}.JPEG" for i in range(N_TRAIN)]
            zf.writestr(f"{ROOT}/train/{wnid}/{wnid}_boxes.txt", "".join(f"{f}\t0\t0\t63\t63\n" for f in images))
            for i, name in enumerate(images):
                zf.writestr(f"{ROOT}/train/{wnid}/images/{name}", _jpeg(100 * k + i, grey=k == 0 and i == 0))
        labels = _val_labels()
        zf.writestr(f"{ROOT}/val/val_annotations.txt", "".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in labels))
        for i, (name, _) in enumerate(labels):
            zf.writestr(f"{ROOT}/val/images/{name}", _jpeg(10_000 + i))
        for i in range(2):
            zf.writestr(f"{ROOT}/test/images/test_{i}.JPEG", _jpeg(20_000 + i))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


@pytest.fixture(autouse=True)
def _fast_retries(fast_retries):
    """Offline and failing servers are retried: without the pauses here."""


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_zip(tmp_path_factory) -> Path:
    return write_tiny_zip(tmp_path_factory.mktemp("zip") / TINY_ZIP)


@pytest.fixture
def served(http_server, tiny_zip, monkeypatch):
    """The archive on 127.0.0.1; yields its URL and the list of Range headers of the requests."""
    root, base_url = http_server
    (root / TINY_ZIP).write_bytes(tiny_zip.read_bytes())
    seen: list[str | None] = []
    send_head = RangeRequestHandler.send_head

    def logged(handler):
        seen.append(handler.headers.get("Range"))
        return send_head(handler)

    monkeypatch.setattr(RangeRequestHandler, "send_head", logged)
    return f"{base_url}/{TINY_ZIP}", seen


def run(tmp_path: Path, *flags: str) -> Path:
    dp.main(["--data_dir", str(tmp_path / "Data"), "--download_dir", str(tmp_path / "dl"), *flags])
    return tmp_path / "Data"


def fails(tmp_path: Path, capsys, *flags: str) -> str:
    """The one error line of a run that must fail with exit code 1."""
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, *flags)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0])
    return errors[0]


def leftovers(*folders: Path) -> list[str]:
    """Scratch folders and partial files that a finished or failed run must not leave."""
    return sorted(
        p.name for f in folders if f.is_dir() for p in f.iterdir() if p.name.startswith(".") or ".part" in p.name
    )


def download_failed(url: str, reason: str) -> str:
    return (
        f"error: could not download {url} ({reason}); run again to retry (a partial download resumes where it "
        f"stopped), pass --archive PATH to use a copy of {TINY_ZIP} you already have, "
        "or use --dataset digits for the offline demo"
    )


def assert_nothing_left(tmp_path: Path) -> None:
    """After a failed download: no Data/, no scratch folder, nothing in the download folder."""
    assert not (tmp_path / "Data").exists()
    assert list((tmp_path / "dl").iterdir()) == []
    assert leftovers(tmp_path) == []


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def expected_tree(split: list[list[str]]) -> set[str]:
    files = {"manifest.json"}
    for t, wnids in enumerate(split, start=1):
        for wnid in wnids:
            files |= {f"Task_{t}/train/{wnid}/{wnid}_{i}.JPEG" for i in range(N_TRAIN)}
            files |= {f"Task_{t}/test/{wnid}/{f}" for f, w in _val_labels() if w == wnid}
    return files


def expected_manifest(split: list[list[str]], md5: str, signature: dict) -> dict:
    tasks = [
        {
            "name": f"Task_{t}",
            "classes": wnids,
            "class_names": [CLASS_NAMES[w] for w in wnids],
            "num_train": N_TRAIN * len(wnids),
            "num_test": N_VAL * len(wnids),
        }
        for t, wnids in enumerate(split, start=1)
    ]
    return {
        "dataset": "tiny-imagenet",
        "source": f"{TINY_ZIP} (MD5 {md5}): train/<wnid>/images for training, the labelled val set for testing",
        "tasks": tasks,
        "image_size": 64,
        "channels": 3,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "augment": True,
        "num_tasks": len(split),
        "prepared_with": signature,
    }


def test_download_and_split_give_the_exact_tree_and_manifest(served, tiny_zip, tmp_path):
    url, seen = served
    md5 = md5_of(tiny_zip)
    data = run(tmp_path, "--url", url, "--md5", md5, "--num_tasks", "2")
    assert seen == [None]  # one plain request
    assert (tmp_path / "dl" / TINY_ZIP).read_bytes() == tiny_zip.read_bytes()
    assert tree(data) == expected_tree(SEED0_SPLIT)
    signature = {"dataset": "tiny-imagenet", "seed": 0, "num_tasks": 2, "classes_per_task": None}
    assert json.loads((data / "manifest.json").read_text()) == expected_manifest(SEED0_SPLIT, md5, signature)
    # The images are the archive's, hard-linked from the extracted copy (which skips the test set).
    extracted = tmp_path / "dl" / ROOT
    with zipfile.ZipFile(tiny_zip) as zf:
        original = zf.read(f"{ROOT}/val/images/val_0.JPEG")
    linked = data / "Task_2" / "test" / WNIDS[0] / "val_0.JPEG"  # val_0 is of class WNIDS[0]
    assert linked.read_bytes() == original
    assert linked.stat().st_ino == (extracted / "val" / "images" / "val_0.JPEG").stat().st_ino
    assert not (extracted / "test").exists()
    assert leftovers(tmp_path, tmp_path / "dl") == []


def test_a_download_cut_off_midway_resumes_to_a_byte_identical_archive(served, tiny_zip, tmp_path, capsys, monkeypatch):
    url, seen = served
    cut = 16 * 1024
    monkeypatch.setattr(download, "CHUNK", 1024)  # small reads, so the bytes before the cut reach the disk

    def cut_off(handler, source, outputfile):
        outputfile.write(source.read(cut))  # then the server closes the connection

    whole = RangeRequestHandler.copyfile
    monkeypatch.setattr(RangeRequestHandler, "copyfile", cut_off)
    line = fails(tmp_path, capsys, "--url", url, "--md5", md5_of(tiny_zip), "--retries", "1")
    assert line == download_failed(url, "the connection broke off during the transfer")
    part = tmp_path / "dl" / f"{TINY_ZIP}.part"
    assert part.read_bytes() == tiny_zip.read_bytes()[:cut]
    assert not (tmp_path / "Data").exists()
    monkeypatch.setattr(RangeRequestHandler, "copyfile", whole)
    run(tmp_path, "--url", url, "--md5", md5_of(tiny_zip), "--num_tasks", "2")
    assert seen == [None, f"bytes={cut}-"]
    assert (tmp_path / "dl" / TINY_ZIP).read_bytes() == tiny_zip.read_bytes()
    assert tree(tmp_path / "Data") == expected_tree(SEED0_SPLIT)
    assert leftovers(tmp_path, tmp_path / "dl") == []


def test_a_server_that_ignores_range_gives_the_whole_file_again(served, tiny_zip, tmp_path, monkeypatch):
    url, seen = served
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / f"{TINY_ZIP}.part").write_bytes(b"stale bytes of another file")
    plain = http.server.SimpleHTTPRequestHandler.send_head  # answers 200 with the whole file

    def no_range(handler):
        seen.append(handler.headers.get("Range"))
        return plain(handler)

    monkeypatch.setattr(RangeRequestHandler, "send_head", no_range)
    run(tmp_path, "--url", url, "--md5", md5_of(tiny_zip), "--num_tasks", "2")
    assert seen == ["bytes=27-"]
    assert (tmp_path / "dl" / TINY_ZIP).read_bytes() == tiny_zip.read_bytes()
    assert leftovers(tmp_path, tmp_path / "dl") == []


def test_a_complete_partial_file_answered_416_is_verified_and_kept(served, tiny_zip, tmp_path, monkeypatch):
    url, _ = served
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / f"{TINY_ZIP}.part").write_bytes(tiny_zip.read_bytes())

    def range_not_satisfiable(handler):
        handler.send_error(416)

    monkeypatch.setattr(RangeRequestHandler, "send_head", range_not_satisfiable)
    run(tmp_path, "--url", url, "--md5", md5_of(tiny_zip), "--num_tasks", "2")
    assert (tmp_path / "dl" / TINY_ZIP).read_bytes() == tiny_zip.read_bytes()
    assert tree(tmp_path / "Data") == expected_tree(SEED0_SPLIT)


def test_a_wrong_md5_fails_clearly_and_leaves_nothing(served, tiny_zip, tmp_path, capsys):
    url, _ = served
    line = fails(tmp_path, capsys, "--url", url, "--md5", "0" * 32)
    assert line == (
        f"error: the file downloaded from {url} has MD5 {md5_of(tiny_zip)}, not the expected {'0' * 32}; "
        "deleted it; run again to download it anew, or check --url and --md5"
    )
    assert_nothing_left(tmp_path)


def test_offline_is_one_line_that_names_the_way_out(closed_port_url, tmp_path, capsys):
    url = f"{closed_port_url}/{TINY_ZIP}"
    line = fails(tmp_path, capsys, "--url", url)
    assert line == download_failed(url, "Connection refused")
    assert_nothing_left(tmp_path)


def test_a_missing_file_on_the_server_names_the_http_status(http_server, tmp_path, capsys):
    _, base_url = http_server
    url = f"{base_url}/nothing.zip"
    assert fails(tmp_path, capsys, "--url", url) == download_failed(url, "HTTP 404 File not found")
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    ("member", "why"),
    [
        ("../evil.txt", "has a '..' component that escapes the target folder"),
        (f"{ROOT}/train/../../../evil.txt", "has a '..' component that escapes the target folder"),
        ("/tmp/evil.txt", "has an absolute path"),
        ("symlink", "is a symbolic link"),
    ],
)
def test_an_archive_with_a_member_outside_the_folder_or_a_link_is_refused(tmp_path, capsys, member, why):
    if member == "symlink":
        member = zipfile.ZipInfo(f"{ROOT}/train/evil.txt")
        member.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = write_tiny_zip(tmp_path / "bad.zip", extra={member: b"/etc/passwd"})
    line = fails(tmp_path, capsys, "--archive", str(archive), "--md5", md5_of(archive))
    name = member.filename if isinstance(member, zipfile.ZipInfo) else member
    assert line == f"error: refusing to extract {archive}: member {name!r} {why}; the archive is damaged or malicious"
    assert not (tmp_path / "Data").exists()
    assert not (tmp_path / "dl").exists()  # nothing was extracted, not even the safe members
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]
    assert not (tmp_path.parent / "evil.txt").exists()


def test_archive_flag_needs_no_server_and_still_checks_the_md5(tiny_zip, closed_port_url, tmp_path, capsys):
    wrong = "f" * 32
    line = fails(tmp_path, capsys, "--archive", str(tiny_zip), "--md5", wrong)
    got = md5_of(tiny_zip)
    assert line == (
        f"error: {tiny_zip} has MD5 {got}, not the expected {wrong}; it is not the expected Tiny-ImageNet archive, "
        f"or pass --md5 {got} if you trust it"
    )
    assert tiny_zip.is_file()  # the user's file is never deleted
    assert not (tmp_path / "Data").exists()
    url = f"{closed_port_url}/{TINY_ZIP}"  # any attempt to download would fail
    data = run(tmp_path, "--archive", str(tiny_zip), "--md5", got, "--url", url, "--num_tasks", "2")
    assert tree(data) == expected_tree(SEED0_SPLIT)
    assert not (tmp_path / "dl" / TINY_ZIP).exists()  # the archive was not copied


def test_rerun_is_a_no_op_other_arguments_are_refused_force_rebuilds(served, tiny_zip, tmp_path, capsys):
    url, seen = served
    flags = ["--url", url, "--md5", md5_of(tiny_zip), "--num_tasks", "2"]
    data = run(tmp_path, *flags)
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    capsys.readouterr()
    run(tmp_path, *flags)
    signature = {"dataset": "tiny-imagenet", "seed": 0, "num_tasks": 2, "classes_per_task": None}
    assert (
        capsys.readouterr().out
        == f"{data} already holds this split ({signature}); nothing to do (use --force to rebuild)\n"
    )
    assert seen == [None]  # the second run did not even ask the server
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before
    line = fails(tmp_path, capsys, *flags, "--classes_per_task", "2")
    other = {**signature, "classes_per_task": 2}
    assert line == (
        f"error: {data} already holds a split made with {signature}, not {other}; "
        "pass --force to replace it, or choose another --data_dir"
    )
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before
    run(tmp_path, *flags, "--classes_per_task", "2", "--force")
    assert seen == [None]  # the verified archive and its extracted copy are reused
    manifest = json.loads((data / "manifest.json").read_text())
    # The first two of each group of the seed-0 order (n01698640 n01629819 n01742172 n01641577 | n01443537 ...).
    assert [t["classes"] for t in manifest["tasks"]] == [["n01629819", "n01698640"], ["n01443537", "n01644900"]]
    assert leftovers(tmp_path, tmp_path / "dl") == []


def test_train_and_test_hold_the_same_classes_in_every_task(tiny_zip, tmp_path):
    data = run(tmp_path, "--archive", str(tiny_zip), "--md5", md5_of(tiny_zip), "--num_tasks", "4", "--seed", "3")
    manifest = json.loads((data / "manifest.json").read_text())
    seen = []
    for task in manifest["tasks"]:
        assert check_task(data / task["name"], task["classes"]) == task["classes"]  # the check main.py makes
        seen += task["classes"]
    assert sorted(seen) == sorted(WNIDS)


def test_the_split_is_the_same_for_the_same_seed_and_differs_for_another(tiny_zip, tmp_path):
    def classes(seed: int, name: str) -> list[list[str]]:
        flags = ["--archive", str(tiny_zip), "--md5", md5_of(tiny_zip), "--num_tasks", "2", "--seed", str(seed)]
        dp.main(["--data_dir", str(tmp_path / name), "--download_dir", str(tmp_path / "dl"), *flags])
        return [t["classes"] for t in json.loads((tmp_path / name / "manifest.json").read_text())["tasks"]]

    assert classes(0, "a") == classes(0, "b") == SEED0_SPLIT
    assert classes(1, "c") != SEED0_SPLIT


def test_split_classes_cuts_equal_groups_and_keeps_the_first_of_each():
    wnids = [f"n{i:08d}" for i in range(200)]
    full = split_classes(wnids, seed=0, num_tasks=4, per_task=None)
    assert [len(g) for g in full] == [50] * 4
    assert sorted(w for g in full for w in g) == wnids
    half = split_classes(wnids, seed=0, num_tasks=4, per_task=25)
    assert [len(g) for g in half] == [25] * 4
    assert all(set(h) < set(f) for h, f in zip(half, full))
    assert split_classes(list(reversed(wnids)), 0, 4, None) == full  # the file's order does not matter
    assert split_classes(wnids, 1, 4, None) != full


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num_tasks", "3"], "error: --num_tasks 3 does not divide the 8 classes into equal groups"),
        (
            ["--num_tasks", "2", "--classes_per_task", "5"],
            "error: --classes_per_task 5 is more than the 4 classes of each of the 2 tasks",
        ),
    ],
)
def test_impossible_splits_are_refused(tiny_zip, tmp_path, capsys, flags, message):
    assert fails(tmp_path, capsys, "--archive", str(tiny_zip), "--md5", md5_of(tiny_zip), *flags) == message
    assert not (tmp_path / "Data").exists()
    assert leftovers(tmp_path, tmp_path / "dl") == []


def test_flags_of_another_dataset_are_refused(tmp_path, capsys):
    line = fails(tmp_path, capsys, "--dataset", "digits", "--num_tasks", "2")
    assert line == (
        "error: --num_tasks does not apply to --dataset digits --scenario split (only to tiny-imagenet, "
        "mnist --scenario permuted/rotated, digits --scenario permuted/rotated, cifar100)"
    )


def test_across_file_systems_the_images_are_copied(tiny_zip, tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    data = run(tmp_path, "--archive", str(tiny_zip), "--md5", md5_of(tiny_zip), "--num_tasks", "2")
    assert tree(data) == expected_tree(SEED0_SPLIT)
    image = data / "Task_1" / "train" / SEED0_SPLIT[0][0] / f"{SEED0_SPLIT[0][0]}_0.JPEG"
    source = tmp_path / "dl" / ROOT / "train" / SEED0_SPLIT[0][0] / "images" / image.name
    assert image.read_bytes() == source.read_bytes()
    assert image.stat().st_ino != source.stat().st_ino


def test_every_flag_documents_its_default():
    for action in dp.build_parser()._actions:
        if action.dest != "help":
            assert action.help.endswith("(default: %(default)s)"), action.dest


@pytest.mark.slow  # a whole main.py run (the quick tier leaves it out)
def test_main_trains_alexnet_on_the_prepared_split(tiny_zip, tmp_path, capsys):
    flags = ["--archive", str(tiny_zip), "--md5", md5_of(tiny_zip), "--num_tasks", "2", "--classes_per_task", "2"]
    data = run(tmp_path, *flags)
    # As light as AlexNet gets: 6 training images a task, 64x64, one epoch, random weights.
    fast = ["--num_epochs", "1", "--batch_size", "4", "--num_workers", "0", "--no-pretrained", "--image_size", "64"]
    results = train_main(["--data_dir", str(data), "--models_dir", str(tmp_path / "models"), *fast])
    out = capsys.readouterr().out
    assert results["args"]["arch"] == "alexnet"  # the manifest's default_arch
    assert "Task | after training (%) | now (%) | forgetting (pp)" in out
    rows = [int(m.group(1)) for m in re.finditer(r"^\s*(\d+) \|\s*[-\d.]+ \|\s*[-\d.]+ \|\s*[-\d.]+$", out, re.M)]
    assert rows == [1, 2]
    assert re.search(r"^\s*avg \|", out, re.M)
