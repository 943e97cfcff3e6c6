"""Atomic file and directory writes, and what may be read or written at all.

A stage killed half-way must never leave a half-written model or dataset that
DVC could cache, nor destroy the previous good output. Everything is written to
a temporary sibling first and renamed into place (``os.replace`` is atomic on
one filesystem).

- The temporaries are named ``.<name>.<host>-<pid>.<random>.tmp``: what a killed
  process left beside an output (a ``data/.classification.*.tmp`` copy, a half
  checkpoint) is removed by the next atomic write of that output on the same host,
  once the process that made it is gone.
- A written file or folder gets the permissions a plain ``open``/``mkdir`` would give
  (``0666`` / ``0777`` less the umask), not ``tempfile``'s private ``0600``/``0700``:
  a team's other users can read the outputs when the umask lets them.
- A folder that cannot be written is a ``OutputError`` naming it (one line, exit 2),
  found before the work rather than as a traceback after it (``check_writable``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitkit.errors import OutputError

if TYPE_CHECKING:
    import pandas as pd

_OWNER = re.compile(r"[^A-Za-z0-9_-]+")


def _owner() -> str:
    """``<host>-<pid>`` of this process, as it appears in the names of its temporaries."""
    return f"{_OWNER.sub('-', socket.gethostname())}-{os.getpid()}"


def current_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc (macOS): read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove what interrupted atomic writes of ``path`` left beside it; the removed entries.

    A temporary is stale when this host's process that made it is gone, or when it has the
    older ``.<name>.<random>.tmp`` form, which names no process. Another host's temporaries
    (a shared disk) are left alone: whether their process lives cannot be told from here. A
    stale ``.old`` folder still holding the previous output while ``path`` itself is missing
    (a kill between the two renames of ``atomic_dir``) is put back first.
    """
    path = Path(path)
    name = re.escape(path.name)
    host = _OWNER.sub("-", socket.gethostname())
    pattern = re.compile(rf"\.{name}\.(?:(?P<owner>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.)?[a-z0-9_]+\.(tmp|old)")
    removed: list[Path] = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        if match["pid"] is not None and (match["owner"] != host or _alive(int(match["pid"]))):
            continue
        with contextlib.suppress(OSError):
            if entry.name.endswith(".old") and not path.exists() and (entry / path.name).exists():
                os.replace(entry / path.name, path)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(_cannot_write(path.parent, exc)) from None


def _cannot_write(folder: Path, exc: OSError) -> str:
    return (
        f"cannot write to {folder} ({exc.strerror or exc}): make it writable "
        f"(e.g. chmod u+w {folder}) or free the disk, then run again"
    )


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and make sure a file can be created in it, else ``OutputError``.

    Tried by creating (and removing) a file: ``os.access`` says yes to root on a folder a
    plain user could not write, and no on nothing else (a read-only mount, an immutable folder).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".write-check.{_owner()}.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(_cannot_write(folder, exc)) from None


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    _make_parent(path)
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(_cannot_write(path.parent, exc)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # a writer may have replaced the file: set the mode on what is there
            os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces the directory ``path`` if the block succeeds.

    The old directory is moved aside before the new one is renamed in, and
    deleted only after; a failure inside the block leaves ``path`` untouched.
    """
    path = Path(path)
    _make_parent(path)
    remove_stale_temporaries(path)
    prefix = f".{path.name}.{_owner()}."
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise OutputError(_cannot_write(path.parent, exc)) from None
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def non_regular_kind(path: Path) -> str | None:
    """None when ``path`` is (a link to) a regular file; otherwise what it is, in words.

    Opening a named pipe blocks until someone writes to it, and a device may never end:
    an input is read only once this says None.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if path.is_symlink() else "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kinds = {
        stat.S_ISDIR: "a folder",
        stat.S_ISFIFO: "a named pipe (FIFO)",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "not a regular file")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as pretty JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(path: Path, table: pd.DataFrame) -> None:
    """Write a table as CSV without its index, atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_digest(path: Path | None) -> str:
    """sha256 of a file (e.g. the weights a model starts from); empty for None."""
    if path is None:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
