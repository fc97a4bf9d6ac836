"""The data cache (--cache): batches from memory equal those from the files, bit for bit, augmentation
included, and so do whole runs (AlexNet on a Tiny-ImageNet-shaped stand-in); bad images are one line
before training; resume stays exact; --importance_batch_size reaches the importance pass."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.loader import write_standin
from conftest import ROOT, interrupted_after_checkpoint, write_dataset
from importance import mas_batch_importance, mas_per_sample_importance
from main import main
from model_class import TaskModel, build_head, build_shared_model
from utils import UserError
from utils.artefacts.files import load_tensor_pickle
from utils.data.cache import RunCache, format_bytes
from utils.data.tasks import make_task_data, read_manifest, task_dirs


def _tasks(data: Path, channels: int, image_size: int, cache: str, workers: int = 0, **options) -> list:
    manifest = read_manifest(data)
    run_cache = RunCache(cache, workers)
    return [
        make_task_data(folder, manifest, channels, image_size, 4, workers, cache=run_cache, **options)
        for folder in task_dirs(data, manifest)
    ]


def _batches(loader, seed: int) -> tuple[list, torch.Tensor]:
    """Every batch of one pass after seeding, and the global RNG state after it."""
    torch.manual_seed(seed)
    return list(loader), torch.get_rng_state()


def _assert_same_passes(ours, reference, seed: int = 3) -> None:
    (batches, rng), (expected, expected_rng) = _batches(ours, seed), _batches(reference, seed)
    assert len(batches) == len(expected)
    for (images, labels), (want_images, want_labels) in zip(batches, expected):
        assert images.dtype == want_images.dtype == torch.float32
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    assert torch.equal(rng, expected_rng)  # the global RNG stream advanced exactly as the file path's


def _augmented(data: Path) -> Path:
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "augment": True}))
    return data


@pytest.mark.parametrize(
    "stored_channels,model_channels,image_size,workers",
    [(1, 1, 8, 0), (1, 3, 12, 0), (3, 3, 8, 2)],  # grey; grey for an RGB model, resized; RGB in 2 workers
)
def test_batches_from_memory_are_the_file_batches_bit_for_bit(
    tmp_path, stored_channels, model_channels, image_size, workers
):
    data = write_dataset(tmp_path / "Data", channels=stored_channels, n_train=5)
    cached = _tasks(data, model_channels, image_size, "ram", workers)
    files = _tasks(data, model_channels, image_size, "off", workers)
    for ours, reference in zip(cached, files):
        for kind in ("train", "importance", "test"):
            _assert_same_passes(getattr(ours, kind), getattr(reference, kind))


@pytest.mark.parametrize(
    "stored_channels,model_channels,per_class,workers",
    [(3, 3, 5, 0), (3, 3, 5, 2), (1, 3, 5, 2), (1, 1, 1, 0), (1, 1, 1, 2)],
)
def test_augmented_batches_from_memory_are_the_file_batches_bit_for_bit(
    tmp_path, stored_channels, model_channels, per_class, workers
):
    """RandomResizedCrop + flip for training, resize + centre crop for the importance pass and the tests:
    the file path's PIL transforms, drawing the same random numbers in the same order. 2 classes x 5 images
    in batches of 4 end with a batch of 2; one class of one image is a split of 1; grey images for an RGB
    model are converted as the file path converts them."""
    classes = 1 if per_class == 1 else 2
    counts = {"classes_per_task": classes, "n_train": per_class, "n_test": per_class}
    data = _augmented(write_dataset(tmp_path / "Data", size=20, channels=stored_channels, **counts))
    cached, files = (_tasks(data, model_channels, 14, cache, workers) for cache in ("ram", "off"))
    for ours, reference in zip(cached, files):
        for kind in ("train", "importance", "test"):
            _assert_same_passes(getattr(ours, kind), getattr(reference, kind))
            assert getattr(ours, kind).dataset.store.decoded is not None  # served from memory


@pytest.mark.parametrize("workers", [0, 2])
def test_augmented_jpegs_from_memory_are_the_file_batches_over_two_epochs(tmp_path, workers):
    """The Tiny-ImageNet stand-in of benchmarks/loader.py (64x64 RGB JPEGs): two epochs in a row, the
    workers reseeded from the global RNG for each, upsampled as Tiny-ImageNet is for AlexNet."""
    data = write_standin(tmp_path / "Data", tasks=1, classes=3, train=3, test=1)
    cached, files = (_tasks(data, 3, 72, cache, workers)[0] for cache in ("ram", "off"))
    for kind in ("train", "importance", "test"):
        torch.manual_seed(11)
        ours = [batch for _ in range(2) for batch in getattr(cached, kind)]
        torch.manual_seed(11)
        reference = [batch for _ in range(2) for batch in getattr(files, kind)]
        assert [len(images) for images, _ in ours] == ([3, 3] if kind == "test" else [4, 4, 1] * 2)  # 1 last
        for (images, labels), (want_images, want_labels) in zip(ours, reference, strict=True):
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    assert cached.train.dataset.store.decoded is not None  # served from memory


def test_auto_reads_a_split_of_mixed_sizes_from_its_files_with_the_same_batches(tmp_path, capsys):
    """A train split whose images differ in size is read from its files by auto, the test split is held in
    memory: every loader gives the batches of --cache off."""
    data, _ = _mixed_sizes(tmp_path)
    auto, files = (_tasks(data, 1, 6, cache, workers=2) for cache in ("auto", "off"))
    for ours, reference in zip(auto, files):
        for kind in ("train", "importance", "test"):
            _assert_same_passes(getattr(ours, kind), getattr(reference, kind))
    stores = auto[0].train.prepare.func.__self__.tasks["Task_1"]
    assert stores["train"].from_files and stores["train"].decoded is None and stores["test"].decoded is not None
    assert capsys.readouterr().out.count("--cache auto: Task_1 train: ") == 1


@pytest.mark.filterwarnings("ignore::UserWarning")  # no accelerator here: pinning is a no-op
@pytest.mark.parametrize("cache", ["ram", "off"])
def test_pin_memory_reaches_every_loader_and_changes_no_batch(tmp_path, cache):
    """main.py asks for pinned memory on CUDA (copied with non_blocking); the transforms stay in the loader."""
    data = _augmented(write_dataset(tmp_path / "Data", n_train=3, size=10))
    pinned, plain = (_tasks(data, 1, 8, cache, pin_memory=pin)[0] for pin in (True, False))
    for kind in ("train", "importance", "test"):
        assert getattr(pinned, kind).pin_memory and not getattr(plain, kind).pin_memory
        _assert_same_passes(getattr(pinned, kind), getattr(plain, kind))


def _trained_tensors_equal(first: Path, second: Path) -> None:
    """The shared model, every head and every reg_params tensor of two runs: torch.equal, file by file."""
    names = ["shared_model.pth", *(str(p.relative_to(first)) for p in sorted(first.glob("Task_*/head.pth")))]
    assert len(names) == 3
    for name in names:
        ours, reference = (torch.load(m / name, weights_only=True) for m in (first, second))
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[k], reference[k]) for k in reference), name
    _runs_equal(first, second)


@pytest.mark.slow  # two AlexNet runs; with 0 workers too, the loaders' batches are compared above
def test_alexnet_with_augmentation_trains_the_same_from_memory_and_from_the_files(tmp_path):
    workers = 2
    """Two tasks of the Tiny-ImageNet stand-in (64x64 JPEGs), AlexNet with random weights at 72, 2 epochs:
    --cache ram and --cache off leave the same tensors (the files take 0.9 GB a run: removed at the end).
    At 72 torchvision.transforms.v2 on tensors, which the cache used before, differed from PIL in a few
    hundred values per task and every loader (at 64, by chance, in none on this stand-in)."""
    data = write_standin(tmp_path / "Data", tasks=2, classes=2, train=3, test=2)
    flags = ["--arch", "alexnet", "--no-pretrained", "--image_size", "72", "--num_workers", str(workers)]
    flags += ["--checkpoint_every", "1000"]  # AlexNet's 0.9 GB checkpoint at each task's end only: the same result
    try:
        for cache in ("ram", "off"):
            _run(data, tmp_path / cache, *flags, "--cache", cache)
        _trained_tensors_equal(tmp_path / "ram", tmp_path / "off")
    finally:
        for cache in ("ram", "off"):
            shutil.rmtree(tmp_path / cache, ignore_errors=True)


def _runs_equal(first: Path, second: Path) -> None:
    results = [json.loads((m / "results.json").read_text()) for m in (first, second)]
    assert results[0]["accuracy_matrix"] == results[1]["accuracy_matrix"]
    ours, reference = (load_tensor_pickle(m / "reg_params.pickle") for m in (first, second))
    assert ours.keys() == reference.keys()
    for name in reference:
        for key in ("omega", "init_val", "prev_omega"):
            assert torch.equal(ours[name][key], reference[name][key]), (name, key)


def _run(data: Path, models: Path, *extra: str) -> dict:
    flags = ["--num_epochs", "2", "--batch_size", "4", "--reg_lambda", "0.5"]
    return main(["--data_dir", str(data), "--models_dir", str(models), *flags, *extra])


def test_a_whole_run_with_the_cache_equals_one_without(tmp_path, capsys):
    data = write_dataset(tmp_path / "Data", num_tasks=3)
    _run(data, tmp_path / "ram", "--cache", "ram")
    _run(data, tmp_path / "off", "--cache", "off")
    _runs_equal(tmp_path / "ram", tmp_path / "off")
    recorded = json.loads((tmp_path / "ram" / "results.json").read_text())["args"]
    assert recorded["cache"] == "ram" and recorded["importance_batch_size"] == 4


def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header (IHDR) that declares ``width`` x ``height`` grey pixels, and hardly any data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 9)) + chunk(b"IEND", b"")
    )


def _half_a_jpeg() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=95)
    whole = buffer.getvalue()
    return whole[: len(whole) // 2]


DAMAGE = {  # file name -> its bytes, given the bytes of a good PNG
    "truncated.png": lambda good: good[:40],
    "garbage.png": lambda good: b"GIF89a? no: " + bytes(range(256)) * 4,
    "bomb.png": lambda good: _png_declaring(100_000, 100_000),
    "half.jpg": lambda good: _half_a_jpeg(),
}


def _damage(data: Path, where: str, name: str) -> Path:
    folder = data / where
    path = folder / name
    path.write_bytes(DAMAGE[name]((folder / "0.png").read_bytes()))
    return path


@pytest.mark.parametrize("cache", ["ram", "off"])
@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_image_is_one_line_naming_it(tmp_path, capsys, name, cache):
    """In a test image of task 2: with the cache, before task 2 trains; without, when it is first read."""
    data = write_dataset(tmp_path / "Data")
    bad = _damage(data, "Task_2/test/c2_1", name)
    with pytest.raises(SystemExit) as exc:
        _run(data, tmp_path / "m", "--cache", cache, "--verbose")
    assert exc.value.code == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"error: corrupt or unreadable image {bad}: ")
    assert ("Task_2 epoch" in out) == (cache == "off")
    assert (tmp_path / "m" / "checkpoint.pth").exists() == (cache == "off")


@pytest.mark.slow  # a whole main.py run (the quick tier leaves it out)
def test_a_damaged_image_stops_main_py_with_one_line(tmp_path):
    """Each damage in its own data folder, through a real ``python3 main.py`` (the cache on and off)."""
    procs = {}
    for number, name in enumerate(DAMAGE):
        data = write_dataset(tmp_path / f"Data{number}")
        bad = _damage(data, "Task_1/train/c1_0", name)
        cache = ("auto", "off")[number % 2]
        argv = ["--data_dir", str(data), "--models_dir", str(tmp_path / f"m{number}"), "--cache", cache]
        command = [sys.executable, str(ROOT / "main.py"), *argv, "--num_epochs", "1"]
        procs[bad] = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for bad, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err
        assert err.count("\n") == 1 and err.startswith(f"error: corrupt or unreadable image {bad}: "), err


@pytest.mark.parametrize("cache,workers", [("ram", 0), ("ram", 2), ("off", 2)])
def test_augmented_batches_are_deterministic_for_a_seed(tmp_path, cache, workers):
    data = _augmented(write_dataset(tmp_path / "Data", size=12, n_train=5))
    train = _tasks(data, 1, 10, cache, workers)[0].train
    first, again, other = _batches(train, 5), _batches(train, 5), _batches(train, 6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[0], again[0]))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first[0], other[0]))


def test_the_cache_holds_one_train_split_and_the_test_splits_and_leaves_the_global_rng_alone(tmp_path):
    data = write_dataset(tmp_path / "Data", num_tasks=3, n_train=5, n_test=3)
    tasks = _tasks(data, 1, 8, "ram", workers=2)
    cache = tasks[0].train.prepare.func.__self__
    splits = [cache.tasks[t.name] for t in tasks]
    state = torch.get_rng_state()
    for task in tasks:
        next(iter(task.train))  # the task's first epoch starts
        held = [(t, s) for t, split in enumerate(splits, 1) for s in ("train", "test") if split[s].decoded is not None]
        assert held == [(t, "test") for t in range(1, int(task.name[-1]))] + [(int(task.name[-1]), "train")] + [
            (int(task.name[-1]), "test")
        ]
    image_bytes, labels_bytes = 8 * 8, 8
    assert cache.held_bytes() == (10 + 3 * 6) * (image_bytes + labels_bytes)  # task 3's train, every test split
    torch.set_rng_state(state)
    list(tasks[0].test)  # an earlier task's test split: decoded alone if it had been released
    assert splits[0]["train"].decoded is None
    next(iter(tasks[0].importance))  # a released train split that is needed again is decoded again
    assert splits[0]["train"].decoded is not None and splits[2]["train"].decoded is None


def test_decoding_does_not_draw_from_the_global_rng(tmp_path):
    data = write_dataset(tmp_path / "Data", n_train=5)
    cache = _tasks(data, 1, 8, "ram", workers=2)[0].train.prepare
    torch.manual_seed(0)
    state = torch.get_rng_state()
    cache()
    assert torch.equal(torch.get_rng_state(), state)


def test_auto_reads_the_files_of_a_task_beyond_the_memory_budget(tmp_path, capsys, monkeypatch):
    data = write_dataset(tmp_path / "Data")
    _run(data, tmp_path / "off", "--cache", "off")
    task_bytes = (12 + 8) * (8 * 8 + 8)  # train and test images of one task, with their labels
    budget = task_bytes + 8 * (8 * 8 + 8) - 1
    monkeypatch.setattr("utils.data.cache.memory_budget", lambda: budget)
    capsys.readouterr()
    _run(data, tmp_path / "auto")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--cache auto")]
    assert lines == [  # task 1 fits; task 2 does not, beside the test split of task 1 (8 images) still held
        f"--cache auto: Task_2 ({format_bytes(task_bytes)}, with {format_bytes(8 * 72)} held) does not fit the "
        f"memory budget ({format_bytes(budget)}, a quarter of the RAM); reading its files every epoch"
    ]
    _runs_equal(tmp_path / "auto", tmp_path / "off")


def _mixed_sizes(tmp_path: Path) -> tuple[Path, Path]:
    data = _augmented(write_dataset(tmp_path / "Data", n_train=5, defaults={"pretrained": False, "num_workers": 0}))
    odd = data / "Task_1" / "train" / "c1_1" / "2.png"
    Image.fromarray(np.full((9, 7), 100, dtype=np.uint8), mode="L").save(odd)
    return data, odd


def test_images_of_different_sizes_are_read_from_their_files_by_auto_and_refused_by_ram(tmp_path, capsys):
    data, odd = _mixed_sizes(tmp_path)
    flags = ["--image_size", "6", "--num_freeze_layers", "0", "--arch", "mlp"]
    _run(data, tmp_path / "auto", *flags, "--cache", "auto")
    first = data / "Task_1" / "train" / "c1_0" / "0.png"
    message = f"Task_1 train: {odd} is 7x9 pixels but {first} is 8x8, and the images of a split must have one size"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--cache")]
    assert lines == [f"--cache auto: {message} to be held in memory; reading its files every epoch"]
    with pytest.raises(SystemExit):
        _run(data, tmp_path / "ram", *flags, "--cache", "ram")
    assert capsys.readouterr().err.splitlines() == [
        f"error: --cache ram: {message} to be held in memory; resize them, or run with --cache auto or off"
    ]


@pytest.mark.parametrize("cache", ["ram", "off"])
def test_resume_with_the_cache_and_workers_is_exact(tmp_path, capsys, monkeypatch, cache):
    """Interrupted after epoch 1 of task 2 and resumed, with augmentation drawn in 2 workers: identical
    to an uninterrupted run."""
    data = _augmented(write_dataset(tmp_path / "Data", n_train=10, size=12, defaults={"pretrained": False}))
    flags = ["--num_epochs", "2", "--num_workers", "2", "--image_size", "10", "--cache", cache, "--arch", "mlp"]
    flags += ["--num_freeze_layers", "0"]
    _run(data, tmp_path / "ref", *flags)
    with interrupted_after_checkpoint(monkeypatch, task_no=2), pytest.raises(SystemExit):
        _run(data, tmp_path / "m", *flags)
    _run(data, tmp_path / "m", *flags, "--resume")
    assert "resuming after epoch 1" in capsys.readouterr().out
    _runs_equal(tmp_path / "m", tmp_path / "ref")
    assert load_tensor_pickle(tmp_path / "m" / "reg_params.pickle").keys()


def _importance(data: Path, estimator, batch_size: int | None) -> dict[str, torch.Tensor]:
    """Omega of a fixed model on task 1's training images, with the importance loader of make_task_data."""
    task = _tasks(data, 1, 8, "ram", importance_batch_size=batch_size)[0]
    torch.manual_seed(0)
    shared = build_shared_model("mlp", 1, 8, False)
    model = TaskModel(shared, build_head(shared, len(task.classes)))
    assert task.importance.batch_size == (batch_size or 4)
    return estimator(model, task.importance, torch.device("cpu"))


def test_importance_batch_size_changes_the_batch_estimator_only(tmp_path):
    data = write_dataset(tmp_path / "Data", n_train=12)
    default, same, other = (_importance(data, mas_batch_importance, b) for b in (None, 4, 24))
    per_sample = [_importance(data, mas_per_sample_importance, b) for b in (None, 24)]
    for name in default:
        assert torch.equal(default[name], same[name])
        assert not torch.allclose(default[name], other[name])
        assert (other[name] <= default[name] + 1e-6).all()  # |sum over 24| <= sum of |sums over 4|
        torch.testing.assert_close(per_sample[0][name], per_sample[1][name], rtol=1e-5, atol=1e-9)


def test_the_default_importance_batch_size_is_the_batch_size(tmp_path):
    data = write_dataset(tmp_path / "Data")
    _run(data, tmp_path / "default")
    _run(data, tmp_path / "given", "--importance_batch_size", "4")
    _runs_equal(tmp_path / "given", tmp_path / "default")
    with pytest.raises(UserError):
        RunCache("disk", 0)
