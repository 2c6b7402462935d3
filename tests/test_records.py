"""Records that must never be lost or doubled, and files that must never cost a traceback (issue 10): torn lines,
full disks, orphaned workers, two sweeps on one file, wrongly typed records and sweep files.

Fast (no torch needed) except the two sweep tests at the end, which start real `memplan measure --sweep` processes.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from memplan.cli import main
from memplan.errors import MemplanError
from memplan.io import atomic_write

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _enospc_after(n_ok: int):
    """An os.write that writes `n_ok` calls' worth of data, then fails as a full disk does (ENOSPC)."""
    real = os.write
    calls = {"n": 0}

    def write(fd, data):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)
    return write


# ---- whole-file outputs: atomic --------------------------------------------------------------------------------
def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_says_so(tmp_path, monkeypatch):
    p = tmp_path / "page.html"
    atomic_write(p, "old page")
    monkeypatch.setattr(os, "write", _enospc_after(0))
    with pytest.raises(MemplanError, match=r"cannot write .*page.html: No space left on device"):
        atomic_write(p, "new page " * 1000)
    monkeypatch.undo()
    assert p.read_text() == "old page"  # never a 0-byte or half page
    assert [f.name for f in tmp_path.iterdir()] == ["page.html"]  # the temporary file is gone


def test_report_and_timeline_are_written_atomically(tmp_path, monkeypatch):
    from memplan.report import Report
    from memplan.trace.timeline import TimelineRow, write_timeline

    page = tmp_path / "r.html"
    Report(html="<p>first</p>", entries=(), rows=()).write(page)
    tl = tmp_path / "t.csv"
    row = TimelineRow(1, "forward", "embed", 1, 0, 0, 0, 2, 0, 3)
    write_timeline([row], tl)
    before = tl.read_text()
    assert before.splitlines()[0].startswith("event,phase")
    monkeypatch.setattr(os, "write", _enospc_after(0))
    with pytest.raises(MemplanError, match="No space left on device"):
        Report(html="<p>second</p>", entries=(), rows=()).write(page)
    with pytest.raises(MemplanError, match="No space left on device"):
        write_timeline([row, row], tl)
    monkeypatch.undo()
    assert page.read_text() == "<p>first</p>" and tl.read_text() == before
