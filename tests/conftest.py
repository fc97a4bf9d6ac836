"""Shared fixtures: tiny task sequences generated on disk in the layout data_prep.py writes."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# The quick tier (`python3 -m pytest -m "not slow"`) leaves out these modules, which start real processes
# (main.py, torchrun ranks, sweeps, signals) or train AlexNet; tests elsewhere may carry @pytest.mark.slow.
SLOW_MODULES = {
    "test_checkpoint_every",
    "test_distributed",
    "test_error_exit",
    "test_gpu_check",
    "test_hparam_search",
    "test_interrupts",
    "test_locks",
    "test_reliability",
    "test_scenarios_distributed",
    "test_startup",
    "test_sweep",
}


def pytest_collection_modifyitems(items: list) -> None:
    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def write_dataset(
    root: Path,
    num_tasks: int = 2,
    classes_per_task: int = 2,
    n_train: int = 6,
    n_test: int = 4,
    size: int = 8,
    channels: int = 1,
    seed: int = 0,
    defaults: dict | None = None,
) -> Path:
    """Random images whose mean brightness depends on the class, so a model can learn them."""
    rng = np.random.default_rng(seed)
    mode = "L" if channels == 1 else "RGB"
    tasks = []
    for t in range(1, num_tasks + 1):
        names = [f"c{t}_{k}" for k in range(classes_per_task)]
        for split, n in (("train", n_train), ("test", n_test)):
            for k, name in enumerate(names):
                folder = root / f"Task_{t}" / split / name
                folder.mkdir(parents=True)
                for i in range(n):
                    base = 40 + 170 * k / max(classes_per_task - 1, 1)
                    shape = (size, size) if channels == 1 else (size, size, 3)
                    pixels = np.clip(rng.normal(base, 30, shape), 0, 255).astype(np.uint8)
                    Image.fromarray(pixels, mode=mode).save(folder / f"{i}.png")
        tasks.append(
            {
                "name": f"Task_{t}",
                "classes": names,
                "num_train": n_train * classes_per_task,
                "num_test": n_test * classes_per_task,
            }
        )
    manifest = {
        "dataset": "synthetic",
        "tasks": tasks,
        "num_tasks": num_tasks,
        "image_size": size,
        "channels": channels,
        "mean": [0.5] * channels,
        "std": [0.25] * channels,
        "augment": False,
        "default_arch": "mlp",
        "defaults": defaults
        if defaults is not None
        else {"pretrained": False, "num_freeze_layers": 0, "num_workers": 0},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def make_test_config(data: Path, models: Path, **overrides):
    """A RunConfig for the generated data: main.py's built-in defaults, the manifest's, then ``overrides``."""
    from config import default_values, make_config, manifest_defaults
    from utils.data.tasks import read_manifest

    manifest = read_manifest(data)
    values = default_values(data_dir=str(data), models_dir=str(models))
    values.update(manifest_defaults(manifest, values, data / "manifest.json"))
    return make_config({**values, **overrides}, manifest)


def new_run_state(config):
    """A fresh run in memory, as main.py starts one."""
    from main import _new_results
    from mas import RunState

    return RunState(config, _new_results(config))


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "Data")


class RangeRequestHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with support for ``Range: bytes=N-`` (resumed downloads)."""

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def send_head(self):
        range_header = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not range_header or not path.is_file():
            return super().send_head()
        start = int(range_header.removeprefix("bytes=").split("-")[0])
        size = path.stat().st_size
        handle = open(path, "rb")  # noqa: SIM115 (closed by the base class after copying)
        handle.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        return handle


@pytest.fixture
def http_server(tmp_path: Path):
    """Serve ``<tmp_path>/www`` on 127.0.0.1; yields (folder, base_url)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(RangeRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """An address on 127.0.0.1 where nothing listens (an offline server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_same_run(models: Path, reference: Path) -> None:
    """Bit for bit the same run: every task's performance.txt, classes.txt and head, the trunk,
    reg_params.pickle and the accuracy matrix."""
    import torch

    from utils.artefacts.files import load_tensor_pickle

    tasks = sorted(p.name for p in reference.glob("Task_*"))
    assert sorted(p.name for p in models.glob("Task_*")) == tasks
    for task in tasks:
        for name in ("performance.txt", "classes.txt"):
            assert (models / task / name).read_text() == (reference / task / name).read_text(), (task, name)
    for name in [*(f"{t}/head.pth" for t in tasks), "shared_model.pth"]:
        ours, ref = (torch.load(m / name, weights_only=True) for m in (models, reference))
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), name
    ours, ref = (load_tensor_pickle(m / "reg_params.pickle") for m in (models, reference))
    assert sorted(ours) == sorted(ref)
    assert all(torch.equal(ours[n][k], ref[n][k]) for n in ref for k in ("omega", "init_val", "prev_omega"))
    matrices = [json.loads((m / "results.json").read_text())["accuracy_matrix"] for m in (models, reference)]
    assert matrices[0] == matrices[1]


@pytest.fixture
def fast_retries(monkeypatch):
    """Download retries without the real pauses between attempts."""
    from mas_data import download

    monkeypatch.setattr(download, "RETRY_DELAY", 0.001)


class ScriptedHandler(RangeRequestHandler):
    """Serves like RangeRequestHandler, but each transfer first takes the next fault of the server's
    plan: 'cut' (the first ``cut`` bytes of the body, then the connection closes), 'stall' (those
    bytes, then silence until the test ends), 'status:NNN' (that HTTP error); 'whole' once the plan
    is used up. torchvision's redirect probe (a GET with a 'Method: HEAD' header) gets the headers only."""

    def do_GET(self) -> None:
        if self.headers.get("Method") == "HEAD":
            self.server.probes += 1
            return self.do_HEAD()
        fault = self.server.plan.pop(0) if self.server.plan else "whole"
        self.server.seen.append(self.headers.get("Range"))
        if fault.startswith("status:"):
            return self.send_error(int(fault.removeprefix("status:")))
        source = self.send_head()
        if source is None:
            return None
        with source:
            if fault == "whole":
                return self.copyfile(source, self.wfile)
            self.wfile.write(source.read(self.server.cut))
            self.wfile.flush()
            if fault == "stall":
                self.server.release.wait(10)
        return None


@pytest.fixture
def scripted_server(tmp_path: Path):
    """A server on 127.0.0.1 for ``<tmp_path>/served`` that plays ``server.plan``; ``server.seen``
    lists the Range header of every transfer, ``server.probes`` counts torchvision's probes."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(ScriptedHandler, directory=str(root)))
    server.root, server.plan, server.seen, server.probes = root, [], [], 0
    server.cut, server.release = 16 * 1024, threading.Event()
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def error_line(capsys):
    """``error_line(call)`` runs a call that must exit with ``code`` (1 by default) and returns its one
    ``error:`` line: the last of stderr (progress bars may come before it, unless ``alone``), no traceback."""

    def run(call, code: int = 1, alone: bool = False) -> str:
        with pytest.raises(SystemExit) as exc:
            call()
        assert exc.value.code == code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert "Traceback" not in err and len(lines) == 1 and err.rstrip().endswith(lines[0]), err
        assert not alone or err == lines[0] + "\n", err
        return lines[0]

    return run


@contextlib.contextmanager
def interrupted_after_checkpoint(monkeypatch, task_no: int | None = None, epoch: int = 0):
    """Inside the block, main.py raises KeyboardInterrupt (Ctrl-C) right after writing the checkpoint of
    ``epoch`` (0-based) of ``task_no`` (None: the first checkpoint); on leaving, checkpoints are normal."""
    import utils.artefacts.checkpoint as checkpoint_module

    real_save = checkpoint_module.save_checkpoint

    def save_then_stop(models_dir, saved_task, saved_epoch, *args):
        real_save(models_dir, saved_task, saved_epoch, *args)
        if task_no is None or (saved_task, saved_epoch) == (task_no, epoch):
            raise KeyboardInterrupt

    monkeypatch.setattr("mas.save_checkpoint", save_then_stop)
    try:
        yield
    finally:
        monkeypatch.setattr("mas.save_checkpoint", real_save)
