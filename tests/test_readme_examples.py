"""Every `memplan ...` line of the README's bash code blocks runs and exits 0 (lines marked `# on a GPU node`
excepted): in-process through memplan.cli.main, each block in a fresh temporary directory (with a `reports/`
folder, as in a checkout), `/tmp/` rewritten into it, globs expanded as the shell would (a glob that matches
nothing fails, as the README's old `reports/measurements/h100-sxm/*.jsonl` example did). Shell lines that make
files (`echo '...' > FILE`, `cat > FILE <<'END'` heredocs) are carried out; other commands (pip, pytest) are not
memplan lines and are left alone.

The README's placeholder `./my-model/config.json` ("any local HF config.json") is written as a tiny Llama config.
"""
from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the README's trace and measure examples

from memplan.cli import main  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
GPU_MARK = "# on a GPU node"
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}


def bash_blocks(text: str) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(bash|sh)\n(.*?)^```", text, re.S | re.M)]


def statements(block: str):
    """(kind, payload) per shell statement: ("heredoc", (file, text)) or ("line", source text); a quote spanning
    lines is one statement."""
    lines = block.splitlines()
    i, pending = 0, ""
    while i < len(lines):
        line = lines[i]
        i += 1
        m = re.match(r"cat > (\S+) <<'?(\w+)'?\s*$", line)
        if m and not pending:
            body = []
            while lines[i] != m.group(2):
                body.append(lines[i])
                i += 1
            i += 1
            yield "heredoc", (m.group(1), "\n".join(body) + "\n")
            continue
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the statement goes on
            continue
        yield "line", pending
        pending = ""


def memplan_lines(text: str = None) -> list[tuple[int, str]]:
    text = README.read_text() if text is None else text
    return [(b, s) for b, block in enumerate(bash_blocks(text)) for kind, s in statements(block)
            if kind == "line" and re.search(r"(^|&&)\s*memplan\s", s)]


def _argv(tokens: list[str], tmp: Path) -> list[str]:
    out = []
    for t in tokens:
        t = t.replace("/tmp/", f"{tmp}/")
        if any(c in t for c in "*?["):
            found = sorted(glob.glob(t))
            assert found, f"the glob {t} matches no file"
            out += found
        else:
            out.append(t)
    return out


def _segments(tokens: list[str]) -> list[list[str]]:
    """The commands of `a && b && c`."""
    out = [[]]
    for t in tokens:
        if t == "&&":
            out.append([])
        else:
            out[-1].append(t)
    return [seg for seg in out if seg]


def run_block(block: str, tmp: Path, capsys) -> list[str]:
    """Run one block in tmp; returns the memplan command lines it ran."""
    ran = []
    for kind, payload in statements(block):
        if kind == "heredoc":
            name, body = payload
            Path(name.replace("/tmp/", f"{tmp}/")).write_text(body)
            continue
        if GPU_MARK in payload:
            continue
        for tokens in _segments(shlex.split(payload, comments=True)):
            segment = shlex.join(tokens)
            if tokens[:1] == ["echo"] and ">" in tokens:
                k = tokens.index(">")
                Path(_argv([tokens[k + 1]], tmp)[0]).write_text(" ".join(tokens[1:k]) + "\n")
            elif tokens[:1] == ["memplan"]:
                rc = main(_argv(tokens[1:], tmp))
                out, err = capsys.readouterr()
                assert rc == 0, f"README: `{segment}` exited {rc}: {err.strip()[-500:]}"
                ran.append(segment)
    return ran


BLOCKS = bash_blocks(README.read_text())


@pytest.mark.parametrize("index", [i for i, b in enumerate(BLOCKS) if re.search(r"(^|&&)\s*memplan\s", b, re.M)])
def test_readme_block_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "tests").mkdir()  # the README's `--config tests/fixtures/configs/...` examples, as in a checkout
    (tmp_path / "tests" / "fixtures").symlink_to(README.parent / "tests" / "fixtures")
    ran = run_block(BLOCKS[index], tmp_path, capsys)
    assert ran


def test_every_memplan_line_is_run_or_marked():
    """The extraction sees the README's examples: the lines the tests run plus the GPU-marked ones are all of
    them, and the known examples are among them."""
    lines = memplan_lines()
    assert len(lines) >= 25
    gpu = [s for _, s in lines if GPU_MARK in s]
    assert 1 <= len(gpu) < len(lines)
    assert any("memplan reconcile" in s and GPU_MARK not in s for _, s in lines)


def test_a_glob_that_matches_nothing_fails(tmp_path, monkeypatch, capsys):
    """The old example (`memplan reconcile reports/measurements/h100-sxm/*.jsonl`) fails in a fresh clone."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="matches no file"):
        run_block("memplan reconcile reports/measurements/h100-sxm/*.jsonl --max-error 5\n", tmp_path, capsys)
