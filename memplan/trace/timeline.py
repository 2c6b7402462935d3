"""Timeline rows of a trace and their CSV / JSON writer (no torch import)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable, NamedTuple

from memplan.errors import MemplanError
from memplan.io import atomic_write


class TimelineRow(NamedTuple):
    """Live bytes per category after one allocation / free event of the reported (second) iteration.

    mark is the region the event happened in: "embed", "block0".."blockN", "final_norm", "head", "loss" in
    forward; "loss.backward", "head.backward", "blockN.backward".."block0.backward", "embed.backward" in backward
    (module forward hooks; tensor hooks on the region outputs' gradients); "" in the optimizer step.
    """

    event: int
    phase: str
    mark: str
    weights: int
    master_weights: int
    gradients: int
    optimizer_states: int
    activations: int
    temporaries: int
    total: int


def write_timeline(rows: Iterable[TimelineRow], path: str | Path) -> Path:
    """Write rows as CSV (.csv) or JSON (.json: a list of objects), chosen by the file suffix."""
    path = Path(path)
    rows = list(rows)
    if path.suffix == ".csv":
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(TimelineRow._fields)
        w.writerows(rows)
        text = buf.getvalue()
    elif path.suffix == ".json":
        text = json.dumps([r._asdict() for r in rows])
    else:
        raise MemplanError(f"timeline file must end in .csv or .json, got {path.name}")
    return atomic_write(path, text)  # one error line on a full disk, never a torn file
