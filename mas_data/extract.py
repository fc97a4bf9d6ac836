"""Safe extraction of a zip archive: every member is checked before anything is written, and a link,
an absolute path or a '..' that would land outside the target folder is refused, never sanitised;
a damaged member is reported by name, in one line."""

from __future__ import annotations

import lzma
import re
import stat
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from mas_data.download import CHUNK
from mas_data.messages import first_line
from utils import UserError

# What reading a damaged zip member raises: bad CRC or header, a broken deflate / bzip2 / lzma
# stream (bz2 raises OSError), an unsupported method or flag, an encrypted member.
MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, NotImplementedError, RuntimeError)


def check_member(info: zipfile.ZipInfo, archive: Path) -> None:
    """Refuse (never sanitise) a member that is a link or whose path leaves the target folder."""
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        why = "is a symbolic link"
    elif name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        why = "has an absolute path"
    elif ".." in re.split(r"[\\/]", name):
        why = "has a '..' component that escapes the target folder"
    else:
        return
    raise UserError(f"refusing to extract {archive}: member {name!r} {why}; the archive is damaged or malicious")


def check_members(zf: zipfile.ZipFile, archive: Path) -> None:
    """``check_member`` on every member, before anything is written."""
    for info in zf.infolist():
        check_member(info, archive)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path, src=None):
    """``zf.open(info)`` (without ``src``), else the next chunk of ``src``; an error names the member."""
    try:
        return zf.open(info) if src is None else src.read(CHUNK)
    except MEMBER_ERRORS as err:
        raise UserError(
            f"could not read member {info.filename!r} of {archive} ({first_line(err)}); the archive is "
            "damaged: delete it to download it again, or give another --archive"
        ) from err


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, archive: Path) -> None:
    """Copy one member; errors while writing (the disk, not the archive) pass unchanged."""
    with _read_member(zf, info, archive) as src, open(dest, "wb") as out:
        while chunk := _read_member(zf, info, archive, src):
            out.write(chunk)


def extract_members(
    zf: zipfile.ZipFile, target: Path, archive: Path, wanted: Callable[[zipfile.ZipInfo], PurePosixPath | None]
) -> None:
    """Copy every member that ``wanted`` maps to a path (inside ``target``); the others are skipped.
    Run ``check_members`` first: this trusts the paths it is given."""
    made: set[Path] = set()
    for info in zf.infolist():
        inner = wanted(info)
        if inner is None:
            continue
        dest = target / inner
        if dest.parent not in made:
            dest.parent.mkdir(parents=True, exist_ok=True)
            made.add(dest.parent)
        _copy_member(zf, info, dest, archive)
