"""data_prep.py --dataset mnist on small generated IDX files (never the real download)."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import MNIST

from data_prep import main as data_prep

IDX = {  # torchvision's file names
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
PER_DIGIT = {"train": 3, "test": 2}


def mnist_like(split: str) -> tuple[np.ndarray, np.ndarray]:
    """A few 28x28 grey images of every digit, labels in shuffled order."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), PER_DIGIT[split]))
    pixels = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    return pixels, labels


def idx_bytes(pixels: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
    """The IDX format: big-endian magic (2051 images, 2049 labels), sizes, then uint8 data."""
    images = struct.pack(">IIII", 2051, *pixels.shape) + pixels.tobytes()
    return images, struct.pack(">II", 2049, len(labels)) + labels.tobytes()


def write_raw(raw: Path, compress: bool = False) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for split, names in IDX.items():
        for name, data in zip(names, idx_bytes(*mnist_like(split))):
            if compress:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
            else:
                (raw / name).write_bytes(data)


@pytest.fixture(autouse=True)
def no_internet(closed_port_url, monkeypatch, fast_retries):
    """torchvision may only ever reach a closed port on 127.0.0.1."""
    monkeypatch.setattr(MNIST, "mirrors", [f"{closed_port_url}/mnist/"])


def run(tmp_path: Path) -> Path:
    data_prep(["--dataset", "mnist", "--data_dir", str(tmp_path / "Data"), "--download_dir", str(tmp_path / "dl")])
    return tmp_path / "Data"


def fails(tmp_path: Path, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run(tmp_path)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert not (tmp_path / "Data").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folder
    return err.strip().splitlines()[-1]


def test_conversion_writes_five_pairs_with_the_official_split(tmp_path):
    write_raw(tmp_path / "dl" / "MNIST" / "raw")
    data = run(tmp_path)
    expected_files = {"manifest.json"}
    for split in ("train", "test"):
        pixels, labels = mnist_like(split)
        for i, label in enumerate(labels):
            task = label // 2 + 1
            expected_files.add(f"Task_{task}/{split}/{label}/{i:05d}.png")
            if i < 5:
                with Image.open(data / f"Task_{task}" / split / str(label) / f"{i:05d}.png") as img:
                    assert img.mode == "L" and np.array_equal(np.asarray(img), pixels[i])
    assert {str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()} == expected_files
    train = mnist_like("train")[0].astype(np.float64) / 255
    assert json.loads((data / "manifest.json").read_text()) == {
        "dataset": "mnist",
        "source": "torchvision.datasets.MNIST (official 60000/10000 train/test split)",
        "tasks": [
            {"name": f"Task_{t + 1}", "classes": [str(2 * t), str(2 * t + 1)], "num_train": 6, "num_test": 4}
            for t in range(5)
        ],
        "image_size": 28,
        "channels": 1,
        "mean": [pytest.approx(train.mean())],
        "std": [pytest.approx(train.std())],
        "augment": False,
        "num_tasks": 5,
        "prepared_with": {"dataset": "mnist"},
    }


def test_offline_is_one_line_that_names_the_way_out(tmp_path, capsys, closed_port_url):
    line = fails(tmp_path, capsys)
    raw = tmp_path / "dl" / "MNIST" / "raw"
    assert line == (
        f"error: could not download MNIST's train-images-idx3-ubyte.gz from {closed_port_url}/mnist/ "
        f"(Connection refused); run again when online, copy the four MNIST .gz files into {raw}, "
        "or use --dataset digits for the offline demo"
    )
    assert list(raw.iterdir()) == []


def test_download_goes_through_torchvision_and_its_md5_check(http_server, tmp_path, capsys, monkeypatch):
    root, base_url = http_server
    write_raw(root, compress=True)
    resources = [(f"{n}.gz", hashlib.md5((root / f"{n}.gz").read_bytes()).hexdigest()) for p in IDX.values() for n in p]
    monkeypatch.setattr(MNIST, "mirrors", [f"{base_url}/"])
    monkeypatch.setattr(MNIST, "resources", [(resources[0][0], "0" * 32), *resources[1:]])
    line = fails(tmp_path, capsys)
    assert line == (
        f"error: could not download MNIST's train-images-idx3-ubyte.gz from {base_url}/ (File not found or "
        f"corrupted.); run again when online, copy the four MNIST .gz files into {tmp_path / 'dl' / 'MNIST' / 'raw'}, "
        "or use --dataset digits for the offline demo"
    )
    monkeypatch.setattr(MNIST, "resources", resources)
    data = run(tmp_path)
    assert json.loads((data / "manifest.json").read_text())["tasks"][4]["num_test"] == 4


def test_corrupt_raw_files_are_named(tmp_path, capsys):
    raw = tmp_path / "dl" / "MNIST" / "raw"
    write_raw(raw)
    (raw / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 1234, 1, 28, 28))
    assert fails(tmp_path, capsys) == f"error: the MNIST files in {raw} are corrupt; delete them to download them again"


def test_a_seed_is_refused_since_the_split_is_the_official_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        data_prep(["--dataset", "mnist", "--data_dir", str(tmp_path / "Data"), "--seed", "1"])
    assert (
        capsys.readouterr().err == "error: --seed does not apply to --dataset mnist --scenario split "
        "(only to tiny-imagenet, mnist --scenario permuted, digits)\n"
    )
