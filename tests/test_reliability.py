"""Resume after SIGKILL and Ctrl-C, atomic artefacts, disk full, and refusal to mix runs."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils.artefacts.files as io_utils
from conftest import ROOT, interrupted_after_checkpoint, write_dataset
from main import main
from utils.artefacts.checkpoint import load_checkpoint
from utils.artefacts.files import load_tensor_pickle

# Slow enough epochs (400 images of 16x16 per task) that a signal lands inside task 2.
RUN = ["--verbose", "--num_epochs", "6", "--batch_size", "4", "--init_lr", "0.02", "--reg_lambda", "0.5", "--seed", "7"]


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("slow") / "Data", num_tasks=3, n_train=200, n_test=20, size=16)


@pytest.fixture(scope="module")
def reference(slow_data, tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted run: its models folder and its printed table."""
    models = tmp_path_factory.mktemp("ref") / "models"
    proc = _main_process(slow_data, models)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0
    return models, _table(out)


def _main_process(data: Path, models: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-u", str(ROOT / "main.py"), "--data_dir", str(data), "--models_dir", str(models), *RUN]
    return subprocess.Popen([*argv, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _table(out: str) -> str:
    """The forgetting table and its summary lines (the last line names the run's own folder)."""
    return out[out.index("Task | after training") : out.index("artefacts of the run in")]


def _signal_in_task_2(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` once task 2 has finished two epochs."""
    for line in proc.stdout:
        if line.startswith("Task_2 epoch   2/"):
            proc.send_signal(sig)
            return
    raise AssertionError("the run ended before task 2 started")


def _assert_same_artefacts(models: Path, reference: Path) -> None:
    for task in (1, 2, 3):
        name = f"Task_{task}/performance.txt"
        assert (models / name).read_text() == (reference / name).read_text()
        head, ref_head = (torch.load(m / f"Task_{task}" / "head.pth", weights_only=True) for m in (models, reference))
        assert all(torch.equal(head[k], ref_head[k]) for k in ref_head)
    ours, ref = (load_tensor_pickle(m / "reg_params.pickle") for m in (models, reference))
    assert sorted(ours) == sorted(ref)
    for name in ref:
        for key in ("omega", "init_val", "prev_omega"):
            assert torch.equal(ours[name][key], ref[name][key]), (name, key)


def test_sigkill_in_task_2_then_resume_equals_an_uninterrupted_run(slow_data, reference, tmp_path):
    models = tmp_path / "models"
    proc = _main_process(slow_data, models)
    _signal_in_task_2(proc, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    checkpoint = load_checkpoint(models)
    assert checkpoint.task == 2 and 1 <= checkpoint.epoch + 1 < 6  # killed in the middle of task 2
    assert (models / "Task_1" / "performance.txt").exists() and not (models / "Task_2").exists()
    partial = json.loads((models / "results.json").read_text())  # the killed run's results up to task 1
    assert [t["task"] for t in partial["tasks"]] == [1] and len(partial["accuracy_matrix"]) == 1
    resumed = _main_process(slow_data, models, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resuming after epoch {checkpoint.epoch + 1}" in out
    assert "Task_1: finished in the interrupted run, kept" in out
    assert _table(out) == reference[1]
    _assert_same_artefacts(models, reference[0])
    assert not (models / "checkpoint.pth").exists()
    assert not list(models.rglob(".*.tmp"))


def test_ctrl_c_says_how_to_resume_and_exits_130(slow_data, reference, tmp_path):
    models = tmp_path / "models"
    proc = _main_process(slow_data, models)
    _signal_in_task_2(proc, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted: finished tasks and the last epoch's checkpoint are intact" in err
    assert "Traceback" not in err
    command = err.strip().splitlines()[-1].strip()
    assert command.startswith("python3 main.py ") and command.endswith(" --resume")
    assert load_checkpoint(models).task == 2
    resumed = subprocess.run([sys.executable, *command.split()[1:]], capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert _table(resumed.stdout) == reference[1]
    _assert_same_artefacts(models, reference[0])


def _tiny_run(data: Path, models: Path, *extra: str) -> dict:
    return main(
        [
            "--data_dir",
            str(data),
            "--models_dir",
            str(models),
            "--num_epochs",
            "2",
            "--batch_size",
            "4",
            "--reg_lambda",
            "0.5",
            *extra,
        ]
    )


def _error(capsys, data: Path, models: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as exc:
        _tiny_run(data, models, *extra)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_resume_with_different_arguments_lists_the_differences(tiny_data, tmp_path, capsys):
    _tiny_run(tiny_data, tmp_path / "m")
    err = _error(capsys, tiny_data, tmp_path / "m", "--resume", "--seed", "5", "--init_lr", "0.1")
    assert err == (
        "error: --resume with arguments that differ from the run in "
        f"{tmp_path / 'm'}: --init_lr 0.001 -> 0.1; --seed 0 -> 5"
    )


def test_fresh_run_into_a_used_folder_is_refused_and_overwrite_replaces_it(tiny_data, tmp_path, capsys):
    models = tmp_path / "m"
    _tiny_run(tiny_data, models)
    (models / "Task_9").mkdir()  # an artefact that only the earlier run had
    before = (models / "shared_model.pth").read_bytes()
    err = _error(capsys, tiny_data, models)
    assert "holds a previous run" in err and "--resume" in err and "--overwrite" in err
    assert (models / "shared_model.pth").read_bytes() == before
    _tiny_run(tiny_data, models, "--overwrite", "--seed", "3")
    assert not (models / "Task_9").exists()
    assert (models / "shared_model.pth").read_bytes() != before


def test_resume_of_a_finished_run_only_prints_the_table(tiny_data, tmp_path, capsys):
    first = _tiny_run(tiny_data, tmp_path / "m")
    capsys.readouterr()
    again = _tiny_run(tiny_data, tmp_path / "m", "--resume")
    assert "finished in the interrupted run, kept" in capsys.readouterr().out
    assert again["forgetting"] == first["forgetting"]


def test_nothing_to_resume(tiny_data, tmp_path, capsys):
    err = _error(capsys, tiny_data, tmp_path / "empty", "--resume")
    assert "nothing to resume" in err


def test_disk_full_while_saving_task_2_keeps_task_1_and_resume_finishes(tiny_data, tmp_path, capsys, monkeypatch):
    models = tmp_path / "m"
    reference = _tiny_run(tiny_data, tmp_path / "ref")
    real_save = torch.save
    shared_saves = []

    def save_then_fill_disk(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and "net.1.weight" in obj:  # a shared_model.pth, not a checkpoint
            shared_saves.append(1)
            if len(shared_saves) == 2:  # task 2's: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(io_utils.torch, "save", save_then_fill_disk)
    err = _error(capsys, tiny_data, models)
    assert err == (
        f"error: could not write {models / 'shared_model.pth'}: No space left on device; "
        "the previous version of the file is intact"
    )
    task_1 = torch.load(models / "shared_model.pth", weights_only=True)  # task 1's, complete
    assert set(task_1) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}
    assert not list(models.rglob(".*.tmp"))
    monkeypatch.setattr(io_utils.torch, "save", real_save)
    resumed = _tiny_run(tiny_data, models, "--resume")
    assert resumed["forgetting"] == reference["forgetting"]


def test_a_real_full_disk_on_a_small_tmpfs(tiny_data, tmp_path, capsys):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        err = _error(capsys, tiny_data, mount / "m")
        assert "No space left on device; the previous version of the file is intact" in err
        assert not list((mount / "m").rglob(".*.tmp"))
        for pth in (mount / "m").rglob("*.pth"):
            torch.load(pth, weights_only=True)  # whatever was written is complete
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, capsys, monkeypatch):
    import model_train

    calls = {"n": 0}

    class NanAfterOneEpoch(torch.nn.CrossEntropyLoss):
        def forward(self, logits, labels):
            calls["n"] += 1  # task 1 has 3 batches per epoch: the 4th call is epoch 2
            loss = super().forward(logits, labels)
            return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(model_train.nn, "CrossEntropyLoss", NanAfterOneEpoch)
    err = _error(capsys, tiny_data, tmp_path / "m")
    assert err == (
        "error: Task_1: the training loss became nan at Task_1 epoch 2/2; the last epoch's checkpoint is kept; "
        "start again with --penalty_step proximal (stable at any lambda) or a lower --init_lr (or --reg_lambda), "
        "and --overwrite"
    )
    checkpoint = load_checkpoint(tmp_path / "m")
    assert (checkpoint.task, checkpoint.epoch) == (1, 0)
    assert all(torch.isfinite(t).all() for t in checkpoint.model.values())
    diverged = json.loads((tmp_path / "m" / "results.json").read_text())["diverged"]
    assert diverged == {"task": 1, "message": err.removeprefix("error: ")}


def test_models_dir_that_is_a_file_or_unwritable(tiny_data, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    err = _error(capsys, tiny_data, tmp_path / "file")
    assert err == f"error: --models_dir {tmp_path / 'file'} exists and is not a folder"

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("utils.artefacts.run_folder.tempfile.TemporaryFile", refuse)
    err = _error(capsys, tiny_data, tmp_path / "locked")
    assert err == f"error: cannot use --models_dir {tmp_path / 'locked'}: Permission denied"


def test_truncated_image_names_the_file_and_leaves_no_artefacts(tmp_path, capsys):
    data = write_dataset(tmp_path / "Data")
    image = data / "Task_1" / "train" / "c1_1" / "3.png"
    image.write_bytes(image.read_bytes()[:40])
    err = _error(capsys, data, tmp_path / "m")
    assert err.startswith(f"error: corrupt or unreadable image {image}")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["data_files.json"]  # the record of the images only


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda d: [p.unlink() for p in (d / "Task_2" / "train" / "c2_0").iterdir()],
            "Task_2: class folder {d}/Task_2/train/c2_0 holds no images",
        ),
        (
            lambda d: [p.unlink() for p in (d / "Task_1" / "test").rglob("*.png")],
            "Task_1: class folder {d}/Task_1/test/c1_0 holds no images",
        ),
    ],
)
def test_empty_class_or_task_folders(tmp_path, capsys, damage, message):
    data = write_dataset(tmp_path / "Data")
    damage(data)
    err = _error(capsys, data, tmp_path / "m")
    assert err == "error: " + message.format(d=data)
    assert not (tmp_path / "m").exists()


def test_manifest_that_does_not_match_the_folders(tmp_path, capsys):
    data = write_dataset(tmp_path / "Data")
    text = (data / "manifest.json").read_text().replace('"c2_1"', '"c2_9"')
    (data / "manifest.json").write_text(text)
    err = _error(capsys, data, tmp_path / "m")
    assert err == "error: Task_2: the folders hold classes ['c2_0', 'c2_1'] but the manifest lists ['c2_0', 'c2_9']"


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "performance.txt"
    target.write_text("old\n")

    class Boom(Exception):
        pass

    with pytest.raises(Boom), io_utils.atomic_open(target, "w") as handle:
        handle.write("new and half")
        raise Boom
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["performance.txt"]


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_reg_params_pickle_is_refused_without_running_it(tiny_data, tmp_path, capsys):
    models = tmp_path / "m"
    _tiny_run(tiny_data, models)
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"net.1.weight": {"omega": _RunsACommand(marker)}})
    (models / "reg_params.pickle").write_bytes(evil)
    with pytest.raises(io_utils.UserError, match=r"refusing to load .*reg_params.pickle: global posix.system"):
        load_tensor_pickle(models / "reg_params.pickle")
    assert not marker.exists()
    # A run that meets it: make task 2 unfinished, so that --resume loads reg_params.pickle.
    results = json.loads((models / "results.json").read_text())
    results.update(tasks=results["tasks"][:1], accuracy_matrix=results["accuracy_matrix"][:1], complete=False)
    (models / "results.json").write_text(json.dumps(results))
    shutil.rmtree(models / "Task_2")
    err = _error(capsys, tiny_data, models, "--resume")
    assert err.startswith(f"error: refusing to load {models / 'reg_params.pickle'}: global posix.system")
    assert not marker.exists()


def test_malicious_pth_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": _RunsACommand(marker)}, tmp_path / "head.pth")
    with pytest.raises(io_utils.UserError, match="refusing to load"):
        io_utils.load_torch(tmp_path / "head.pth")
    assert not marker.exists()


def test_resume_with_workers_and_augmentation_is_exact(tmp_path, capsys, monkeypatch):
    """Interrupted after an epoch of task 2, resumed: identical to an uninterrupted run, with
    random crops and flips drawn in two DataLoader worker processes."""
    data = write_dataset(tmp_path / "Data", n_train=10, size=12, defaults={"pretrained": False, "num_freeze_layers": 0})
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "augment": True}))
    flags = ["--num_epochs", "3", "--num_workers", "2", "--image_size", "10"]
    reference = _tiny_run(data, tmp_path / "ref", *flags)
    with interrupted_after_checkpoint(monkeypatch, task_no=2), pytest.raises(SystemExit) as exc:
        _tiny_run(data, tmp_path / "m", *flags)
    assert exc.value.code == 130
    resumed = _tiny_run(data, tmp_path / "m", *flags, "--resume")
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert resumed["forgetting"] == reference["forgetting"]
    _assert_same_artefacts_2(tmp_path / "m", tmp_path / "ref")


def _assert_same_artefacts_2(models: Path, reference: Path) -> None:
    ours, ref = (load_tensor_pickle(m / "reg_params.pickle") for m in (models, reference))
    for name in ref:
        assert torch.equal(ours[name]["omega"], ref[name]["omega"]), name


def test_ctrl_c_before_anything_was_saved_says_to_start_again(tiny_data, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mas.train_model", interrupt)
    with pytest.raises(SystemExit) as exc:
        _tiny_run(tiny_data, tmp_path / "m")
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted before anything was saved; start again with" in err
    assert "--resume" not in err


def test_resume_refuses_a_rebuilt_data_split(tiny_data, tmp_path, capsys):
    _tiny_run(tiny_data, tmp_path / "m")
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    manifest["prepared_with"] = {"dataset": "synthetic", "seed": 1}
    (tiny_data / "manifest.json").write_text(json.dumps(manifest))
    err = _error(capsys, tiny_data, tmp_path / "m", "--resume")
    assert err.startswith(
        f"error: --resume with arguments that differ from the run in {tmp_path / 'm'}: --data_fingerprint "
    )


def test_resume_ignores_flags_that_do_not_change_the_result(tiny_data, tmp_path, tmp_path_factory):
    first = _tiny_run(tiny_data, tmp_path / "m")
    moved = tmp_path_factory.mktemp("elsewhere") / "Data"
    shutil.copytree(tiny_data, moved)
    again = _tiny_run(moved, tmp_path / "m", "--resume", "--si_xi", "5")
    assert again["forgetting"] == first["forgetting"]


def test_artefacts_get_the_usual_file_mode_not_mkstemps_0600(tiny_data, tmp_path):
    _tiny_run(tiny_data, tmp_path / "m")
    expected = io_utils.shared_mode()  # 0o644 under the usual umask 022
    for name in ("results.json", "shared_model.pth", "reg_params.pickle", "Task_1/performance.txt"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == expected, name


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda m: torch.save({"weight": torch.zeros(2, 256)}, m / "Task_1" / "head.pth"),
            "{m}/Task_1/head.pth has no entry for parameter 'bias' (1 missing)",
        ),
        (
            lambda m: torch.save(
                {**torch.load(m / "shared_model.pth"), "net.9.weight": torch.zeros(1)}, m / "shared_model.pth"
            ),
            "{m}/shared_model.pth has an unknown parameter 'net.9.weight' (1 not in the model)",
        ),
        (
            lambda m: torch.save(
                {**torch.load(m / "shared_model.pth"), "net.3.bias": torch.zeros(3)}, m / "shared_model.pth"
            ),
            "{m}/shared_model.pth: parameter 'net.3.bias' has shape (3,), the model expects (256,)",
        ),
    ],
)
def test_loaded_tensors_are_checked_against_the_model(tiny_data, tmp_path, capsys, damage, message):
    models = tmp_path / "m"
    _tiny_run(tiny_data, models)
    damage(models)
    err = _error(capsys, tiny_data, models, "--resume")
    assert err == "error: " + message.format(m=models)


def test_a_checkpoint_for_another_model_names_the_parameter(tiny_data, tmp_path, capsys, monkeypatch):
    with interrupted_after_checkpoint(monkeypatch), pytest.raises(SystemExit):
        _tiny_run(tiny_data, tmp_path / "m")
    capsys.readouterr()
    checkpoint = torch.load(tmp_path / "m" / "checkpoint.pth", weights_only=True)
    checkpoint["model"]["head.weight"] = torch.zeros(5, 256)
    torch.save(checkpoint, tmp_path / "m" / "checkpoint.pth")
    err = _error(capsys, tiny_data, tmp_path / "m", "--resume")
    assert err == (
        f"error: {tmp_path / 'm' / 'checkpoint.pth'}: the model: parameter 'head.weight' has shape (5, 256), "
        "the model expects (2, 256)"
    )


def test_malicious_head_through_the_command_line(tiny_data, tmp_path, capsys):
    models = tmp_path / "m"
    _tiny_run(tiny_data, models)
    marker = tmp_path / "pwned"
    torch.save({"weight": _RunsACommand(marker)}, models / "Task_2" / "head.pth")
    err = _error(capsys, tiny_data, models, "--resume")
    assert err == f"error: refusing to load {models / 'Task_2' / 'head.pth'}: global posix.system is not allowed"
    assert not marker.exists()


def test_a_pickle_of_allowed_globals_with_wrong_arguments(tmp_path):
    # torch._utils._rebuild_tensor_v2("x", ...): only allowed names, but not a tensor.
    payload = b"\x80\x04\x8c\x0ctorch._utils\x8c\x12_rebuild_tensor_v2\x93\x8c\x01x\x85R."
    (tmp_path / "reg_params.pickle").write_bytes(payload)
    with pytest.raises(io_utils.UserError, match="could not read .*reg_params.pickle: it is truncated or corrupt"):
        load_tensor_pickle(tmp_path / "reg_params.pickle")


def test_task_folder_without_class_folders(tmp_path, capsys):
    data = write_dataset(tmp_path / "Data")
    for folder in (data / "Task_2" / "test").iterdir():
        shutil.rmtree(folder)
    err = _error(capsys, data, tmp_path / "m")
    assert err == f"error: Task_2: {data / 'Task_2' / 'test'} holds no class folders"
    assert not (tmp_path / "m").exists()


def test_a_stiff_penalty_is_announced(tiny_data, tmp_path, capsys):
    _tiny_run(tiny_data, tmp_path / "ok")
    assert "warning" not in capsys.readouterr().out
    with contextlib.suppress(SystemExit):  # such a run may well diverge
        main(
            [
                "--data_dir",
                str(tiny_data),
                "--models_dir",
                str(tmp_path / "m"),
                "--num_epochs",
                "2",
                "--batch_size",
                "4",
                "--reg_lambda",
                "100000",
            ]
        )
    out = capsys.readouterr().out
    assert "warning: init_lr * 2 * reg_lambda * max(Omega) = " in out
    assert "exceeds 3.8, the stability limit of SGD on the penalty" in out


def test_a_run_of_an_earlier_version_resumes_with_the_flags_it_did_not_record(tiny_data, tmp_path, capsys):
    """A results.json without --amp, --cache, --penalty_step and --importance_batch_size (written
    before they existed) resumes when their values compute what that version computed."""
    first = _tiny_run(tiny_data, tmp_path / "m")
    path = tmp_path / "m" / "results.json"
    results = json.loads(path.read_text())
    for added_later in ("amp", "cache", "penalty_step", "importance_batch_size"):
        del results["args"][added_later]
    path.write_text(json.dumps(results))
    err = _error(capsys, tiny_data, tmp_path / "m", "--resume")
    assert err.endswith(": --cache 'off' -> 'auto'")  # the earlier version read the files every epoch
    err = _error(capsys, tiny_data, tmp_path / "m", "--resume", "--cache", "off", "--importance_batch_size", "8")
    assert err.endswith(": --importance_batch_size 4 -> 8")
    again = _tiny_run(tiny_data, tmp_path / "m", "--resume", "--cache", "off")
    assert again["forgetting"] == first["forgetting"]
