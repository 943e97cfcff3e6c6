"""Atomic writes: readable by the team as the umask allows, stale temporaries cleaned, clear errors."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.readonly import read_only
from vitkit.errors import OutputError
from vitkit.io import (
    atomic_dir,
    atomic_path,
    check_writable,
    non_regular_kind,
    remove_stale_temporaries,
    write_json,
)


@pytest.fixture
def umask():
    """Set the process umask inside a test; the old one comes back after it."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_outputs_get_the_permissions_the_umask_gives(tmp_path, umask, mask, file_mode, dir_mode):
    """tempfile makes 0600 files and 0700 folders: outputs must be as readable as a plain write's."""
    umask(mask)
    write_json(tmp_path / "metrics" / "m.json", {"a": 1})
    with atomic_dir(tmp_path / "data") as tmp:
        (tmp / "x.txt").write_text("x")
    assert (tmp_path / "metrics" / "m.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "data").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "data" / "x.txt").stat().st_mode & 0o777 == file_mode


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporaries_of_dead_processes_are_removed_at_the_next_write(tmp_path):
    host = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname())
    dead, me = _dead_pid(), os.getpid()
    stale = [
        tmp_path / f".classification.{host}-{dead}.k3j4h5g6.tmp",  # a killed prepare's copy
        tmp_path / f".classification.{host}-{dead}.a1b2c3d4.old",
        tmp_path / ".classification.q8w7e6r5.tmp",  # the older naming, without an owner
    ]
    kept = [
        tmp_path / f".classification.{host}-{me}.z9y8x7w6.tmp",  # a live process's, maybe this one's
        tmp_path / f".classification.otherhost-{dead}.m1n2b3v4.tmp",  # another host's (a shared disk)
        tmp_path / f".classification.extra.{host}-{dead}.p0o9i8u7.tmp",  # another output's
        tmp_path / ".classification.bak",
    ]
    for path in stale + kept:
        path.mkdir()
        (path / "000001.png").write_bytes(b"x")
    with atomic_dir(tmp_path / "classification") as tmp:
        (tmp / "ok").write_text("new")
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert (tmp_path / "classification" / "ok").read_text() == "new"

    leftover = tmp_path / f".model.pt.{host}-{dead}.s5d6f7g8.tmp"  # a half-written file
    leftover.write_bytes(b"half")
    with atomic_path(tmp_path / "model.pt") as tmp:
        tmp.write_bytes(b"whole")
    assert not leftover.exists() and (tmp_path / "model.pt").read_bytes() == b"whole"


def test_a_folder_moved_aside_by_a_killed_swap_is_put_back(tmp_path):
    """Killed between atomic_dir's two renames: the output is only in the .old folder."""
    host = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname())
    old = tmp_path / f".detection.{host}-{_dead_pid()}.a1b2c3d4.old"
    (old / "detection").mkdir(parents=True)
    (old / "detection" / "annotations.json").write_text("{}")
    assert remove_stale_temporaries(tmp_path / "detection") == [old]
    assert (tmp_path / "detection" / "annotations.json").read_text() == "{}"
    assert not old.exists()


def test_unwritable_folders_are_one_output_error_naming_them(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    with read_only(folder):
        with pytest.raises(OutputError, match=f"cannot write to {folder}"):
            check_writable(folder)
        with pytest.raises(OutputError, match=f"cannot write to {folder}"):
            write_json(folder / "m.json", {})
        with pytest.raises(OutputError, match=f"cannot write to {folder}"), atomic_dir(folder / "data"):
            pass
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match="file"):
        check_writable(tmp_path / "file" / "sub")
    check_writable(tmp_path / "new" / "deeper")  # made when missing
    assert (tmp_path / "new" / "deeper").is_dir() and not any((tmp_path / "new" / "deeper").iterdir())


def test_what_is_not_a_regular_file_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to-pipe").symlink_to(tmp_path / "pipe")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        assert non_regular_kind(tmp_path / "sock") == "a socket"
    assert non_regular_kind(tmp_path / "file") is None
    assert non_regular_kind(tmp_path) == "a folder"
    assert non_regular_kind(tmp_path / "pipe") == "a named pipe (FIFO)"
    assert non_regular_kind(tmp_path / "to-pipe") == "a named pipe (FIFO)"
    assert non_regular_kind(tmp_path / "broken") == "a broken symbolic link"
    assert non_regular_kind(tmp_path / "missing") == "missing"
    assert non_regular_kind(Path("/dev/null")) == "a character device"
