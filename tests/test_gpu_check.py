"""benchmarks/gpu_check.py's reduced CPU mode: the same script that checks the GPU path on a device,
run here end to end, so that it is known to work before a GPU session spends its time on it."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

CHECKS = (
    "--cache ram and --cache off give bit-identical artefacts",
    "SIGKILL in task 2, then --resume: equal to the uninterrupted run",
    "MAS penalty active: sum Omega_1 (theta - theta_1*)^2 below fine-tuning's",
    "MAS forgets no more than fine-tuning (same seed)",
)
COSTS = (
    "optimizer step: LocalSgd with penalty / torch SGD",
    "importance pass (MAS, batch estimator)",
    "training loader (--cache ram) / training step",
    "peak GPU memory of the training step",
    "our epoch / minimal torchvision loop",
)


def test_the_cpu_mode_passes_every_check_and_prints_the_table():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for check in CHECKS:
        assert any(line.strip().startswith(check) and " PASS " in line for line in lines), (check, done.stdout)
    for cost in COSTS:
        assert any(line.strip().startswith(cost) for line in lines), (cost, done.stdout)
    assert any(line.strip().startswith("main.py --amp off") for line in lines)
