"""torchvision's downloaders (MNIST, CIFAR) made as patient as ``download``: a socket timeout (their
urllib calls take none) and the same retries, with urllib's and torchvision's errors turned into
short reasons for our one-line messages."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import re
import socket
import tarfile
import urllib.error
import zlib
from collections.abc import Callable, Iterator
from typing import TypeVar

from mas_data import download
from mas_data.download import retryable_status, with_retries
from mas_data.messages import errno_reason

T = TypeVar("T")

# What urllib raises when the network fails; torchvision lets most of them through.
NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)
# What a damaged .gz or .tar.gz raises while it is unpacked.
UNPACK_ERRORS = (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error)
TORCHVISION_MD5_ERROR = "File not found or corrupted."  # torchvision's words for an MD5 mismatch
MD5_NOTE = "the file is incomplete or damaged: its MD5 does not match"


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """torchvision's urllib calls take no timeout: every socket opened meanwhile gets this one."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def urllib_reason(err: BaseException) -> str:
    """'Connection refused', 'HTTP 404 Not Found', ... out of what urllib and torchvision raise."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException):
        err = err.reason
    text = str(err)
    if isinstance(err, RuntimeError):  # MNIST's: each mirror tried and its error, the last one last
        text = ([line for line in text.splitlines() if line.strip()] or [text])[-1]
    if isinstance(err, TimeoutError) or text.endswith("timed out>") or text == "timed out":
        return "the server did not answer in time"
    if isinstance(err, (http.client.IncompleteRead, ConnectionResetError)):
        return "the connection broke off during the transfer"
    return errno_reason(text)


def _torchvision_retry_reason(err: Exception) -> str | None:
    if isinstance(err, urllib.error.HTTPError):
        return urllib_reason(err) if retryable_status(err.code) else None
    if isinstance(err, NETWORK_ERRORS):
        return urllib_reason(err)
    text = str(err) if isinstance(err, RuntimeError) else ""
    if text.startswith("Error downloading"):  # MNIST's summary of its mirrors
        statuses = [int(code) for code in re.findall(r"got:\nHTTP Error (\d+)", text)]
        tried = text.count("got:\n")
        if statuses and len(statuses) == tried and not any(map(retryable_status, statuses)):
            return None
        reason = urllib_reason(err)
        return MD5_NOTE if reason == TORCHVISION_MD5_ERROR else reason
    # urllib ends a body cut short without an error: the MD5 check is where it shows.
    return MD5_NOTE if text.startswith(TORCHVISION_MD5_ERROR) else None


def fetch_torchvision(build: Callable[[], T], retries: int) -> T:
    """``build()`` (a torchvision dataset with download=True) with a socket timeout and retries."""
    with socket_timeout(max(download.TIMEOUT)):
        return with_retries(build, retries, _torchvision_retry_reason)
