"""The data cache (--cache): batches from memory equal those from the files, bit for bit without
augmentation and as the same random pipeline with it; bad images are one line before training;
resume stays exact; --importance_batch_size reaches the importance pass."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, interrupted_after_checkpoint, write_dataset
from importance import mas_batch_importance, mas_per_sample_importance
from main import main
from model_class import TaskModel, build_head, build_shared_model
from utils import UserError
from utils.data_cache import RunCache, format_bytes
from utils.data_utils import build_transforms, make_task_data, read_manifest, task_dirs
from utils.io_utils import load_tensor_pickle
from utils.tensor_transforms import tensor_transform


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


def test_device_path_on_the_cpu_gives_the_loader_path_batches(tmp_path):
    """transform_on: uint8 batches moved to the device and transformed there (CUDA in practice; the same
    code on the CPU here): the same batches, random crops included, as transforming inside the loader."""
    data = _augmented(write_dataset(tmp_path / "Data", size=12, n_train=5))
    on_device = _tasks(data, 1, 10, "ram", transform_on=torch.device("cpu"))[0]
    in_loader = _tasks(data, 1, 10, "ram")[0]
    for kind in ("train", "importance", "test"):
        _assert_same_passes(getattr(on_device, kind), getattr(in_loader, kind))
    first = next(iter(on_device.train))[0]
    assert first.shape == (4, 1, 10, 10) and first.dtype == torch.float32


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
        _run(data, tmp_path / "m", "--cache", cache)
    assert exc.value.code == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"error: corrupt or unreadable image {bad}: ")
    assert ("Task_2 epoch" in out) == (cache == "off")
    assert (tmp_path / "m" / "checkpoint.pth").exists() == (cache == "off")


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


SOURCE, OUTPUT, DRAWS = 64, 32, 2000
LEVELS_PER_PIXEL = 256 // SOURCE


def _gradient_image() -> np.ndarray:
    """Red grows with x, green with y, blue constant: a crop's extent, place and flip can be read off."""
    ramp = np.arange(SOURCE, dtype=np.uint8) * LEVELS_PER_PIXEL
    image = np.zeros((SOURCE, SOURCE, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = ramp[None, :], ramp[:, None], 128
    return image


def _crop_statistics(outputs: torch.Tensor) -> torch.Tensor:
    """Per output (N x 3 x S x S in grey levels): the crop's area / the image's (its scale), the log of its
    aspect ratio (from the least-squares slopes of red along x and green along y: the crop's width and
    height in source pixels), its centre (mean red, mean green) and whether it was flipped."""
    centred = torch.arange(OUTPUT, dtype=torch.float64) - (OUTPUT - 1) / 2
    red_along_x, green_along_y = outputs[:, 0].mean(1), outputs[:, 1].mean(2)
    slope_x = (red_along_x * centred).sum(1) / centred.square().sum()
    slope_y = (green_along_y * centred).sum(1) / centred.square().sum()
    width, height = (s * OUTPUT / LEVELS_PER_PIXEL for s in (slope_x.abs(), slope_y))
    centre = outputs[:, :2].mean((2, 3))
    return torch.stack([width * height / SOURCE**2, (width / height).log(), *centre.T, (slope_x < 0).double()], 1)


def _draw(transform, image, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.stack([transform(image) for _ in range(DRAWS)]).double()


def test_augmentation_from_memory_is_the_file_path_pipeline_statistically():
    """RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3) + flip: PIL on files vs transforms.v2 on tensors,
    2000 draws each (fixed seeds: the test is deterministic), on a 64x64 image with ramps to 32x32.

    - The ranges of scale and log aspect agree within 0.02 and 0.03: with 2000 draws the extremes lie
      within 0.001 of the bounds, and the estimates from 8-bit ramps of small crops (whose integer width
      and height can exceed the aspect range slightly, in both pipelines alike) agreed within 0.016 and
      0.008 here; a scale from 0.12 or an aspect range of 0.7-1.43 moves an extreme by 0.037 or more.
    - Means agree within 4 standard errors of the difference (p ~ 6e-5 per statistic under one
      distribution) plus the largest systematic difference of PIL's and torch's antialiased bilinear
      resize of uint8 images (2 grey levels for the centres; no more than 0.005 / 0.01 for scale / aspect).
    - Spreads agree within 12 % (4 standard errors of a standard deviation are 9 % at n = 2000)."""
    pixels = _gradient_image()
    zero, unit = [0.0] * 3, [1 / 255] * 3  # outputs in grey levels
    pil = build_transforms(OUTPUT, zero, unit, augment=True, train=True)
    tensor = tensor_transform(OUTPUT, zero, unit, augment=True, train=True)
    files = _crop_statistics(_draw(pil, Image.fromarray(pixels), seed=1))
    memory = _crop_statistics(_draw(lambda x: tensor.batch(x[None])[0], torch.from_numpy(pixels).permute(2, 0, 1), 2))
    range_tolerance = torch.tensor([0.02, 0.03])
    assert ((files.min(0).values[:2] - memory.min(0).values[:2]).abs() <= range_tolerance).all()
    assert ((files.max(0).values[:2] - memory.max(0).values[:2]).abs() <= range_tolerance).all()
    assert memory[:, 0].min() < 0.1 and memory[:, 1].min() < -0.27 and memory[:, 1].max() > 0.27
    standard_error = (files.var(0) / DRAWS + memory.var(0) / DRAWS).sqrt()
    bias = torch.tensor([0.005, 0.01, 2.0, 2.0, 0.0])
    assert ((files.mean(0) - memory.mean(0)).abs() <= 4 * standard_error + bias).all(), (files.mean(0), memory.mean(0))
    assert ((files.std(0) / memory.std(0) - 1).abs() <= 0.12).all(), (files.std(0), memory.std(0))


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
    monkeypatch.setattr("utils.data_cache.memory_budget", lambda: budget)
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
