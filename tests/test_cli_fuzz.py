"""The CLI's contract under random input: exit 0, 1 or 2, never a traceback, and a 2 is one `memplan: error:` line.

The fuzz calls memplan.cli.main(argv) in-process with stdout/stderr captured: 1,000 `estimate` command lines, 500
of every other command (trace, fit, measure, report, reconcile, profiles; the traced and measured steps and a
sweep's workers stubbed, so each command line is checked up to where the real work starts), and 300 mutated input
files (config.json field by field, --setups files, raw bytes, deep nesting, non-UTF-8). Every run is deterministic
(the "ci" hypothesis profile in conftest.py); MEMPLAN_FUZZ_EXAMPLES, MEMPLAN_FUZZ_COMMAND_EXAMPLES and
MEMPLAN_FUZZ_FILE_EXAMPLES raise the counts. Subprocess tests then run the console script for real: a full disk,
a closed pipe, Ctrl-C. Record and sweep files are fuzzed too.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings, strategies as st

from memplan.cli import main
from memplan.profiles import gpu_keys, model_keys

# --- config.json files the fuzz can point --model at (made once per session) -----------------------------------
_TMP = tempfile.TemporaryDirectory(prefix="memplan-fuzz-")
TMP = Path(_TMP.name)
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=256)
CONFIGS = {
    "good.json": json.dumps(TINY),
    "gpt2.json": json.dumps(dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)),
    "truncated.json": json.dumps(TINY)[:-7],
    "array.json": "[1, 2, 3]",
    "empty.json": "",
    "no-type.json": json.dumps({"hidden_size": 64}),
    "unknown-type.json": json.dumps({**TINY, "model_type": "mamba-9000"}),
    "missing-key.json": json.dumps({"model_type": "llama", "hidden_size": 64}),
    "zero-heads.json": json.dumps({**TINY, "num_attention_heads": 0}),
    "bad-heads.json": json.dumps({**TINY, "num_attention_heads": 3}),
    "negative.json": json.dumps({**TINY, "num_hidden_layers": -2}),
    "str-hidden.json": json.dumps({**TINY, "hidden_size": "64"}),
    "nan-hidden.json": '{"model_type": "llama", "hidden_size": NaN, "intermediate_size": 128, '
                       '"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}',
    "binary.json": b"\x00\xff\xfe".decode("latin-1"),
}
for _name, _text in CONFIGS.items():
    (TMP / _name).write_text(_text, encoding="latin-1")
(TMP / "folder").mkdir()
(TMP / "folder" / "config.json").write_text(json.dumps(TINY))  # a folder holding config.json is a valid --model
(TMP / "dir.json").mkdir()  # a directory named *.json: reading it fails with IsADirectoryError
(TMP / "emptydir").mkdir()  # a folder without config.json

MODEL_VALUES = (
    model_keys()
    + ["meta-llama/Llama-2-7b-hf", "LLAMA-7B", " gpt2 ", "llama", "gpt-2", "nope", "", "-", "x/y", "/", ".", "..",
       "llama-7b/", "a" * 300, "💥", str(TMP / "missing.json"), str(TMP / "folder"), str(TMP / "emptydir"),
       str(TMP / "dir.json")]
    + [str(TMP / n) for n in CONFIGS]
)
PRECISIONS = ["fp32", "fp16", "bf16", "fp16-master", "bf16-master", "pure-bf16"]
OPTIMIZERS = ["adamw", "adamw-fused", "adamw-forloop", "sgd", "momentum", "adafactor", "adamw-8bit", "paged-adamw",
              "paged-adamw-8bit"]
PEFTS = ["full", "freeze", "lora", "dora", "qlora", "ia3", "prompt", "prefix", "adapter", "bitfit"]

junk = st.one_of(st.sampled_from(["", " ", "-", "--", "nan", "inf", "-inf", "1e3", "0x10", "1.5", "abc", "None",
                                  "true", "٣", "--model", "-1", "0", "\n", "a\nb", "\t"]),
                 st.text(max_size=12))
ints = st.one_of(st.integers(-3, 40), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 2**31, 10**100]))
sizes = st.one_of(ints.map(str), junk)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.floats(-1, 12).map(str), junk)


def choice_or_junk(values):
    return st.one_of(st.sampled_from(values), st.sampled_from([v.upper() for v in values]), junk)


# option -> strategy for its value (None: a flag that takes no value)
OPTIONS = {
    "--model": st.sampled_from(MODEL_VALUES) | junk, "-m": st.sampled_from(MODEL_VALUES),
    "--gpu": choice_or_junk(gpu_keys() + ["h100", "a100", "nvidia-h100"]),
    "--gpus": sizes, "--zero": sizes,
    "--zero0": None, "--zero1": None, "--zero2": None, "--zero3": None,
    "--offload-optimizer": None, "--offload-params": None,
    "--precision": choice_or_junk(PRECISIONS), "--fp32": None, "--fp16": None, "--bf16": None, "--pure-bf16": None,
    "--optimizer": choice_or_junk(OPTIMIZERS), "--adam": None, "--sgd": None, "--momentum": None, "--adafactor": None,
    "--adam8bit": None, "--optimizer-in-backward": None,
    "--peft": choice_or_junk(PEFTS), "--lora-rank": sizes, "--lora-alpha": sizes,
    "--lora-targets": choice_or_junk(["q_proj,v_proj", "all-linear", "c_attn", "query,value", "q,v", ",", "nope",
                                      "q_proj,,k_proj", "down_proj"]),
    "--double-quant": None, "--no-double-quant": None,
    "--virtual-tokens": sizes, "--adapter-size": sizes, "--train-layers": sizes,
    "--batch": sizes, "-b": sizes, "--seq": sizes, "-s": sizes, "--grad-accum": sizes,
    "--checkpointing": choice_or_junk(["none", "full", "selective"]),
    "--attention": choice_or_junk(["eager", "sdpa", "flash"]),
    "--dropout": None, "--no-dropout": None,
    "--context-mib": sizes, "--fragmentation": floats,
    "--format": choice_or_junk(["table", "json", "csv"]), "-f": st.sampled_from(["table", "json", "csv"]),
    "--bogus": None, "-x": None, "--seq=": None, "--zero=3": None, "--batch=2": None,
}
# values that parse, for runs that should mostly reach the estimator (impossible combinations still happen)
GOOD = st.integers(1, 64).map(str)
VALID = {
    "--model": st.sampled_from(model_keys()), "-m": st.sampled_from(model_keys()),
    "--gpu": st.sampled_from(gpu_keys()), "--gpus": st.sampled_from(["1", "2", "8", "64"]),
    "--zero": st.sampled_from(["0", "1", "2", "3"]), "--precision": st.sampled_from(PRECISIONS),
    "--optimizer": st.sampled_from(OPTIMIZERS), "--peft": st.sampled_from(PEFTS),
    "--lora-rank": GOOD, "--lora-alpha": GOOD, "--lora-targets": st.sampled_from(["all-linear", "q_proj,v_proj"]),
    "--virtual-tokens": GOOD, "--adapter-size": GOOD, "--train-layers": st.integers(0, 6).map(str),
    "--batch": GOOD, "-b": GOOD, "--seq": st.sampled_from(["64", "128", "512"]), "-s": st.just("256"),
    "--grad-accum": st.sampled_from(["1", "4"]), "--checkpointing": st.sampled_from(["none", "full", "selective"]),
    "--attention": st.sampled_from(["eager", "sdpa", "flash"]), "--context-mib": st.sampled_from(["0", "600"]),
    "--fragmentation": st.sampled_from(["0", "0.05", "0.3"]), "--format": st.sampled_from(["table", "json", "csv"]),
    "-f": st.sampled_from(["table", "json", "csv"]),
}
VALID_FLAGS = [o for o, v in OPTIONS.items() if v is None and not o.startswith(("--bogus", "-x", "--seq=", "--zero="))]

# a realistic core that most runs start from, so the fuzz reaches the estimator often, not only the parser
BASE = st.sampled_from([[], ["--model", "llama-7b"], ["--model", "gpt2", "--seq", "512"],
                        ["--model", "t5-3b", "--seq", "512"], ["--model", "bert-base-uncased", "--seq", "128"],
                        ["--model", "mixtral-8x7b"], ["--model", str(TMP / "good.json"), "--seq", "64"],
                        ["--model", "qwen2.5-0.5b", "--peft", "qlora"]])


@st.composite
def option_lists(draw, valid: bool = False):
    argv = list(draw(BASE))
    names = sorted(VALID) + VALID_FLAGS if valid else sorted(OPTIONS)
    for opt in draw(st.lists(st.sampled_from(names), max_size=8)):
        argv.append(opt)
        if OPTIONS[opt] is not None:
            argv.append(draw(VALID[opt] if valid else OPTIONS[opt]))
    if not valid and draw(st.integers(0, 9)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(junk))  # a stray positional argument
    return argv


COMMANDS = st.one_of(
    option_lists().map(lambda a: ["estimate", *a]),  # mostly the estimate command: any values
    option_lists(valid=True).map(lambda a: ["estimate", *a]),  # values that parse
    option_lists(valid=True).map(lambda a: ["estimate", *a]),
    st.tuples(st.sampled_from(["list", "show"]), st.lists(st.sampled_from(
        ["models", "gpus", "all", "llama-7b", "h100-sxm", "nope", "", "--format", "json", "csv", "xml"]),
        max_size=3)).map(lambda t: ["profiles", t[0], *t[1]]),
    st.lists(junk, max_size=3),  # no command / a bogus one
)


def call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except BaseException as exc:  # main() must never let anything escape: the console script would trace back
            raise AssertionError(f"main({argv!r}) raised {type(exc).__name__}: {exc}") from exc
    return rc, out.getvalue(), err.getvalue()


def check_contract(argv, rc, out, err):
    assert rc in (0, 2), (argv, rc, err)
    assert "Traceback" not in out + err, argv
    if rc == 2:
        lines = err.split("\n")
        assert lines[-1] == "" and len(lines) == 2, (argv, err)  # exactly one newline-terminated line
        assert lines[0].startswith("memplan: error:") and lines[0][len("memplan: error:"):].strip(), (argv, err)
        assert "\r" not in lines[0]
        assert out == "", (argv, out)
    elif argv[:1] == ["estimate"] and "--help" not in argv:
        fmts = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--format", "-f")]
        fmt = fmts[-1] if fmts else "table"  # click: the last occurrence of an option wins
        if fmt == "json":
            d = json.loads(out)
            assert d["peak"]["allocated_bytes"] > 0
        elif fmt == "csv":
            assert len(list(csv.reader(io.StringIO(out)))) == 2
        for line in err.splitlines():  # on success stderr carries warnings only
            assert line.startswith("warning: "), (argv, err)


@settings(max_examples=int(os.environ.get("MEMPLAN_FUZZ_EXAMPLES", max(1000, settings().max_examples))), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(COMMANDS)
def test_cli_fuzz(argv):
    rc, out, err = call(argv)
    check_contract(argv, rc, out, err)
    event(f"exit {rc}")  # --hypothesis-show-statistics: how often the fuzz gets past the parser


# --- hand-picked invalid input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["estimate", "--model", "llama-7b", "--fp16", "--bf16"], "conflicting precision"),
    (["estimate", "--model", "llama-7b", "--adam", "--sgd"], "conflicting optimizer"),
    (["estimate", "--model", "llama-7b", "--zero", "2", "--zero3"], "conflicting zero"),
    (["estimate", "--model", "llama-7b", "--zero", "7"], "--zero must be"),
    (["estimate", "--model", "llama-7b", "--offload-params"], "offload"),
    (["estimate", "--model", "llama-7b", "--zero", "2", "--offload-params"], "stage 3"),
    (["estimate", "--model", "llama-7b", "--peft", "qlora", "--fp32"], "QLoRA"),
    (["estimate", "--model", "llama-7b", "--zero2", "--gpus", "8", "--offload-optimizer"], "optimizer-only offload"),
    (["estimate", "--model", "llama-7b", "--zero1", "--gpus", "8", "--fsdp-bf16"], "fsdp-bf16"),
    (["estimate", "--model", "llama-7b", "--zero3", "--gpus", "8", "--engine", "deepspeed", "--bf16"],
     "bf16-master"),
    (["estimate", "--model", "llama-7b", "--engine", "megatron"], "unknown engine"),
    (["estimate", "--model", "llama-7b", "--batch", "0"], "--batch must be positive"),
    (["estimate", "--model", "llama-7b", "--seq", "-5"], "--seq must be positive"),
    (["estimate", "--model", "llama-7b", "--gpus", "0"], "--gpus must be positive"),
    (["estimate", "--model", "llama-7b", "--batch", str(2**20), "--seq", "4096"], "absurd"),
    (["estimate", "--model", "llama-7b", "--batch", str(10**30)], "too large"),
    (["estimate", "--model", "llama-7b", "--seq", str(10**400)], "1329-bit integer is too large"),  # past a float  # past 2**53: no int option takes it
    (["estimate", "--model", "llama-7b", "--fragmentation", "inf"], "not a finite number"),
    (["measure", "--model", "gpt2", "--memory-cap-gib", "nan"], "not a finite number"),
    (["measure", "--sweep", "x.toml", "--timeout-s", "-inf"], "not a finite number"),
    (["reconcile", "x.jsonl", "--max-error", "nan"], "not a finite number"),
    (["fit", "--model", "gpt2", "--gpu", "t4", "--margin", "nan"], "not a finite number"),
    (["estimate", "--model", "lama-7b"], "did you mean"),
    (["estimate", "--model", "llama-7b", "--gpu", "h1000"], "unknown GPU"),
    (["estimate", "--model", "gpt2", "--seq", "4096"], "learned positions"),
    (["estimate", "--model", "llama-7b", "--peft", "prefix", "--checkpointing", "full"], "prefix"),
    (["estimate", "--model", "llama-7b", "--peft", "freeze", "--train-layers", "33"], "exceeds"),
    (["estimate", "--model", "llama-7b", "--peft", "lora", "--lora-targets", "c_attn"], "match no linear"),
    (["estimate", "--model", "llama-7b", "--peft", "sparse"], "unknown peft"),
    (["estimate", "--model", "llama-7b", "--fragmentation", "nan"], "--fragmentation"),
    (["estimate", "--model", "llama-7b", "--context-mib", "-1"], "--context-mib"),
    (["estimate", "--model", "llama-7b", "--format", "xml"], "--format"),
    (["estimate", "--model", "llama-7b", "--batch", "two"], "--batch"),
    (["estimate", "--model", "llama-7b", "--bogus"], "--bogus"),
    (["estimate"], "--model"),
    (["estimate", "--model", str(TMP / "truncated.json")], "malformed config"),
    (["estimate", "--model", str(TMP / "dir.json")], "not found"),  # a folder: its config.json is missing
    (["estimate", "--model", str(TMP / "missing.json")], "not found"),
    (["estimate", "--model", str(TMP / "emptydir")], "not found"),
    (["estimate", "--model", str(TMP / "unknown-type.json")], "not supported"),
    (["estimate", "--model", "a\x00.json"], "NUL character"),  # main(argv) in-process: os.stat raises ValueError
    (["report", "-o", "a\x00.html"], "NUL character"),
    (["profiles", "show", "nope"], "unknown model"),
    (["profiles", "list", "cars"], "unknown profile kind"),
    (["frobnicate"], "frobnicate"),
])
def test_invalid_input_is_one_line(argv, needle):
    rc, out, err = call(argv)
    check_contract(argv, rc, out, err)
    assert rc == 2 and needle in err, err


def test_valid_config_folder_and_file():
    for model in (str(TMP / "good.json"), str(TMP / "folder")):
        rc, out, err = call(["estimate", "--model", model, "--seq", "64", "--format", "json"])
        assert rc == 0, err
        assert json.loads(out)["total_params"] == (2 * 256 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64)
        # ^ exact count by hand: embed + lm_head, 2 blocks of q/k/v/o, gate/up/down and 2 norms, final norm


# --- malformed config.json files that crash memplan today ---------------------------------------------------------
CRASHING_CONFIGS = {
    "model_type is a list": '{"model_type": ["llama"]}',
    "mixtral expert count is not a number": json.dumps({**TINY, "model_type": "mixtral",
                                                        "num_local_experts": "eight"}),
    "gpt2 dropout is not a number": json.dumps(dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4,
                                                    vocab_size=100, n_positions=64, resid_pdrop="x")),
    "bert max_position_embeddings is a string": json.dumps(dict(
        model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        vocab_size=100, max_position_embeddings="512")),
    "deeply nested JSON": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("case", list(CRASHING_CONFIGS))
def test_malformed_config_is_one_line(case, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(CRASHING_CONFIGS[case])
    argv = ["estimate", "--model", str(path), "--seq", "64"]
    check_contract(argv, *call(argv))


# --- the real console script -----------------------------------------------------------------------------------------
def memplan_cmd() -> list[str]:
    exe = shutil.which("memplan")
    return [exe] if exe else [sys.executable, "-m", "memplan"]


def run_cli(*args, check_rc=None):
    p = subprocess.run([*memplan_cmd(), *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "200"})
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


def test_console_script_table():
    p = run_cli("estimate", "--model", "llama-7b", "--adam", "--bf16", "--zero3", check_rc=0)
    assert "llama-7b" in p.stdout and "peak allocated" in p.stdout and "peak device" in p.stdout
    for cat in ("weights", "master_weights", "gradients", "optimizer_states", "activations", "temporaries",
                "overhead"):
        assert f"  {cat}" in p.stdout
    # --zero3 on one GPU: one warning line (in the table output)
    warnings = [l for l in p.stdout.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "one GPU" in warnings[0]


def test_console_script_json():
    p = run_cli("estimate", "--model", "llama-7b", "--adam", "--bf16", "--zero3", "--gpus", "8", "--gpu",
                "h100-sxm", "--format", "json", check_rc=0)
    d = json.loads(p.stdout)
    assert {"model_states", "categories", "peak", "trainable_params", "total_params", "setup", "fits"} <= set(d)
    assert {"allocated_bytes", "reserved_bytes", "device_bytes", "phase"} <= set(d["peak"])
    assert d["total_params"] == 6_738_415_616  # exact llama-7b count (profile expected_params)
    assert isinstance(d["fits"], bool) and "headroom_bytes" in d
    assert d["setup"]["zero"] == 3 and d["setup"]["gpus"] == 8 and d["setup"]["precision"] == "bf16"
    assert p.stderr == ""  # 8 GPUs: no warning
    no_gpu = json.loads(run_cli("estimate", "--model", "llama-7b", "--format", "json", check_rc=0).stdout)
    assert "fits" not in no_gpu


def test_console_script_json_warning_on_stderr():
    p = run_cli("estimate", "--model", "llama-7b", "--zero3", "--format", "json", check_rc=0)
    json.loads(p.stdout)  # the warning does not pollute the JSON
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "one GPU" in lines[0]


def test_console_script_csv():
    p = run_cli("estimate", "--model", "llama-7b", "--adam", "--bf16", "--zero3", "--gpus", "8", "--format", "csv",
                check_rc=0)
    rows = list(csv.reader(io.StringIO(p.stdout)))
    assert len(rows) == 2 and len(rows[0]) == len(rows[1])
    row = dict(zip(*rows))
    assert row["model"] == "llama-7b" and int(row["peak_allocated_bytes"]) > 0


def test_console_script_profiles():
    p = run_cli("profiles", "list", check_rc=0)
    names = {l.split()[1] for l in p.stdout.splitlines() if l.strip()}
    assert {"llama-7b", "gpt2", "h100-sxm"} <= names
    p = run_cli("profiles", "show", "llama-7b", check_rc=0)
    assert "6,738,415,616" in p.stdout and "131,072,000" in p.stdout  # exact P and largest tensor L


@pytest.mark.parametrize("content", [None, "{not json", "[]"])
def test_console_script_bad_config_path(tmp_path, content):
    path = tmp_path / "config.json"
    if content is None:
        path.mkdir()  # not a readable file: a directory named config.json (holding no config.json)
    else:
        path.write_text(content)
    p = run_cli("estimate", "--model", str(path), check_rc=2)
    assert p.stdout == ""
    lines = p.stderr.split("\n")
    assert len(lines) == 2 and lines[1] == "" and lines[0].startswith("memplan: error:")


# --- how a run ends: a full disk, a closed pipe, Ctrl-C ------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("args", [["estimate", "--model", "gpt2", "--seq", "64"],
                                  ["estimate", "--model", "gpt2", "--seq", "64", "--format", "json"],
                                  ["profiles", "list"], ["estimate", "--help"]])
def test_full_stdout_is_one_line(args):
    with open("/dev/full", "w") as full:
        p = subprocess.run([*memplan_cmd(), *args], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr == "memplan: error: cannot write the output: No space left on device\n"


def test_closed_pipe_ends_quietly():
    p = subprocess.Popen([*memplan_cmd(), "profiles", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before memplan (still importing) writes a byte
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and err == "", err


def test_ctrl_c_in_process(monkeypatch):
    import memplan.estimate

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(memplan.estimate, "estimate_spec", interrupted)
    assert call(["estimate", "--model", "gpt2", "--seq", "64"]) == (130, "", "memplan: aborted\n")


def default_sigint():
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_a_trace():
    import signal
    import time

    pytest.importorskip("torch")
    # a Ctrl-C reaches a foreground command; started from a background job, SIGINT is ignored and the child would
    # inherit that (POSIX shells ignore it in non-interactive background jobs): restore the default
    p = subprocess.Popen([*memplan_cmd(), "trace", "--model", "llama-7b", "--seq", "512"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    time.sleep(4)  # past the imports, inside the model build or the traced step (which takes 10 s or more)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (out, err)
    assert "Traceback" not in err and err.splitlines()[-1] == "memplan: aborted", err


# --- config files read from anywhere: one line naming the file, before any work ---------------------------------
BAD_CONFIGS = {  # file name -> (content, what the error line says)
    "vocab-10e334.json": (json.dumps(TINY).replace('"vocab_size": 256', '"vocab_size": 1' + "0" * 334),
                          "vocab-10e334.json: vocab_size must be an integer"),
    "layers-1e8.json": (json.dumps({**TINY, "num_hidden_layers": 10**8}), "layers 1e+08 is absurd"),
    "hidden-float.json": (json.dumps({**TINY, "hidden_size": 64.5}), "hidden_size must be an integer"),
    "heads-bool.json": (json.dumps({**TINY, "num_attention_heads": True}), "num_attention_heads must be an integer"),
    "experts-inf.json": ('{"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers":'
                         ' 2, "num_attention_heads": 4, "vocab_size": 256, "num_local_experts": Infinity}',
                         "num_local_experts must be an integer"),
    "dropout-nan.json": ('{"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100, '
                         '"n_positions": 64, "resid_pdrop": NaN}', "resid_pdrop must be a probability"),
    "dropout-huge.json": (json.dumps(dict(model_type="t5", d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128,
                                          vocab_size=100, dropout_rate=1e300)), "dropout_rate must be a probability"),
    "negative-types.json": (json.dumps(dict(model_type="bert", hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=96, vocab_size=100,
                                            type_vocab_size=-5)), "type_vocab_size must be an integer"),
    "partial.json": (json.dumps({"model_type": "llama", "hidden_size": 64}),
                     "partial.json: config has no num_hidden_layers"),
    "syntax.json": ('{\n  "model_type": "llama",\n  "hidden_size": ,\n}', "line 3 column 18: Expecting value"),
    "latin1.json": ('{"model_type": "llama", "name": "caf\xe9"}', "not UTF-8 text (byte 36)"),  # the é, counted from 0
    "nested.json": ("[" * 100_000 + "]" * 100_000, "malformed config"),
    "array.json": ("[1, 2]", "expected a JSON object, got a list"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_names_the_file(name, tmp_path):
    content, needle = BAD_CONFIGS[name]
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1"))
    argv = ["estimate", "--model", str(path), "--seq", "64"]
    rc, out, err = call(argv)
    check_contract(argv, rc, out, err)
    assert rc == 2 and needle in err and name in err, err


@pytest.mark.parametrize("kind", ["fifo", "device", "too large"])
def test_config_that_is_not_a_small_regular_file(kind, tmp_path):
    from memplan.profiles import MAX_CONFIG_BYTES

    if kind == "fifo":
        path = tmp_path / "config.json"
        os.mkfifo(path)  # reading it would wait for a writer forever
        needle = "not a regular file"
    elif kind == "device":
        path = Path("/dev/zero")  # reading it would never end
        if not path.exists():
            pytest.skip("no /dev/zero")
        needle = "not a regular file"
    else:
        path = tmp_path / "config.json"
        path.write_text(json.dumps(TINY) + " " * MAX_CONFIG_BYTES)
        needle = "too large"
    argv = ["estimate", "--model", str(path)]
    rc, out, err = call(argv)
    check_contract(argv, rc, out, err)
    assert rc == 2 and needle in err and str(path) in err, err


# --- the trace without torch, overrides out of range, names the filesystem refuses ---------------------------------
@pytest.mark.parametrize("argv", [["estimate", "--model", "gpt2", "--seq", "64", "--exact"],
                                  ["trace", "--model", "gpt2", "--seq", "64"]])
def test_trace_without_torch_is_one_hint(argv, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, as without the extra
    rc, out, err = call(argv)
    check_contract(argv, rc, out, err)
    assert rc == 2 and "needs torch, transformers and peft: pip install 'memplan[torch]'" in err, err


@pytest.mark.parametrize("kw", [dict(cuda_context=-1), dict(nccl=-(2**20)), dict(cublas_workspace=1.5),
                                dict(cuda_context=2**60), dict(fragmentation=float("nan")),
                                dict(fragmentation=float("inf")), dict(fragmentation=-0.01), dict(fragmentation=10)])
def test_overhead_out_of_range_is_refused(kw):
    from memplan.errors import MemplanError
    from memplan.estimate import Overhead

    with pytest.raises(MemplanError, match="overhead"):
        Overhead(**kw)


@pytest.mark.parametrize("argv", [["estimate", "--model", "llama-7b", "--context-mib", str(2**40)],
                                  ["estimate", "--model", "llama-7b", "--fragmentation", "-0.5"]])
def test_overhead_options_out_of_range(argv):
    rc, out, err = call(argv)
    check_contract(argv, rc, out, err)
    assert rc == 2 and argv[-2] in err


def test_long_output_names_are_one_line(tmp_path):
    long = str(tmp_path / ("a" * 300))  # one component past NAME_MAX (255 on Linux filesystems)
    argv = ["trace", "--model", "gpt2", "--seq", "64", "--timeline", long + ".csv"]
    rc, out, err = call(argv)
    check_contract(argv, rc, out, err)
    assert rc == 2 and "File name too long" in err, err
    rc, out, err = call(["report", "-o", long + ".html"])
    assert rc in (1, 2) and out == "" and len(err.splitlines()) == 1 and err.startswith("memplan: error:"), err
    assert "Traceback" not in err


# --- every subcommand, and the files each one reads -----------------------------------------------------------------
# The long steps are stubbed (a traced step, a measured step, a sweep's worker): each raises Ran, so the fuzz checks
# every command line up to the point where the real work would start, and stays fast. Runs happen in CWD (a
# scratch folder), so default output paths (reports/...) land there, never in the checkout.
CWD = TMP / "cwd"
CWD.mkdir()
(CWD / "tiny.json").write_text(json.dumps(TINY))  # the model the committed CPU record names
RECORD = (Path(__file__).parent / "data" / "fuzz" / "cpu-tiny-record.jsonl").read_text()
GOOD_RECORD = json.loads(RECORD)


def _record(**changes) -> str:
    return json.dumps({**GOOD_RECORD, **changes}) + "\n"


def _write(name: str, content: str | bytes) -> str:
    path = TMP / "files" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


TINY_SWEEP = '[suite]\nname = "fuzz"\nsteps = 1\nwarmup = 0\n\n[[config]]\nname = "t"\nmodel = "tiny.json"\nseq = 16\n'
RECORD_FILES = [_write("record.jsonl", RECORD), _write("two.jsonl", RECORD + RECORD),
                _write("record-empty.jsonl", ""), _write("record-blank.jsonl", "\n\n")]
SWEEP_FILES = [_write("sweep.toml", TINY_SWEEP), _write("sweep.json", json.dumps([{"name": "t", "model": "tiny.json",
                                                                                 "seq": 16}])),
               _write("sweep-empty.toml", ""), _write("sweep-bad.toml", "[suite\nname = 1"),
               _write("sweep-latin1.toml", b"name = \"caf\xe9\""), "validation", "nope", str(TMP / "files")]
SETUP_FILES = [_write("setups.toml", '[[setup]]\nname = "a"\nmodel = "gpt2"\nseq = 128\n'),
               _write("setups.json", json.dumps([{"name": "b", "model": "tiny.json", "seq": 32, "peft": "lora"}])),
               _write("setups-empty.toml", ""), _write("setups-bad.json", "[{")]
OUTPUTS = [str(TMP / "out" / n) for n in ("page.html", "page.txt", "r.jsonl", "t.csv", "t.json", "snap.pickle")] + [
    str(TMP / "files"), str(TMP / ("a" * 300 + ".html")), str(TMP / "files" / "record.jsonl" / "under-a-file.html")]
paths = st.sampled_from(OUTPUTS)
gib = st.one_of(floats, st.sampled_from(["0.5", "80", "1e-9"]))


class Ran(Exception):
    """A stubbed long step was reached: the command line passed every check before it."""


def _ran(*args, **kwargs):
    raise Ran


@contextlib.contextmanager
def stubbed_long_steps():
    from unittest import mock

    import memplan.measure.harness
    import memplan.measure.sweep
    import memplan.trace

    with mock.patch.object(memplan.trace, "trace", _ran), mock.patch.object(memplan.measure.harness, "measure", _ran), \
            mock.patch.object(memplan.measure.sweep, "run_one", _ran):
        yield


def call_any(argv: list[str]) -> tuple[int | str, str, str]:
    """call(), with the long steps stubbed, in the scratch folder; "ran" when a stubbed step was reached."""
    here = os.getcwd()
    os.chdir(CWD)
    try:
        with stubbed_long_steps():
            return call(argv)
    except AssertionError as exc:
        if isinstance(exc.__cause__, Ran):
            return "ran", "", ""
        raise
    finally:
        os.chdir(here)


def check_any(argv, rc, out, err):
    """The contract of every command: 0, 1 (an error above --max-error, an output that cannot be written), 2 (bad
    input, one `memplan: error:` line) or 3 (nothing fits / --require-fit over the margin), never a traceback."""
    if rc == "ran":
        return
    assert rc in (0, 1, 2, 3), (argv, rc, err)
    assert "Traceback" not in out + err, (argv, err)
    if rc == 2:
        check_contract(argv, rc, out, err)
    elif rc in (1, 3):
        assert err.rstrip("\n").splitlines()[-1].startswith("memplan:"), (argv, err)


def options(spec: dict, max_size: int = 6):
    """A strategy for option lists drawn from {option: value strategy or None for a flag}."""
    @st.composite
    def draw_options(draw):
        argv = []
        for opt in draw(st.lists(st.sampled_from(sorted(spec)), max_size=max_size)):
            argv.append(opt)
            if spec[opt] is not None:
                argv.append(draw(spec[opt]))
        return argv
    return draw_options()


SMALL_MODELS = st.sampled_from(["gpt2", "qwen2.5-0.5b", "bert-base-uncased", "t5-small", str(TMP / "good.json"),
                                str(TMP / "gpt2.json")] + [str(TMP / n) for n in CONFIGS])
SETUP_SUBSET = {k: v for k, v in OPTIONS.items() if k not in ("--context-mib", "--fragmentation", "--model", "-m")}
FIT_OPTIONS = {
    "--gpus": sizes, "--seq": sizes, "-s": sizes, "--min-batch": sizes, "--max-batch": sizes, "--max-seq": sizes,
    "--margin": st.one_of(floats, st.sampled_from(["0", "0.05", "0.5", "0.99", "1", "-0.1"])),
    "--precision": choice_or_junk(PRECISIONS + ["fp32,bf16", "bf16,nope", ","]),
    "--optimizer": choice_or_junk(OPTIMIZERS + ["adamw,sgd"]), "--peft": choice_or_junk(PEFTS + ["lora,qlora"]),
    "--checkpointing": choice_or_junk(["none", "full", "selective", "none,full"]),
    "--zero": st.sampled_from(["0", "1,2", "3", "0,,1", "x", "9", "-1"]) | junk, "--max-zero": sizes,
    "--lora-rank": sizes, "--lora-targets": OPTIONS["--lora-targets"], "--train-layers": sizes,
    "--attention": OPTIONS["--attention"], "--grad-accum": sizes, "--top": sizes, "--format": OPTIONS["--format"],
    "--bogus": None,
}
MEASURE_OPTIONS = {
    **SETUP_SUBSET, "--device": choice_or_junk(["cpu", "cpu", "cuda", "auto"]), "--steps": sizes, "--warmup": sizes,
    "--lengths": choice_or_junk(["fixed", "varied"]), "--snapshot": paths, "--results": paths,
    "--sweep": st.sampled_from(SWEEP_FILES), "--resume": None, "--chunk": sizes, "--max-minutes": gib,
    "--plan": None, "--timeout-s": gib, "--memory-cap-gib": gib, "--name": junk,
}
REPORT_OPTIONS = {"-o": paths, "--output": paths, "--setups": st.sampled_from(SETUP_FILES) | junk,
                  "--gpu": st.sampled_from(["h100-sxm", "t4,a100-80gb", "nope", ",", ""]),
                  "--timeline": st.sampled_from(OUTPUTS[3:5] + SETUP_FILES[:1]), "--title": junk}
RECONCILE_OPTIONS = {"--max-error": st.one_of(floats, st.sampled_from(["0", "5", "-1"])),
                     "--level": choice_or_junk(["allocated", "reserved", "device"]),
                     "--estimate": choice_or_junk(["current", "recorded"]), "--format": OPTIONS["--format"]}

EVERY_COMMAND = st.one_of(
    st.tuples(SMALL_MODELS, options(SETUP_SUBSET, 4), st.sampled_from([[], [], ["--timeline", str(TMP / "t.csv")],
                                                                     ["--timeline", str(TMP / ("a" * 300 + ".csv"))],
                                                                     ["--timeline", "x.txt"], ["--help"]])).map(
        lambda t: ["trace", "--model", t[0], "--seq", "32", *t[1], *t[2]]),
    st.tuples(SMALL_MODELS, st.sampled_from(["t4", "a100-80gb", "h100-sxm", "nope"]), options(FIT_OPTIONS, 4)).map(
        lambda t: ["fit", "--model", t[0], "--gpu", t[1], "--max-batch", "8", "--max-seq", "1024", *t[2]]),
    st.tuples(st.sampled_from([[], ["--model", str(TMP / "good.json"), "--device", "cpu"],
                               ["--sweep", SWEEP_FILES[0], "--plan"], ["--sweep", SWEEP_FILES[0], "--device", "cpu"]]),
              options(MEASURE_OPTIONS, 5)).map(lambda t: ["measure", *t[0], *t[1]]),
    st.tuples(st.lists(st.sampled_from(RECORD_FILES + [str(TMP / "missing.jsonl"), str(TMP / "files")]), max_size=2),
              st.sampled_from([["-o", OUTPUTS[0]], []]), options(REPORT_OPTIONS, 3)).map(
        lambda t: ["report", *t[0], *t[1], *t[2]]),
    st.tuples(st.lists(st.sampled_from(RECORD_FILES + [str(TMP / "missing.jsonl"), str(TMP / "files")]), max_size=3),
              options(RECONCILE_OPTIONS, 3)).map(lambda t: ["reconcile", *t[0], *t[1]]),
    st.tuples(st.sampled_from(["list", "show", "bogus"]), st.lists(st.sampled_from(
        ["models", "gpus", "all", "llama-7b", "h100-sxm", "nope", "", "--format", "json", "csv", "xml", "--help"]),
        max_size=3)).map(lambda t: ["profiles", t[0], *t[1]]),
)
EVERY_COMMAND_EXAMPLES = int(os.environ.get("MEMPLAN_FUZZ_COMMAND_EXAMPLES", 500))


@settings(max_examples=EVERY_COMMAND_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EVERY_COMMAND)
def test_every_command_fuzz(argv):
    rc, out, err = call_any(argv)
    check_any(argv, rc, out, err)
    event(f"{argv[0]} exit {rc}")


# --- file inputs: config.json, measurement records, sweep files, --setups files, each mutated field by field ------
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.sampled_from([10**8, 2**31, 2**63, 10**334, -10**20]),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
              st.sampled_from(["64", "h100", "x", "ok", "oom", "error", "nan"])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
GPT2 = dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
T5 = dict(model_type="t5", d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128, vocab_size=100)
BERT = dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            vocab_size=100)
MIXTRAL = {**TINY, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}


@st.composite
def mutated(draw, base: dict) -> dict:
    """`base` with up to three fields replaced by any JSON value, or removed, or a new field added."""
    d = dict(base)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(d) + ["extra", "head_dim", "tie_word_embeddings", "num_key_value_heads"]))
        if draw(st.integers(0, 5)) == 0:
            d.pop(key, None)
        else:
            d[key] = draw(json_values)
    return d


def dump(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


RAW_FILES = st.sampled_from([b"", b" ", b"\x00\xff\xfe", b"[" * 5_000 + b"]" * 5_000, b'{"a": ' * 3000, b"null",
                             b"\xef\xbb\xbf{}", '{"model_type": "llama", "é": 1}'.encode("utf-16")])
CONFIG_FILES = st.one_of(*(mutated(b).map(dump) for b in (TINY, GPT2, T5, BERT, MIXTRAL)), RAW_FILES)
RECORD_CONTENTS = st.one_of(
    mutated(GOOD_RECORD).map(lambda r: dump(r) + b"\n"),
    st.builds(lambda s, k, v: dump({**GOOD_RECORD, "setup": {**GOOD_RECORD["setup"], k: v}}) + b"\n",
              st.none(), st.sampled_from(sorted(GOOD_RECORD["setup"])), json_values),
    st.builds(lambda k, v: dump({**GOOD_RECORD, "measured": {**GOOD_RECORD["measured"], k: v}}) + b"\n",
              st.sampled_from(sorted(GOOD_RECORD["measured"])), json_values),
    st.just(RECORD.encode()[:-40]), st.just(RECORD.encode() + RECORD.encode()[:100]), RAW_FILES)
SWEEP_CONTENTS = st.one_of(
    mutated({"name": "t", "model": "tiny.json", "seq": 16, "batch": 1}).map(lambda c: dump([c])),
    mutated({"name": "fuzz", "steps": 1, "warmup": 0}).map(
        lambda s: dump({"suite": s, "config": [{"name": "t", "model": "tiny.json", "seq": 16}]})), RAW_FILES)
SETUPS_CONTENTS = st.one_of(mutated({"name": "a", "model": "tiny.json", "seq": 32}).map(lambda s: dump([s])), RAW_FILES)
CONFIG_CASES = st.tuples(st.just("config.json"), CONFIG_FILES, st.sampled_from([
    ["estimate", "--seq", "16"], ["estimate", "--seq", "16", "--peft", "lora"], ["estimate", "--seq", "16", "--exact"],
    ["trace", "--seq", "16"], ["fit", "--gpu", "t4", "--max-batch", "4"],
    ["measure", "--device", "cpu", "--seq", "16", "--results", OUTPUTS[2]]]))
SETUPS_CASES = st.tuples(st.just("setups.json"), SETUPS_CONTENTS, st.just(["report", "-o", OUTPUTS[0], "--setups"]))
# records and sweep files: memplan/measure/record.py, sweep.py and reconcile.py validate them (issue 10, "No
# tracebacks", the record / sweep half); see test_record_and_sweep_file_fuzz below
RECORD_SWEEP_CASES = st.one_of(
    st.tuples(st.just("records.jsonl"), RECORD_CONTENTS, st.sampled_from([["reconcile"],
                                                                          ["reconcile", "--estimate", "recorded"],
                                                                          ["report", "-o", OUTPUTS[0]]])),
    st.tuples(st.just("sweep.json"), SWEEP_CONTENTS, st.just(["measure", "--plan", "--device", "cpu", "--sweep"])),
)
FILE_EXAMPLES = int(os.environ.get("MEMPLAN_FUZZ_FILE_EXAMPLES", 300))


def file_argv(name: str, path: str, command: list[str]) -> list[str]:
    if name == "config.json":
        return [command[0], "--model", path, *command[1:]]
    if command[0] in ("reconcile", "report") and name == "records.jsonl":
        return [command[0], path, *command[1:]]
    return [*command, path]


def check_file_case(case):
    name, content, command = case
    path = TMP / "fuzzed" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    argv = file_argv(name, str(path), command)
    rc, out, err = call_any(argv)
    check_any(argv, rc, out, err)
    event(f"{name} {command[0]} exit {rc}")


@settings(max_examples=FILE_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(CONFIG_CASES, CONFIG_CASES, SETUPS_CASES))
def test_file_input_fuzz(case):
    check_file_case(case)


@settings(max_examples=FILE_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=(Phase.generate,))  # no shrinking: the first traceback is enough, and shrinking one takes 20 s
@given(RECORD_SWEEP_CASES)
def test_record_and_sweep_file_fuzz(case):
    check_file_case(case)


# --- setup fields from files (a sweep, --setups, a record): integers and booleans, nothing else -------------------
@pytest.mark.parametrize("kw, needle", [
    (dict(batch=1.5), "batch must be an integer"), (dict(gpus=2.0), "gpus must be an integer"),
    (dict(batch=float("nan")), "batch must be an integer"), (dict(seq="64"), "seq must be an integer"),
    (dict(gpus=True), "gpus must be an integer"), (dict(grad_accum=10**40), "at most 2**31"),
    (dict(lora_rank=8.0), "rank must be an integer"), (dict(double_quant=1), "double_quant must be true or false"),
    (dict(dropout="x"), "dropout must be true or false"), (dict(offload_params="yes"), "offload_params must be"),
    (dict(lora_targets=5), "lora_targets must be module names"), (dict(lora_targets=["q_proj", 5]), "module names"),
])
def test_setup_field_types(kw, needle):
    from memplan.errors import MemplanError
    from memplan.spec.values import make_setup

    with pytest.raises(MemplanError) as exc:
        make_setup(**kw)
    assert needle in str(exc.value)


def test_fractional_batch_in_a_setups_file(tmp_path):
    setups = tmp_path / "setups.json"
    setups.write_text(json.dumps([{"name": "a", "model": "gpt2", "seq": 128, "batch": 1.5}]))
    argv = ["report", "--setups", str(setups), "-o", str(tmp_path / "r.html")]
    rc, out, err = call(argv)
    check_contract(argv, rc, out, err)
    assert rc == 2 and "batch must be" in err, err


@pytest.mark.parametrize("option", ["--setups", "--timeline"])
@pytest.mark.parametrize("kind", ["fifo", "deep", "latin1"])
def test_report_input_files(option, kind, tmp_path):
    path = tmp_path / ("in.json" if option == "--setups" or kind != "fifo" else "in.csv")
    if kind == "fifo":
        os.mkfifo(path)  # reading it would wait for a writer forever
        needle = "not a regular file"
    elif kind == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
        needle = str(path)
    else:
        path.write_bytes(b'[{"name": "caf\xe9"}]')
        needle = "not UTF-8 text (byte 14)"  # the é, counted from 0
    argv = ["report", option, str(path), "-o", str(tmp_path / "r.html")]
    if option == "--timeline":
        argv += ["--setups", SETUP_FILES[0]]
    rc, out, err = call(argv)
    check_contract(argv, rc, out, err)
    assert rc == 2 and needle in err, err
