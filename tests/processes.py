"""The tests' check that a multi-rank job left no process behind."""
from __future__ import annotations

from pathlib import Path


def left_behind(folder: Path) -> list[int]:
    """Processes whose command line names `folder` (the job's folder lies inside it: its launcher and ranks)."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if str(folder).encode() in (d / "cmdline").read_bytes():
                out.append(int(d.name))
        except OSError:
            pass
    return out
