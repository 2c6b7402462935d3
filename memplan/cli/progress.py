"""Status lines for single long runs (`memplan trace`, `memplan measure`): one short line per phase on stderr,
only when stderr is a terminal or --progress is given, so stdout (JSON, CSV, the table) is never touched and
logs of piped runs stay clean."""
from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

ProgressOpt = Annotated[bool, typer.Option("--progress", help="Print a status line per phase on stderr (the "
                                           "default when stderr is a terminal).")]


class Progress:
    """`phase(text)` prints `memplan COMMAND: text` with the seconds since the start; `done()` the total."""

    def __init__(self, command: str, forced: bool = False, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.command = command
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(forced or (isatty is not None and isatty()))
        self.start = time.monotonic()

    def phase(self, text: str) -> None:
        if self.enabled:
            print(f"memplan {self.command}: [{time.monotonic() - self.start:5.1f} s] {text}", file=self.stream,
                  flush=True)

    def done(self) -> None:
        self.phase("done")
