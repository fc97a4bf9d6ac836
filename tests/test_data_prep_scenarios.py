"""--scenario permuted / rotated of the digits and of MNIST (issue 11): every image is compared with
its source image transformed independently (numpy indexing, np.rot90, PIL's rotate), the manifest
records the permutations / angles, the same seed gives the same files, and --scenario split is
byte-for-byte what it was before the scenarios existed."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from test_data_prep_mnist import IDX, mnist_like, write_raw
from torchvision.datasets import MNIST

import data_prep as dp
from mas_data import digits
from presets import presets_for

DIGITS = load_digits()
SOURCE = np.round(DIGITS.images * (255.0 / 16.0)).astype(np.uint8)  # what data_prep.py reads
ALL = [str(d) for d in range(10)]
# MD5 of the manifests that data_prep.py wrote before --scenario existed, when they still carried main.py's
# presets (now in presets.py): digits with --seed 0 and --seed 3, and MNIST from the generated files of
# test_data_prep_mnist. Today's manifest with those presets put back must hash to the same bytes.
SPLIT_MANIFEST_MD5 = {
    ("digits", "0"): "ba6b6c795b944ecd91af81ee7fdcb9e2",
    ("digits", "3"): "671653c8c45438dd6915466a7a9ae6c1",
    ("mnist", None): "ededb89081fc589c34b0af1d1002ec06",
}


OLD_PRESETS = {
    "digits": (
        "mlp",
        {"pretrained": False, "num_freeze_layers": 0, "num_workers": 0, "init_lr": 0.02, "num_epochs": 30},
    ),
    "mnist": ("mlp", {"pretrained": False, "num_freeze_layers": 0, "num_workers": 0}),
}


def md5_with_old_presets(path: Path) -> str:
    """The manifest at ``path`` with the presets the old format carried put back after 'augment'."""
    manifest = json.loads(path.read_text())
    assert "defaults" not in manifest and "default_arch" not in manifest  # data only
    arch, defaults = OLD_PRESETS[manifest["dataset"]]
    old = {}
    for key, value in manifest.items():
        old[key] = value
        if key == "augment":
            old |= {"default_arch": arch, "defaults": defaults}
    return hashlib.md5((json.dumps(old, indent=2) + "\n").encode()).hexdigest()


def prepare(out: Path, *flags: str) -> dict:
    dp.main(["--data_dir", str(out), *flags])
    return json.loads((out / "manifest.json").read_text())


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.asarray(img)


def files(task_dir: Path) -> list[tuple[str, str, int, Path]]:
    """(split, class folder, source index, path) of every image of a task."""
    return [(p.parts[-3], p.parts[-2], int(p.stem), p) for p in sorted(task_dir.rglob("*.png"))]


def pil_rotate(image: np.ndarray, angle: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).rotate(angle, resample=Image.Resampling.BILINEAR))


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def permuted(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("p") / "Data"
    return out, prepare(out, "--dataset", "digits", "--scenario", "permuted", "--num_tasks", "3", "--seed", "4")


def test_permuted_manifest_records_scenario_seed_and_permutations(permuted):
    _, manifest = permuted
    assert manifest["dataset"] == "digits" and manifest["scenario"] == "permuted"
    assert manifest["prepared_with"] == {"dataset": "digits", "scenario": "permuted", "seed": 4, "num_tasks": 3}
    assert manifest["num_tasks"] == 3 and [t["name"] for t in manifest["tasks"]] == ["Task_1", "Task_2", "Task_3"]
    orders = [t["permutation"] for t in manifest["tasks"]]
    assert orders[0] == list(range(64))  # task 1 is unpermuted
    for order in orders:
        assert sorted(order) == list(range(64)) and all(type(i) is int for i in order)  # a permutation
    assert orders[1] != orders[2] and orders[1] != orders[0]
    for task in manifest["tasks"]:
        assert task["classes"] == ALL and (task["num_train"], task["num_test"]) == (1257, 540)
        assert set(task) == {"name", "classes", "num_train", "num_test", "permutation"}
    assert (manifest["image_size"], manifest["channels"], presets_for(manifest)["arch"]) == (8, 1, "mlp")


def test_permuted_images_are_the_permuted_pixels_of_scikit_learns_digits(permuted):
    out, manifest = permuted
    for task in manifest["tasks"]:
        order = np.array(task["permutation"])
        written = files(out / task["name"])
        assert len(written) == 1797
        for _, digit, index, path in written:
            assert DIGITS.target[index] == int(digit)
            assert np.array_equal(pixels(path), SOURCE[index].ravel()[order].reshape(8, 8)), (task["name"], path)


def test_permuted_tasks_share_the_train_test_split_of_the_split_scenario(permuted, tmp_path):
    out, manifest = permuted
    split_manifest = prepare(tmp_path / "split", "--dataset", "digits", "--seed", "4")
    reference = {(s, i) for t in split_manifest["tasks"] for s, _, i, _ in files(tmp_path / "split" / t["name"])}
    for task in manifest["tasks"]:
        assert {(s, i) for s, _, i, _ in files(out / task["name"])} == reference
    # The pixels of every task are the same multiset, so the statistics are the source's.
    train = SOURCE[sorted(i for s, i in reference if s == "train")].astype(np.float64) / 255
    assert manifest["mean"] == [pytest.approx(train.mean(), abs=1e-12)]
    assert manifest["std"] == [pytest.approx(train.std(), abs=1e-12)]
    assert split_manifest["mean"] == [pytest.approx(manifest["mean"][0], abs=1e-12)]


def test_the_same_seed_gives_the_same_files_and_another_seed_other_permutations(permuted, tmp_path):
    out, manifest = permuted
    flags = ["--dataset", "digits", "--scenario", "permuted", "--num_tasks", "3"]
    again = prepare(tmp_path / "again", *flags, "--seed", "4")
    assert tree_bytes(tmp_path / "again") == tree_bytes(out) and again == manifest
    other = prepare(tmp_path / "other", *flags, "--seed", "5")
    assert other["tasks"][0]["permutation"] == manifest["tasks"][0]["permutation"]  # identity either way
    assert other["tasks"][1]["permutation"] != manifest["tasks"][1]["permutation"]


@pytest.mark.parametrize(("num_tasks", "num_pixels"), [(1, 4), (5, 64), (10, 784)])
def test_permutations_are_permutations_and_task_one_is_the_identity(num_tasks, num_pixels):
    orders = digits.permutations(num_tasks, num_pixels, seed=7)
    assert len(orders) == num_tasks and np.array_equal(orders[0], np.arange(num_pixels))
    for order in orders:
        assert np.array_equal(np.sort(order), np.arange(num_pixels))
    assert all(np.array_equal(a, b) for a, b in zip(orders, digits.permutations(num_tasks, num_pixels, seed=7)))


def test_rotated_images_match_pils_rotate_and_numpys_quarter_turn(tmp_path):
    out = tmp_path / "Data"
    manifest = prepare(out, "--dataset", "digits", "--scenario", "rotated", "--angles", "0", "90", "33.5")
    assert manifest["scenario"] == "rotated" and [t["angle"] for t in manifest["tasks"]] == [0.0, 90.0, 33.5]
    assert manifest["prepared_with"] == {
        "dataset": "digits",
        "scenario": "rotated",
        "seed": 0,
        "num_tasks": 3,
        "angles": [0.0, 90.0, 33.5],
    }
    expected = {
        "Task_1": lambda image: image,
        "Task_2": np.rot90,  # a quarter turn counter-clockwise, exactly
        "Task_3": lambda image: pil_rotate(image, 33.5),
    }
    rotated_train = []
    for task in manifest["tasks"]:
        assert task["classes"] == ALL and set(task) == {"name", "classes", "num_train", "num_test", "angle"}
        for split, digit, index, path in files(out / task["name"]):
            image = pixels(path)
            assert DIGITS.target[index] == int(digit)
            assert np.array_equal(image, expected[task["name"]](SOURCE[index])), path
            if split == "train":
                rotated_train.append(image)
    reference = np.stack(rotated_train).astype(np.float64) / 255  # every training image of every task
    assert manifest["mean"] == [pytest.approx(reference.mean(), abs=1e-12)]
    assert manifest["std"] == [pytest.approx(reference.std(), abs=1e-12)]


@pytest.mark.parametrize(
    ("flags", "angles"),
    [
        ([], [0.0, 36.0, 72.0, 108.0, 144.0]),  # digits: 5 tasks by default
        (["--num_tasks", "4"], [0.0, 45.0, 90.0, 135.0]),
        (["--num_tasks", "1"], [0.0]),
    ],
)
def test_default_angles_are_evenly_spaced_from_0_below_180(tmp_path, flags, angles):
    manifest = prepare(tmp_path / "Data", "--dataset", "digits", "--scenario", "rotated", *flags)
    assert [t["angle"] for t in manifest["tasks"]] == angles == manifest["prepared_with"]["angles"]


def test_a_rerun_is_a_no_op_and_other_permutations_are_refused(permuted, capsys):
    out, manifest = permuted
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    flags = ["--dataset", "digits", "--scenario", "permuted", "--seed", "4"]
    prepare(out, *flags, "--num_tasks", "3")
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare(out, *flags, "--num_tasks", "4")
    assert "pass --force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare(out, "--dataset", "digits", "--seed", "4")  # the split scenario is another split too
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.parametrize("seed", ["0", "3"])
def test_split_digits_manifest_is_byte_identical_to_before(tmp_path, seed):
    prepare(tmp_path / "Data", "--dataset", "digits", "--seed", seed)
    assert md5_with_old_presets(tmp_path / "Data" / "manifest.json") == SPLIT_MANIFEST_MD5[("digits", seed)]


# --- MNIST ------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_internet(closed_port_url, monkeypatch, fast_retries):
    """torchvision may only ever reach a closed port on 127.0.0.1 unless a test serves the files."""
    monkeypatch.setattr(MNIST, "mirrors", [f"{closed_port_url}/mnist/"])


def prepare_mnist(tmp_path: Path, *flags: str) -> dict:
    args = ["--dataset", "mnist", "--download_dir", str(tmp_path / "dl"), *flags]
    return prepare(tmp_path / "Data", *args)


def test_split_mnist_manifest_is_byte_identical_to_before(tmp_path):
    write_raw(tmp_path / "dl" / "MNIST" / "raw")
    prepare_mnist(tmp_path)
    assert md5_with_old_presets(tmp_path / "Data" / "manifest.json") == SPLIT_MANIFEST_MD5[("mnist", None)]


def test_permuted_mnist_images_are_the_permuted_source_pixels(tmp_path):
    write_raw(tmp_path / "dl" / "MNIST" / "raw")
    manifest = prepare_mnist(tmp_path, "--scenario", "permuted", "--num_tasks", "3")
    assert manifest["prepared_with"] == {"dataset": "mnist", "scenario": "permuted", "seed": 0, "num_tasks": 3}
    source = {split: mnist_like(split) for split in ("train", "test")}
    for task in manifest["tasks"]:
        order = np.array(task["permutation"])
        assert sorted(order) == list(range(784))
        assert (task["num_train"], task["num_test"]) == (30, 20) and task["classes"] == ALL
        for split, digit, index, path in files(tmp_path / "Data" / task["name"]):
            images, labels = source[split]
            assert labels[index] == int(digit)
            assert np.array_equal(pixels(path), images[index].ravel()[order].reshape(28, 28))
    assert manifest["tasks"][0]["permutation"] == list(range(784))


def test_rotated_mnist_matches_pil_and_defaults_to_ten_tasks(tmp_path):
    write_raw(tmp_path / "dl" / "MNIST" / "raw")
    manifest = prepare_mnist(tmp_path, "--scenario", "rotated")
    assert manifest["num_tasks"] == 10 and [t["angle"] for t in manifest["tasks"]] == [18.0 * k for k in range(10)]
    images, labels = mnist_like("test")
    for task in manifest["tasks"][:3]:
        for split, _, index, path in files(tmp_path / "Data" / task["name"]):
            if split == "test":
                assert np.array_equal(pixels(path), pil_rotate(images[index], task["angle"]))


def test_permuted_mnist_defaults_to_ten_tasks(tmp_path):
    write_raw(tmp_path / "dl" / "MNIST" / "raw")
    manifest = prepare_mnist(tmp_path, "--scenario", "permuted", "--seed", "2")
    assert manifest["num_tasks"] == 10 and manifest["prepared_with"]["seed"] == 2


@pytest.fixture
def served_mnist(http_server, monkeypatch):
    """The four .gz files on 127.0.0.1 with their MD5s; yields (folder, base URL, resources)."""
    root, base_url = http_server
    write_raw(root, compress=True)
    resources = [(f"{n}.gz", hashlib.md5((root / f"{n}.gz").read_bytes()).hexdigest()) for p in IDX.values() for n in p]
    monkeypatch.setattr(MNIST, "mirrors", [f"{base_url}/"])
    monkeypatch.setattr(MNIST, "resources", resources)
    return root, base_url, resources


@pytest.mark.parametrize("scenario", ["permuted", "rotated"])
def test_mnist_scenarios_download_verify_and_rerun_without_the_server(served_mnist, tmp_path, capsys, scenario):
    root, base_url, resources = served_mnist
    manifest = prepare_mnist(tmp_path, "--scenario", scenario, "--num_tasks", "2")
    assert manifest["num_tasks"] == 2
    for name, md5 in resources:
        assert hashlib.md5((tmp_path / "dl" / "MNIST" / "raw" / name).read_bytes()).hexdigest() == md5
    for path in root.iterdir():
        path.unlink()  # the server has nothing now: a rerun must not need it
    capsys.readouterr()
    prepare_mnist(tmp_path, "--scenario", scenario, "--num_tasks", "2")
    assert "nothing to do" in capsys.readouterr().out
    prepare_mnist(tmp_path, "--scenario", scenario, "--num_tasks", "2", "--force")  # from the files on disk


@pytest.mark.parametrize("scenario", ["permuted", "rotated"])
def test_mnist_scenarios_refuse_a_wrong_md5(served_mnist, tmp_path, error_line, monkeypatch, scenario):
    _, base_url, resources = served_mnist
    monkeypatch.setattr(MNIST, "resources", [(resources[0][0], "0" * 32), *resources[1:]])
    line = error_line(lambda: prepare_mnist(tmp_path, "--scenario", scenario))
    assert line.startswith(
        f"error: could not download MNIST's train-images-idx3-ubyte.gz from {base_url}/ (File not found or corrupted.)"
    )
    assert not (tmp_path / "Data").exists()


@pytest.mark.parametrize("scenario", ["permuted", "rotated"])
def test_mnist_scenarios_offline_is_one_line(tmp_path, error_line, closed_port_url, scenario):
    line = error_line(lambda: prepare_mnist(tmp_path, "--scenario", scenario))
    assert line.startswith(
        f"error: could not download MNIST's train-images-idx3-ubyte.gz from {closed_port_url}/mnist/ "
        "(Connection refused); run again when online"
    )


@pytest.mark.parametrize("damage", ["truncated", "not-gzip", "bad-deflate"])
def test_a_damaged_gz_with_a_matching_md5_is_one_line(served_mnist, tmp_path, error_line, monkeypatch, damage):
    root, _, resources = served_mnist
    path = root / resources[0][0]
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "not-gzip":
        data[:2] = b"XX"
    else:
        for k in range(20, 60):
            data[k] ^= 0xFF
    path.write_bytes(bytes(data))
    monkeypatch.setattr(MNIST, "resources", [(path.name, hashlib.md5(data).hexdigest()), *resources[1:]])
    line = error_line(lambda: prepare_mnist(tmp_path, "--scenario", "permuted"))
    raw = tmp_path / "dl" / "MNIST" / "raw"
    assert line.startswith(f"error: could not unpack the MNIST .gz files in {raw} (")
    assert line.endswith("); delete them to download them again")
    with pytest.raises((OSError, EOFError, gzip.BadGzipFile, Exception)):
        gzip.decompress(bytes(data))
