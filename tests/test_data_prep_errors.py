"""data_prep.py answers bad input with one `error:` line and a non-zero exit, never a traceback
(issue 14): damaged archive members, numeric flags at their limits, folders that are files or
cannot be written, malformed manifests, bad URLs, Ctrl-C, and anything unexpected."""

from __future__ import annotations

import bz2
import hashlib
import json
import lzma
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
from test_data_prep_tiny import ROOT, WNIDS, write_tiny_zip

import data_prep as dp
from mas_data import download, image_tasks
from mas_data.tiny_imagenet import TINY_ZIP

REPO = Path(__file__).resolve().parents[1]
NOTE = f"{ROOT}/val/notes.txt"  # a compressible member, so that damage breaks its stream
NOTE_TEXT = b"".join(b"line %d of a note that compresses well\n" % i for i in range(400))
JPEG = f"{ROOT}/train/{WNIDS[0]}/images/{WNIDS[0]}_1.JPEG"  # a stored member


def run(tmp_path: Path, *flags: str) -> Path:
    """data_prep.py into tmp_path (with its download folder where the dataset downloads)."""
    argv = ["--data_dir", str(tmp_path / "Data"), *flags]
    dataset = flags[flags.index("--dataset") + 1] if "--dataset" in flags else "tiny-imagenet"
    if dataset != "digits":
        argv += ["--download_dir", str(tmp_path / "dl")]
    return dp.main(argv)


# --- Damaged archive members ---------------------------------------------------------------------


def zip_with_note(path: Path, method: int) -> Path:
    note = zipfile.ZipInfo(NOTE)
    note.compress_type = method
    return write_tiny_zip(path, extra={note: NOTE_TEXT})


def _central_entry(data: bytes, name: str) -> int:
    """Offset of the central directory header of member ``name``."""
    start = data.index(b"PK\x01\x02")
    while True:
        name_len = struct.unpack("<H", data[start + 28 : start + 30])[0]
        if data[start + 46 : start + 46 + name_len] == name.encode():
            return start
        start = data.index(b"PK\x01\x02", start + 46)


def _data_offset(data: bytes, name: str) -> tuple[int, int]:
    """Where the stored bytes of member ``name`` start, and how many there are."""
    with zipfile.ZipFile(_bytes_path(data)) as zf:
        info = zf.getinfo(name)
    header = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[header + 26 : header + 30])
    return header + 30 + name_len + extra_len, info.compress_size


_SCRATCH: list[Path] = []


def _bytes_path(data: bytes) -> Path:
    _SCRATCH[0].write_bytes(data)
    return _SCRATCH[0]


def flip_data(data: bytearray, name: str) -> None:
    start, size = _data_offset(bytes(data), name)
    for k in range(size // 3, size // 3 + 8):
        data[start + k] ^= 0xA5


def patch_central(data: bytearray, name: str, offset: int, value: int) -> None:
    """Set a 16-bit field of a member's central directory header (8: flags, 10: method)."""
    entry = _central_entry(bytes(data), name)
    data[entry + offset : entry + offset + 2] = struct.pack("<H", value)


def or_central_flags(data: bytearray, name: str, bits: int) -> None:
    entry = _central_entry(bytes(data), name)
    patch_central(data, name, 8, struct.unpack("<H", data[entry + 8 : entry + 10])[0] | bits)


def damage_local_signature(data: bytearray, name: str) -> None:
    start, _ = _data_offset(bytes(data), name)
    with zipfile.ZipFile(_bytes_path(bytes(data))) as zf:
        header = zf.getinfo(name).header_offset
    data[header : header + 4] = b"PK\x09\x09"
    assert start > header


def rename_in_local_header(data: bytearray, name: str) -> None:
    with zipfile.ZipFile(_bytes_path(bytes(data))) as zf:
        header = zf.getinfo(name).header_offset
    data[header + 30] ^= 0x01  # first letter of the name: 't' -> 'u'


DAMAGE = {
    # case: (compression of the note, member damaged, damage, what the reason says)
    "stored-crc": (zipfile.ZIP_STORED, JPEG, flip_data, "Bad CRC-32"),
    "deflate-stream": (zipfile.ZIP_DEFLATED, NOTE, flip_data, ("Error -3", "Bad CRC-32")),
    "bzip2-stream": (zipfile.ZIP_BZIP2, NOTE, flip_data, ("Invalid data stream", "Bad CRC-32")),
    "lzma-stream": (zipfile.ZIP_LZMA, NOTE, flip_data, ("Corrupt input data", "Bad CRC-32")),
    "unknown-method": (zipfile.ZIP_STORED, JPEG, lambda d, n: patch_central(d, n, 10, 99), "not supported"),
    "encrypted": (zipfile.ZIP_STORED, JPEG, lambda d, n: or_central_flags(d, n, 0x1), "encrypted"),
    "patched-data": (zipfile.ZIP_STORED, JPEG, lambda d, n: or_central_flags(d, n, 0x20), "flag bit 5"),
    "local-signature": (zipfile.ZIP_STORED, JPEG, damage_local_signature, "Bad magic number"),
    "local-name": (zipfile.ZIP_STORED, WNIDS and f"{ROOT}/wnids.txt", rename_in_local_header, "differ"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_member_damaged_inside_an_archive_with_a_matching_md5_is_one_line(tmp_path, error_line, case):
    method, member, damage, reason = DAMAGE[case]
    _SCRATCH[:] = [tmp_path / "scratch.zip"]
    archive = zip_with_note(tmp_path / "damaged.zip", method)
    data = bytearray(archive.read_bytes())
    damage(data, member)
    archive.write_bytes(bytes(data))
    md5 = hashlib.md5(data).hexdigest()  # the user trusts the damaged copy, as the MD5 message offers
    line = error_line(lambda: run(tmp_path, "--archive", str(archive), "--md5", md5, "--num_tasks", "2"), alone=True)
    prefix = f"error: could not read member {member!r} of {archive} ("
    assert line.startswith(prefix)
    assert line.endswith("); the archive is damaged: delete it to download it again, or give another --archive")
    said = line[len(prefix) :]
    assert any(word in said for word in ((reason,) if isinstance(reason, str) else reason)), said
    assert not (tmp_path / "Data").exists()
    assert [p.name for p in (tmp_path / "dl").iterdir()] == []  # no extracted copy, no staging folder


def test_the_damage_is_real_for_zipfile_itself(tmp_path):
    """The cases above fail inside zipfile as a user would see them (so the test tests the cause)."""
    _SCRATCH[:] = [tmp_path / "scratch.zip"]
    archive = zip_with_note(tmp_path / "damaged.zip", zipfile.ZIP_DEFLATED)
    data = bytearray(archive.read_bytes())
    flip_data(data, NOTE)
    archive.write_bytes(bytes(data))
    with zipfile.ZipFile(archive) as zf, pytest.raises((zlib.error, zipfile.BadZipFile)):
        zf.read(NOTE)
    assert bz2 and lzma  # the compressions exercised above are available


def test_a_write_error_while_extracting_is_not_blamed_on_the_archive(tmp_path, error_line, monkeypatch):
    archive = write_tiny_zip(tmp_path / "good.zip")
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(".JPEG"):
            raise OSError(28, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    line = error_line(lambda: run(tmp_path, "--archive", str(archive), "--md5", md5, "--num_tasks", "2"), alone=True)
    assert line == f"error: could not extract {archive}: No space left on device"


# --- Numeric flags at their limits ---------------------------------------------------------------

BOUNDARY_VALUES = ["0", "-1", str(2**32), str(2**63), "nan", "inf", "1e999", ""]


@pytest.fixture(scope="module")
def good_zip(tmp_path_factory) -> Path:
    return write_tiny_zip(tmp_path_factory.mktemp("zip") / TINY_ZIP)


def numeric_flags() -> list[str]:
    """Every option of data_prep.py that takes a number."""
    return [a.option_strings[0] for a in dp.build_parser()._actions if a.type not in (None, dp._md5_hex)]


def context_of(flag: str, good_zip: Path) -> list[str]:
    """Flags under which ``flag`` applies, so that its value (not its scope) is what is checked."""
    tiny = ["--archive", str(good_zip), "--md5", hashlib.md5(good_zip.read_bytes()).hexdigest()]
    return {
        "--seed": ["--dataset", "digits"],
        "--num_tasks": ["--dataset", "digits", "--scenario", "permuted"],
        "--angles": ["--dataset", "digits", "--scenario", "rotated"],
        "--classes_per_task": [*tiny, "--num_tasks", "2"],
        "--retries": [*tiny, "--num_tasks", "2"],
    }[flag]


def test_the_walk_below_covers_every_numeric_flag():
    assert sorted(numeric_flags()) == ["--angles", "--classes_per_task", "--num_tasks", "--retries", "--seed"]


@pytest.mark.parametrize("value", BOUNDARY_VALUES)
@pytest.mark.parametrize("flag", ["--seed", "--num_tasks", "--angles", "--classes_per_task", "--retries"])
def test_every_numeric_flag_at_its_limits_gives_one_line_or_succeeds(tmp_path, capsys, good_zip, flag, value):
    try:
        data = run(tmp_path, *context_of(flag, good_zip), flag, value)
    except SystemExit as exc:
        assert exc.code not in (0, None)
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert flag in err or "--num_tasks" in err  # the line names the flag
        assert not (tmp_path / "Data").exists()
        return
    # Only values that are valid succeed: seed 0, and angles 0 and -1 (one rotated task).
    assert (flag, value) in {("--seed", "0"), ("--angles", "0"), ("--angles", "-1")}
    assert json.loads((data / "manifest.json").read_text())["num_tasks"] >= 1


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--seed", "-1"], "error: argument --seed: must be >= 0, got -1 (see --help)"),
        (
            ["--dataset", "digits", "--scenario", "rotated", "--angles", "1e999"],
            "error: argument --angles: expected an angle in degrees from -360 to 360, got '1e999' (see --help)",
        ),
    ],
)
def test_the_command_line_itself_prints_one_line(tmp_path, flags, said):
    done = subprocess.run(
        [sys.executable, str(REPO / "data_prep.py"), "--data_dir", str(tmp_path / "Data"), *flags],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert (done.returncode, done.stderr, done.stdout) == (2, said + "\n", "")


# --- Folders, manifests, URLs ----------------------------------------------------------------------


def test_a_data_dir_that_is_a_file_is_named(tmp_path, error_line):
    (tmp_path / "Data").write_text("not a folder")
    line = error_line(lambda: run(tmp_path, "--dataset", "digits"), alone=True)
    assert line == f"error: --data_dir {tmp_path / 'Data'} is a file, not a folder; choose another --data_dir"
    assert (tmp_path / "Data").read_text() == "not a folder"


def test_a_data_dir_inside_a_file_is_one_line(tmp_path, error_line):
    (tmp_path / "file").write_text("x")
    data_dir = tmp_path / "file" / "Data"
    line = error_line(lambda: dp.main(["--dataset", "digits", "--data_dir", str(data_dir)]), alone=True)
    file = tmp_path / "file"
    assert line == f"error: --data_dir {data_dir}: {file} is a file, not a folder; choose another --data_dir"


def test_a_download_dir_that_is_a_file_is_named(tmp_path, error_line):
    (tmp_path / "dl").write_text("x")
    line = error_line(lambda: run(tmp_path, "--dataset", "mnist"), alone=True)
    assert line == f"error: --download_dir {tmp_path / 'dl'} is a file, not a folder; choose another --download_dir"


def test_an_archive_that_is_a_folder_is_named(tmp_path, error_line):
    (tmp_path / "archive").mkdir()
    line = error_line(lambda: run(tmp_path, "--archive", str(tmp_path / "archive")), alone=True)
    assert line == f"error: --archive {tmp_path / 'archive'} is a folder; give the path of a copy of {TINY_ZIP}"


def test_an_archive_that_is_no_zip_is_one_line(tmp_path, error_line):
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"this is no zip file" * 10)
    md5 = hashlib.md5(fake.read_bytes()).hexdigest()
    line = error_line(lambda: run(tmp_path, "--archive", str(fake), "--md5", md5), alone=True)
    assert line == f"error: could not read {fake}: File is not a zip file; the archive is damaged"


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_a_class_list_that_is_not_text_is_one_line(tmp_path, error_line):
    archive = tmp_path / "binary.zip"
    write_tiny_zip(archive)
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(f"{ROOT}/words.txt", b"\xff\xfe\x00binary")  # a second entry: it wins on extraction
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    line = error_line(lambda: run(tmp_path, "--archive", str(archive), "--md5", md5, "--num_tasks", "2"), alone=True)
    assert line == f"error: {tmp_path / 'dl' / ROOT / 'words.txt'} is not text: the archive is damaged"


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("[1, 2]", "was not written by data_prep.py, so"),
        ('"text"', "was not written by data_prep.py, so"),
        ("{not json", "could not read"),
    ],
)
def test_a_malformed_manifest_in_the_way_is_one_line(tmp_path, error_line, content, said):
    (tmp_path / "Data").mkdir()
    (tmp_path / "Data" / "manifest.json").write_text(content)
    line = error_line(lambda: run(tmp_path, "--dataset", "digits"), alone=True)
    assert said in line and str(tmp_path / "Data" / "manifest.json") in line
    assert (tmp_path / "Data" / "manifest.json").read_text() == content


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/tiny.zip", "not a url", "http://[::1/tiny.zip"])
def test_a_malformed_url_is_one_line_and_not_retried(tmp_path, error_line, monkeypatch, url):
    # Our own words only: the HTTP library's wording of these errors changes between its releases.
    monkeypatch.setattr(download.time, "sleep", lambda _: pytest.fail("a malformed URL is not worth a retry"))
    line = error_line(lambda: run(tmp_path, "--url", url), alone=True)
    assert line.startswith(f"error: could not download {url} (not a valid http:// or https:// address); ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_parent_folder_is_one_line(tmp_path, error_line):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        line = error_line(lambda: dp.main(["--dataset", "digits", "--data_dir", str(locked / "Data")]), alone=True)
    finally:
        locked.chmod(0o700)
    assert "Permission denied" in line and line.endswith(f"{locked / 'Data'} is unchanged")


def test_a_folder_nobody_may_create_is_one_line(error_line):
    line = error_line(lambda: dp.main(["--dataset", "digits", "--data_dir", "/proc/data_prep_test/Data"]), alone=True)
    assert line.startswith("error: could not write /proc/data_prep_test")
    assert line.endswith("/proc/data_prep_test/Data is unchanged")


# --- Interrupts and the unexpected -----------------------------------------------------------------


def _raising(error: BaseException):
    def save_png(pixels, path):
        if path.name.startswith("0100"):
            raise error

    return save_png


def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing(tmp_path, error_line, monkeypatch):
    monkeypatch.setattr(image_tasks, "save_png", _raising(KeyboardInterrupt()))
    line = error_line(lambda: dp.main(["--dataset", "digits", "--data_dir", str(tmp_path / "Data")]), 130, alone=True)
    assert line == f"error: interrupted; {tmp_path / 'Data'} is unchanged (run the same command again to finish)"
    assert list(tmp_path.iterdir()) == []


def test_an_unexpected_error_is_one_line_that_points_at_debug(tmp_path, error_line, monkeypatch):
    monkeypatch.setattr(image_tasks, "save_png", _raising(ZeroDivisionError("division by zero")))
    data_dir = str(tmp_path / "Data")
    line = error_line(lambda: dp.main(["--dataset", "digits", "--data_dir", data_dir]), alone=True)
    assert line == (
        f"error: internal error (ZeroDivisionError: division by zero); {data_dir} is unchanged; "
        "run with --debug for the traceback and report it"
    )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ZeroDivisionError):
        dp.main(["--dataset", "digits", "--data_dir", data_dir, "--debug"])


# --- Flags that do not fit together -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (
            ["--scenario", "permuted"],
            "error: --scenario does not apply to --dataset tiny-imagenet (only to mnist, digits)",
        ),
        (
            ["--dataset", "digits", "--scenario", "permuted", "--angles", "10"],
            "error: --angles does not apply to --dataset digits --scenario permuted "
            "(only to mnist --scenario rotated, digits --scenario rotated)",
        ),
        (
            ["--dataset", "mnist", "--scenario", "rotated", "--seed", "3"],
            "error: --seed does not apply to --dataset mnist --scenario rotated "
            "(only to tiny-imagenet, mnist --scenario permuted, digits)",
        ),
        (
            ["--dataset", "digits", "--retries", "5"],
            "error: --retries does not apply to --dataset digits --scenario split "
            "(only to tiny-imagenet, mnist, cifar10, cifar100)",
        ),
        (
            ["--dataset", "cifar10", "--num_tasks", "5"],
            "error: --num_tasks does not apply to --dataset cifar10 (only to tiny-imagenet, "
            "mnist --scenario permuted/rotated, digits --scenario permuted/rotated, cifar100)",
        ),
        (
            ["--dataset", "digits", "--scenario", "rotated", "--angles", "0", "90", "--num_tasks", "3"],
            "error: --num_tasks 3 does not match the 2 --angles given; "
            "give one angle per task, or leave out --num_tasks",
        ),
        (
            ["--dataset", "cifar100", "--num_tasks", "7"],
            "error: --num_tasks 7 does not divide CIFAR-100's 100 classes into equal groups "
            "(10 or 20 as in the literature, 5 as Hsu et al. 2018)",
        ),
    ],
)
def test_flags_that_do_not_fit_together_are_one_line(tmp_path, error_line, flags, said):
    assert error_line(lambda: run(tmp_path, *flags), alone=True) == said
    assert not (tmp_path / "Data").exists() and not (tmp_path / "dl").exists()
