"""The configuration of a run of ``main.py``: its flags, and one frozen ``RunConfig`` built from them.

Memory Aware Synapses (Aljundi et al., ECCV 2018) trains every task on CE + reg_lambda * sum
Omega (theta - theta*)^2 (Eq. 3); the flags set that lambda, the network, the optimizer and the data.

Precedence: a flag given on the command line wins over the manifest's ``defaults`` (written by
``data_prep.py`` for data that needs other settings, e.g. the MLP for digits), which win over the
built-in defaults. argv is parsed once; the manifest's defaults are checked by the same parser.
The derived fields (channels and image size the model takes, a fingerprint of the data) are
computed here, once.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import methods
from model_class import ARCHS, check_image_size
from model_train import AMP_DTYPES
from optimizer_lib import PENALTY_STEPS
from presets import presets_for
from scenario import SCENARIOS, check_scenario
from utils import UserError
from utils.cli import OneLineParser, at_least, int_between, positive_float, seed, unit_interval
from utils.data.cache import CACHE_MODES
from utils.data.manifest import MAX_IMAGE_SIZE  # the manifest's stored size is bounded as this flag is
from utils.data.tasks import data_fingerprint, read_manifest

# Flags that are not part of what a run computes: never recorded, never compared on --resume.
# --checkpoint_every only sets how often the exact resume point is written: a resume may change it.
NOT_RECORDED = frozenset({"resume", "overwrite", "debug", "checkpoint_every", "verbose"})
# Flags a manifest may not set: where the data and the artefacts are, and what this invocation does.
NOT_FROM_MANIFEST = NOT_RECORDED | {"data_dir", "models_dir", "plot"}
_NOT_GIVEN = object()
# Upper bounds of the integer flags: beyond them a run cannot work (or finish) on any machine.
MAX_BATCH = 2**31 - 1
MAX_EPOCHS = 1_000_000
MAX_LAYERS = 1_000
MAX_WORKERS = 512
MAX_TRIES = 1_000
HPARAM_SEARCHES = ("off", "chf")


DESCRIPTION = """Train a sequence of tasks with Memory Aware Synapses (Aljundi et al., ECCV 2018) or a baseline,
and print how much each task was forgotten.

  python3 data_prep.py --dataset digits && python3 main.py --reg_lambda 0.2      # offline, CPU
  python3 data_prep.py && python3 main.py --use_gpu --reg_lambda 0.01            # Tiny-ImageNet, AlexNet
  torchrun --standalone --nproc_per_node 4 main.py --use_gpu                     # 4 GPUs

A flag given here wins over the data set's presets (presets.py), which win over the defaults shown.
Documentation: README.md and docs/usage.md."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="main.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _data_flags(
        p.add_argument_group("data", "where the tasks are read and the artefacts written, and how images are loaded")
    )
    _model_flags(p.add_argument_group("model", "the trunk"))
    _optimisation_flags(
        p.add_argument_group(
            "optimisation", "SGD with momentum, the learning-rate schedule of the seed (x0.1 every 20 epochs)"
        )
    )
    _method_flags(
        p.add_argument_group(
            "method", "the importance Omega and the penalty reg_lambda * sum Omega (theta - theta*)^2 (Eq. 3)"
        )
    )
    protocol = p.add_argument_group(
        "protocol", "how tasks are presented and scored, validation and hyperparameter search"
    )
    _protocol_flags(protocol)
    _add_validation_args(protocol)
    _add_chf_args(p.add_argument_group("--hparam_search chf", "the Continual Hyperparameter Framework's settings"))
    _run_flags(p.add_argument_group("run management", "resume, overwrite, checkpoints and what the terminal shows"))
    _device_flags(
        p.add_argument_group(
            "devices", "one process on the CPU or a GPU; under torchrun one process per device (docs/distributed.md)"
        )
    )
    for name in methods.method_names():
        methods.method_class(name).add_args(p.add_argument_group(f"--method {name}"))
    return p


def _data_flags(g) -> None:
    g.add_argument(
        "--data_dir", default="Data", help="task folders and manifest from data_prep.py (default: %(default)s)"
    )
    g.add_argument("--models_dir", default="models", help="where the artefacts of every task go (default: %(default)s)")
    g.add_argument(
        "--image_size",
        type=int_between(1, MAX_IMAGE_SIZE),
        default=None,
        help="input size in pixels (default: %(default)s, i.e. 224 for alexnet as the seed, the stored size otherwise)",
    )
    g.add_argument(
        "--num_workers",
        type=int_between(0, MAX_WORKERS),
        default=2,
        help="data loading processes (default: %(default)s)",
    )
    g.add_argument(
        "--cache",
        choices=CACHE_MODES,
        default="auto",
        help="ram: decode each task's images once into memory; off: read the files every epoch; auto: ram while "
        "a task fits a quarter of the machine's RAM, else off (default: %(default)s)",
    )


def _model_flags(g) -> None:
    g.add_argument(
        "--arch",
        choices=ARCHS,
        default=None,
        help="trunk (default: %(default)s, i.e. the data set's preset in presets.py: mlp for digits and MNIST, "
        "convnet for CIFAR, alexnet otherwise)",
    )
    g.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start AlexNet from torchvision's ImageNet weights (default: %(default)s)",
    )
    g.add_argument(
        "--num_freeze_layers",
        type=int_between(0, MAX_LAYERS),
        default=2,
        help="freeze the first k layers of the trunk in every task: AlexNet convolutions, "
        "or MLP Linear layers, from the input (default: %(default)s)",
    )


def _optimisation_flags(g) -> None:
    g.add_argument(
        "--num_epochs", type=int_between(1, MAX_EPOCHS), default=10, help="epochs per task (default: %(default)s)"
    )
    g.add_argument("--batch_size", type=int_between(1, MAX_BATCH), default=8, help="batch size (default: %(default)s)")
    g.add_argument(
        "--init_lr",
        type=positive_float,
        default=0.001,
        help="initial learning rate, x0.1 every 20 epochs (default: %(default)s)",
    )
    g.add_argument("--momentum", type=unit_interval, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--weight_decay", type=at_least(0.0), default=0.0, help="L2 weight decay (default: %(default)s)")
    g.add_argument(
        "--amp",
        choices=tuple(AMP_DTYPES),
        default="off",
        help="mixed precision of the training forward pass: bf16, or fp16 with gradient scaling; the importance "
        "pass always runs in float32 (default: %(default)s, i.e. float32 as the seed)",
    )
    g.add_argument("--seed", type=seed, default=0, help="seed of every random number generator (default: %(default)s)")


def _method_flags(g) -> None:
    names = methods.method_names()
    g.add_argument(
        "--method",
        choices=names,
        default="mas",
        help="; ".join(f"{n}: {methods.method_class(n).summary}" for n in names) + " (default: %(default)s)",
    )
    g.add_argument(
        "--reg_lambda",
        type=at_least(0.0),
        default=0.01,
        help="weight of the MAS penalty sum Omega (theta - theta*)^2 (default: %(default)s)",
    )
    g.add_argument(
        "--penalty_step",
        choices=PENALTY_STEPS,
        default="explicit",
        help="explicit: add the penalty's gradient to the SGD step (the paper, the authors' code); proximal: "
        "apply the penalty by its exact proximal map after the data step, stable for any lambda (default: %(default)s)",
    )
    g.add_argument(
        "--importance_batch_size",
        type=int_between(1, MAX_BATCH),
        default=None,
        help="batch size of the importance pass; the batch estimator of --method mas depends on it "
        "(default: %(default)s, i.e. --batch_size)",
    )


def _protocol_flags(g) -> None:
    g.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="task",
        help="task: a head per task, the task given at test (the paper's setting); domain: one head shared by "
        "all tasks; class: one head over every class seen so far, scored with no task given (van de Ven & "
        "Tolias 2019; see docs/scenarios.md) (default: %(default)s)",
    )
    g.add_argument(
        "--eval_every_task",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after every task, score all tasks seen so far (the full accuracy matrix); "
        "without it only the diagonal and the last row (default: %(default)s)",
    )


def _run_flags(g) -> None:
    g.add_argument(
        "--resume", action="store_true", help="continue the interrupted run in --models_dir (default: %(default)s)"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the artefacts of an earlier run in --models_dir (default: %(default)s)",
    )
    g.add_argument(
        "--checkpoint_every",
        type=int_between(1, MAX_EPOCHS),
        default=1,
        help="write the resume checkpoint after every N-th epoch of a task and after its last one; an "
        "interrupted run resumes, bit-identical, from the last one written (default: %(default)s)",
    )
    g.add_argument(
        "--plot",
        action="store_true",
        help="write the accuracy-matrix heatmap and the before/after bar chart to <models_dir>/plots "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--verbose",
        action="store_true",
        help="print every epoch's line (training loss, train accuracy, learning rate); without it, one line "
        "per task (default: %(default)s)",
    )
    g.add_argument("--debug", action="store_true", help="show tracebacks of errors (default: %(default)s)")


def _device_flags(g) -> None:
    g.add_argument(
        "--use_gpu", action="store_true", help="train on CUDA; an error if CUDA is absent (default: %(default)s)"
    )


def _add_validation_args(p: argparse.ArgumentParser) -> None:
    """--val_fraction and --hparam_search chf (hparam_search.py); the defaults of the search are FACIL's
    (src/gridsearch.py, its general learning rates and its start lambda for MAS)."""
    p.add_argument(
        "--val_fraction",
        type=unit_interval,
        default=0.0,
        help="hold out this part of each class's training images of every task as a validation set, scored "
        "after every task; 0: none (default: %(default)s)",
    )
    p.add_argument(
        "--hparam_search",
        choices=HPARAM_SEARCHES,
        default="off",
        help="chf: choose each task's --init_lr and --reg_lambda on the validation set by the Continual "
        "Hyperparameter Framework (De Lange et al., TPAMI 2021); needs --val_fraction > 0 (default: %(default)s)",
    )


def _add_chf_args(g) -> None:
    g.add_argument(
        "--chf_lrs",
        type=positive_float,
        nargs="+",
        default=[0.1, 0.05, 0.01, 0.005, 0.001],
        help="learning rates of the fine-tuning grid (default: %(default)s)",
    )
    g.add_argument(
        "--chf_lambda",
        type=positive_float,
        default=400.0,
        help="reg_lambda of the first stability trial (default: %(default)s)",
    )
    g.add_argument(
        "--chf_p",
        type=unit_interval,
        default=0.2,
        help="accepted drop of validation accuracy below the fine-tuned one (default: %(default)s)",
    )
    g.add_argument(
        "--chf_decay",
        type=unit_interval,
        default=0.5,
        help="reg_lambda is multiplied by this after a trial below the threshold (default: %(default)s)",
    )
    g.add_argument(
        "--chf_max_tries",
        type=int_between(1, MAX_TRIES),
        default=7,
        help="at most this many stability trials per task (default: %(default)s)",
    )
    g.add_argument(
        "--chf_epochs",
        type=int_between(1, MAX_EPOCHS),
        default=None,
        help="epochs of every trial (default: %(default)s, i.e. --num_epochs)",
    )


@dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on, fixed before the first task starts."""

    use_gpu: bool
    batch_size: int
    num_freeze_layers: int
    num_epochs: int
    init_lr: float
    reg_lambda: float
    method: str
    scenario: str  # task, domain or class (scenario.py)
    penalty_step: str
    amp: str  # off, bf16 or fp16 (model_train.Precision)
    data_dir: str
    models_dir: str
    arch: str
    momentum: float
    weight_decay: float
    pretrained: bool
    image_size: int  # resolved: 224 for alexnet unless given, else the stored size
    num_workers: int
    cache: str  # auto, ram or off (utils/data/cache.py)
    importance_batch_size: int  # resolved: --batch_size unless given
    seed: int
    eval_every_task: bool
    plot: bool
    resume: bool
    overwrite: bool
    debug: bool
    checkpoint_every: int  # epochs between resume checkpoints (not recorded: it changes no result)
    verbose: bool  # every epoch's line on the terminal (not recorded)
    method_options: Mapping[str, Any]  # the chosen method's own flags
    channels: int  # what the model takes (AlexNet: 3, also for grey-scale data)
    data_fingerprint: str  # identifies the data whatever its path
    manifest: Mapping[str, Any] = field(repr=False, compare=False)
    applied_defaults: Mapping[str, Any] = field(default_factory=dict, compare=False)
    world_size: int = 1  # processes under torchrun; --batch_size is the global batch, shared among them
    val_fraction: float = 0.0  # training images held out per class as validation (utils/data/validation.py)
    hparam_search: str = "off"  # off, or chf (hparam_search.py)
    search_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # the --chf_ flags

    def recorded(self) -> dict[str, Any]:
        """The arguments stored in checkpoints and results.json, as flat ``flag -> value``; flags the
        chosen method does not read are left out, so that they cannot block a resume."""
        skipped = NOT_RECORDED | {"method_options", "manifest", "applied_defaults", "search_options"}
        arguments = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skipped}
        arguments.update(self.method_options)
        arguments.update({k: list(v) if isinstance(v, tuple) else v for k, v in self.search_options.items()})
        for key, plain in (("world_size", 1), ("val_fraction", 0.0), ("hparam_search", "off")):
            if arguments[key] == plain:
                del arguments[key]  # a plain run records what it always recorded
        arguments["data_dir"] = str(Path(self.data_dir).resolve())
        arguments["models_dir"] = str(Path(self.models_dir).resolve())
        return dict(sorted(arguments.items()))


def given_flags(argv: list[str], parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """The flags set on the command line: argparse leaves a namespace's existing attributes alone
    unless a flag sets them, so every attribute still holding the marker was not given."""
    parser = parser or build_parser()
    namespace = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), _NOT_GIVEN))
    parsed = vars(parser.parse_args(argv, namespace))
    return {k: v for k, v in parsed.items() if v is not _NOT_GIVEN}


def _as_flags(key: str, value: Any, builtin: dict[str, Any], path: Path) -> list[str]:
    """A manifest default written as the command-line flag it stands for."""
    if not isinstance(builtin[key], bool):
        return [f"--{key}={value}"]
    if not isinstance(value, bool):
        raise UserError(f"{path}: default {key}={value!r}: must be true or false")
    if value == builtin[key]:
        return []
    return [f"--{key}"] if value else [f"--no-{key}"]


def manifest_defaults(manifest: Mapping[str, Any], builtin: dict[str, Any], path: Path) -> dict[str, Any]:
    """The training presets of the manifest's data set (presets.py, with what the manifest itself carries),
    checked like the flags they stand for."""
    defaults = presets_for(manifest)
    for key in defaults:
        if key not in builtin or key in NOT_FROM_MANIFEST:
            raise UserError(f"{path}: unknown default {key!r}")
    parser = build_parser()
    parser.exit_on_error = False
    for key, value in defaults.items():
        try:
            parser.parse_args(_as_flags(key, value, builtin, path), argparse.Namespace(**builtin))
        except argparse.ArgumentError as err:
            raise UserError(f"{path}: default {key}={value!r}: {err.message}") from None
    return defaults


def parse_config(argv: list[str]) -> RunConfig:
    """The run's configuration: command line > manifest defaults > built-in defaults."""
    parser = build_parser()
    builtin = vars(parser.parse_args([]))
    given = given_flags(argv, parser)  # --help and malformed flags stop here
    manifest = read_manifest(given.get("data_dir", builtin["data_dir"]))
    path = Path(given.get("data_dir", builtin["data_dir"])) / "manifest.json"
    defaults = manifest_defaults(manifest, builtin, path)
    values = {**builtin, **defaults, **given}
    applied = {k: v for k, v in defaults.items() if k not in given}
    return make_config(values, manifest, applied)


def make_config(values: Mapping[str, Any], manifest: Mapping[str, Any], applied: Mapping[str, Any] = ()) -> RunConfig:
    """A RunConfig from flag values (every flag of ``build_parser``) and the data's manifest."""
    options = methods.method_class(values["method"]).option_names()
    common = {k: v for k, v in values.items() if k not in _all_method_options() and not k.startswith("chf_")}
    arch = common["arch"]
    image_size = common["image_size"] or (224 if arch == "alexnet" else manifest["image_size"])
    check_image_size(arch, image_size)
    check_scenario(common["scenario"], manifest)
    importance_batch_size = common["importance_batch_size"] or common["batch_size"]
    return RunConfig(
        **{**common, "image_size": image_size, "importance_batch_size": importance_batch_size},
        method_options=MappingProxyType({k: values[k] for k in options}),
        search_options=_search_options(values),
        channels=3 if arch == "alexnet" else manifest["channels"],
        data_fingerprint=data_fingerprint(manifest),
        manifest=MappingProxyType(dict(manifest)),
        applied_defaults=MappingProxyType(dict(applied)),
    )


def _search_options(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """The --chf_ flags of --hparam_search chf (none otherwise), --chf_epochs resolved."""
    if values["hparam_search"] == "off":
        return MappingProxyType({})
    if values["val_fraction"] <= 0:
        raise UserError("--hparam_search chf chooses on a validation set: give --val_fraction > 0 (e.g. 0.1)")
    if values["chf_decay"] <= 0:
        raise UserError("--chf_decay must be > 0, got 0")
    options = {k: v for k, v in values.items() if k.startswith("chf_")}
    options["chf_lrs"] = tuple(options["chf_lrs"])
    options["chf_epochs"] = options["chf_epochs"] or values["num_epochs"]
    return MappingProxyType(options)


def _all_method_options() -> set[str]:
    return {o for name in methods.method_names() for o in methods.method_class(name).option_names()}


def default_values(**overrides: Any) -> dict[str, Any]:
    """The built-in value of every flag, with ``overrides``: what tests build configs from."""
    values = vars(build_parser().parse_args([]))
    unknown = set(overrides) - set(values)
    if unknown:
        raise TypeError(f"unknown flags {sorted(unknown)}")
    return {**values, **overrides}
