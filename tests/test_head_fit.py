"""--resume checks every finished task's head against the task: as many outputs as its classes, over the
trunk's features. A head of another shape (tampered, or from another run) is one line naming the file,
what it holds and what was expected; nothing is written."""

from __future__ import annotations

import pytest
import torch

from main import main

FLAGS = ["--num_epochs", "1", "--batch_size", "4", "--reg_lambda", "0.5"]


@pytest.mark.parametrize("task,shape", [(1, (3, 256)), (2, (1, 256)), (1, (2, 255))])
def test_a_head_that_does_not_fit_its_task_is_refused(tiny_data, tmp_path, error_line, task, shape):
    models = tmp_path / "m"
    argv = ["--data_dir", str(tiny_data), "--models_dir", str(models), *FLAGS]
    main(argv)
    head = models / f"Task_{task}" / "head.pth"
    torch.save({"weight": torch.zeros(shape), "bias": torch.zeros(shape[0])}, head)
    before = {p: p.read_bytes() for p in sorted(models.rglob("*")) if p.is_file()}
    line = error_line(lambda: main([*argv, "--resume"]))
    assert line == (
        f"error: {head} holds a head of {shape[0]} outputs over {shape[1]} features, but Task_{task} has 2 classes "
        "and the trunk gives 256 features"
    )
    assert {p: p.read_bytes() for p in sorted(models.rglob("*")) if p.is_file()} == before
