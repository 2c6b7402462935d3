"""Writing files so that a failure is one clear error and never a half-written file (the shared vocabulary tier:
imports nothing of memplan but errors).

atomic_write(path, text): the whole text goes to a temporary file beside `path` (same folder, so the same file
system), is flushed to disk (fsync), and replaces `path` in one os.replace (rename(2): atomic on POSIX). A full
disk, a quota or a killed process leaves the old file (or none) and no 0-byte or truncated one; the temporary
file is removed on failure. Every OSError becomes one MemplanError naming the path and the reason.

exclusive_lock(path): an advisory lock (flock(2), LOCK_EX | LOCK_NB) on `path` held for a with-block; None where
another process holds it. The kernel releases it when the process dies, however it dies (SIGKILL included), so a
stale lock file never blocks a later run.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from memplan.errors import MemplanError


def os_reason(exc: OSError) -> str:
    """The short reason of an OSError ("No space left on device"), without the path Python appends."""
    return exc.strerror or str(exc) or type(exc).__name__


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (a regular file short-writes only when the disk fills: the next write then
    raises ENOSPC, which the caller reports)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - POSIX write returns ≥ 1 or raises
            raise OSError(f"write returned {n}")
        view = view[n:]


def atomic_write(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Replace `path` with `text` atomically (see the module docstring); MemplanError on any failure."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{p.name[:100]}.", suffix=".tmp")
        try:
            write_all(fd, text.encode(encoding))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a report is an ordinary readable file
        os.replace(tmp, p)
        tmp = None
    except OSError as exc:
        raise MemplanError(f"cannot write {p}: {os_reason(exc)}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return p


@contextmanager
def exclusive_lock(path: str | os.PathLike):
    """Yield True while holding an exclusive flock on `path` (created if missing), False when another process holds
    it; MemplanError when the lock file cannot be opened."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise MemplanError(f"cannot open lock file {path}: {os_reason(exc)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock
