"""Throughput of torchrun's 2 ranks x 1 thread against 1 process x 2 threads on the CPU (gloo).

    python3 benchmarks/distributed.py                 # AlexNet at 64x64 and the MLP, 3 rounds

For each model it measures, in images per second, the training step (forward, backward, DDP's gradient
all-reduce, LocalSgd with the MAS penalty on every trainable parameter, as in task 2 and later) at a
global batch of 64, and the importance pass (the per-sample MAS estimator over 512 images): once in
this process with 2 threads, once as 2 torchrun ranks with 1 thread each, each rank taking half of
every batch and half of the images. Rounds alternate the two, and the median ratio 2 ranks / 1 process
is printed (target on AlexNet: >= 0.85, i.e. less than 15 % lost to communication). Runs on the CPU.

It also times, on the 2 ranks, the all-reduce of a gradient alone (one float32 tensor of the trainable
parameters' size, what DDP sends per step), beside the single process's whole training step: the share
of the step that communication alone costs before any compute competes with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository runs from its folder

from importance import mas_per_sample_importance  # noqa: E402
from model_class import TaskModel, build_trunk, create_freeze_layers, trainable_parameters  # noqa: E402
from optimizer_lib import LocalSgd  # noqa: E402
from utils.cli import at_least  # noqa: E402
from utils.runtime import distributed  # noqa: E402

MODELS = {"alexnet": (3, 64, 2), "mlp": (1, 8, 0)}  # channels, image size, frozen layers
BATCH, STEPS, SCORED = 64, 6, 512  # defaults of --batch, --steps, --scored


def _model(arch: str) -> tuple[TaskModel, tuple[int, int]]:
    channels, size, frozen = MODELS[arch]
    torch.manual_seed(0)
    trunk = build_trunk(arch, channels, size)
    create_freeze_layers(trunk, frozen)
    return TaskModel(trunk, nn.Linear(trunk.out_features, 10)), (channels, size)


def _optimizer(model: TaskModel) -> LocalSgd:
    params = list(trainable_parameters(model).values())
    optimizer = LocalSgd(params, lr=0.001, reg_lambda=1.0, momentum=0.9)
    for p in trainable_parameters(model.shared).values():
        optimizer.set_importance(p, torch.rand_like(p), p.detach().clone())
    return optimizer


def _train_rate(arch: str, ranks: int, batch: int = BATCH) -> float:
    """Images/s of the training step at a global batch of ``batch`` (each rank takes batch / ranks)."""
    model, (channels, size) = _model(arch)
    optimizer, trained = _optimizer(model), distributed.wrap(model, torch.device("cpu"))
    x, y = torch.randn(batch // ranks, channels, size, size), torch.randint(0, 10, (batch // ranks,))
    for step in range(STEPS + 1):
        if step == 1:  # the first step compiles LocalSgd's fused penalty: not timed
            distributed.barrier()
            tic = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(trained(x), y).backward()
        optimizer.step()
    distributed.barrier()
    return STEPS * batch / (time.perf_counter() - tic)


def _importance_rate(arch: str, ranks: int) -> float:
    """Images/s of the per-sample MAS estimator over SCORED images (each rank scores SCORED / ranks)."""
    model, (channels, size) = _model(arch)
    data = TensorDataset(
        torch.randn(SCORED // ranks, channels, size, size), torch.zeros(SCORED // ranks, dtype=torch.long)
    )
    distributed.barrier()
    tic = time.perf_counter()
    mas_per_sample_importance(model, DataLoader(data, batch_size=BATCH // ranks), torch.device("cpu"))
    distributed.barrier()
    return SCORED / (time.perf_counter() - tic)


def _allreduce_seconds(arch: str, repeats: int = 5) -> float:
    """Median seconds of one all-reduce (SUM) of as many float32 values as the model trains."""
    model, _ = _model(arch)
    gradient = torch.ones(sum(p.numel() for p in trainable_parameters(model).values()))
    seconds = []
    for _ in range(repeats + 1):
        distributed.barrier()
        tic = time.perf_counter()
        torch.distributed.all_reduce(gradient)
        seconds.append(time.perf_counter() - tic)
    return statistics.median(seconds[1:])  # the first one sets up the connections


def _measure(arch: str, ranks: int, batch: int) -> dict[str, float]:
    rates = {"train": _train_rate(arch, ranks, batch), "importance": _importance_rate(arch, ranks)}
    if ranks > 1:
        rates["allreduce_seconds"] = _allreduce_seconds(arch)
    return rates


def _worker(arch: str, batch: int, out: Path) -> None:
    """One rank under torchrun, 1 thread; rank 0 writes the rates."""
    torch.set_num_threads(1)
    distributed.start(distributed.from_environment(), use_gpu=False)
    rates = _measure(arch, 2, batch)
    if distributed.is_writer():
        out.write_text(json.dumps(rates))
    distributed.stop()


def _two_ranks(arch: str, batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rates.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        subprocess.run(
            [*command, __file__, "--worker", arch, "--batch", str(batch), "--out", str(out)], check=True, env=env
        )
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=at_least(1, int), default=3, help="alternated rounds (default: %(default)s)")
    parser.add_argument(
        "--models", nargs="+", choices=tuple(MODELS), default=list(MODELS), help="(default: %(default)s)"
    )
    parser.add_argument(
        "--batch", type=at_least(2, int), default=BATCH, help="global batch of the training step (default: %(default)s)"
    )
    parser.add_argument("--worker", choices=tuple(MODELS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.batch, Path(args.out))
    torch.set_num_threads(2)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; 1 process x 2 threads vs 2 ranks x 1 thread (gloo); "
        f"global batch {args.batch}"
    )
    for arch in args.models:
        single, dual = [], []
        for _ in range(args.rounds):
            single.append(_measure(arch, 1, args.batch))
            dual.append(_two_ranks(arch, args.batch))
        for kind in ("train", "importance"):
            one, two = (statistics.median(r[kind] for r in runs) for runs in (single, dual))
            rates = f"1 process {one:9.1f} images/s, 2 ranks {two:9.1f} images/s"
            print(f"{arch:8s} {kind:10s}: {rates}, ratio {two / one:.2f}")
        allreduce = statistics.median(r["allreduce_seconds"] for r in dual)
        step = args.batch / statistics.median(r["train"] for r in single)
        print(
            f"{arch:8s} all-reduce of the gradient alone: {allreduce * 1e3:.0f} ms, "
            f"{allreduce / step:.0%} of one process's training step ({step * 1e3:.0f} ms)"
        )


if __name__ == "__main__":
    main()
