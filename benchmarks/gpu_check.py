"""The GPU path end to end, in one command: what must hold on the device, and what it costs.

    python3 benchmarks/gpu_check.py            # with CUDA: about 5-8 minutes on one GPU
    python3 benchmarks/gpu_check.py --cpu      # the reduced CPU mode (also chosen when CUDA is absent)

It writes a Tiny-ImageNet-shaped stand-in (``data_prep.py``'s layout, RGB JPEGs whose colour depends on
the class, ``augment: true``, ImageNet's mean and std) to a temporary folder and then

(a) trains it end to end with ``main.py --use_gpu`` on AlexNet at 224 px for ``--amp off``, ``bf16`` and
    ``fp16`` (the CPU mode: the small ``convnet`` trunk at 32 px, ``--amp off``, no ``--use_gpu``: it
    checks the script and the same code paths in about a minute, where AlexNet's 57 M parameters would
    take several);
(b) checks what must hold there: ``--cache ram`` and ``--cache off`` give bit-identical artefacts;
    a run killed with SIGKILL in task 2 and resumed with ``--resume`` equals the uninterrupted run;
    the MAS penalty is active: after task 2, MAS moved the trunk less, in Omega's metric
    sum Omega (theta - theta*)^2, than fine-tuning from the same start, and forgot no more;
(c) prints one table: the penalised LocalSgd step against torch.optim.SGD's step, the importance pass,
    the training loader against the training step in images/s, the peak GPU memory, and our training
    epoch against a minimal torchvision fine-tuning loop over the same files and model.

Every check prints PASS or FAIL; the exit status is 1 if any failed. Timings are medians of repeats in
this one process (``torch.cuda.synchronize`` around each on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository runs from its folder

from importance import mas_batch_importance  # noqa: E402
from model_class import TaskModel, build_head, build_shared_model, create_freeze_layers, trainable_parameters  # noqa: E402
from model_train import train_one_epoch  # noqa: E402
from optimizer_lib import LocalSgd  # noqa: E402
from utils.artefacts.files import load_tensor_pickle  # noqa: E402
from utils.data.cache import RunCache  # noqa: E402
from utils.data.tasks import build_transforms, make_task_data, read_manifest, task_dirs  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class Mode:
    """How big the check is: the GPU mode, or the reduced CPU mode the test suite runs."""

    gpu: bool
    arch: str
    image_size: int
    classes: int
    train: int  # training images per class
    test: int
    epochs: int
    batch_size: int
    workers: int
    amps: tuple[str, ...]
    repeats: int

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.gpu else "cpu")


GPU = Mode(True, "alexnet", 224, 10, 101, 21, 3, 64, 8, ("off", "bf16", "fp16"), 20)
# Sizes that divide by nothing: 2 x 7 = 14 training images at batch 4 leave a last batch of 2.
CPU = Mode(False, "convnet", 32, 2, 7, 3, 2, 4, 0, ("off",), 2)


def write_standin(root: Path, mode: Mode, tasks: int = 2, stored: int = 64) -> Path:
    """JPEGs of a class colour with noise, Tiny-ImageNet's 64x64, in data_prep.py's layout."""
    rng = np.random.default_rng(0)
    entries = []
    for t in range(1, tasks + 1):
        names = [f"n{t:02d}{k:06d}" for k in range(mode.classes)]
        colours = rng.integers(30, 226, (mode.classes, 3))
        for split, count in (("train", mode.train), ("test", mode.test)):
            for name, colour in zip(names, colours):
                folder = root / f"Task_{t}" / split / name
                folder.mkdir(parents=True)
                for i in range(count):
                    noisy = colour + rng.normal(0, 40, (stored, stored, 3))
                    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{name}_{i}.JPEG", quality=85)
        entries.append({"name": f"Task_{t}", "classes": names, "num_train": mode.train * mode.classes})
        entries[-1]["num_test"] = mode.test * mode.classes
    manifest = {"dataset": "tiny-imagenet-standin", "tasks": entries, "image_size": stored, "channels": 3}
    manifest |= {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "augment": True}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


# --------------------------------------------------------------------------- (a) and (b): real runs


def main_command(data: Path, models: Path, mode: Mode, *flags: str) -> list[str]:
    argv = [sys.executable, "-u", str(ROOT / "main.py"), "--data_dir", str(data), "--models_dir", str(models)]
    argv += ["--arch", mode.arch, "--no-pretrained", "--image_size", str(mode.image_size), "--seed", "0"]
    argv += ["--num_epochs", str(mode.epochs), "--batch_size", str(mode.batch_size), "--init_lr", "0.01"]
    argv += ["--num_workers", str(mode.workers), "--reg_lambda", "100", "--penalty_step", "proximal"]
    return argv + (["--use_gpu"] if mode.gpu else []) + list(flags)


def run_main(data: Path, models: Path, mode: Mode, *flags: str) -> float:
    """One whole main.py run in its own process; its wall time in seconds. The runs that are not killed
    write their checkpoint (AlexNet's: about 0.9 GB) only at each task's end: it changes no result."""
    tic = time.perf_counter()
    flags = ("--checkpoint_every", "1000", *flags) if "--resume" not in flags else flags
    done = subprocess.run(main_command(data, models, mode, *flags), cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"main.py {' '.join(flags)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return time.perf_counter() - tic


def killed_and_resumed(data: Path, models: Path, mode: Mode) -> None:
    """SIGKILL once task 1 is finished (task 2 is training or about to), then ``--resume``."""
    proc = subprocess.Popen(main_command(data, models, mode, "--cache", "ram"), cwd=ROOT, stdout=subprocess.DEVNULL)
    marker = models / "Task_1" / "performance.txt"
    while proc.poll() is None and not marker.exists():
        time.sleep(0.05)
    time.sleep(0.5)  # into task 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_main(data, models, mode, "--cache", "ram", "--resume")


def artefact_differences(ours: Path, ref: Path) -> list[str]:
    """Names of the tensors and results that differ between two runs' folders (empty: bit-identical)."""
    differ = []
    for name in ["shared_model.pth", *(f"{p.name}/head.pth" for p in sorted(ref.glob("Task_*")))]:
        a, b = (torch.load(m / name, weights_only=True) for m in (ours, ref))
        differ += [f"{name}:{k}" for k in b if k not in a or not torch.equal(a[k], b[k])]
    a, b = (load_tensor_pickle(m / "reg_params.pickle") for m in (ours, ref))
    differ += [f"reg_params:{n}" for n in b if n not in a or not torch.equal(a[n]["omega"], b[n]["omega"])]
    if accuracy_matrix(ours) != accuracy_matrix(ref):
        differ.append("results.json:accuracy_matrix")
    return differ


def accuracy_matrix(models: Path) -> list:
    return json.loads((models / "results.json").read_text())["accuracy_matrix"]


def average_forgetting(models: Path) -> float:
    """Mean forgetting (pp) over the tasks before the last, from the accuracy matrix."""
    matrix = accuracy_matrix(models)
    last = matrix[-1]
    return statistics.fmean(matrix[t][t] - last[t] for t in range(len(matrix) - 1))


# --------------------------------------------------------------------------- (c): costs in this process


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(work: Callable[[], object], device: torch.device, repeats: int) -> float:
    work()  # warm-up: kernels chosen, memory allocated
    times = []
    for _ in range(repeats):
        _sync(device)
        tic = time.perf_counter()
        work()
        _sync(device)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def network(mode: Mode) -> TaskModel:
    torch.manual_seed(0)
    shared = build_shared_model(mode.arch, 3, mode.image_size, pretrained=False)
    create_freeze_layers(shared, 2)
    return TaskModel(shared, build_head(shared, mode.classes)).to(mode.device)


def optimizer_steps(mode: Mode) -> tuple[float, float]:
    """Seconds per optimizer step: LocalSgd with a live penalty, and torch.optim.SGD (same momentum)."""
    model = network(mode)
    params = list(trainable_parameters(model).values())
    for p in params:
        p.grad = torch.randn_like(p)
    local = LocalSgd(params, lr=0.01, reg_lambda=1.0, momentum=0.9)
    for p in params:
        local.state[p]["omega"] = torch.rand_like(p)
        local.state[p]["theta_star"] = p.detach().clone()
    plain = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    return median_seconds(local.step, mode.device, mode.repeats), median_seconds(plain.step, mode.device, mode.repeats)


def training_step_rate(mode: Mode) -> tuple[float, float]:
    """Images/s of the training step on a device-resident batch, and its peak memory in GiB."""
    model = network(mode).train()
    optimizer = LocalSgd(trainable_parameters(model).values(), lr=0.01, reg_lambda=0.0, momentum=0.9)
    images = torch.randn(mode.batch_size, 3, mode.image_size, mode.image_size, device=mode.device)
    labels = torch.randint(0, mode.classes, (mode.batch_size,), device=mode.device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    if mode.gpu:
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(step, mode.device, mode.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if mode.gpu else float("nan")
    return mode.batch_size / seconds, peak


def task_1(data: Path, mode: Mode, cache: str):
    manifest = read_manifest(data)
    first = task_dirs(data, manifest)[0]
    cache_of_run = RunCache(cache, mode.workers)
    return make_task_data(first, manifest, 3, mode.image_size, mode.batch_size, mode.workers, cache=cache_of_run)


def loader_rate(loader) -> float:
    tic, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += len(images)
    return seen / (time.perf_counter() - tic)


def importance_rate(data: Path, mode: Mode) -> float:
    task = task_1(data, mode, "ram")
    model = network(mode)
    seconds = median_seconds(lambda: mas_batch_importance(model, task.importance, mode.device), mode.device, 2)
    return len(task.importance.dataset) / seconds


def our_epoch_seconds(data: Path, mode: Mode) -> float:
    task = task_1(data, mode, "ram")
    model = network(mode)
    optimizer = LocalSgd(trainable_parameters(model).values(), lr=0.01, reg_lambda=0.0, momentum=0.9)
    return median_seconds(lambda: train_one_epoch(model, optimizer, task, mode.device, "epoch"), mode.device, 2)


def torchvision_epoch_seconds(data: Path, mode: Mode) -> float:
    """A minimal fine-tuning loop: ImageFolder, the seed's transforms, DataLoader, forward/backward/SGD."""
    from torchvision.datasets import ImageFolder

    transform = build_transforms(mode.image_size, IMAGENET_MEAN, IMAGENET_STD, augment=True, train=True)
    dataset = ImageFolder(str(data / "Task_1" / "train"), transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=mode.batch_size, shuffle=True, num_workers=mode.workers, pin_memory=mode.gpu
    )
    model = network(mode).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def epoch() -> None:
        for images, labels in loader:
            images, labels = images.to(mode.device, non_blocking=True), labels.to(mode.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()

    return median_seconds(epoch, mode.device, 2)


# --------------------------------------------------------------------------- the whole check


def first_task_only(data: Path, into: Path) -> Path:
    """A copy of the stand-in with task 1 alone: its run's trunk and reg_params are theta_1* and Omega_1."""
    import shutil

    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tasks"] = manifest["tasks"][:1]
    shutil.copytree(data / "Task_1", into / "Task_1")
    (into / "manifest.json").write_text(json.dumps(manifest))
    return into


def penalty_distance(models: Path, task_1: Path) -> float:
    """sum Omega_1 (theta - theta_1*)^2 over the trunk of ``models``, from the task-1-only run ``task_1``."""
    reg = load_tensor_pickle(task_1 / "reg_params.pickle")
    theta_1 = torch.load(task_1 / "shared_model.pth", weights_only=True)
    trunk = torch.load(models / "shared_model.pth", weights_only=True)
    return sum(float((r["omega"] * (trunk[n] - theta_1[n]) ** 2).sum()) for n, r in reg.items())


Check = tuple[str, bool, str]


def end_to_end(data: Path, work: Path, mode: Mode) -> tuple[list[Check], list[tuple[str, str]]]:
    """(a) the runs at every --amp, and (b) the checks on the device."""
    runs = []
    for amp in mode.amps:
        seconds = run_main(data, work / f"amp_{amp}", mode, "--amp", amp, "--cache", "ram")
        forgetting = average_forgetting(work / f"amp_{amp}")
        runs.append((f"main.py --amp {amp}", f"{seconds:.1f} s whole run, forgetting {forgetting:.2f} pp"))
    reference = work / "amp_off"
    run_main(data, work / "cache_off", mode, "--cache", "off")
    checks = [_identical("--cache ram and --cache off give bit-identical artefacts", work / "cache_off", reference)]
    killed_and_resumed(data, work / "killed", mode)
    checks.append(
        _identical("SIGKILL in task 2, then --resume: equal to the uninterrupted run", work / "killed", reference)
    )
    run_main(data, work / "finetune", mode, "--cache", "ram", "--method", "finetune")
    run_main(first_task_only(data, work / "data_task1"), work / "task1", mode, "--cache", "ram")
    checks += _penalty_checks(work)
    return checks, runs


def _identical(name: str, ours: Path, reference: Path) -> Check:
    differ = artefact_differences(ours, reference)
    return name, not differ, ", ".join(differ[:3]) + (" ..." if len(differ) > 3 else "") or "identical"


def _penalty_checks(work: Path) -> list[Check]:
    mas, finetune = (penalty_distance(work / run, work / "task1") for run in ("amp_off", "finetune"))
    mas_f, finetune_f = (average_forgetting(work / run) for run in ("amp_off", "finetune"))
    return [
        (
            "MAS penalty active: sum Omega_1 (theta - theta_1*)^2 below fine-tuning's",
            mas < finetune,
            f"{mas:.4g} vs {finetune:.4g}",
        ),
        (
            "MAS forgets no more than fine-tuning (same seed)",
            mas_f <= finetune_f,
            f"{mas_f:.2f} vs {finetune_f:.2f} pp",
        ),
    ]


def costs(data: Path, mode: Mode) -> list[tuple[str, str]]:
    """(c): what each part costs, in this process."""
    local, plain = optimizer_steps(mode)
    step_rate, peak = training_step_rate(mode)
    loader = loader_rate(task_1(data, mode, "ram").train)
    ours, theirs = our_epoch_seconds(data, mode), torchvision_epoch_seconds(data, mode)
    return [
        (
            "optimizer step: LocalSgd with penalty / torch SGD",
            f"{local * 1e3:.2f} / {plain * 1e3:.2f} ms = {local / plain:.2f}x",
        ),
        ("importance pass (MAS, batch estimator)", f"{importance_rate(data, mode):.0f} images/s"),
        ("training loader (--cache ram) / training step", f"{loader:.0f} / {step_rate:.0f} images/s"),
        ("peak GPU memory of the training step", "n/a (CPU)" if not mode.gpu else f"{peak:.2f} GiB"),
        ("our epoch / minimal torchvision loop", f"{ours:.2f} / {theirs:.2f} s = {ours / theirs:.2f}x"),
    ]


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the reduced CPU mode, even where CUDA is present")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = GPU if torch.cuda.is_available() and not args.cpu else CPU
    device_name = torch.cuda.get_device_name() if mode.gpu else "CPU (reduced mode)"
    shape = f"{mode.arch} at {mode.image_size} px, {mode.epochs} epochs"
    print(f"gpu_check on {device_name}, torch {torch.__version__}, {shape}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_standin(work / "data", mode)
        checks, runs = end_to_end(data, work, mode)
        print_table("(a) end to end", runs)
        print_table("(b) checks", [(name, f"{'PASS' if ok else 'FAIL'}  {detail}") for name, ok, detail in checks])
        print_table("(c) costs", costs(data, mode))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
