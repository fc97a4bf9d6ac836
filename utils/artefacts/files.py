"""Atomic writes and safe loading of every artefact of a MAS run.

Writes go to a temporary file in the destination folder, are flushed and
fsynced, then renamed over the destination, so a crash at any instant leaves
either the old or the new file. Loading never executes code: ``.pth`` files go
through ``torch.load(weights_only=True)`` and ``reg_params.pickle`` (kept as a
pickle for compatibility with the seed implementation) through an unpickler that
only rebuilds dicts, lists, strings, numbers and tensors.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import re
import signal
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from utils import UserError
from utils.runtime import interrupt


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def shared_mode(directory: bool = False) -> int:
    """The mode a new file (or folder) gets from open()/mkdir() under the user's umask."""
    return (0o777 if directory else 0o666) & ~_UMASK


def _fsync_dir(folder: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the enclosed write is complete, then raise KeyboardInterrupt (outside a run;
    during a run, utils.runtime.interrupt already turns signals into a request checked at safe points)."""
    if threading.current_thread() is not threading.main_thread() or interrupt.active():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success.

    Ctrl-C during the write is held until the file is complete. An OSError (disk full,
    read-only folder) becomes a UserError that names the file and says the previous
    version is intact.
    """
    path = Path(path)
    tmp = None
    try:
        with _sigint_deferred():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, mode) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, shared_mode())  # mkstemp makes 0600 files; artefacts are shared
            os.replace(tmp, path)
            tmp = None
            _fsync_dir(path.parent)
    except OSError as err:
        reason = err.strerror or str(err)
        raise UserError(f"could not write {path}: {reason}; the previous version of the file is intact") from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


class _RecordingWriter:
    """A file proxy for torch.save, which turns the OSError of a failed write into a vague
    RuntimeError; the proxy keeps the OSError so that the real reason can be reported."""

    def __init__(self, handle: IO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    with atomic_open(path) as handle:
        writer = _RecordingWriter(handle)
        try:
            torch.save(obj, writer)
        except RuntimeError as err:
            raise (writer.error or OSError(errno.EIO, f"torch.save failed: {err}")) from err


def save_pickle(obj: Any, path: str | os.PathLike) -> None:
    with atomic_open(path) as handle:
        pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)


def save_text(text: str, path: str | os.PathLike) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def save_json(obj: Any, path: str | os.PathLike) -> None:
    save_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def _weights_only_reason(err: Exception) -> str:
    """One line out of torch's multi-line weights_only refusal: the global it met, if it says."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f"global {found.group(1)} is not allowed" if found else "it holds more than tensors and plain containers"


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_torch(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors and plain containers, onto the CPU (``mmap``: tensors
    are read only when used)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UserError(f"refusing to load {path}: {_weights_only_reason(err)}") from err
    except Exception as err:  # untrusted bytes fail in many ways: zip, pickle, storage errors
        raise UserError(f"could not read {path}: it is truncated or not a PyTorch file ({_first_line(err)})") from err


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise UserError(f"missing file {path}") from err
    except (OSError, ValueError) as err:
        raise UserError(f"could not read {path}: {err}") from err


def _storage_from_bytes(data: bytes) -> Any:
    # The stock rebuild function calls torch.load(weights_only=False) on these bytes.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals that plain-pickled tensors need; refuses everything else."""

    allowed = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("collections", "OrderedDict"): OrderedDict,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def load_tensor_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a file that may hold only dicts, lists, strings, numbers and tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _TensorOnlyUnpickler(handle).load()
    except FileNotFoundError as err:
        raise UserError(f"missing file {path}") from err
    except pickle.UnpicklingError as err:
        reason = _weights_only_reason(err) if "GLOBAL" in str(err) else _first_line(err)
        raise UserError(f"refusing to load {path}: {reason}; it may only hold dicts and tensors") from err
    except Exception as err:  # untrusted bytes: allowed globals with wrong arguments fail in many ways
        raise UserError(f"could not read {path}: it is truncated or corrupt ({_first_line(err)})") from err
