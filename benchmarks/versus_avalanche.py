"""This project's main.py beside Avalanche 0.6 on the split-digits sequence: wall time and accuracy.

    pip install -r requirements-bench.txt           # avalanche-lib 0.6.0, in a venv (see the file)
    python3 benchmarks/versus_avalanche.py          # about 5 minutes on 2 CPU cores

Without Avalanche the script says so in one line and exits 0.

What is compared. The digits sequence of ``data_prep.py --dataset digits`` (5 task-incremental tasks of
2 digits, 8x8 grey PNG files, about 250 training images a task), learned by the same network, the
``mlp`` trunk of model_class.py (Flatten, Linear(64, 256), ReLU, Linear(256, 256), ReLU) with one
Linear(256, 2) head per task, with the same settings: SGD lr 0.02, momentum 0.9, no weight decay,
batch size 8, the digits manifest's mean/std, one torch thread. Two pairs:

- fine-tuning: ``main.py --method finetune`` against Avalanche's ``Naive`` strategy;
- MAS: ``main.py --method mas --reg_lambda L`` against Avalanche's ``MAS`` strategy (``MASPlugin``) with
  ``lambda_reg=L`` (default L = 1).

The runs alternate (ours, Avalanche, ours, ...), round r with seed r - 1. Ours is ``main.main(argv)``
called in this process; Avalanche's run decodes the same task folders into tensors, builds a benchmark
with ``tensors_benchmark`` (one experience and task label per task), trains every experience and
scores all of them after the last one. Each run is timed from start to end, data loading included,
in wall seconds and in CPU seconds of this process (at one thread, the CPU time hardly depends on what
else the machine runs).
One ``python3 main.py`` process per method (seed 0, OMP_NUM_THREADS=1) is also timed on its own:
interpreter start, imports and the first ``torch.compile`` of LocalSgd are in that number only.

What differs between the two implementations (so the numbers are not a like-for-like race):

- Data: main.py decodes every PNG again in every epoch (torchvision ImageFolder); Avalanche holds the
  decoded tensors in memory.
- Work besides training: main.py checkpoints after every epoch, writes its artefacts (heads, shared
  model, reg_params, results.json), scores every task seen so far after every task (the accuracy
  matrix) and re-scores all tasks for the forgetting table; Avalanche scores once, at the end.
- The penalty: main.py adds its gradient 2 L Omega (theta - theta*) inside the optimizer (LocalSgd);
  Avalanche adds L sum Omega (theta - theta*)^2 to the loss (the same gradient, through autograd).
- MAS importance: both take |gradient| of the squared L2 norm of the output by batches of 8 (main.py
  the batch sum over samples, Avalanche the batch mean over batches: equal up to the last, smaller
  batch). Avalanche computes it in train mode (no effect: this MLP has neither dropout nor batch norm)
  and combines tasks as 0.5 old + 0.5 new instead of main.py's sum (Aljundi et al. and the authors'
  code), so the same L protects old tasks less in Avalanche.
- Initial weights: both use PyTorch's default initialisation, but draw them in another order, so
  the same seed gives different networks; accuracies are compared as means over the seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision import datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository runs from its folder

from data_prep import main as data_prep  # noqa: E402
from main import main as run_main  # noqa: E402
from model_class import MLP_HIDDEN, MlpTrunk  # noqa: E402
from model_train import seed_everything  # noqa: E402
from utils.cli import at_least  # noqa: E402
from utils.data.tasks import build_transforms, image_loader, read_manifest, task_dirs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

LR, MOMENTUM, WEIGHT_DECAY, BATCH_SIZE = 0.02, 0.9, 0.0, 8
AVALANCHE_STRATEGY = {"finetune": "Naive", "mas": "MAS"}
INSTALL_HINT = "pip install -r requirements-bench.txt"


@dataclass
class Run:
    """One timed run: wall seconds, CPU seconds of this process (robust to a busy machine at one thread)
    and the final average accuracy (%)."""

    wall: float
    cpu: float
    accuracy: float


@dataclass
class Pair:
    """The runs of one method, round by round, and the wall seconds of one whole main.py process."""

    ours: list[Run] = field(default_factory=list)
    theirs: list[Run] = field(default_factory=list)
    process_seconds: float = float("nan")


def measure(run: Callable[..., float], *args) -> Run:
    """Time ``run(*args)``, which returns the final average accuracy (%)."""
    wall, cpu = time.perf_counter(), time.process_time()
    accuracy = run(*args)
    return Run(time.perf_counter() - wall, time.process_time() - cpu, accuracy)


def our_flags(method: str, epochs: int, reg_lambda: float, seed: int, data_dir: Path, models_dir: Path) -> list[str]:
    """main.py's arguments for one run with the benchmark's settings."""
    flags = ["--method", method] + (["--reg_lambda", str(reg_lambda)] if method == "mas" else [])
    return [
        *flags,
        *("--num_epochs", str(epochs), "--init_lr", str(LR), "--batch_size", str(BATCH_SIZE)),
        *("--momentum", str(MOMENTUM), "--weight_decay", str(WEIGHT_DECAY), "--seed", str(seed)),
        *("--data_dir", str(data_dir), "--models_dir", str(models_dir), "--num_workers", "0"),
    ]


def run_ours(argv: list[str]) -> float:
    """Final average accuracy (%) of main.main(argv), called in this process."""
    with contextlib.redirect_stdout(io.StringIO()):  # the forgetting table; errors still reach stderr
        return run_main(argv)["average_accuracy"]


def run_our_process(argv: list[str]) -> float:
    """Seconds of one whole ``python3 main.py`` process, at one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "main.py", *argv], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    if done.returncode != 0:
        raise RuntimeError(f"python3 main.py {' '.join(argv)} failed: {done.stderr.strip()}")
    return seconds


def load_split(folder: Path, manifest: dict) -> list[torch.Tensor]:
    """[images, labels] of one task split, decoded and normalised as main.py does (labels: sorted folders)."""
    size = manifest["image_size"]
    transform = build_transforms(size, manifest["mean"], manifest["std"], augment=False, train=False)
    dataset = datasets.ImageFolder(str(folder), transform=transform, loader=image_loader("L"))
    images = torch.stack([image for image, _ in dataset])
    return [images, torch.tensor(dataset.targets)]


def import_avalanche():
    """The avalanche package (imported here, so that the script runs without it), its import noise muted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. qpsolvers: "no QP solver found" (GEM's solver, unused here)
        import avalanche
        import avalanche.benchmarks
        import avalanche.evaluation.metrics
        import avalanche.models
        import avalanche.training
        import avalanche.training.plugins
    return avalanche


def multi_head_mlp(in_features: int) -> torch.nn.Module:
    """Our mlp trunk with Avalanche's MultiHeadClassifier: one Linear(256, 2) head per task label."""
    from avalanche.models import MultiHeadClassifier, MultiTaskModule

    class MultiHeadMlp(MultiTaskModule):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = MlpTrunk(in_features)
            self.heads = MultiHeadClassifier(MLP_HIDDEN, initial_out_features=2, masking=False)

        def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
            return self.heads(self.trunk(x), task_label)

    return MultiHeadMlp()


def build_strategy(method: str, model: torch.nn.Module, epochs: int, reg_lambda: float):
    """Avalanche's Naive or MAS strategy with the benchmark's optimizer; it logs nothing."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import MAS, Naive
    from avalanche.training.plugins import EvaluationPlugin

    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "No loggers specified")  # on purpose: the metrics are read, not logged
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    common = {
        "criterion": torch.nn.CrossEntropyLoss(),
        "train_mb_size": BATCH_SIZE,
        "train_epochs": epochs,
        "eval_mb_size": BATCH_SIZE,
        "device": "cpu",
        "evaluator": evaluator,
    }
    if method == "mas":
        return MAS(model=model, optimizer=optimizer, lambda_reg=reg_lambda, alpha=0.5, **common)
    return Naive(model=model, optimizer=optimizer, **common)


def run_avalanche(method: str, data_dir: Path, epochs: int, reg_lambda: float, seed: int) -> float:
    """Final average accuracy (%) of one Avalanche run, from loading the task folders to the last score."""
    from avalanche.benchmarks import tensors_benchmark

    seed_everything(seed)
    manifest = read_manifest(data_dir)
    folders = task_dirs(data_dir, manifest)
    benchmark = tensors_benchmark(
        train_tensors=[load_split(folder / "train", manifest) for folder in folders],
        test_tensors=[load_split(folder / "test", manifest) for folder in folders],
        task_labels=list(range(len(folders))),
    )
    model = multi_head_mlp(manifest["channels"] * manifest["image_size"] ** 2)
    strategy = build_strategy(method, model, epochs, reg_lambda)
    for experience in benchmark.train_stream:
        strategy.train(experience, num_workers=0)
    metrics = strategy.eval(benchmark.test_stream, num_workers=0)
    return statistics.mean(
        100.0 * metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Task{t:03d}/Exp{t:03d}"] for t in range(len(folders))
    )


def compare(method: str, args: argparse.Namespace, data_dir: Path, scratch: Path) -> Pair:
    """Alternated rounds (ours, then Avalanche; seed = round - 1), then one main.py process."""
    pair = Pair()
    for seed in range(args.rounds):
        models_dir = Path(tempfile.mkdtemp(prefix=f"{method}-{seed}-", dir=scratch))
        pair.ours.append(measure(run_ours, our_flags(method, args.epochs, args.reg_lambda, seed, data_dir, models_dir)))
        pair.theirs.append(measure(run_avalanche, method, data_dir, args.epochs, args.reg_lambda, seed))
        ours, theirs = pair.ours[-1], pair.theirs[-1]
        print(f"  {method} round {seed + 1}: ours {ours.wall:.2f} s, Avalanche {theirs.wall:.2f} s", flush=True)
    models_dir = Path(tempfile.mkdtemp(prefix=f"{method}-process-", dir=scratch))
    pair.process_seconds = run_our_process(our_flags(method, args.epochs, args.reg_lambda, 0, data_dir, models_dir))
    return pair


def _numbers(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def report(method: str, pair: Pair, reg_lambda: float) -> list[str]:
    """The lines printed for one method."""
    ours = f"main.py --method {method}" + (f" --reg_lambda {reg_lambda:g}" if method == "mas" else "")
    theirs = AVALANCHE_STRATEGY[method] + (f"(lambda_reg={reg_lambda:g}, alpha=0.5)" if method == "mas" else "")
    wall_ratios = [o.wall / t.wall for o, t in zip(pair.ours, pair.theirs)]
    cpu_ratios = [o.cpu / t.cpu for o, t in zip(pair.ours, pair.theirs)]
    lines = [
        f"## {method}: ours `{ours}` vs Avalanche `{theirs}`",
        "",
        "| round | seed | ours wall (s) | Avalanche wall (s) | ours / Avalanche | ours CPU (s) | Avalanche CPU (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, (o, t, r) in enumerate(zip(pair.ours, pair.theirs, wall_ratios)):
        lines.append(f"| {i + 1} | {i} | {o.wall:.2f} | {t.wall:.2f} | {r:.2f}x | {o.cpu:.2f} | {t.cpu:.2f} |")
    ours_accuracy, theirs_accuracy = [r.accuracy for r in pair.ours], [r.accuracy for r in pair.theirs]
    return [
        *lines,
        "",
        f"median ratio ours / Avalanche: {statistics.median(wall_ratios):.2f}x wall time, "
        f"{statistics.median(cpu_ratios):.2f}x CPU time",
        f"final average accuracy, mean over {len(pair.ours)} seeds: ours {statistics.mean(ours_accuracy):.2f} %, "
        f"Avalanche {statistics.mean(theirs_accuracy):.2f} % "
        f"(per seed: ours {_numbers(ours_accuracy)}; Avalanche {_numbers(theirs_accuracy)})",
        f"one whole `python3 {ours}` process (seed 0, OMP_NUM_THREADS=1): {pair.process_seconds:.2f} s wall",
        "",
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--rounds",
        type=at_least(1, int),
        default=3,
        help="alternated rounds, round r with seed r - 1 (default: %(default)s)",
    )
    p.add_argument("--epochs", type=at_least(1, int), default=10, help="epochs per task (default: %(default)s)")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=tuple(AVALANCHE_STRATEGY),
        default=list(AVALANCHE_STRATEGY),
        help="pairs to run: finetune (vs Naive) and/or mas (vs MAS) (default: %(default)s)",
    )
    lam_help = "lambda of both MAS implementations (default: %(default)s)"
    p.add_argument("--reg_lambda", type=at_least(0.0), default=1.0, help=lam_help)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("avalanche") is None:
        print(f"avalanche is not installed, so there is nothing to compare against; install it with `{INSTALL_HINT}`")
        return
    avalanche = import_avalanche()
    torch.set_num_threads(1)
    print(
        f"# main.py vs Avalanche {avalanche.__version__} on split digits: torch {torch.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, 1 torch thread, {args.epochs} epochs, batch {BATCH_SIZE}\n",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "Data"
        with contextlib.redirect_stdout(io.StringIO()):
            data_prep(["--dataset", "digits", "--data_dir", str(data_dir)])
        lines = []
        for method in args.methods:
            lines += report(method, compare(method, args, data_dir, Path(tmp)), args.reg_lambda)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
