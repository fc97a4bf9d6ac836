"""Which flag of data_prep.py applies to which dataset and scenario, the defaults that depend on
them, and the signature of a split (the arguments that decide its content, kept in the manifest).

A flag given where it would be silently ignored is refused, so that a typo in a command does not
build a split other than the one the user meant.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from utils import UserError

DATASETS = ("tiny-imagenet", "mnist", "digits", "cifar10", "cifar100")
SCENARIOS = ("split", "permuted", "rotated")
MAX_TASKS = 200  # Tiny-ImageNet's 200 classes: no dataset makes more tasks
MAX_RETRIES = 100
# --num_tasks when not given: Tiny-ImageNet as the paper, the others as the literature's sequences.
DEFAULT_NUM_TASKS = {"tiny-imagenet": 4, "mnist": 10, "digits": 5, "cifar100": 10}

# Flags that only some datasets (and scenarios) read: giving one elsewhere is a mistake worth reporting.
ALL, SPLIT, VARIANTS = SCENARIOS, ("split",), ("permuted", "rotated")
DATASET_SCENARIOS = {"mnist": ALL, "digits": ALL}  # the others are split only
_DOWNLOADED = {"tiny-imagenet": SPLIT, "mnist": ALL, "cifar10": SPLIT, "cifar100": SPLIT}
FLAG_SCOPE: dict[str, dict[str, tuple[str, ...]]] = {
    "scenario": {"mnist": ALL, "digits": ALL},
    "seed": {"tiny-imagenet": SPLIT, "mnist": ("permuted",), "digits": ALL},
    "num_tasks": {"tiny-imagenet": SPLIT, "mnist": VARIANTS, "digits": VARIANTS, "cifar100": SPLIT},
    "classes_per_task": {"tiny-imagenet": SPLIT},
    "angles": {"mnist": ("rotated",), "digits": ("rotated",)},
    "url": {"tiny-imagenet": SPLIT},
    "md5": {"tiny-imagenet": SPLIT},
    "archive": {"tiny-imagenet": SPLIT},
    "download_dir": _DOWNLOADED,
    "retries": _DOWNLOADED,
}
# Of those, the ones that change the content of the split (recorded in the manifest).
CONTENT_FLAGS = ("seed", "num_tasks", "classes_per_task", "angles")


def applies(flag: str, args: argparse.Namespace) -> bool:
    """Whether ``--flag`` is read for the chosen dataset and scenario."""
    return args.scenario in FLAG_SCOPE[flag].get(args.dataset, ())


def _scope_text(scope: dict[str, tuple[str, ...]]) -> str:
    """'tiny-imagenet, mnist --scenario permuted, digits': where a flag applies."""
    where = []
    for dataset in DATASETS:
        if dataset in scope:
            whole = scope[dataset] == DATASET_SCENARIOS.get(dataset, SPLIT)
            where.append(dataset if whole else f"{dataset} --scenario {'/'.join(scope[dataset])}")
    return ", ".join(where)


def check_flags(args: argparse.Namespace, defaults: Mapping[str, Any]) -> None:
    """Refuse a flag that the chosen dataset (and scenario) would silently ignore: one that holds
    another value than its default in ``defaults``."""
    chosen = f"--dataset {args.dataset}"
    if args.dataset in DATASET_SCENARIOS:
        chosen += f" --scenario {args.scenario}"
    for flag, scope in FLAG_SCOPE.items():
        if not applies(flag, args) and getattr(args, flag) != defaults[flag]:
            raise UserError(f"--{flag} does not apply to {chosen} (only to {_scope_text(scope)})")


def resolve_flags(args: argparse.Namespace) -> None:
    """Fill in the dataset-dependent defaults (--num_tasks, --angles) and check what needs no data."""
    if args.angles is not None:
        if args.num_tasks is not None and args.num_tasks != len(args.angles):
            raise UserError(
                f"--num_tasks {args.num_tasks} does not match the {len(args.angles)} --angles given; "
                "give one angle per task, or leave out --num_tasks"
            )
        args.num_tasks = len(args.angles)
    if args.num_tasks is None and applies("num_tasks", args):
        args.num_tasks = DEFAULT_NUM_TASKS[args.dataset]
    if args.scenario == "rotated" and args.angles is None:
        args.angles = [180 * k / args.num_tasks for k in range(args.num_tasks)]
    if args.dataset == "cifar100" and 100 % args.num_tasks:
        raise UserError(
            f"--num_tasks {args.num_tasks} does not divide CIFAR-100's 100 classes into equal groups "
            "(10 or 20 as in the literature, 5 as Hsu et al. 2018)"
        )


def split_signature(args: argparse.Namespace) -> dict:
    """The arguments that decide the content of the split (recorded in the manifest).

    ``scenario`` is recorded only when it is not ``split``, so that a split made before the
    scenarios existed is still recognised as the same one.
    """
    signature: dict = {"dataset": args.dataset}
    if args.scenario != "split":
        signature["scenario"] = args.scenario
    signature.update({flag: getattr(args, flag) for flag in CONTENT_FLAGS if applies(flag, args)})
    return signature
