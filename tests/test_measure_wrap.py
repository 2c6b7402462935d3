"""Issue 12 §3: `memplan measure [OPTIONS] -- COMMAND` measures the user's own training command, unchanged.

Two real runs on the CPU (the fixture scripts in tests/fixtures/wrap/, each with random weights and no download):
a Hugging Face Trainer on a tiny Llama (its setup detected, estimated, reconciled), and a plain PyTorch loop that
exits with code 3 after its steps (detected without a config: no estimate, said so; the code and the steps kept). The
rest is the pure mapping of observations to setup fields and the CLI's bad input, without a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memplan.calibrate import PEAK_TOL
from memplan.cli import main, split_command
from memplan.measure.record import load_records
from memplan.measure.wrap import detect
from memplan.measure.wrap.job import SITE_DIR, Run, command_env, compose

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "wrap"
PY = sys.executable


def wrapped(tmp_path_factory, name: str, *script_args: str) -> tuple[int, dict, str, str, Path]:
    """(exit code, the record, stderr, stdout, the results file) of `memplan measure -- python SCRIPT ...`."""
    out = tmp_path_factory.mktemp(name) / "wrap.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([PY, "-m", "memplan", "measure", "--device", "cpu", "--results", str(out), "--format",
                           "json", "--", PY, *script_args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    recs = load_records(out) if out.exists() else []
    return proc.returncode, (recs[0] if recs else {}), proc.stderr, proc.stdout, out


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return wrapped(tmp_path_factory, "trainer", str(FIX / "hf_trainer.py"))


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """The plain loop, ending with exit code 3 after its steps: one run for detection and the failure path."""
    return wrapped(tmp_path_factory, "loop", str(FIX / "torch_loop.py"), "--exit-code", "3")


def test_trainer_detected_and_estimated(trainer):
    rc, rec, err, out, _ = trainer
    assert rc == 0, err[-2000:]
    assert json.loads(out)["record_id"] == rec["record_id"]  # stdout: memplan's JSON only (the script's went to stderr)
    det = rec["wrapped"]["detected"]
    cfg = rec["model_config"]
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 2
    assert {k: det[k]["value"] for k in ("optimizer", "precision", "peft", "batch", "seq", "grad_accum",
                                         "checkpointing", "attention", "loss", "gpus", "zero")} == {
        "optimizer": "adamw", "precision": "fp32", "peft": "full", "batch": 2, "seq": 32, "grad_accum": 1,
        "checkpointing": "none", "attention": "sdpa", "loss": "standard", "gpus": 1, "zero": 0}
    assert rec["wrapped"]["unknown"] == {}
    assert rec["setup"]["batch"] == 2 and rec["setup"]["seq"] == 32
    m = rec["measured"]
    assert set(m["phases"]) == {"load", "forward", "backward", "optimizer_step"}
    assert m["steps"] == 2 and m["warmup"] == 1 and m["steps_seen"] == 3  # max_steps=3, the first is warm-up
    assert m["tokens_per_step"] == 2 * 32 and m["tokens_per_s"] > 0
    assert rec["source"] == "wrapped" and rec["wrapped"]["exit_code"] == 0
    est = rec["estimate"]["peak"]["allocated_bytes"]
    meas = m["peak"]["allocated_bytes"]
    assert abs(est - meas) <= PEAK_TOL * meas, (est, meas)  # the tracker's bytes, as --device cpu measures


def test_trainer_record_reconciles(trainer, capsys):
    *_, path = trainer
    rc = main(["reconcile", str(path), "--format", "json"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rc == 0 and rows[0]["note"] is None  # re-estimated from the config the record carries
    assert rows[0]["est_allocated_bytes"] == trainer[1]["estimate"]["peak"]["allocated_bytes"]


def test_plain_loop_detected_without_estimate(loop, capsys):
    rc, rec, err, _, path = loop
    det = {k: v["value"] for k, v in rec["wrapped"]["detected"].items()}
    assert det["optimizer"] == "adamw" and det["precision"] == "fp32" and det["peft"] == "full", err[-2000:]
    assert (det["batch"], det["seq"]) == (4, 16)  # torch_loop.py's defaults
    assert set(rec["wrapped"]["unknown"]) == {"checkpointing", "attention", "loss"}
    assert rec["model"] == "TinyLM" and rec["estimate"] is None and rec["model_config"] is None
    assert "no Hugging Face config" in rec["wrapped"]["estimate_note"]
    assert set(rec["measured"]["phases"]) == {"load", "forward", "backward", "optimizer_step"}
    assert main(["reconcile", str(path), "--format", "json"]) == 0
    assert "no Hugging Face config" in json.loads(capsys.readouterr().out)["rows"][0]["note"]


def test_failing_command_keeps_its_code_and_steps(loop):
    rc, rec, err, _, _ = loop
    assert rc == 3
    assert [line for line in err.splitlines() if line.startswith("memplan: the command exited with code 3")]
    assert rec["status"] == "error" and "code 3" in rec["error"] and rec["wrapped"]["exit_code"] == 3
    assert rec["measured"]["steps_seen"] == 3  # the results so far are kept


# ---- without a subprocess ---------------------------------------------------------------------------------------
def test_split_command():
    assert split_command(["measure", "--device", "cpu", "--", "python3", "t.py", "--lr", "1"]) == (
        ["measure", "--device", "cpu"], ["python3", "t.py", "--lr", "1"])
    assert split_command(["estimate", "--model", "gpt2"]) == (["estimate", "--model", "gpt2"], None)


@pytest.mark.parametrize("argv, what", [
    (["measure", "--device", "cpu", "--"], "give the training command"),
    (["measure", "--device", "cpu", "--batch", "4", "--", "python3", "t.py"], "--batch do not apply"),
    (["measure", "--device", "cpu", "--model", "gpt2", "--", "python3", "t.py"], "--model do not apply"),
    (["measure", "--device", "cpu", "--", "/nonexistent/memplan-no-such-command"], "command not found"),
])
def test_bad_input_is_one_line(argv, what, capsys, tmp_path):
    rc = main(argv[:3] + ["--results", str(tmp_path / "r.jsonl")] + argv[3:])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("memplan: error:") and err.count("\n") == 1 and what in err, err


def test_detect_lora_bf16_and_launchers():
    obs = {"param_dtypes": {"trainable": {"float32": 10}, "frozen": {"float32": 1000}},
           "autocast": {"cuda": "bfloat16"},
           "optimizer": {"class": "torch.optim.adamw.AdamW", "defaults": {"fused": True}},
           "peft_config": {"default": {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_dora": True,
                                       "target_modules": ["v_proj", "q_proj"]}},
           "gradient_checkpointing": True, "checkpoint_kwargs": {"use_reentrant": False},
           "attn_implementation": "flash_attention_2", "labels_in_forward": True,
           "env": {"WORLD_SIZE": "8", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}}
    steps = [{"forwards": 4, "shapes": [[2, 128]] * 4}, {"forwards": 4, "shapes": [[2, 100]] * 4}]
    d = detect.detect_setup(obs, steps)
    assert d.fields == {"precision": "bf16", "optimizer": "adamw-fused", "peft": "dora", "lora_rank": 16,
                        "lora_alpha": 32, "lora_targets": ["q_proj", "v_proj"], "checkpointing": "full",
                        "ckpt_reentrant": False, "attention": "flash", "batch": 2, "seq": 128, "grad_accum": 4,
                        "loss": "standard", "gpus": 8, "engine": "deepspeed", "zero": 2}
    assert d.unknown == {} and d.lengths == "varied"


def test_detect_names_what_it_cannot_see():
    obs = {"param_dtypes": {"trainable": {"float16": 10}}, "autocast": {},
           "optimizer": {"class": "my.opt.Lion", "defaults": {}}}
    d = detect.detect_setup(obs, [])
    assert {"precision", "optimizer", "batch", "seq", "grad_accum", "checkpointing", "attention", "loss"} <= \
        set(d.unknown)
    assert "Lion has no memplan state model" in d.unknown["optimizer"]
    assert not set(d.fields) & set(d.unknown)  # an unknown field keeps memplan's default, never a guess


def test_compose_without_any_step_is_an_error():
    rec = compose(["python3", "x.py"], Run(0, "exited", []), "cpu", 1)
    assert rec["status"] == "error" and "no torch optimizer step" in rec["error"]
    assert rec["model"] == "unknown model" and rec["measured"] is None


def test_site_chains_to_an_existing_sitecustomize(tmp_path):
    """The injected folder shadows the site's own sitecustomize; it runs it (no hooks without MEMPLAN_WRAP_DIR,
    so no torch import here)."""
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.SITE_RAN = 'yes'\n")
    env = command_env("", "cpu", {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path)})
    env.pop("MEMPLAN_WRAP_DIR")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(SITE_DIR), str(tmp_path)]
    out = subprocess.run([PY, "-c", "import builtins, sitecustomize; print(builtins.SITE_RAN, sitecustomize.__file__)"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    ran, path = out.stdout.split()
    assert ran == "yes" and Path(path).parent == SITE_DIR


SLEEPER = [PY, "-c", "import time; time.sleep(120)"]  # trains nothing: stopped by memplan


def test_timeout_stops_the_command(capsys, tmp_path):
    out = tmp_path / "r.jsonl"
    rc = main(["measure", "--device", "cpu", "--results", str(out), "--timeout-s", "1", "--", *SLEEPER])
    err = capsys.readouterr().err
    rec = load_records(out)[0]
    assert rc == 1 and "timed out" in err
    assert rec["status"] == "error" and rec["wrapped"]["ended"] == "timeout" and rec["wrapped"]["exit_code"] is None


def test_ctrl_c_stops_the_command_and_keeps_the_record(capsys, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    real_wait = subprocess.Popen.wait
    calls = []

    def wait(self, timeout=None):
        if self.args == SLEEPER and not calls:  # memplan's own wait for the command: Ctrl-C arrives
            calls.append(timeout)
            raise KeyboardInterrupt
        return real_wait(self, timeout=timeout)

    monkeypatch.setattr(subprocess.Popen, "wait", wait)
    monkeypatch.setattr("memplan.measure.wrap.job.OWN_STOP_S", 0.1)
    rc = main(["measure", "--device", "cpu", "--results", str(out), "--", *SLEEPER])
    err = capsys.readouterr().err
    rec = load_records(out)[0]
    assert rc == 130 and "interrupted" in err
    assert rec["wrapped"]["ended"] == "interrupted" and "interrupted" in rec["error"]


def test_measured_block_takes_the_steps_after_warmup():
    """A CUDA-like payload (reserved peaks per phase): the first step (optimizer state creation) is left out of the
    phase peaks, load is kept, the peak phase is the largest window phase."""
    from memplan.measure.wrap.job import measured_block

    def step(fwd, bwd, opt, t):
        ph = {p: {"peak_allocated_bytes": v, "end_allocated_bytes": v // 2, "peak_reserved_bytes": 2 * v}
              for p, v in (("forward", fwd), ("backward", bwd), ("optimizer_step", opt))}
        return {"time_s": t, "tokens": 64, "forwards": 1, "shapes": [[2, 32]], "phases": ph}

    payload = {"load": {"peak_allocated_bytes": 10, "end_allocated_bytes": 10, "peak_reserved_bytes": 20},
               "steps": [step(100, 900, 50, 5.0), step(300, 400, 350, 1.0), step(310, 390, 340, 3.0)],
               "memory": {"device_bytes": 5000, "device_reason": None, "context_bytes": 100}}
    m, warns = measured_block(payload, warmup=1)
    assert m["steps"] == 2 and m["warmup"] == 1 and m["steps_seen"] == 3 and not warns
    assert m["phases"]["backward"]["peak_allocated_bytes"] == 400  # not the first step's 900
    assert m["peak"] == {"allocated_bytes": 400, "reserved_bytes": 800, "device_bytes": 5000, "device_reason": None,
                         "phase": "backward"}
    assert m["phases"]["load"]["peak_allocated_bytes"] == 10
    assert m["step_time_s"]["median"] == 2.0 and m["tokens_per_s"] == 128 / 4.0
    short, warns = measured_block({**payload, "steps": payload["steps"][:1]}, warmup=1)
    assert short["warmup"] == 0 and short["peak"]["allocated_bytes"] == 900 and "include the first step" in warns[0]


def test_torchrun_command_gathers_every_rank(tmp_path_factory):
    """`memplan measure -- python -m torch.distributed.run --nproc_per_node 2 train.py`: each rank's hooks report,
    the record holds both ranks (the max over them at every level) and the world size the launcher set."""
    from memplan.measure.distributed import free_port

    rc, rec, err, _, _ = wrapped(tmp_path_factory, "torchrun", "-m", "torch.distributed.run", "--nnodes", "1",
                                 "--nproc_per_node", "2", "--master_port", str(free_port()),
                                 str(FIX / "hf_trainer.py"))
    assert rc == 0 and rec["status"] == "ok", err[-800:]
    assert len(rec["ranks"]) == 2 and rec["measured"]["world"] == 2
    assert rec["wrapped"]["detected"]["gpus"]["value"] == 2
    assert all(r["status"] == "ok" for r in rec["ranks"])
