"""Single long runs (`memplan trace`, `memplan measure --device cpu`) show a status line per phase on stderr when
asked (--progress) or when stderr is a terminal, and never write it to stdout (JSON stays parseable)."""
from __future__ import annotations

import io
import json

import pytest

pytest.importorskip("torch")

from memplan.cli import main  # noqa: E402
from memplan.cli.progress import Progress  # noqa: E402

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(TINY))
    return str(p)


def _status(err: str, command: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith(f"memplan {command}: [")]


def test_trace_progress_on_stderr_only(tiny, tmp_path, capsys):
    rc = main(["trace", "--model", tiny, "--batch", "1", "--seq", "32", "-f", "json", "--progress",
               "--timeline", str(tmp_path / "t.csv")])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["tier"] == "trace"
    lines = _status(err, "trace")
    assert len(lines) == 4 and "tracing" in lines[1] and "timeline" in lines[2] and lines[-1].endswith("done")


def test_trace_silent_when_piped(tiny, capsys):
    rc = main(["trace", "--model", tiny, "--batch", "1", "--seq", "32", "-f", "json"])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out) and not _status(err, "trace")


def test_measure_progress(tiny, tmp_path, capsys):
    rc = main(["measure", "--model", tiny, "--device", "cpu", "--batch", "1", "--seq", "32", "--steps", "1",
               "--results", str(tmp_path / "r.jsonl"), "-f", "json", "--progress"])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["status"] == "ok"
    lines = _status(err, "measure")
    assert len(lines) == 3 and "measuring" in lines[0] and lines[-1].endswith("done")


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_on_for_a_terminal_off_for_a_pipe():
    tty, pipe = _Tty(), io.StringIO()
    Progress("trace", stream=tty).phase("x")
    Progress("trace", stream=pipe).phase("x")
    Progress("trace", forced=True, stream=pipe).phase("y")
    assert tty.getvalue().startswith("memplan trace: [") and pipe.getvalue().rstrip().endswith("y")
    assert pipe.getvalue().count("\n") == 1
