"""Downloads that survive a bad network: HTTP with resume (``Range``) into ``<file>.part``, the MD5
checked over every byte, and a transfer that breaks off or stalls retried with a growing pause.

``with_retries`` and the ``TIMEOUT`` here are also what ``torchvision_fetch`` puts around
torchvision's own downloaders, so both kinds of download behave alike.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import requests
from tqdm import tqdm

from mas_data.messages import errno_reason
from utils import UserError

CHUNK = 1 << 20
TIMEOUT = (15, 60)  # seconds to connect, and to wait for each piece of the answer
RETRY_DELAY = 1.0  # seconds before the second attempt of a download; doubled after each failure
MAX_RETRY_DELAY = 60.0

T = TypeVar("T")


def with_retries(attempt: Callable[[], T], retries: int, retry_reason: Callable[[Exception], str | None]) -> T:
    """``attempt()`` up to ``retries`` times, pausing RETRY_DELAY, then twice as long each time.

    ``retry_reason`` says why an error is worth another attempt (a dropped connection, a
    timeout), or None for one that would fail again (a missing file); the last error is raised.
    """
    for number in range(1, retries + 1):
        try:
            return attempt()
        except Exception as err:
            reason = retry_reason(err)
            if number == retries or reason is None:
                raise
            delay = min(RETRY_DELAY * 2 ** (number - 1), MAX_RETRY_DELAY)
            print(f"download failed ({reason}); attempt {number + 1} of {retries} in {delay:g} s")
            time.sleep(delay)
    raise AssertionError("unreachable: retries >= 1")


def retryable_status(status: int) -> bool:
    """Server errors and 'too many requests' may pass; other HTTP errors will not."""
    return status >= 500 or status in (408, 429)


def _request_reason(err: requests.RequestException) -> str:
    if isinstance(
        err, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema)
    ):
        return "not a valid http:// or https:// address"  # our words: requests' own wording changes between releases
    if isinstance(err, requests.HTTPError) and err.response is not None:
        return f"HTTP {err.response.status_code} {err.response.reason}"
    if isinstance(err, requests.Timeout) or "Read timed out" in str(err):  # a stall mid-body: a ConnectionError
        return "the server did not answer in time"
    if isinstance(err, requests.exceptions.ChunkedEncodingError):
        return "the connection broke off during the transfer"
    return errno_reason(str(err))


def _request_retry_reason(err: Exception) -> str | None:
    if isinstance(err, requests.HTTPError):
        status = err.response.status_code if err.response is not None else 0
        return _request_reason(err) if retryable_status(status) else None
    if isinstance(err, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        return _request_reason(err)
    return None


def hash_file(path: Path) -> hashlib._Hash:
    """MD5 of a file, read in chunks (never whole in memory)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest


def verify_md5(path: Path, expected: str, hint: str) -> None:
    """Hash an existing file once; a mismatch is an error that ends with ``hint``."""
    got = hash_file(path).hexdigest()
    if got != expected:
        raise UserError(
            f"{path} has MD5 {got}, not the expected {expected}; {hint}, or pass --md5 {got} if you trust it"
        )


def _open_part(response: requests.Response, part: Path, done: int) -> int:
    """How many bytes of ``part`` the answer continues: ``done`` for a resume, 0 for the whole file."""
    if done and response.status_code == 206:
        start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        if start and int(start.group(1)) == done:
            return done
        raise UserError(f"{response.url} answered the resume request with another range; delete {part} and retry")
    return 0  # a plain 200: the server ignored the Range header, so start again


def _stream(response: requests.Response, part: Path, digest: hashlib._Hash, done: int) -> None:
    """Append the body to ``part``, hashing it on the way, with a progress bar in bytes."""
    size = response.headers.get("Content-Length")
    total = int(size) + done if size and size.isdigit() else None
    with (
        open(part, "ab" if done else "wb") as out,
        tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name) as bar,
    ):
        for chunk in response.iter_content(CHUNK):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))


def _download_part(url: str, part: Path) -> hashlib._Hash:
    """Bring ``part`` up to the whole file; returns the MD5 of all its bytes."""
    done = part.stat().st_size if part.exists() else 0
    # The bytes already there are hashed once, so the digest covers the whole file at the end.
    digest = hash_file(part) if done else hashlib.md5()
    headers = {"Range": f"bytes={done}-"} if done else {}
    with requests.get(url, stream=True, timeout=TIMEOUT, headers=headers) as response:
        if done and response.status_code == 416:  # the part already holds the whole file
            return digest
        response.raise_for_status()
        kept = _open_part(response, part, done)
        if kept != done:
            digest = hashlib.md5()
        _stream(response, part, digest, kept)
    return digest


def download(url: str, dest: Path, expected_md5: str, retries: int, offline_hint: str) -> None:
    """Download ``url`` to ``dest`` through ``dest.part``; a transfer that breaks off or stalls is
    attempted ``retries`` times in all, each resuming from what is on disk (and so is a rerun).
    ``offline_hint`` ends the error of a download that failed: how to do without it."""
    part = dest.with_name(dest.name + ".part")
    try:
        got = with_retries(lambda: _download_part(url, part).hexdigest(), retries, _request_retry_reason)
    except requests.RequestException as err:
        raise UserError(
            f"could not download {url} ({_request_reason(err)}); run again to retry (a partial download "
            f"resumes where it stopped), {offline_hint}"
        ) from err
    except OSError as err:
        raise UserError(f"could not write {part}: {err.strerror or err}; free some space and run again") from err
    if got != expected_md5:
        part.unlink()
        raise UserError(
            f"the file downloaded from {url} has MD5 {got}, not the expected {expected_md5}; deleted it; "
            "run again to download it anew, or check --url and --md5"
        )
    part.rename(dest)
