"""Train a task sequence with Memory Aware Synapses and print the forgetting table.

Aljundi, Babiloni, Elhoseiny, Rohrbach, Tuytelaars. Memory Aware Synapses: Learning
what (not) to forget. ECCV 2018. Each task is trained on  CE + reg_lambda * sum
Omega (theta - theta*)^2  (Eq. 3), with Omega measured after every task (Eq. 2, 4).

    python3 data_prep.py && python3 main.py --use_gpu --reg_lambda 0.01
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mas import METHODS, OMEGA_ESTIMATORS, ForgettingRow, compute_forgetting, mas_train
from model_class import ARCHS
from utils import UserError
from utils.data_utils import make_task_data, read_manifest, task_dirs


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _at_least(minimum: float, kind=float):
    def check(text: str):
        value = kind(text)
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    return check


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _momentum(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--use_gpu", action="store_true", help="train on CUDA; an error if CUDA is absent (default: %(default)s)"
    )
    p.add_argument("--batch_size", type=_at_least(1, int), default=8, help="batch size (default: %(default)s)")
    p.add_argument(
        "--num_freeze_layers",
        type=_at_least(0, int),
        default=2,
        help="freeze the first k layers of the trunk in every task: AlexNet convolutions, "
        "or MLP Linear layers, from the input (default: %(default)s)",
    )
    p.add_argument("--num_epochs", type=_at_least(1, int), default=10, help="epochs per task (default: %(default)s)")
    p.add_argument(
        "--init_lr",
        type=_positive_float,
        default=0.001,
        help="initial learning rate, x0.1 every 20 epochs (default: %(default)s)",
    )
    p.add_argument(
        "--reg_lambda",
        type=_at_least(0.0),
        default=0.01,
        help="weight of the MAS penalty sum Omega (theta - theta*)^2 (default: %(default)s)",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="mas",
        help="mas, local_mas (Hebbian), the baselines ewc and si, or finetune (no penalty) (default: %(default)s)",
    )
    p.add_argument(
        "--omega_estimator",
        choices=tuple(OMEGA_ESTIMATORS),
        default="batch",
        help="for --method mas: batch = |gradient of a batch sum| (the authors' default), "
        "per_sample = the paper's exact per-sample definition (default: %(default)s)",
    )
    p.add_argument("--si_xi", type=_positive_float, default=0.1, help="SI's damping xi (default: %(default)s)")
    p.add_argument(
        "--data_dir", default="Data", help="task folders and manifest from data_prep.py (default: %(default)s)"
    )
    p.add_argument("--models_dir", default="models", help="where the artefacts of every task go (default: %(default)s)")
    p.add_argument(
        "--arch", choices=ARCHS, default=None, help="trunk (default: %(default)s, i.e. the manifest's default_arch)"
    )
    p.add_argument("--momentum", type=_momentum, default=0.9, help="SGD momentum (default: %(default)s)")
    p.add_argument("--weight_decay", type=_at_least(0.0), default=0.0, help="L2 weight decay (default: %(default)s)")
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start AlexNet from torchvision's ImageNet weights (default: %(default)s)",
    )
    p.add_argument(
        "--image_size",
        type=_at_least(1, int),
        default=None,
        help="input size in pixels (default: %(default)s, i.e. 224 for alexnet as the seed, the stored size for mlp)",
    )
    p.add_argument(
        "--num_workers", type=_at_least(0, int), default=2, help="data loading processes (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random number generator (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors (default: %(default)s)")
    return p


def _given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations the user set on the command line."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    """Command-line flags win over the manifest's ``defaults``, which win over the built-in defaults.

    Returns the arguments and the manifest; ``manifest["applied_defaults"]`` lists what it set.
    """
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and malformed flags stop here
    manifest = read_manifest(args.data_dir)
    defaults = dict(manifest.get("defaults", {}))
    defaults.setdefault("arch", manifest.get("default_arch", "alexnet"))
    unknown = sorted(set(defaults) - set(vars(args)))
    if unknown:
        raise UserError(f"{Path(args.data_dir) / 'manifest.json'}: unknown default {unknown[0]!r}")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    given = _given_flags(build_parser(), argv)
    manifest["applied_defaults"] = {k: v for k, v in defaults.items() if k not in given}
    if args.image_size is None:
        args.image_size = 224 if args.arch == "alexnet" else manifest["image_size"]
    args.channels = 3 if args.arch == "alexnet" else manifest["channels"]
    return args, manifest


def select_device(use_gpu: bool) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            "--use_gpu was given but CUDA is not available on this machine; drop the flag to train on the CPU"
        )
    return torch.device("cuda")


def _pp(value: float) -> str:
    return f"{round(value, 2) + 0.0:.2f}"  # + 0.0: never print -0.00


def format_table(rows: list[ForgettingRow]) -> str:
    rule = "-----+--------------------+---------+----------------"
    lines = ["Task | after training (%) | now (%) | forgetting (pp)", rule]
    n = len(rows)
    mean = ForgettingRow(0, *(sum(getattr(r, k) for r in rows) / n for k in ("after_training", "now", "forgetting")))
    for label, row in [*((str(r.task), r) for r in rows), ("avg", mean)]:
        if label == "avg":
            lines.append(rule)
        lines.append(f"{label:>4} | {_pp(row.after_training):>18} | {_pp(row.now):>7} | {_pp(row.forgetting):>15}")
    return "\n".join(lines)


def run(args: argparse.Namespace, manifest: dict) -> dict:
    device = select_device(args.use_gpu)
    applied = ", ".join(f"{k}={v}" for k, v in manifest["applied_defaults"].items())
    print(f"{manifest['dataset']}: {len(manifest['tasks'])} tasks; defaults from the manifest: {applied or 'none'}")
    folders = task_dirs(args.data_dir, manifest)
    tasks = [
        make_task_data(f, manifest, args.channels, args.image_size, args.batch_size, args.num_workers) for f in folders
    ]
    Path(args.models_dir).mkdir(parents=True, exist_ok=True)
    results = []
    for task_no, task in enumerate(tasks, start=1):
        print(f"== {task.name}: {len(task.classes)} classes, {len(task.train.dataset)} training images ==")
        results.append(mas_train(task_no, task, args, device))
    rows = compute_forgetting(args.models_dir, tasks, args, device)
    print(format_table(rows))
    return {
        "args": {k: v for k, v in vars(args).items()},
        "tasks": [
            {
                "task": i,
                "test_accuracy": r.test_accuracy,
                "history": r.history,
                "train_seconds": r.train_seconds,
                "importance_seconds": r.importance_seconds,
            }
            for i, r in enumerate(results, start=1)
        ],
        "forgetting": [vars(r) for r in rows],
        "average_forgetting": sum(r.forgetting for r in rows) / len(rows),
        "average_accuracy": sum(r.now for r in rows) / len(rows),
    }


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, train every task, print and return the results."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args, manifest = parse_args(argv)
        return run(args, manifest)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
