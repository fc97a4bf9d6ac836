"""Shared fixtures: tiny task sequences generated on disk in the layout data_prep.py writes."""

from __future__ import annotations

import functools
import http.server
import json
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


@pytest.fixture
def fast_retries(monkeypatch):
    """Download retries without the real pauses between attempts."""
    import data_prep

    monkeypatch.setattr(data_prep, "RETRY_DELAY", 0.001)


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
