"""Reading an input file named on the command line: a regular file of bounded size, UTF-8 text, one error line.

Every file memplan reads comes from a user (a config.json, a --setups file, a timeline, a sweep, records), so
each may be a device (/dev/zero never ends), a FIFO (blocks for a writer), a folder, gigabytes, or not text.
read_text() refuses all of those with one MemplanError naming the file, before reading a byte too many.
"""
from __future__ import annotations

import json
import math
import stat
from pathlib import Path

from memplan.errors import MemplanError

# Largest input file read: 256 MiB. The largest file memplan reads is a results file of JSON Lines records
# (about 4 KiB each: 65,536 records) or a trace timeline; anything larger is not one of its files.
MAX_INPUT_BYTES = 256 * 2**20


def read_text(path, what: str, max_bytes: int = MAX_INPUT_BYTES) -> str:
    """The UTF-8 text of the regular file `path` (at most max_bytes); `what` names it in errors ("--setups")."""
    p = Path(path)
    try:
        st = p.stat()
        if stat.S_ISDIR(st.st_mode):
            raise MemplanError(f"{what} {p} is a folder, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise MemplanError(f"{what} {p} is not a regular file (a device, a pipe or a socket)")
        if st.st_size > max_bytes:
            raise MemplanError(f"{what} {p} is {st.st_size:,} bytes: too large (at most {max_bytes:,})")
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may grow between stat and read
    except FileNotFoundError:
        raise MemplanError(f"{what} file not found: {p}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name (Python API callers)
        if isinstance(exc, MemplanError):
            raise
        raise MemplanError(f"cannot read {what} {p}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(data) > max_bytes:
        raise MemplanError(f"{what} {p}: too large (more than {max_bytes:,} bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MemplanError(f"{what} {p}: not UTF-8 text (byte {exc.start})") from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"{text} is out of range")
    return v


def parse_json(text: str):
    """json.loads that refuses NaN / Infinity and overflowing numbers; ValueError (never RecursionError) otherwise."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None
