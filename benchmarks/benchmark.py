"""Speed of the MAS implementation, as ratios measured in one process (Aljundi et al., ECCV 2018).

    python3 benchmarks/benchmark.py                 # all sections, a few minutes on 2 CPU cores
    python3 benchmarks/benchmark.py --only step     # one section: step, importance or digits
    python3 benchmarks/benchmark.py --only step --batch_sizes 64 --rounds 3   # a quick check

Variants are alternated in rounds and the median time of each is reported, so a slow
moment of the machine hits every variant alike. Sections:

- step: one AlexNet (64x64) training step, forward + backward + optimizer, at batch 8 and 64:
  LocalSgd with the MAS penalty (Eq. 3, added locally) vs torch.optim.SGD with the same
  momentum (no penalty), and vs the penalty as an autograd loss term (how Avalanche and
  FACIL add it). Targets: LocalSgd / SGD <= 1.15 at batch 8 and <= 1.05 at batch 64.
  Also LocalSgd's proximal penalty step (``penalty_step="proximal"``) against its default
  explicit step, both compiled, on the same model (so that only the step differs, not where the
  model lies in memory); target: proximal / explicit <= 1.05 at batch 64.
- importance: images per second of the importance pass on AlexNet (64x64, batch 64):
  the exact per-sample estimator vs the batch estimator (target >= 0.8x) and vs a
  batch-size-1 loop, the only exact route before (target >= 20x).
- digits: wall time of the digits sequence (5 tasks) for every method.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository runs from its folder

from importance import mas_batch_importance, mas_per_sample_importance  # noqa: E402
from model_class import AlexNetTrunk, TaskModel, create_freeze_layers, trainable_parameters  # noqa: E402
from optimizer_lib import LocalSgd  # noqa: E402

LR, MOMENTUM, REG_LAMBDA = 0.001, 0.9, 0.01


def alternate(variants: dict[str, Callable[[], None]], rounds: int, repeat: int) -> dict[str, float]:
    """Median seconds per call of each variant, the variants interleaved round by round."""
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up (and compilation)
    for _ in range(rounds):
        for name, fn in variants.items():
            tic = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[name].append((time.perf_counter() - tic) / repeat)
    return {name: statistics.median(t) for name, t in times.items()}


def _alexnet(num_classes: int = 50) -> TaskModel:
    torch.manual_seed(0)
    trunk = AlexNetTrunk()
    create_freeze_layers(trunk, 2)  # main.py's default
    return TaskModel(trunk, nn.Linear(trunk.out_features, num_classes))


def _step_variants(batch_size: int) -> dict[str, Callable[[], None]]:
    x = torch.randn(batch_size, 3, 64, 64)
    y = torch.randint(0, 50, (batch_size,))
    criterion = nn.CrossEntropyLoss()
    variants = {}

    def make(name: str, build_optimizer, penalty_in_loss: bool = False, model: TaskModel | None = None) -> TaskModel:
        model = model or _alexnet()
        model.train()
        optimizer = build_optimizer(model)
        shared = trainable_parameters(model.shared)
        omega = {n: torch.rand_like(p) for n, p in shared.items()}
        theta_star = {n: p.detach().clone() for n, p in shared.items()}
        if isinstance(optimizer, LocalSgd):
            for n, p in shared.items():
                optimizer.set_importance(p, omega[n], theta_star[n])

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            if penalty_in_loss:
                loss = loss + REG_LAMBDA * sum((omega[n] * (p - theta_star[n]).pow(2)).sum() for n, p in shared.items())
            loss.backward()
            optimizer.step()

        variants[name] = step
        return model

    def sgd(model):
        return torch.optim.SGD(trainable_parameters(model).values(), lr=LR, momentum=MOMENTUM)

    make("torch.optim.SGD (no penalty)", sgd)
    penalised = make(
        "LocalSgd + MAS penalty", lambda m: LocalSgd(trainable_parameters(m).values(), LR, REG_LAMBDA, MOMENTUM)
    )
    make(  # the same model and memory as the explicit step: the two differ only in the penalty step
        "LocalSgd, proximal penalty step",
        lambda m: LocalSgd(trainable_parameters(m).values(), LR, REG_LAMBDA, MOMENTUM, penalty_step="proximal"),
        model=penalised,
    )
    make(
        "LocalSgd eager (no compiler)",
        lambda m: LocalSgd(trainable_parameters(m).values(), LR, REG_LAMBDA, MOMENTUM, fused="eager"),
    )
    make("SGD + penalty as a loss term", sgd, penalty_in_loss=True)
    return variants


def bench_step(rounds: int, batch_sizes: list[int]) -> list[str]:
    lines = ["## Training step, AlexNet 64x64 (seconds per step, median)", ""]
    lines += ["| batch | variant | s/step | vs SGD |", "| ---: | --- | ---: | ---: |"]
    proximal_ratios = []
    for batch_size in batch_sizes:
        repeat = max(1, 32 // batch_size)  # small batches: several steps per timing
        times = alternate(_step_variants(batch_size), rounds, repeat)
        base = times["torch.optim.SGD (no penalty)"]
        lines += [f"| {batch_size} | {name} | {t:.4f} | {t / base:.2f}x |" for name, t in times.items()]
        ratio = times["LocalSgd, proximal penalty step"] / times["LocalSgd + MAS penalty"]
        proximal_ratios.append(f"proximal / explicit penalty step at batch {batch_size}: {ratio:.3f}x")
    return [*lines, "", *proximal_ratios, "(target: <= 1.05x at batch 64)"]


def bench_importance(rounds: int) -> list[str]:
    model = _alexnet()
    data = TensorDataset(torch.randn(128, 3, 64, 64), torch.zeros(128, dtype=torch.long))
    few = TensorDataset(*data[:8])
    cpu = torch.device("cpu")
    names = {
        "batch": "batch estimator (authors' default), batch 64",
        "exact": "per-sample estimator (exact), batch 64",
        "loop": "batch-size-1 loop (exact)",
    }
    variants = {
        "batch": lambda: mas_batch_importance(model, DataLoader(data, 64), cpu),
        "exact": lambda: mas_per_sample_importance(model, DataLoader(data, 64), cpu),
        "loop": lambda: mas_batch_importance(model, DataLoader(few, 1), cpu),
    }
    images = {"batch": len(data), "exact": len(data), "loop": len(few)}
    speed = {k: images[k] / t for k, t in alternate(variants, rounds, 1).items()}
    lines = ["## Importance pass, AlexNet 64x64 (images per second)", "", "| estimator | images/s |", "| --- | ---: |"]
    lines += [f"| {names[k]} | {v:.1f} |" for k, v in speed.items()]
    lines += [
        "",
        f"per-sample / batch estimator: {speed['exact'] / speed['batch']:.2f}x (target >= 0.8x)",
        f"per-sample / batch-size-1 loop: {speed['exact'] / speed['loop']:.1f}x (target >= 20x)",
    ]
    return lines


def bench_digits() -> list[str]:
    from data_prep import main as data_prep
    from main import main as run_main

    lines = [
        "## Digits sequence, 5 tasks, main.py with the digits presets (wall seconds)",
        "",
        "| method | seconds |",
        "| --- | ---: |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "Data"
        with contextlib.redirect_stdout(io.StringIO()):
            data_prep(["--dataset", "digits", "--data_dir", str(data)])
        for flags in (
            ["--method", "mas"],
            ["--method", "mas", "--omega_estimator", "per_sample"],
            ["--method", "local_mas"],
            ["--method", "ewc"],
            ["--method", "si"],
            ["--method", "finetune"],
        ):
            tic = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                run_main(["--data_dir", str(data), "--models_dir", str(Path(tmp) / "m"), "--overwrite", *flags])
            lines.append(f"| {' '.join(flags[1::2])} | {time.perf_counter() - tic:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only",
        choices=("step", "importance", "digits"),
        default=None,
        help="run one section (default: %(default)s, i.e. all)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternation rounds per section (default: %(default)s)")
    parser.add_argument(
        "--batch_sizes",
        type=int,
        nargs="+",
        default=[8, 64],
        help="batch sizes of the step section (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch_sizes must be positive integers, got {args.batch_sizes}")
    torch.set_num_threads(args.threads)
    sections = {
        "step": lambda: bench_step(args.rounds, args.batch_sizes),
        "importance": lambda: bench_importance(args.rounds),
        "digits": bench_digits,
    }
    lines = [
        f"# MAS benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads",
        "",
    ]
    for name, section in sections.items():
        if args.only in (None, name):
            lines += [*section(), ""]
            print("\n".join(lines), flush=True)
            lines = []
    return "\n".join(lines)


if __name__ == "__main__":
    main()
