"""The tests' in-process CLI call."""
from __future__ import annotations


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `memplan ARGV` run in-process (memplan.cli.main)."""
    from memplan.cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err
