"""--config FILE: each reader on files written the way their tools write them (tests/fixtures/configs/README.md
names each file's origin), override order (later files over earlier ones, flags over every file), --explain,
the one warning line per file for fields memplan does not model, bad files (one `memplan: error:` line, exit 2),
and optimizer names as transformers spells them. Expected values are read from the fixture files themselves."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from memplan.api import config_setup
from memplan.cli import main
from memplan.configfile import detect, load_doc, read_configs
from memplan.errors import MemplanError
from memplan.spec.values import make_setup, optimizer_name

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "configs"


def fx(name: str) -> str:
    return str(FIX / name)


def doc(name: str) -> dict:
    text = (FIX / name).read_text()
    return json.loads(text) if name.endswith(".json") else yaml.safe_load(text)  # YAML 1.1 reads 5e8 as a string


def values(*names) -> dict:
    return read_configs([fx(n) for n in names]).values


def run(args, capsys):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def setup_of(args, capsys) -> dict:
    rc, out, err = run(["estimate", *args, "-f", "json"], capsys)
    assert rc == 0, err
    return json.loads(out)["setup"]


# --- each reader on its real files -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, fmt", [
    ("deepspeed_template_zero3.json", "deepspeed"), ("ds_zero3_bf16_offload_all.json", "deepspeed"),
    ("accelerate_fsdp2.yaml", "accelerate"), ("accelerate_deepspeed_zero2.yaml", "accelerate"),
    ("accelerate_deepspeed_file.yaml", "accelerate"), ("trainer_args_bf16.json", "trainer"),
    ("trainer_args_fsdp.json", "trainer"), ("trainer_args_deepspeed.json", "trainer"),
    ("torchtune_llama3_2_1B_lora.yaml", "torchtune"), ("torchtune_llama3_2_1B_qlora_single_device.yaml", "torchtune"),
    ("torchtune_llama3_1_70B_full.yaml", "torchtune"), ("axolotl_llama3_qlora_1b.yml", "axolotl"),
    ("axolotl_llama3_qlora_fsdp_70b.yaml", "axolotl")])
def test_every_fixture_is_detected_and_makes_a_valid_setup(name, fmt):
    assert detect(load_doc(fx(name))) == fmt
    model, setup, _ = config_setup(fx(name))  # a TrainingSetup validates every field
    assert setup.batch >= 1


def test_format_comes_from_the_keys_not_the_name(tmp_path):
    for new in ("ds.yaml", "config", "args.txt"):
        shutil.copy(FIX / "ds_zero3_bf16_offload_all.json", tmp_path / new)
        assert detect(load_doc(str(tmp_path / new))) == "deepspeed"
    shutil.copy(FIX / "trainer_args_bf16.json", tmp_path / "train.yaml")
    assert detect(load_doc(str(tmp_path / "train.yaml"))) == "trainer"


def test_deepspeed_json():
    d = doc("deepspeed_template_zero3.json")
    z = d["zero_optimization"]
    v = values("deepspeed_template_zero3.json")
    assert v["engine"] == "deepspeed" and v["zero"] == z["stage"]
    assert v["ds_reduce_bucket_size"] == int(z["reduce_bucket_size"])  # 5e8 as DeepSpeed's pp_int reads it
    assert v["ds_allgather_bucket_size"] == int(z["allgather_bucket_size"])
    assert v["ds_prefetch_bucket_size"] == int(z["stage3_prefetch_bucket_size"])
    assert v["ds_max_live_parameters"] == int(z["stage3_max_live_parameters"])
    assert v["ds_max_reuse_distance"] == int(z["stage3_max_reuse_distance"])
    assert v["ds_param_persistence_threshold"] == int(z["stage3_param_persistence_threshold"])
    assert v["ds_contiguous_gradients"] is z["contiguous_gradients"] and v["ds_overlap_comm"] is z["overlap_comm"]
    assert v["ds_sub_group_size"] == 2**31  # 1e12: above memplan's bound for a count, taken at it (said in --explain)
    assert v["precision"] == "fp32"  # no bf16 / fp16 section: DeepSpeed trains in fp32


def test_deepspeed_auto_values_are_shown_and_left_to_flags():
    m = read_configs([fx("ds_zero3_bf16_offload_all.json")])
    d = doc("ds_zero3_bf16_offload_all.json")
    autos = {f.name for f in m.fields if f.key is None and "auto" in f.note}
    assert {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
            "zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size"} <= autos
    v = m.values
    assert "batch" not in v and "grad_accum" not in v and "ds_reduce_bucket_size" not in v
    assert v["offload_optimizer"] is True and v["offload_params"] is True  # offload_*.device: cpu
    assert v["precision"] == "bf16-master" and d["bf16"]["enabled"] is True
    assert v["ds_max_live_parameters"] == d["zero_optimization"]["max_live_parameters"]  # the un-prefixed alias


def test_accelerate_yaml():
    d = doc("accelerate_fsdp2.yaml")
    v = values("accelerate_fsdp2.yaml")
    assert v["engine"] == "fsdp" and v["gpus"] == d["num_processes"]
    assert v["zero"] == 3 and d["fsdp_config"]["fsdp_reshard_after_forward"] is True
    assert v["checkpointing"] == "full" and v["offload_params"] is False
    assert v["precision"] == "fsdp-bf16"  # mixed_precision bf16 under FSDP2
    d = doc("accelerate_deepspeed_zero2.yaml")
    v = values("accelerate_deepspeed_zero2.yaml")
    assert v["engine"] == "deepspeed" and v["zero"] == d["deepspeed_config"]["zero_stage"]
    assert v["gpus"] == d["num_processes"] and v["gpus_per_node"] == d["num_processes"] // d["num_machines"]
    assert v["offload_optimizer"] is True and v["offload_params"] is False
    assert v["grad_accum"] == d["deepspeed_config"]["gradient_accumulation_steps"]
    assert v["precision"] == "bf16-master"


def test_accelerate_reads_the_deepspeed_file_it_names():
    m = read_configs([fx("accelerate_deepspeed_file.yaml")])
    assert [r.path for r in m.readings[0].included] == [fx("ds_zero3_bf16_offload_all.json")]
    v = m.values
    assert v["engine"] == "deepspeed" and v["zero"] == 3 and v["offload_params"] is True
    assert v["gpus"] == doc("accelerate_deepspeed_file.yaml")["num_processes"]


def test_trainer_args_json():
    d = doc("trainer_args_bf16.json")
    v = values("trainer_args_bf16.json")
    assert v["batch"] == d["per_device_train_batch_size"] and v["grad_accum"] == d["gradient_accumulation_steps"]
    assert v["precision"] == "bf16" and v["checkpointing"] == "full"
    assert make_setup(optimizer=v["optimizer"]).optimizer.value == "adamw-8bit"  # optim adamw_bnb_8bit
    v = values("trainer_args_fsdp.json")
    assert v["engine"] == "fsdp" and v["zero"] == 3 and v["offload_params"] and v["offload_optimizer"]
    assert v["checkpointing"] == "full"  # fsdp_config's activation_checkpointing, the argument itself off
    v = values("trainer_args_deepspeed.json")  # deepspeed: a path, read beside the file
    assert v["engine"] == "deepspeed" and v["precision"] == "bf16-master" and v["batch"] == 8


def test_torchtune_recipe():
    d = doc("torchtune_llama3_2_1B_lora.yaml")
    v = values("torchtune_llama3_2_1B_lora.yaml")
    assert v["model"] == "llama-3.2-1b" and v["peft"] == "lora"
    assert v["lora_rank"] == d["model"]["lora_rank"] and v["lora_alpha"] == d["model"]["lora_alpha"]
    assert set(v["lora_targets"]) == {"q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert v["batch"] == d["batch_size"] and v["grad_accum"] == d["gradient_accumulation_steps"]
    assert v["precision"] == "pure-bf16" and v["optimizer"] == "adamw-fused"  # torch.optim.AdamW(fused=True)
    assert "seq" not in v  # tokenizer.max_seq_len: null
    assert values("torchtune_llama3_2_1B_qlora_single_device.yaml")["peft"] == "qlora"
    v = values("torchtune_llama3_1_70B_full.yaml")
    assert v["peft"] == "full" and v["checkpointing"] == "full" and v["zero"] == 3 and v["offload_params"]


def test_axolotl_yaml():
    d = doc("axolotl_llama3_qlora_1b.yml")
    v = values("axolotl_llama3_qlora_1b.yml")
    assert v["model"] == "llama-3.2-1b"  # NousResearch/Llama-3.2-1B: the profile by its name after the org
    assert v["peft"] == "qlora" and v["lora_rank"] == d["lora_r"] and v["lora_alpha"] == d["lora_alpha"]
    assert list(v["lora_targets"]) == d["lora_target_modules"]
    assert v["seq"] == d["sequence_len"] and v["batch"] == d["micro_batch_size"]
    assert v["checkpointing"] == "full" and v["attention"] == "flash" and v["precision"] == "pure-bf16"
    assert v["packing"] is d["sample_packing"] is True  # sample_packing: true -> --packing
    v = values("axolotl_llama3_qlora_fsdp_70b.yaml")
    assert "model" not in v  # casperhansen/llama-3-70b-fp16 is no profile: said in --explain
    assert v["lora_targets"] == "all-linear" and v["zero"] == 3 and v["offload_params"] is True
    assert v["packing"] is doc("axolotl_llama3_qlora_fsdp_70b.yaml")["sample_packing"] is False


def test_axolotl_sample_packing_packs_rows_and_says_what_is_assumed(capsys):
    f = fx("axolotl_llama3_qlora_1b.yml")
    rc, out, err = run(["estimate", "--config", f, "--seq", "128", "-f", "json", "--explain"], capsys)
    assert rc == 0, err
    s = json.loads(out)["setup"]
    assert s["packing"] is True and s.get("lengths", "fixed") == "fixed"  # no distribution in the file: full rows
    assert "sample_packing = true -> --packing" in err and "no length distribution" in err
    assert not any("not modelled" in ln and "sample_packing" in ln for ln in err.splitlines())
    # a distribution from the command line joins the file's packing: padded batches' waste is gone, not the tokens
    s = setup_of(["--config", f, "--seq", "128", "--lengths", "uniform:16-128"], capsys)
    assert s["packing"] is True and s["lengths"] == "uniform:16-128"
    s = setup_of(["--config", f, "--seq", "128", "--no-packing"], capsys)  # the flag wins
    assert s.get("packing", False) is False  # (to_dict leaves packing out at its default)


# --- the CLI: override order, --explain, warnings ----------------------------------------------------------------

def test_model_from_the_file_and_flags_over_it(capsys):
    s = setup_of(["--config", fx("torchtune_llama3_2_1B_lora.yaml"), "--seq", "128"], capsys)
    d = doc("torchtune_llama3_2_1B_lora.yaml")
    assert s["batch"] == d["batch_size"] and s["peft"] == "lora" and s["lora"]["rank"] == d["model"]["lora_rank"]
    s = setup_of(["--config", fx("torchtune_llama3_2_1B_lora.yaml"), "--seq", "128", "--batch", "1",
                  "--bf16", "--lora-rank", "8"], capsys)
    assert s["batch"] == 1 and s["precision"] == "bf16" and s["lora"]["rank"] == 8  # 1 and 8 are the defaults


def test_later_files_override_earlier_ones(capsys):
    a, b = fx("trainer_args_bf16.json"), fx("trainer_args_fsdp.json")
    s = setup_of(["-m", "gpt2", "--seq", "64", "--gpus", "2", "--config", a, "--config", b], capsys)
    assert s["batch"] == doc("trainer_args_fsdp.json")["per_device_train_batch_size"] and s["zero"] == 3
    s = setup_of(["-m", "gpt2", "--seq", "64", "--gpus", "2", "--config", b, "--config", a], capsys)
    assert s["batch"] == doc("trainer_args_bf16.json")["per_device_train_batch_size"]


def test_trainer_bf16_then_a_deepspeed_file_is_deepspeeds_bf16(capsys):
    s = setup_of(["-m", "gpt2", "--seq", "64", "--gpus", "2", "--config", fx("trainer_args_bf16.json"), "--config",
                  fx("ds_zero3_bf16_offload_all.json")], capsys)
    assert s["engine"] == "deepspeed" and s["precision"] == "bf16-master" and s["zero"] == 3


def test_an_engine_flag_over_a_deepspeed_file_drops_its_knobs(capsys):
    s = setup_of(["-m", "gpt2", "--seq", "64", "--gpus", "2", "--config", fx("deepspeed_template_zero3.json"),
                  "--engine", "fsdp", "--offload-params", "--offload-optimizer"], capsys)
    assert s["engine"] == "fsdp" and s["ds_sub_group_size"] == make_setup().ds_sub_group_size


def test_explain_names_every_field_its_flag_and_file(capsys):
    f = fx("torchtune_llama3_2_1B_lora.yaml")
    rc, out, err = run(["estimate", "--config", f, "--seq", "128", "--batch", "2", "--explain"], capsys)
    assert rc == 0
    assert f"{f}: batch_size = 4 -> --batch 4  — the flag wins: --batch 2" in err
    assert f"{f}: model._component_ = torchtune.models.llama3_2.lora_llama3_2_1b -> --model llama-3.2-1b" in err
    assert "-> --optimizer adamw-fused" in err and "-> --precision pure-bf16" in err
    assert "tokenizer.max_seq_len = null" in err  # read, sets nothing: said so
    assert "not read (no effect on per-GPU training memory): output_dir" in err
    rc, out, err = run(["estimate", "-m", "gpt2", "--seq", "64", "--config", fx("trainer_args_bf16.json"),
                        "--config", fx("trainer_args_fsdp.json"), "--gpus", "2", "--explain"], capsys)
    assert "-> --batch 4  — overridden by per_device_train_batch_size in " + fx("trainer_args_fsdp.json") in err


def test_one_warning_line_per_file_names_what_is_not_modelled(capsys):
    files = [fx("torchtune_llama3_1_70B_full.yaml"), fx("axolotl_llama3_qlora_1b.yml")]
    rc, out, err = run(["estimate", "-m", "llama-3.2-1b", "--seq", "128", "--gpus", "2",
                        *[a for f in files for a in ("--config", f)]], capsys)
    assert rc == 0
    lines = [ln for ln in err.splitlines() if ln.startswith("warning: ") and "not modelled" in ln]
    # the axolotl file's last unmodelled field was sample_packing, read now (--packing): it has no warning line
    assert [ln.split(":")[1].strip() for ln in lines] == files[:1]
    assert "tensor_parallel_plan" in lines[0] and "CEWithChunkedOutputLoss" not in lines[0]  # read: --loss chunked


def test_warnings_name_unmodelled_fields_of_each_format(tmp_path):
    cases = {
        "ds.json": {"zero_optimization": {"stage": 2, "zero_quantized_weights": True}, "train_batch_size": 8},
        "tt.yaml": {"model": {"_component_": "torchtune.models.llama3_2.llama3_2_1b"},
                    "tokenizer": {"_component_": "x"}, "compile": True},
        "args.json": {"per_device_train_batch_size": 2, "output_dir": "o", "use_liger_kernel": True},
        "acc.yaml": {"distributed_type": "MULTI_GPU", "mixed_precision": "fp8", "num_processes": 2},
        "ax.yaml": {"base_model": "gpt2", "micro_batch_size": 1, "sequence_len": 64, "brand_new_option": 3},
    }
    expect = {"ds.json": "zero_optimization.zero_quantized_weights", "tt.yaml": "compile",
              "args.json": "use_liger_kernel", "acc.yaml": "mixed_precision", "ax.yaml": "brand_new_option"}
    for name, d in cases.items():
        (tmp_path / name).write_text(json.dumps(d))
        w = read_configs([str(tmp_path / name)]).warnings
        assert len(w) == 1 and expect[name] in w[0], (name, w)


@pytest.mark.parametrize("text, why", [
    ("{ not json", "not valid JSON"), ("a: [1, 2\nb: 3", "not valid YAML"), ("- 1\n- 2\n", "not a config file"),
    ("optimizer: adamw\nlr: 3\n", "not a DeepSpeed JSON"), ("", "not a config file")])
def test_a_bad_file_is_one_error_line_and_exit_2(text, why, tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    rc, out, err = run(["estimate", "-m", "gpt2", "--config", str(p)], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("memplan: error: ") and why in err, err


def test_missing_or_dangling_files_exit_2(tmp_path, capsys):
    rc, _, err = run(["fit", "--gpu", "l4", "--config", str(tmp_path / "nope.json")], capsys)
    assert rc == 2 and "cannot read it" in err
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "num_processes": 2,
                                                     "deepspeed_config": {"deepspeed_config_file": "gone.json"}}))
    rc, _, err = run(["estimate", "-m", "gpt2", "--config", str(tmp_path / "a.yaml")], capsys)
    assert rc == 2 and "gone.json" in err and err.count("\n") == 1
    (tmp_path / "ds.json").write_text('{"train_micro_batch_size_per_gpu": 1.5}')
    rc, _, err = run(["estimate", "-m", "gpt2", "--config", str(tmp_path / "ds.json")], capsys)
    assert rc == 2 and "must be an integer" in err


def test_no_model_anywhere_is_an_error(capsys):
    rc, _, err = run(["estimate", "--config", fx("ds_zero3_bf16_offload_all.json")], capsys)
    assert rc == 2 and "--model" in err
    rc, _, err = run(["estimate"], capsys)
    assert rc == 2 and "Missing option '--model'" in err
    rc, _, err = run(["estimate", "--config", fx("axolotl_llama3_qlora_fsdp_70b.yaml")], capsys)
    assert rc == 2 and "base_model casperhansen/llama-3-70b-fp16 is not a memplan profile" in err


def test_fit_narrows_its_search_to_the_file(capsys):
    rc, out, err = run(["fit", "--config", fx("axolotl_llama3_qlora_1b.yml"), "--gpu", "a100-80gb", "--seq", "256",
                        "-f", "json"], capsys)
    assert rc == 0, err
    rows = json.loads(out)["rows"]
    assert rows and {(r["peft"], r["precision"], r["checkpointing"]) for r in rows} == {("qlora", "pure-bf16", "full")}
    assert json.loads(out)["min_batch"] == doc("axolotl_llama3_qlora_1b.yml")["micro_batch_size"]
    assert {r["packing"] for r in rows} == {True}  # sample_packing: only packed rows are searched


def test_fit_takes_a_recipes_loss(capsys):
    """torchtune's CEWithChunkedOutputLoss reaches fit as --loss chunked (every choice; 8 chunks, its default)."""
    rc, out, err = run(["fit", "--config", fx("torchtune_llama3_2_1B_lora.yaml"), "--gpu", "l4", "--seq", "256",
                        "-f", "json"], capsys)
    assert rc == 0, err
    rows = json.loads(out)["rows"]
    assert rows and {r.get("loss") for r in rows} == {"chunked:8"}


def test_measure_sweep_with_a_config_is_an_error(capsys):
    rc, _, err = run(["measure", "--sweep", "validation", "--config", fx("trainer_args_bf16.json")], capsys)
    assert rc == 2 and "--config" in err


def test_python_api(tmp_path):
    import memplan

    r = memplan.estimate(config=fx("torchtune_llama3_2_1B_lora.yaml"), seq=128, batch=1)
    v = values("torchtune_llama3_2_1B_lora.yaml")
    assert r.model == v["model"] and r.setup.batch == 1 and r.setup.lora.rank == v["lora_rank"]
    assert r.setup.loss.value == "chunked"  # the recipe's CEWithChunkedOutputLoss
    assert not any("CEWithChunkedOutputLoss" in w for w in r.warnings)
    with pytest.raises(MemplanError, match="needs a model"):
        memplan.estimate(config=fx("ds_zero3_bf16_offload_all.json"))


# --- optimizer names as transformers spells them -----------------------------------------------------------------

# transformers 5.24 training_args.py OptimizerNames values memplan models -> its own name
TRANSFORMERS_NAMES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw-fused", "adamw_hf": "adamw-forloop",
                      "adamw_bnb_8bit": "adamw-8bit", "adamw_8bit": "adamw-8bit",
                      "paged_adamw_32bit": "paged-adamw", "paged_adamw_8bit": "paged-adamw-8bit",
                      "adafactor": "adafactor", "sgd": "sgd", "adamw_fused": "adamw-fused",
                      "PAGED_ADAMW_8BIT": "paged-adamw-8bit", "lion_8bit": "lion-8bit", "lion_32bit": "lion-32bit",
                      "paged_lion_8bit": "paged-lion-8bit", "paged_lion_32bit": "paged-lion"}


@pytest.mark.parametrize("name, ours", sorted(TRANSFORMERS_NAMES.items()))
def test_transformers_optimizer_names(name, ours, capsys):
    assert make_setup(optimizer=name).optimizer.value == ours
    s = setup_of(["-m", "gpt2", "--seq", "64", "--optimizer", name], capsys)
    assert s["optimizer"] == ours


@pytest.mark.parametrize("name", ["ademamix_8bit", "galore_adamw", "rmsprop"])
def test_optimizers_memplan_does_not_model_are_a_clear_error(name, capsys):
    rc, _, err = run(["estimate", "-m", "gpt2", "--optimizer", name], capsys)
    assert rc == 2 and "not modelled by memplan" in err
    rc, _, err = run(["fit", "-m", "gpt2", "--gpu", "l4", "--optimizer", f"adamw,{name}"], capsys)
    assert rc == 2 and "not modelled by memplan" in err


def _installed_optimizer_names() -> list[str]:
    """OptimizerNames' values from the installed transformers' training_args.py, read without importing it
    (importing it loads torch: ~25 s on a loaded machine)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("transformers is not installed")
    tree = ast.parse((Path(spec.submodule_search_locations[0]) / "training_args.py").read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "OptimizerNames")
    return [a.value.value for a in cls.body if isinstance(a, ast.Assign) and isinstance(a.value, ast.Constant)]


def test_every_installed_transformers_optimizer_name_is_taken_or_refused_clearly():
    names = _installed_optimizer_names()
    assert {"adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "lion_8bit"} <= set(names)
    for name in names:
        try:
            make_setup(optimizer=name)
        except MemplanError as exc:
            assert "not modelled by memplan" in str(exc), name
    assert set(TRANSFORMERS_NAMES) - {"adamw_hf", "adamw_fused", "PAGED_ADAMW_8BIT"} <= set(names)


def test_config_readers_import_no_torch():
    code = "import sys, memplan.configfile, memplan.cli.options; assert 'torch' not in sys.modules"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr


def test_torchtune_offloading_in_bwd_and_chunked_loss_are_read(tmp_path):
    """torchtune's enable_activation_offloading, optimizer_in_bwd and CEWithChunkedOutputLoss map to memplan's
    --offload-activations, --optimizer-in-backward and --loss chunked (issue 13 models all three)."""
    d = {"model": {"_component_": "torchtune.models.llama3_2.llama3_2_1b"}, "tokenizer": {"_component_": "x"},
         "enable_activation_checkpointing": True, "enable_activation_offloading": True, "optimizer_in_bwd": True,
         "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"}}
    (tmp_path / "tt.yaml").write_text(json.dumps(d))
    r = read_configs([str(tmp_path / "tt.yaml")])
    assert not r.warnings, r.warnings
    got = {f.key: f.value for f in r.fields if f.key}
    assert got["offload_activations"] is True and got["optimizer_in_backward"] is True and got["loss"] == "chunked"
