"""Atomic writes: a reader sees the old file/folder or the new one, never a half-written one.

The temporary file or folder is created private (`mkstemp`/`mkdtemp` use 0600/0700); it gets the mode a plain
`open()`/`mkdir()` would have given it (the umask's, or an existing file's) before it is renamed into place,
and so does what was written into a temporary folder, so entries, checkpoints and exports are as readable
by other users as anything else the process writes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (`os.umask` sets it process-wide,
    which another thread creating a file at that moment would see)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _widen(path: str, allowed: int) -> None:
    """Add the permission bits the umask allows (never remove any)."""
    st = os.lstat(path)
    current = stat.S_IMODE(st.st_mode)
    if not stat.S_ISLNK(st.st_mode) and current | allowed != current:
        os.chmod(path, current | allowed)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        file_mode = path.stat().st_mode & 0o7777  # rewriting a file keeps its mode, as open() would
    except FileNotFoundError:
        file_mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), file_mode)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename
    (an existing folder is moved aside first and deleted only after the new one is in place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = current_umask()
    try:
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                _widen(os.path.join(root, name), 0o777 & ~umask)
            for name in files:
                # Some writers make private files whatever the umask (safetensors' save_file: 0600).
                _widen(os.path.join(root, name), 0o666 & ~umask)
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
