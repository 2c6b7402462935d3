"""Issue 12 §4 and the custom GPUs of §2: memplan for scripts and CI.

`--version`; `--require-fit` / `--margin` and the exit-code table (0 fits, 3 does not fit, 2 bad input); `--help`
showing every setup default; the default `--seq` capped at the model's positions; one warning per flag the setup
ignores; no bf16 or FlashAttention-2 where the GPU has none; `--gpu 48GiB` and `--gpu FILE.toml`; the same from
the Python API. Every expected byte count below is derived from memplan's own estimate of the same setup (the
thresholds are placed around it), none is typed in.
"""
from __future__ import annotations

import json
import math
import tomllib
from types import SimpleNamespace

import pytest

import memplan
from memplan.api import fits
from memplan.cli import main
from memplan.cli.gate import EXIT_DOES_NOT_FIT
from memplan.cli.options import SETUP_OPTIONS
from memplan.errors import MemplanError
from memplan.profiles import gpu_keys, load_gpu, profiles_dir
from memplan.spec.gpu import AMPERE, MEMORY_UNITS, Platform, parse_memory
from memplan.spec.setup import DEFAULT_SEQ, default_seq
from memplan.spec.values import resolve_gpu
from memplan.units import MiB

SMALL = ("--model", "gpt2", "--seq", "128")  # a small estimate: instant


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc, err) -> bool:
    return rc == 2 and err.startswith("memplan: error:") and err.count("\n") == 1


# --- --version ---------------------------------------------------------------------------------------------------
def test_version(capsys):
    rc, out, err = run(capsys, "--version")
    assert (rc, out, err) == (0, f"memplan {memplan.__version__}\n", "")


# --- --require-fit, --margin and the exit codes -------------------------------------------------------------------
@pytest.fixture(scope="module")
def peak():
    """gpt2 at seq 128: the peak the thresholds below are placed around (memplan's own estimate)."""
    return memplan.estimate("gpt2", seq=128).peak.device_bytes


def test_require_fit_exit_codes_around_the_peak(capsys, peak):
    roomy = math.ceil(peak / 0.95 / MiB) + 1  # fits with the default 5% margin kept free
    tight = math.floor(peak / MiB) - 1  # does not fit at all
    between = math.ceil(peak / MiB) + 1  # fits the whole memory, not once 5% is kept free
    assert peak <= between * MiB < peak / 0.95
    rc, _, err = run(capsys, "estimate", *SMALL, "--gpu", f"{roomy}MiB", "--require-fit", "-f", "json")
    assert rc == 0 and "does not fit" not in err
    rc, _, err = run(capsys, "estimate", *SMALL, "--gpu", f"{tight}MiB", "--require-fit", "-f", "json")
    assert rc == EXIT_DOES_NOT_FIT == 3
    assert [l for l in err.splitlines() if l.startswith("memplan:")] == [err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("memplan: does not fit: peak device")
    rc, _, _ = run(capsys, "estimate", *SMALL, "--gpu", f"{between}MiB", "--require-fit", "-f", "json")
    assert rc == 3, "the default margin is fit's 5%"
    rc, _, _ = run(capsys, "estimate", *SMALL, "--gpu", f"{between}MiB", "--require-fit", "--margin", "0", "-f", "json")
    assert rc == 0
    # the API decides the same
    r = memplan.estimate("gpt2", seq=128, gpu=f"{between}MiB")
    assert r.fits and not fits(r) and fits(r, margin=0)


def test_without_require_fit_the_exit_code_is_0(capsys):
    rc, _, _ = run(capsys, "estimate", *SMALL, "--gpu", "1MiB", "-f", "json")
    assert rc == 0


@pytest.mark.parametrize("argv, needle", [
    (("--require-fit",), "--require-fit needs --gpu"),
    (("--gpu", "t4", "--require-fit", "--margin", "1"), "--margin must be in [0, 1)"),
    (("--gpu", "t4", "--require-fit", "--margin", "-0.1"), "--margin must be in [0, 1)"),
])
def test_require_fit_bad_input_is_exit_2(capsys, argv, needle):
    rc, out, err = run(capsys, "estimate", *SMALL, *argv)
    assert one_error_line(rc, err) and needle in err and out == ""


def test_trace_require_fit_without_gpu_is_refused_before_the_trace(capsys):
    rc, _, err = run(capsys, "trace", *SMALL, "--require-fit")
    assert one_error_line(rc, err) and "--require-fit needs --gpu" in err


def test_margin_without_require_fit_is_named(capsys):
    rc, _, err = run(capsys, "estimate", *SMALL, "--gpu", "t4", "--margin", "0.1", "-f", "json")
    assert rc == 0 and "warning: --margin is ignored without --require-fit" in err


def test_fit_nothing_fits_is_exit_3(capsys):
    rc, out, err = run(capsys, "fit", "--model", "llama-7b", "--gpu", "t4", "--peft", "full", "--precision", "fp32",
                       "--seq", "128")
    assert rc == 3 and out == "" and err.startswith("memplan: nothing fits") and err.count("\n") == 1


def test_exit_codes_are_in_help_and_readme(capsys):
    from pathlib import Path

    for cmd in ("estimate", "trace", "fit"):
        rc, out, _ = run(capsys, cmd, "--help")
        assert rc == 0 and "Exit codes:" in out and "3" in out.split("Exit codes:")[1]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    assert "--require-fit" in section and "| 3 " in section and "| 2 " in section


# --- --help shows every default --------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["estimate", "trace", "measure"])
def test_help_shows_every_setup_default(cmd):
    from memplan.cli import command

    click_cmd = command().commands[cmd]
    names = {p.name for p in SETUP_OPTIONS} - {"model"}  # measure's is optional (not with --sweep)
    missing = [p.opts[0] for p in click_cmd.params if p.name in names and not p.is_flag and not p.required
               and p.default is None and "[default" not in (p.help or "")]
    assert missing == [], f"{cmd}: options whose --help names no default: {missing}"


def test_help_names_the_defaults_the_issue_lists(capsys):
    rc, out, _ = run(capsys, "estimate", "--help")
    text = " ".join(out.split())
    assert rc == 0
    for needle in ("[default: bf16", "[default: adamw]", "[default: 2048", "[default: 0]", "[default: sdpa]",
                   "[default: full]", "[default: none]"):
        assert needle in text, needle


# --- the default --seq ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions, expected", [(512, 512), (DEFAULT_SEQ, DEFAULT_SEQ), (131072, DEFAULT_SEQ),
                                                 (0, DEFAULT_SEQ)])
def test_default_seq_is_the_smaller_of_2048_and_the_positions(positions, expected):
    assert default_seq(SimpleNamespace(max_positions=positions)) == expected


def test_default_seq_caps_relative_position_models_too(capsys):
    """t5-3b's config says n_positions 512 (relative attention bias, no table): the default stays within it."""
    positions = memplan.api.resolve_model("t5-3b").max_positions
    assert not memplan.api.resolve_model("t5-3b").traits.learned_positions
    rc, out, err = run(capsys, "estimate", "--model", "t5-3b", "-f", "json")
    assert rc == 0 and json.loads(out)["setup"]["seq"] == min(DEFAULT_SEQ, positions)
    assert ("--seq not given" in err) == (positions < DEFAULT_SEQ)
    assert memplan.estimate("t5-3b").setup.seq == min(DEFAULT_SEQ, positions)


# --- one warning per ignored flag ----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, flags", [
    (("--lora-rank", "16"), ["--lora-rank"]),
    (("--lora-rank", "16", "--lora-alpha", "32", "--no-double-quant"), ["--lora-rank", "--lora-alpha",
                                                                        "--no-double-quant"]),
    (("--virtual-tokens", "7", "--adapter-size", "16", "--train-layers", "1"),
     ["--virtual-tokens", "--adapter-size", "--train-layers"]),
    (("--bucket-view", "--sync-each-batch"), ["--bucket-view", "--sync-each-batch"]),
    (("--peft", "lora", "--lora-rank", "16", "--lora-alpha", "32"), []),
    (("--peft", "qlora", "--pure-bf16", "--no-double-quant"), []),
    (("--peft", "lora", "--no-double-quant"), ["--no-double-quant"]),
    (("--peft", "ia3", "--lora-targets", "c_attn"), []),
    (("--gpus", "2", "--bucket-view", "--grad-accum", "2", "--sync-each-batch"), []),
])
def test_ignored_flags_are_named_once_each(capsys, argv, flags):
    rc, _, err = run(capsys, "estimate", *SMALL, *argv, "-f", "json")
    assert rc == 0, err
    named = [l.split()[1] for l in err.splitlines() if l.startswith("warning: --") and " is ignored" in l]
    assert sorted(named) == sorted(flags)


def test_bad_input_stays_one_line_even_with_ignored_flags(capsys):
    rc, _, err = run(capsys, "estimate", *SMALL, "--lora-rank", "16", "--gpu", "no-such-gpu")
    assert one_error_line(rc, err)


def test_fit_bad_input_after_ignored_flags_is_one_line(capsys):
    rc, _, err = run(capsys, "fit", "--model", "gpt2", "--gpu", "t4", "--peft", "full", "--lora-rank", "4",
                     "--top", "-1")
    assert one_error_line(rc, err)


def test_fit_names_ignored_flags(capsys):
    rc, _, err = run(capsys, "fit", "--model", "gpt2", "--gpu", "t4", "--peft", "full", "--seq", "128",
                     "--lora-rank", "4", "--top", "1", "-f", "json")
    assert rc == 0 and "warning: --lora-rank is ignored" in err


def test_api_names_ignored_fields():
    r = memplan.estimate("gpt2", seq=128, lora_rank=16)
    assert any(w.startswith("--lora-rank is ignored") for w in r.warnings)
    assert not any("ignored" in w for w in memplan.estimate("gpt2", seq=128, peft="lora", lora_rank=16).warnings)


# --- bf16 and FlashAttention-2 only where the GPU has them ------------------------------------------------------
PRE_AMPERE = [k for k in gpu_keys() if not load_gpu(k).bf16]


def test_pre_ampere_profiles_exist():
    assert {"t4", "v100-16gb", "v100-32gb"} <= set(PRE_AMPERE)


@pytest.mark.parametrize("key", gpu_keys())
def test_stated_support_agrees_with_the_compute_capability(key):
    g = load_gpu(key)
    if g.compute_capability is None:
        assert g.bf16_tensor_cores is not None and g.flash_attention_2 is not None, \
            "a GPU without a CUDA compute capability states its bf16 and FlashAttention-2 support"
        return
    derived = g.compute_capability >= AMPERE
    for stated in (g.bf16_tensor_cores, g.flash_attention_2):
        assert stated in (None, derived)


@pytest.mark.parametrize("key", PRE_AMPERE)
def test_fit_recommends_no_bf16_on_pre_ampere(capsys, key):
    rc, out, err = run(capsys, "fit", "--model", "gpt2", "--gpu", key, "--peft", "lora,full", "--seq", "128",
                       "-f", "json")
    assert rc == 0, err
    rows = json.loads(out)["rows"]
    assert rows and not any("bf16" in r["precision"] for r in rows)
    assert {r["precision"] for r in rows} & {"fp16", "fp16-master"}


@pytest.mark.parametrize("key", PRE_AMPERE)
def test_flash_is_refused_on_pre_ampere(capsys, key):
    for cmd in (("estimate", *SMALL), ("fit", "--model", "gpt2", "--seq", "128")):
        rc, out, err = run(capsys, *cmd, "--gpu", key, "--attention", "flash")
        assert one_error_line(rc, err) and "FlashAttention-2" in err


def test_bf16_on_pre_ampere_is_a_clear_warning(capsys):
    rc, _, err = run(capsys, "estimate", *SMALL, "--gpu", "v100-16gb", "--bf16", "-f", "json")
    assert rc == 0 and "no bf16 tensor cores" in err and "--precision fp16" in err
    rc, _, err = run(capsys, "fit", "--model", "gpt2", "--gpu", "t4", "--precision", "bf16,fp16", "--peft", "lora",
                     "--seq", "128", "--top", "1", "-f", "json")
    assert rc == 0 and "warning: --precision bf16 on the NVIDIA Tesla T4" in err


# --- custom GPUs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, nbytes", [("48GiB", 48 * 2**30), ("80GB", 80 * 10**9), ("24G", 24 * 2**30),
                                          ("49140MiB", 49140 * 2**20), ("1.5TiB", int(1.5 * 2**40)),
                                          ("16 gib", 16 * 2**30), ("500MB", 500 * 10**6)])
def test_memory_sizes(text, nbytes):
    assert parse_memory(text) == nbytes
    g = resolve_gpu(text)
    assert g.memory_bytes == nbytes and not g.has_flops and g.platform is Platform.CUDA


@pytest.mark.parametrize("text", ["h100", "48", "GiB", "-4GiB", "48XB", "4 8GiB", "48GiBs"])
def test_not_memory_sizes(text):
    assert parse_memory(text) is None


def test_units_are_si_or_binary_as_named():
    assert MEMORY_UNITS["gb"] == 10**9 and MEMORY_UNITS["gib"] == MEMORY_UNITS["g"] == 2**30


def test_memory_only_gpu_predicts_no_throughput(capsys):
    rc, out, err = run(capsys, "estimate", *SMALL, "--gpu", "48GiB", "-f", "json")
    d = json.loads(out)
    assert rc == 0 and d["gpu"]["memory_bytes"] == 48 * 2**30 and "throughput" not in d
    assert "no FLOPS figure" in err
    rc, out, _ = run(capsys, "estimate", *SMALL, "--gpu", "48GiB")
    assert rc == 0 and "throughput:" not in out and "no FLOPS figure" in out


def test_memory_only_gpu_in_fit(capsys):
    rc, out, err = run(capsys, "fit", "--model", "gpt2", "--gpu", "8GiB", "--peft", "lora", "--seq", "128", "-f",
                       "json")
    d = json.loads(out)
    assert rc == 0 and d["sort"] == "batch" and "no FLOPS figure" in err
    assert all(r["tokens_per_s"] is None and r["step_s"] is None for r in d["rows"])
    rc, out, _ = run(capsys, "fit", "--model", "gpt2", "--gpu", "8GiB", "--peft", "lora", "--seq", "128")
    assert rc == 0 and "tokens/s" not in out.splitlines()[2] and "no FLOPS figure" in out


@pytest.mark.parametrize("text", ["0GiB", "2000TiB"])
def test_absurd_sizes_are_refused(capsys, text):
    rc, _, err = run(capsys, "estimate", *SMALL, "--gpu", text)
    assert one_error_line(rc, err)


def test_gpu_file_is_the_profile_schema(capsys, tmp_path):
    """A copy of a shipped profile, as a file, gives the same answer as the profile."""
    path = tmp_path / "my-l4.toml"
    path.write_text((profiles_dir() / "gpus" / "l4.toml").read_text())
    rc, out, _ = run(capsys, "estimate", *SMALL, "--gpu", str(path), "-f", "json")
    rc2, out2, _ = run(capsys, "estimate", *SMALL, "--gpu", "l4", "-f", "json")
    a, b = json.loads(out), json.loads(out2)
    assert rc == rc2 == 0 and a["gpu"]["name"] == "my-l4"
    assert a["peak"] == b["peak"] and a["throughput"] == b["throughput"]
    assert memplan.estimate("gpt2", seq=128, gpu=str(path)).gpu.memory_bytes == load_gpu("l4").memory_bytes


@pytest.mark.parametrize("text, needle", [
    ("label = 'x'\nmemory_bytes = 1024\nmemmory = 3\n", "unknown field 'memmory'"),
    ("memory_bytes = 1024\n", "lacks 'label'"),
    ("label = 'x'\n", "lacks 'memory_bytes'"),
    ("label = 'x'\nmemory_bytes = -5\n", "memory_bytes must be"),
    ("label = 'x'\nmemory_bytes = 1.5\n", "memory_bytes must be"),
    ("label = 'x'\nmemory_bytes = 1024\n[tflops]\nbf16 = 'fast'\n", "tflops.bf16 must be a number"),
    ("label = 'x'\nmemory_bytes = 1024\nplatform = 'metal'\n", "platform must be one of"),
    ("label = 'x'\nmemory_bytes = 1024\ncompute_capability = 'eight'\n", "compute_capability"),
    ("label = 'x'\nmemory_bytes = 1024\nbf16_tensor_cores = 'yes'\n", "bf16_tensor_cores must be true or false"),
    ("label = 'x\n", "not a TOML file"),
])
def test_bad_gpu_files_are_one_line(capsys, tmp_path, text, needle):
    path = tmp_path / "gpu.toml"
    path.write_text(text)
    rc, out, err = run(capsys, "estimate", *SMALL, "--gpu", str(path))
    assert one_error_line(rc, err) and needle in err and str(path) in err and out == ""


def test_missing_gpu_file_is_one_line(capsys, tmp_path):
    rc, _, err = run(capsys, "estimate", *SMALL, "--gpu", str(tmp_path / "nope.toml"))
    assert one_error_line(rc, err) and "not found" in err


def test_rocm_gpu_says_its_overhead_is_cudas(capsys):
    g = load_gpu("mi300x")
    assert g.platform is Platform.ROCM and g.compute_capability is None
    rc, out, err = run(capsys, "estimate", *SMALL, "--gpu", "mi300x", "-f", "json")
    assert rc == 0 and "ROCm" in err and any("ROCm" in w for w in json.loads(out)["warnings"])
    raw = tomllib.loads((profiles_dir() / "gpus" / "mi300x.toml").read_text())
    assert raw["platform"] == "rocm"


def test_api_custom_gpu_and_fits():
    r = memplan.estimate("gpt2", seq=128, gpu="48GiB")
    assert r.throughput is None and r.gpu.memory_bytes == 48 * 2**30 and fits(r)
    assert memplan.estimate("gpt2", seq=128, gpu=2**30).gpu.memory_bytes == 2**30
    with pytest.raises(MemplanError):
        fits(memplan.estimate("gpt2", seq=128))
    with pytest.raises(MemplanError):
        fits(r, margin=1.0)


def test_trace_require_fit(capsys, tmp_path):
    """The trace's device level (its allocated bytes plus the estimate's overhead) gated the same way."""
    pytest.importorskip("torch")
    tiny = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny))
    rc, out, err = run(capsys, "trace", "--model", str(path), "--seq", "32", "--gpu", "1MiB", "--require-fit",
                       "-f", "json")
    peak = json.loads(out)["peak"]["device_bytes"]
    assert rc == 3 and peak > 2**20 and err.splitlines()[-1].startswith("memplan: does not fit")
    rc, _, _ = run(capsys, "trace", "--model", str(path), "--seq", "32", "--gpu", f"{peak // MiB * 2 + 2}MiB",
                   "--require-fit", "-f", "json")
    assert rc == 0
