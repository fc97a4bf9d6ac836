"""torchrun on the CPU (gloo): 2 ranks against 1 process, two nodes on 127.0.0.1, a rank killed and
restarted by torchrun, and the errors every rank must give. Real processes, bounded in time."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_same_run, write_dataset
from main import main
from utils.artefacts.files import load_tensor_pickle

# 24 training images a task: 3 global batches of 8 (the odd sizes are _odd_tasks'); a test set of 8.
FLAGS = ["--verbose", "--num_epochs", "3", "--batch_size", "8", "--init_lr", "0.05", "--momentum", "0.9", "--seed", "5"]
TIMEOUT = 300


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ddp") / "Data", num_tasks=2, n_train=12, n_test=4)


def _env() -> dict[str, str]:
    # One thread per rank (2 ranks on 2 cores); the checkout's modules, whatever is installed.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *extra,
        *args,
    ]


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def _argv(data: Path, models: Path, *flags: str) -> list[str]:
    return ["--data_dir", str(data), "--models_dir", str(models), *FLAGS, *flags]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def _assert_close_runs(models: Path, reference: Path) -> None:
    """Same accuracy matrix; trunk, heads and Omega within 1e-5 relative (float summation order); each
    epoch's training loss and accuracy within 1e-5."""
    results = [json.loads((m / "results.json").read_text()) for m in (models, reference)]
    assert results[0]["accuracy_matrix"] == results[1]["accuracy_matrix"]
    tasks = sorted(p.name for p in reference.glob("Task_*"))
    assert tasks and sorted(p.name for p in models.glob("Task_*")) == tasks
    for name in ("shared_model.pth", *(f"{task}/head.pth" for task in tasks)):
        ours, ref = (torch.load(m / name, weights_only=True) for m in (models, reference))
        assert all(_close(ours[k], ref[k]) for k in ref), name
    ours, ref = (load_tensor_pickle(m / "reg_params.pickle") for m in (models, reference))
    for name in ref:
        for key in ("omega", "init_val", "prev_omega"):
            assert _close(ours[name][key], ref[name][key]), (name, key)
    for ours, ref in zip(*(r["tasks"] for r in results), strict=True):
        for epoch, ref_epoch in zip(ours["history"], ref["history"], strict=True):
            assert epoch["loss"] == pytest.approx(ref_epoch["loss"], rel=1e-5), (ours["name"], epoch)
            assert epoch["accuracy"] == pytest.approx(ref_epoch["accuracy"], rel=1e-5), (ours["name"], epoch)


def _assert_ranks_hold_the_same(per_rank: Path, num_tasks: int) -> None:
    """Every rank holds the same model, Omega and theta*, bit for bit, after every task."""
    for task in range(1, num_tasks + 1):
        rank0, rank1 = (torch.load(per_rank / f"rank{r}_task{task}.pt", weights_only=True) for r in (0, 1))
        assert all(torch.equal(rank0["model"][k], rank1["model"][k]) for k in rank0["model"])
        for name, entry in rank0["reg_params"].items():
            assert all(torch.equal(entry[k], rank1["reg_params"][name][k]) for k in entry)
        assert rank0["accuracy"] == rank1["accuracy"]


# Training tasks of 11, 13, 25 and 5 images at the global batch of 8: last global batches of 3, 5, 1 and 5
# samples (the 1 fewer than the 2 ranks); test sets of 5, 9, 7 and 3 images. The importance pass and the
# tests take whole batches of 8 a rank: rank 1 scores none of task 4's images, nor tests task 1 or 4.
ODD_TRAIN, ODD_TEST = (11, 13, 25, 5), (5, 9, 7, 3)
METHODS = {
    "mas_per_sample": ["--method", "mas", "--omega_estimator", "per_sample"],
    "mas_batch": ["--method", "mas", "--omega_estimator", "batch"],
    "ewc": ["--method", "ewc", "--cache", "off"],  # the loaders of the files, the others from memory
    "si": ["--method", "si", "--batch_size", "7"],  # a global batch that 2 ranks share 4 / 3
}


def _odd_tasks(root: Path) -> Path:
    """write_dataset's images, cut down to ODD_TRAIN / ODD_TEST images a task (2 classes)."""
    data = write_dataset(root, num_tasks=len(ODD_TRAIN), n_train=max(ODD_TRAIN), n_test=max(ODD_TEST))
    manifest = json.loads((data / "manifest.json").read_text())
    for entry, n_train, n_test in zip(manifest["tasks"], ODD_TRAIN, ODD_TEST, strict=True):
        for split, total in (("train", n_train), ("test", n_test)):
            for k, name in enumerate(entry["classes"]):
                keep = (total + 1 - k) // 2  # the first class takes the odd one
                for image in sorted((data / entry["name"] / split / name).iterdir(), key=lambda f: int(f.stem)):
                    if int(image.stem) >= keep:
                        image.unlink()
        entry["num_train"], entry["num_test"] = n_train, n_test
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


@pytest.fixture(scope="module")
def odd_runs(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Every method of METHODS on the odd tasks: in one torchrun launch of 2 ranks (ddp_driver.py runs
    them one after the other) under ``<root>/<method>/ranks``, and in this process under ``.../single``."""
    root = tmp_path_factory.mktemp("odd")
    data = _odd_tasks(root / "Data")
    runs = [_argv(data, root / name / "ranks", *flags, "--reg_lambda", "0.5") for name, flags in METHODS.items()]
    chained = [arg for i, argv in enumerate(runs) for arg in (["--then"] if i else []) + argv]
    done = _run(_torchrun("tests/ddp_driver.py", str(root / "per_rank"), *chained))
    for name, flags in METHODS.items():
        main(_argv(data, root / name / "single", *flags, "--reg_lambda", "0.5"))
    return root, done


@pytest.mark.parametrize("method", list(METHODS))
def test_two_ranks_equal_one_process_at_any_dataset_size(odd_runs, method):
    root, done = odd_runs
    assert done.returncode == 0, done.stderr[-3000:]
    tasks = range(1, len(ODD_TRAIN) + 1)
    sizes = [sum(1 for _ in (root / "Data" / f"Task_{t}" / "train").rglob("*.png")) for t in tasks]
    assert sizes == list(ODD_TRAIN)
    _assert_close_runs(root / method / "ranks", root / method / "single")
    assert json.loads((root / method / "ranks" / "results.json").read_text())["args"]["world_size"] == 2
    _assert_ranks_hold_the_same(root / "per_rank" / str(list(METHODS).index(method)), len(ODD_TRAIN))


def test_the_epoch_line_under_torchrun_is_the_epochs_over_every_rank(odd_runs):
    root, done = odd_runs
    assert done.returncode == 0, done.stderr[-3000:]
    per_run = done.stdout.split(f"synthetic: {len(ODD_TRAIN)} tasks")[1:]  # rank 0 alone prints; one part per run
    assert len(per_run) == len(METHODS)
    for index, method in enumerate(METHODS):
        single = json.loads((root / method / "single" / "results.json").read_text())["tasks"]
        printed = re.findall(r"^(Task_\d) epoch +(\d+)/3 .*loss ([\d.]+) +train acc +([\d.]+)%", per_run[index], re.M)
        epochs = [(task["name"], epoch) for task in single for epoch in task["history"]]
        expected = [(name, str(e["epoch"]), f"{e['loss']:.4f}", f"{e['accuracy']:.2f}") for name, e in epochs]
        assert printed == expected, method
    assert done.stdout.count("Task | after training") == len(METHODS)


def test_two_nodes_on_loopback_equal_one_node_with_two_ranks(data, tmp_path):
    one_node, two_nodes = tmp_path / "one", tmp_path / "two"
    done = _run(_torchrun("main.py", *_argv(data, one_node)))
    assert done.returncode == 0, done.stderr[-3000:]
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=mas-test",
                "main.py",
                *_argv(data, two_nodes),
            ],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert_same_run(two_nodes, one_node)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker of ``rank`` among the launcher's descendants (from their environment)."""
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text().split()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and int(stat[3]) == launcher.pid:
            return pid
    return None


def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_ends_as_an_uninterrupted_one(data, tmp_path):
    reference, models = tmp_path / "reference", tmp_path / "models"
    slower = ("--num_epochs", "6")
    done = _run(_torchrun("main.py", *_argv(data, reference, *slower)))
    assert done.returncode == 0, done.stderr[-3000:]
    launcher = subprocess.Popen(
        _torchrun("main.py", *_argv(data, models, *slower), extra=("--max-restarts=1",)),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in launcher.stdout:  # rank 0 prints the epochs: kill rank 1 in the middle of task 2
        if line.startswith("Task_2 epoch   2/"):
            os.kill(_rank_pid(launcher, 1), signal.SIGKILL)
            break
    out, err = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode == 0, err[-3000:]
    assert "torchrun restarted the workers (restart 1): resuming from the last checkpoint" in out
    assert_same_run(models, reference)


def _with_a_late_rank_1(tmp_path: Path) -> str:
    """main.py, with rank 1 starting 3 s after rank 0 (a slower import, a loaded machine): when rank 0
    stops on an error, torchrun stops the group, and rank 1 must still have given its own line."""
    script = tmp_path / "late_rank_1.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "if os.environ['LOCAL_RANK'] == '1':\n"
        "    time.sleep(3)\n"
        "import main\n"
        "main.main()\n"
    )
    return str(script)


def _error_lines(done: subprocess.CompletedProcess) -> list[str]:
    assert done.returncode != 0
    return [line for line in done.stderr.splitlines() if line.startswith("error: ")]


def test_use_gpu_without_gpus_is_one_line_on_every_rank(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = _run(_torchrun(_with_a_late_rank_1(tmp_path), *_argv(data, tmp_path / "m"), "--use_gpu"))
    lines = _error_lines(done)
    assert len(lines) == 2 and all("CUDA is not available" in line for line in lines)


def test_a_refused_flag_is_one_line_on_every_rank(data, tmp_path):
    done = _run(_torchrun(_with_a_late_rank_1(tmp_path), *_argv(data, tmp_path / "m"), "--num_epochs", "0"))
    lines = [line for line in done.stderr.splitlines() if "error: " in line]
    assert done.returncode != 0 and len(lines) == 2
    assert all(line.startswith("main.py: error: argument --num_epochs") for line in lines)


def test_a_plain_process_is_rank_0_of_1():
    from utils.runtime.distributed import World, from_environment

    assert from_environment({}) == World()
    world = from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "TORCHELASTIC_RESTART_COUNT": "3"})
    assert (world.rank, world.size, world.local_rank, world.restart, world.writer) == (1, 2, 1, 3, False)
