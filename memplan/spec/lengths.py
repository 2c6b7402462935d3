"""Sequence-length distributions (--lengths): what a setup stores, and how the user's spelling becomes it.

A TrainingSetup keeps its distribution as canonical text, so that it is hashable, JSON-plain and rebuilds the same
setup from a record or a sweep worker's flags (no file path that would mean something else on another machine):

    fixed             every sequence is --seq tokens (memplan's default, and what every tier assumed before)
    varied            uniform in [seq/2, seq]: `memplan measure --lengths varied`'s spelling, relative to --seq
    uniform:A-B       every whole length A..B equally likely (A ≤ B, both ≥ 1); `uniform:A:B` is read the same
    hist:L*C,L*C,...  a histogram: length L seen C times (sorted by L, counts ≥ 1)

A FILE given to --lengths (any other text naming an existing file) is read here into `hist:` form: a CSV or JSON of
(length, count) rows, or a plain list of lengths (one per line, or a JSON list) such as a tokenized dataset's.
The math over a distribution (padded lengths, expected maximum, waste) is memplan.estimate.lengths.
"""
from __future__ import annotations

import functools
import json
from collections import Counter

from memplan.errors import MemplanError

FIXED = "fixed"
VARIED = "varied"
MAX_DISTINCT = 65_536  # distinct lengths a histogram may hold (a tokenizer's longest context is ~10^6; 2^16 bins
# keeps a setup's JSON small enough for every record; a longer tail is a typo or needs binning first)
MAX_LENGTHS_FILE_BYTES = 64 * 2**20  # a plain list of 10M lengths as text


def is_fixed(text: str) -> bool:
    return text == FIXED


def _int(text: str, what: str) -> int:
    try:
        n = int(str(text).strip())
    except ValueError:
        raise MemplanError(f"--lengths {what}: '{text}' is not a whole number") from None
    if n < 1 or n > 2**31:
        raise MemplanError(f"--lengths {what}: length {n} must be in 1..2**31")
    return n


@functools.lru_cache(maxsize=256)
def histogram(text: str, seq: int) -> tuple[tuple[int, int], ...]:
    """((length, count), ...) sorted by length, of a canonical spelling (`seq` resolves `fixed` and `varied`)."""
    if text == FIXED:
        return ((seq, 1),)
    if text == VARIED:
        return tuple((n, 1) for n in range(max(1, seq // 2), seq + 1))
    kind, _, body = text.partition(":")
    if kind == "uniform":
        lo, hi = _uniform_bounds(body)
        return tuple((n, 1) for n in range(lo, hi + 1))
    if kind == "hist":
        return _hist_pairs(body)
    raise MemplanError(f"--lengths must be fixed, varied, uniform:A-B, hist:L*C,... or a file, got {text[:60]!r}")


def _uniform_bounds(body: str) -> tuple[int, int]:
    sep = "-" if "-" in body else ":"
    a, _, b = body.partition(sep)
    lo, hi = _int(a, "uniform:A-B"), _int(b, "uniform:A-B")
    if lo > hi:
        raise MemplanError(f"--lengths uniform:{body}: A must be ≤ B")
    if hi - lo >= MAX_DISTINCT:
        raise MemplanError(f"--lengths uniform:{body}: more than {MAX_DISTINCT:,} lengths")
    return lo, hi


def _hist_pairs(body: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in body.split(","):
        length, star, count = item.partition("*")
        if not star:
            raise MemplanError(f"--lengths hist: each entry is LENGTH*COUNT, got {item[:40]!r}")
        out.append((_int(length, "hist"), _int(count, "hist")))
    if not out or len(out) > MAX_DISTINCT:
        raise MemplanError(f"--lengths hist: 1 to {MAX_DISTINCT:,} entries")
    if [l for l, _ in out] != sorted({l for l, _ in out}):
        raise MemplanError("--lengths hist: lengths must be distinct and in increasing order")
    return tuple(out)


def canonical(text: str) -> str:
    """The stored spelling of a user's --lengths value (a FILE is read; `uniform:A:B` becomes `uniform:A-B`);
    bad input is one MemplanError."""
    t = str(text).strip()
    low = t.lower()
    if low in (FIXED, VARIED):
        return low
    if low.startswith("uniform:"):
        lo, hi = _uniform_bounds(low[8:])
        return f"uniform:{lo}-{hi}"
    if low.startswith("hist:"):
        return _hist_text(_hist_pairs(low[5:]))
    return read_file(t)


def _hist_text(pairs) -> str:
    return "hist:" + ",".join(f"{l}*{c}" for l, c in pairs)


def read_file(path: str) -> str:
    """A lengths file as `hist:` text: CSV / text rows `length,count` (a header line is skipped) or one length a
    line; JSON: a list of lengths, a list of [length, count] pairs, or an object {length: count}."""
    from pathlib import Path

    from memplan.spec.files import read_text

    try:
        exists = Path(path).exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        exists = False
    if not exists:
        raise MemplanError(f"--lengths must be fixed, varied, uniform:A-B, hist:L*C,... or an existing file, "
                           f"got {path[:60]!r}")
    text = read_text(path, "--lengths", MAX_LENGTHS_FILE_BYTES)
    counts: Counter = Counter()
    if text.lstrip().startswith(("[", "{")):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MemplanError(f"--lengths {path}: not JSON: {exc}") from None
        items = doc.items() if isinstance(doc, dict) else doc
        for item in items:
            pair = item if isinstance(item, (list, tuple)) else (item, 1)
            if len(pair) != 2:
                raise MemplanError(f"--lengths {path}: entries are lengths or [length, count], got {item!r:.40}")
            counts[_int(pair[0], path)] += _int(pair[1], path)
    else:
        first = True
        for i, line in enumerate(text.splitlines()):
            cells = [c.strip() for c in line.replace(";", ",").replace("\t", ",").split(",") if c.strip()]
            if not cells or cells[0].startswith("#"):
                continue
            if first and not cells[0].isdigit():  # a header: length,count
                first = False
                continue
            first = False
            if len(cells) > 2:
                raise MemplanError(f"--lengths {path}: line {i + 1} has more than length,count")
            counts[_int(cells[0], path)] += _int(cells[1], path) if len(cells) == 2 else 1
    if not counts:
        raise MemplanError(f"--lengths {path}: no lengths in the file")
    if len(counts) > MAX_DISTINCT:
        raise MemplanError(f"--lengths {path}: {len(counts):,} distinct lengths (at most {MAX_DISTINCT:,}): bin them")
    return _hist_text(sorted(counts.items()))


def label(text: str) -> str:
    """A short name of a distribution for tables (a histogram by its size, not its entries)."""
    if text.startswith("hist:"):
        pairs = _hist_pairs(text[5:])
        return f"histogram of {sum(c for _, c in pairs):,} sequences ({pairs[0][0]}-{pairs[-1][0]} tokens)"
    return text
