"""data_prep.py --dataset cifar10 / cifar100 through torchvision's real downloaders, against archives
generated here with torchvision's exact layout, served from 127.0.0.1 (the classes' url and MD5s
patched to them): download, tree and pixels, manifest, rerun without the server, MD5 refusal,
offline, damaged archives, transfers cut or stalled."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100

import data_prep as dp
from mas_data import download
from mas_data import torchvision_fetch as tv_fetch

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR100_NAMES = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
]
PER_CLASS = {"train": 2, "test": 1}


class Cifar:
    """A generated CIFAR archive in torchvision's layout: which class, its files, its pixels."""

    def __init__(self, dataset: str, seed: int = 0) -> None:
        self.dataset = dataset
        self.cls = CIFAR10 if dataset == "cifar10" else CIFAR100
        self.names = CIFAR10_NAMES if dataset == "cifar10" else CIFAR100_NAMES
        rng = np.random.default_rng(seed)
        self.images, self.labels = {}, {}
        for split, per_class in PER_CLASS.items():
            labels = rng.permutation(np.repeat(np.arange(len(self.names)), per_class))
            self.labels[split] = labels
            self.images[split] = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
        self.files = self._files()
        self.first_md5 = {name: hashlib.md5(data).hexdigest() for name, data in self.files.items()}

    def _batch(self, split: str, rows: slice) -> bytes:
        """A pickled batch as CIFAR's: rows of 3072 bytes, the red plane, then green, then blue."""
        images, labels = self.images[split][rows], self.labels[split][rows]
        key = "labels" if self.dataset == "cifar10" else "fine_labels"
        batch = {"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), key: labels.tolist()}
        if self.dataset == "cifar100":
            batch["coarse_labels"] = (labels // 5).tolist()
        return pickle.dumps(batch, protocol=2)

    def _files(self) -> dict[str, bytes]:
        if self.dataset == "cifar10":
            n = len(self.labels["train"]) // 5
            files = {f"data_batch_{i + 1}": self._batch("train", slice(i * n, (i + 1) * n)) for i in range(5)}
            files["test_batch"] = self._batch("test", slice(None))
            files["batches.meta"] = pickle.dumps({"label_names": self.names}, protocol=2)
            return files
        meta = {"fine_label_names": self.names, "coarse_label_names": [f"super{i}" for i in range(20)]}
        return {
            "train": self._batch("train", slice(None)),
            "test": self._batch("test", slice(None)),
            "meta": pickle.dumps(meta, protocol=2),
        }

    def archive(self) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name, data in self.files.items():
                info = tarfile.TarInfo(f"{self.cls.base_folder}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    def patch(self, monkeypatch, url: str, archive: bytes) -> None:
        """Point torchvision's class at ``url`` and at the MD5s of these files (of a removed one: as it was)."""
        md5 = {**self.first_md5, **{name: hashlib.md5(data).hexdigest() for name, data in self.files.items()}}
        monkeypatch.setattr(self.cls, "url", url)
        monkeypatch.setattr(self.cls, "tgz_md5", hashlib.md5(archive).hexdigest())
        monkeypatch.setattr(self.cls, "train_list", [[n, md5[n]] for n, _ in self.cls.train_list])
        monkeypatch.setattr(self.cls, "test_list", [[n, md5[n]] for n, _ in self.cls.test_list])
        monkeypatch.setattr(self.cls, "meta", {**self.cls.meta, "md5": md5[self.cls.meta["filename"]]})


@pytest.fixture(params=["cifar10", "cifar100"])
def cifar(request, scripted_server, monkeypatch, fast_retries):
    """The generated archive on the scripted server, torchvision pointed at it; yields (Cifar, server)."""
    fake = Cifar(request.param)
    archive = fake.archive()
    (scripted_server.root / fake.cls.filename).write_bytes(archive)
    fake.patch(monkeypatch, f"{scripted_server.base_url}/{fake.cls.filename}", archive)
    scripted_server.cut = len(archive) // 3
    return fake, scripted_server


def run(tmp_path: Path, dataset: str, *flags: str) -> dict:
    data = tmp_path / "Data"
    dp.main(["--dataset", dataset, "--data_dir", str(data), "--download_dir", str(tmp_path / "dl"), *flags])
    return json.loads((data / "manifest.json").read_text())


def expected_stats(train: np.ndarray) -> tuple[list[float], list[float]]:
    scaled = train.astype(np.float64) / 255.0
    return list(scaled.mean(axis=(0, 1, 2))), list(scaled.std(axis=(0, 1, 2)))


def test_download_writes_every_image_in_label_order_tasks_with_its_manifest(cifar, tmp_path):
    fake, server = cifar
    manifest = run(tmp_path, fake.dataset)
    num_tasks = 5 if fake.dataset == "cifar10" else 10
    group = len(fake.names) // num_tasks
    assert [t["classes"] for t in manifest["tasks"]] == [
        fake.names[k * group : (k + 1) * group] for k in range(num_tasks)
    ]
    mean, std = expected_stats(fake.images["train"])
    assert manifest == {
        "dataset": fake.dataset,
        "source": f"torchvision.datasets.{fake.cls.__name__} (official 50000/10000 train/test split)",
        "tasks": [
            {
                "name": f"Task_{k + 1}",
                "classes": fake.names[k * group : (k + 1) * group],
                "num_train": group * PER_CLASS["train"],
                "num_test": group * PER_CLASS["test"],
            }
            for k in range(num_tasks)
        ],
        "image_size": 32,
        "channels": 3,
        "mean": [pytest.approx(m, abs=1e-12) for m in mean],
        "std": [pytest.approx(s, abs=1e-12) for s in std],
        "augment": False,
        "num_tasks": num_tasks,
        "prepared_with": {"dataset": fake.dataset, **({"num_tasks": 10} if fake.dataset == "cifar100" else {})},
    }
    written = sorted((tmp_path / "Data").rglob("*.png"))
    assert len(written) == sum(len(labels) for labels in fake.labels.values())
    for path in written:
        split, name, index = path.parts[-3], path.parts[-2], int(path.stem)
        assert path.name == f"{index:05d}.png" and fake.names[fake.labels[split][index]] == name
        with Image.open(path) as img:
            assert img.mode == "RGB" and np.array_equal(np.asarray(img), fake.images[split][index])
    assert server.seen == [None]  # one transfer


@pytest.mark.parametrize("cifar", ["cifar100"], indirect=True)
@pytest.mark.parametrize("num_tasks", ["20", "5", "100"])
def test_cifar100_cuts_the_classes_into_any_number_of_equal_groups(cifar, tmp_path, num_tasks):
    manifest = run(tmp_path, "cifar100", "--num_tasks", num_tasks)
    group = 100 // int(num_tasks)
    assert [t["classes"] for t in manifest["tasks"]] == [CIFAR100_NAMES[k : k + group] for k in range(0, 100, group)]
    assert manifest["prepared_with"] == {"dataset": "cifar100", "num_tasks": int(num_tasks)}


def test_a_rerun_needs_no_server_and_force_rebuilds_from_the_files_on_disk(cifar, tmp_path, capsys):
    fake, server = cifar
    first = run(tmp_path, fake.dataset)
    for path in server.root.iterdir():
        path.unlink()
    capsys.readouterr()
    assert run(tmp_path, fake.dataset) == first
    assert "nothing to do" in capsys.readouterr().out
    assert run(tmp_path, fake.dataset, "--force") == first
    assert server.seen == [None]


def test_a_wrong_md5_is_refused_and_the_file_deleted(cifar, tmp_path, error_line, monkeypatch):
    fake, server = cifar
    archive = (server.root / fake.cls.filename).read_bytes()
    monkeypatch.setattr(fake.cls, "tgz_md5", "0" * 32)
    line = error_line(lambda: run(tmp_path, fake.dataset))
    assert line == (
        f"error: the file downloaded from {fake.cls.url} has MD5 {hashlib.md5(archive).hexdigest()}, not the "
        f"expected {'0' * 32}; deleted it; run again to download it anew"
    )
    assert len(server.seen) == 3  # a transfer cut short looks the same, so it was tried again
    assert list((tmp_path / "dl").iterdir()) == [] and not (tmp_path / "Data").exists()


def test_offline_is_one_line(cifar, tmp_path, error_line, monkeypatch, closed_port_url):
    fake, _ = cifar
    url = f"{closed_port_url}/{fake.cls.filename}"
    monkeypatch.setattr(fake.cls, "url", url)
    line = error_line(lambda: run(tmp_path, fake.dataset))
    assert line == (
        f"error: could not download {url} (Connection refused); run again to retry, copy {fake.cls.filename} "
        f"into {tmp_path / 'dl'} from a machine that has it, or use --dataset digits for the offline demo"
    )
    assert not (tmp_path / "Data").exists()


def test_a_missing_file_on_the_server_is_one_line_and_not_retried(cifar, tmp_path, error_line):
    fake, server = cifar
    (server.root / fake.cls.filename).unlink()
    line = error_line(lambda: run(tmp_path, fake.dataset))
    assert line.startswith(f"error: could not download {fake.cls.url} (HTTP 404 File not found); ")
    assert server.probes == 1


def _damaged(fake: Cifar, damage: str) -> bytes:
    archive = fake.archive()
    if damage == "truncated":
        return archive[: len(archive) // 2]
    if damage == "not-gzip":
        return b"XX" + archive[2:]
    if damage == "missing-batch":
        del fake.files[fake.cls.test_list[0][0]]
        return fake.archive()
    fake.files[fake.cls.train_list[0][0]] = b"\x80\x02}q\x00(X\x04\x00\x00\x00datq"  # a pickle cut short
    return fake.archive()


@pytest.mark.parametrize("damage", ["truncated", "not-gzip", "missing-batch", "bad-pickle"])
def test_a_damaged_archive_with_a_matching_md5_is_one_line(cifar, tmp_path, error_line, monkeypatch, damage):
    fake, server = cifar
    archive = _damaged(fake, damage)
    (server.root / fake.cls.filename).write_bytes(archive)
    fake.patch(monkeypatch, fake.cls.url, archive)
    line = error_line(lambda: run(tmp_path, fake.dataset))
    dl = tmp_path / "dl"
    assert line.startswith(
        f"error: could not read {dl / fake.cls.filename} or the files unpacked from it in {dl / fake.cls.base_folder} ("
    )
    assert line.endswith("); they are damaged: delete both to download them again")
    assert not (tmp_path / "Data").exists()


def test_class_names_that_are_no_folder_names_are_refused(cifar, tmp_path, error_line, monkeypatch):
    fake, server = cifar
    fake.names = ["../escape", *fake.names[1:]]
    fake.files = fake._files()
    archive = fake.archive()
    (server.root / fake.cls.filename).write_bytes(archive)
    fake.patch(monkeypatch, fake.cls.url, archive)
    line = error_line(lambda: run(tmp_path, fake.dataset))
    assert line == (
        f"error: the CIFAR files in {tmp_path / 'dl' / fake.cls.base_folder} are not CIFAR's; "
        "delete them to download them again"
    )
    assert not (tmp_path / "escape").exists() and not (tmp_path / "Data").exists()


def test_transfers_cut_short_or_stalled_are_retried_under_a_timeout(cifar, tmp_path, capsys, monkeypatch):
    fake, server = cifar
    monkeypatch.setattr(download, "TIMEOUT", (0.5, 0.5))
    server.plan = ["cut", "stall"]
    manifest = run(tmp_path, fake.dataset)
    assert manifest["num_tasks"] == (5 if fake.dataset == "cifar10" else 10)
    assert len(server.seen) == 3
    out = capsys.readouterr().out
    assert f"download failed ({tv_fetch.MD5_NOTE}); attempt 2 of 3" in out
    assert "download failed (the server did not answer in time); attempt 3 of 3" in out
    assert socket.getdefaulttimeout() is None


def test_a_server_that_always_stalls_is_one_line(cifar, tmp_path, error_line, monkeypatch):
    fake, server = cifar
    monkeypatch.setattr(download, "TIMEOUT", (0.5, 0.5))
    server.plan = ["stall"]
    line = error_line(lambda: run(tmp_path, fake.dataset, "--retries", "1"))
    assert line.startswith(f"error: could not download {fake.cls.url} (the server did not answer in time); ")
    assert socket.getdefaulttimeout() is None
