"""Downloads that break off or stall are retried within one run (issue 13.1): the Tiny-ImageNet zip
through requests (each attempt resumes with a Range request), MNIST through torchvision (under a
socket timeout); servers on 127.0.0.1 that cut or stall transfers on purpose."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
import requests
from test_data_prep_mnist import IDX, mnist_like, write_raw
from test_data_prep_tiny import SEED0_SPLIT, download_failed, expected_tree, leftovers, tree, write_tiny_zip
from torchvision.datasets import MNIST

import data_prep as dp
from mas_data import download
from mas_data import torchvision_fetch as tv_fetch
from mas_data.tiny_imagenet import TINY_ZIP

CUT = 16 * 1024


@pytest.fixture
def tiny(scripted_server, monkeypatch, fast_retries):
    """The Tiny-ImageNet stand-in on the scripted server; yields (server, url, archive bytes)."""
    archive = write_tiny_zip(scripted_server.root / TINY_ZIP)
    assert archive.stat().st_size > 4 * CUT  # room for several cuts before the end
    monkeypatch.setattr(download, "CHUNK", 1024)  # small reads, so the bytes before a cut reach the disk
    scripted_server.cut = CUT
    return scripted_server, f"{scripted_server.base_url}/{TINY_ZIP}", archive.read_bytes()


def run(tmp_path: Path, *flags: str) -> Path:
    dp.main(["--data_dir", str(tmp_path / "Data"), "--download_dir", str(tmp_path / "dl"), *flags])
    return tmp_path / "Data"


def tiny_flags(url: str, data: bytes) -> list[str]:
    return ["--url", url, "--md5", hashlib.md5(data).hexdigest(), "--num_tasks", "2"]


def test_two_transfers_cut_midway_are_resumed_within_one_run(tiny, tmp_path, capsys):
    server, url, data = tiny
    server.plan = ["cut", "cut"]
    run(tmp_path, *tiny_flags(url, data))
    assert server.seen == [None, f"bytes={CUT}-", f"bytes={2 * CUT}-"]
    assert (tmp_path / "dl" / TINY_ZIP).read_bytes() == data
    assert tree(tmp_path / "Data") == expected_tree(SEED0_SPLIT)
    assert leftovers(tmp_path, tmp_path / "dl") == []
    out = capsys.readouterr().out
    for attempt in (2, 3):
        line = f"download failed (the connection broke off during the transfer); attempt {attempt} of 3 in "
        assert line in out


@pytest.mark.parametrize("retries", [1, 2, 3])
def test_when_every_attempt_breaks_off_the_run_stops_with_the_one_line(tiny, tmp_path, error_line, retries):
    server, url, data = tiny
    server.plan = ["cut"] * retries
    flags = tiny_flags(url, data)
    line = error_line(lambda: run(tmp_path, *flags, "--retries", str(retries)))
    assert line == download_failed(url, "the connection broke off during the transfer")
    assert len(server.seen) == retries
    assert (tmp_path / "dl" / f"{TINY_ZIP}.part").read_bytes() == data[: retries * CUT]
    assert not (tmp_path / "Data").exists()
    run(tmp_path, *flags)  # a rerun resumes from what the attempts left
    assert server.seen[retries:] == [f"bytes={retries * CUT}-"]
    assert (tmp_path / "dl" / TINY_ZIP).read_bytes() == data


def test_a_transfer_that_stalls_times_out_and_is_resumed(tiny, tmp_path, monkeypatch):
    server, url, data = tiny
    monkeypatch.setattr(download, "TIMEOUT", (2, 0.3))
    server.plan = ["stall"]
    run(tmp_path, *tiny_flags(url, data))
    assert server.seen == [None, f"bytes={CUT}-"]
    assert (tmp_path / "dl" / TINY_ZIP).read_bytes() == data


def test_a_server_that_stalls_every_time_gives_the_one_line(tiny, tmp_path, error_line, monkeypatch):
    server, url, data = tiny
    monkeypatch.setattr(download, "TIMEOUT", (2, 0.3))
    server.plan = ["stall", "stall"]
    line = error_line(lambda: run(tmp_path, *tiny_flags(url, data), "--retries", "2"))
    assert line == download_failed(url, "the server did not answer in time")
    assert (tmp_path / "dl" / f"{TINY_ZIP}.part").read_bytes() == data[: 2 * CUT]


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_server_error_is_retried(tiny, tmp_path, status):
    server, url, data = tiny
    server.plan = [f"status:{status}", "cut"]
    run(tmp_path, *tiny_flags(url, data))
    assert server.seen == [None, None, f"bytes={CUT}-"]
    assert (tmp_path / "dl" / TINY_ZIP).read_bytes() == data


@pytest.mark.parametrize(("status", "reason"), [(404, "Not Found"), (403, "Forbidden"), (410, "Gone")])
def test_a_refusal_of_the_server_is_not_retried(tiny, tmp_path, error_line, status, reason):
    server, url, data = tiny
    server.plan = [f"status:{status}"] * 3
    line = error_line(lambda: run(tmp_path, *tiny_flags(url, data)))
    assert line == download_failed(url, f"HTTP {status} {reason}")
    assert server.seen == [None]


def test_every_request_carries_the_connect_and_read_timeout(tiny, tmp_path, monkeypatch):
    server, url, data = tiny
    timeouts = []
    real = requests.Session.request

    def recorded(session, method, url, **kwargs):
        timeouts.append(kwargs.get("timeout"))
        return real(session, method, url, **kwargs)

    monkeypatch.setattr(requests.Session, "request", recorded)
    server.plan = ["cut", "status:503"]
    run(tmp_path, *tiny_flags(url, data))
    assert timeouts == [download.TIMEOUT] * 3


class Flaky:
    """Fails with the given errors in turn, then returns 'done'."""

    def __init__(self, *errors: Exception) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def test_the_pause_doubles_after_each_failure_up_to_its_cap(monkeypatch, capsys):
    pauses = []
    monkeypatch.setattr(download.time, "sleep", pauses.append)
    monkeypatch.setattr(download, "RETRY_DELAY", 1.5)
    monkeypatch.setattr(download, "MAX_RETRY_DELAY", 5.0)
    attempt = Flaky(*[requests.ConnectionError("[Errno 104] Connection reset by peer")] * 4)
    assert download.with_retries(attempt, 5, download._request_retry_reason) == "done"
    assert pauses == [1.5, 3.0, 5.0, 5.0] and attempt.calls == 5
    assert capsys.readouterr().out.splitlines()[0] == (
        "download failed (Connection reset by peer); attempt 2 of 5 in 1.5 s"
    )


@pytest.mark.parametrize(
    "error",
    [requests.exceptions.InvalidURL("no host"), requests.exceptions.MissingSchema("no scheme"), ValueError("bug")],
)
def test_errors_that_would_come_again_are_raised_at_once(monkeypatch, error):
    monkeypatch.setattr(download.time, "sleep", lambda _: pytest.fail("no pause for an error that is not transient"))
    attempt = Flaky(error)
    with pytest.raises(type(error)):
        download.with_retries(attempt, 3, download._request_retry_reason)
    assert attempt.calls == 1


# --- MNIST through torchvision ------------------------------------------------------------------


@pytest.fixture
def mnist_server(scripted_server, monkeypatch, fast_retries):
    """The four MNIST .gz stand-ins served, MNIST's mirrors and MD5s pointed at them."""
    write_raw(scripted_server.root, compress=True)
    root = scripted_server.root
    resources = [(f"{n}.gz", hashlib.md5((root / f"{n}.gz").read_bytes()).hexdigest()) for p in IDX.values() for n in p]
    monkeypatch.setattr(MNIST, "mirrors", [f"{scripted_server.base_url}/"])
    monkeypatch.setattr(MNIST, "resources", resources)
    scripted_server.cut = 100
    return scripted_server


def run_mnist(tmp_path: Path, *flags: str) -> Path:
    return run(tmp_path, "--dataset", "mnist", *flags)


def assert_mnist_written(data: Path) -> None:
    pixels, labels = mnist_like("test")
    assert sorted(p.name for p in (data / "Task_1" / "test" / "0").iterdir()) == [
        f"{i:05d}.png" for i in range(len(labels)) if labels[i] == 0
    ]


def test_mnist_transfers_cut_twice_are_retried_within_one_run(mnist_server, tmp_path, capsys):
    mnist_server.plan = ["cut", "cut"]
    data = run_mnist(tmp_path)
    assert_mnist_written(data)
    assert len(mnist_server.seen) == 4 + 2  # each file once, the first one three times
    # urllib takes a body cut short for the whole file: torchvision's MD5 check finds it out.
    assert capsys.readouterr().out.count(f"download failed ({tv_fetch.MD5_NOTE})") == 2
    assert socket.getdefaulttimeout() is None


def test_an_mnist_transfer_that_stalls_times_out_and_is_retried(mnist_server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "TIMEOUT", (0.5, 0.5))
    mnist_server.plan = ["stall"]
    assert_mnist_written(run_mnist(tmp_path))
    assert len(mnist_server.seen) == 5
    assert socket.getdefaulttimeout() is None


def test_an_mnist_server_that_always_stalls_gives_the_one_line(mnist_server, tmp_path, error_line, monkeypatch):
    monkeypatch.setattr(download, "TIMEOUT", (0.5, 0.5))
    mnist_server.plan = ["stall", "stall"]
    line = error_line(lambda: run_mnist(tmp_path, "--retries", "2"))
    assert line == (
        f"error: could not download the MNIST files from {mnist_server.base_url}/ (the server did not answer in "
        f"time); run again when online, copy the four MNIST .gz files into {tmp_path / 'dl' / 'MNIST' / 'raw'}, "
        "or use --dataset digits for the offline demo"
    )
    assert socket.getdefaulttimeout() is None
    assert not (tmp_path / "Data").exists()


def test_an_mnist_file_missing_on_the_server_is_not_retried(mnist_server, tmp_path, error_line):
    (mnist_server.root / "train-images-idx3-ubyte.gz").unlink()
    line = error_line(lambda: run_mnist(tmp_path))
    assert line.startswith(
        f"error: could not download MNIST's train-images-idx3-ubyte.gz from {mnist_server.base_url}/ "
        "(HTTP Error 404: File not found); "
    )
    assert mnist_server.probes == 1


@pytest.mark.parametrize("previous", [None, 7.0])
def test_torchvision_calls_run_under_a_socket_timeout_that_is_restored(monkeypatch, previous):
    monkeypatch.setattr(download, "TIMEOUT", (3, 11))
    seen = []
    socket.setdefaulttimeout(previous)
    try:
        assert tv_fetch.fetch_torchvision(lambda: seen.append(socket.getdefaulttimeout()) or "ok", 1) == "ok"
        assert seen == [11] and socket.getdefaulttimeout() == previous
        with pytest.raises(KeyError):
            tv_fetch.fetch_torchvision(lambda: {}["missing"], 3)
        assert socket.getdefaulttimeout() == previous
    finally:
        socket.setdefaulttimeout(None)


def test_mnist_uses_files_already_there_without_asking_the_server(mnist_server, tmp_path):
    write_raw(tmp_path / "dl" / "MNIST" / "raw")
    assert_mnist_written(run_mnist(tmp_path))
    assert mnist_server.seen == [] and mnist_server.probes == 0
