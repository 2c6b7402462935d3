"""`--model DIR`: a checkpoint folder as transformers' save_pretrained writes it (memplan.spec.checkpoint).

The folders are written here, at test time, by transformers from a tiny LlamaConfig on the CPU: one
model.safetensors, the same model sharded (model.safetensors.index.json + shards), and a bfloat16 copy. The header
reader is checked against the safetensors package's own reader; quantization_config against the dicts
transformers' own config classes write.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import memplan
from memplan.cli import main
from memplan.errors import MemplanError
from memplan.profiles import load_model, load_model_path
from memplan.spec.checkpoint import QuantMethod, checkpoint_warnings, parse_quantization
from memplan.spec.safetensors import read_header
from memplan.spec.setup import TrainingSetup
from memplan.spec.values import make_setup

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"single", "sharded", "bf16"}: folders save_pretrained wrote, and the model's own parameter count."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    model.to(torch.bfloat16).save_pretrained(root / "bf16")
    return {name: root / name for name in ("single", "sharded", "bf16")}, sum(p.numel() for p in model.parameters())


def _copy(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def test_header_reader_equals_the_safetensors_package(folders):
    safetensors = pytest.importorskip("safetensors")
    (paths, _) = folders
    for f in sorted(paths["sharded"].glob("*.safetensors")) + [paths["single"] / "model.safetensors"]:
        mine = {t.name: (t.dtype, t.shape) for t in read_header(f).tensors}
        with safetensors.safe_open(str(f), framework="pt") as theirs:
            ref = {k: (str(theirs.get_slice(k).get_dtype()), tuple(theirs.get_slice(k).get_shape()))
                   for k in theirs.keys()}
        assert mine == ref


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_folder_counts_match_the_model(folders, which):
    paths, params = folders
    spec = load_model(str(paths[which]))
    ck = spec.checkpoint
    assert ck is not None and ck.quantization is None
    assert spec.total_params == ck.stored_params == params
    assert ck.stored_dtype == "float32" and not ck.notes
    shards = sorted(p.name for p in paths[which].glob("*.safetensors"))
    assert list(ck.files) == shards and (len(shards) == 1) == (which == "single")
    # fp32 weights under bf16 autocast (fp32 parameters): nothing to say
    assert not memplan.estimate(spec, seq=64).warnings


def test_sharded_and_single_estimate_alike(folders):
    paths, _ = folders
    a = memplan.estimate(str(paths["single"]), seq=64)
    b = memplan.estimate(Path(paths["sharded"]), seq=64)  # a Path is a path whatever its name
    assert a.peak == b.peak and a.categories == b.categories


def test_stored_dtype_against_the_precision(folders):
    paths, _ = folders
    spec = load_model(str(paths["bf16"]))
    assert spec.checkpoint.stored_dtype == "bfloat16"
    (warn,) = memplan.estimate(spec, seq=64, precision="bf16").warnings
    assert "bfloat16" in warn and "pure-bf16" in warn and "float32 parameters" in warn
    assert not memplan.estimate(spec, seq=64, precision="pure-bf16").warnings


def test_count_mismatch_names_the_tensors(folders, tmp_path):
    paths, params = folders
    biased = _copy(paths["single"], tmp_path / "biased", attention_bias=True)  # the weights have no biases
    (note,) = load_model(str(biased)).checkpoint.notes
    assert f"{params:,}" in note and "spec tensors not stored" in note and "self_attn.q_proj.bias" in note
    tied = _copy(paths["single"], tmp_path / "tied", tie_word_embeddings=True)  # the weights have an lm_head
    (note,) = load_model(str(tied)).checkpoint.notes
    assert "stored tensors the spec lacks: lm_head.weight" in note
    assert note in memplan.estimate(str(tied), seq=64).warnings


def test_folder_without_config_json(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    assert main(["estimate", "--model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json not found" in err


def _safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("header, data, why", [
    (b"{not json", b"", "not JSON"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"1234", "outside the file"),
    (b'{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', b"12345678", "8 bytes for a F32"),
    (b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}', b"", "non-negative"),
])
def test_malformed_safetensors_is_one_error(tmp_path, header, data, why):
    with pytest.raises(MemplanError, match=why):
        read_header(_safetensors(tmp_path / "x.safetensors", header, data))


def test_header_length_past_the_end(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(MemplanError, match="truncated"):
        read_header(p)


def test_index_naming_a_path_outside_or_a_wrong_shard(folders, tmp_path):
    paths, _ = folders
    d = _copy(paths["sharded"], tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    other = next(f for f in index["weight_map"].values() if f != shard)
    for bad, why in (("../model.safetensors", "not a file name"), (other, "does not hold")):
        wmap = {**index["weight_map"], name: bad}
        (d / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": wmap}))
        with pytest.raises(MemplanError, match=why):
            load_model_path(d)


def _quant(cfg_obj) -> dict:
    """quantization_config as transformers writes it into config.json."""
    return json.loads(cfg_obj.to_json_string())


def test_quantization_configs_as_transformers_writes_them():
    nf4 = parse_quantization(_quant(transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16",
        bnb_4bit_use_double_quant=True)))
    assert (nf4.method, nf4.bits, nf4.quant_type, nf4.compute_dtype, nf4.double_quant) == \
        (QuantMethod.BNB_4BIT, 4, "nf4", "bfloat16", True)
    plain4 = parse_quantization(_quant(transformers.BitsAndBytesConfig(load_in_4bit=True)))
    assert (plain4.quant_type, plain4.compute_dtype, plain4.double_quant) == ("fp4", "float32", False)
    assert parse_quantization(_quant(transformers.BitsAndBytesConfig(load_in_8bit=True))).method is QuantMethod.BNB_8BIT
    gptq = parse_quantization(_quant(transformers.GPTQConfig(bits=4, group_size=64)))
    assert (gptq.method, gptq.bits, gptq.group_size) == (QuantMethod.GPTQ, 4, 64)
    awq = parse_quantization(_quant(transformers.AwqConfig(bits=4, group_size=128)))
    assert (awq.method, awq.bits, awq.group_size) == (QuantMethod.AWQ, 4, 128)
    assert parse_quantization(_quant(transformers.FineGrainedFP8Config())).method is QuantMethod.FP8
    assert parse_quantization({"quant_method": "hqq"}).name == "hqq"
    with pytest.raises(MemplanError, match="quantization_config"):
        parse_quantization([4])


def test_quantized_folder_warnings(folders, tmp_path):
    paths, _ = folders
    q = _quant(transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype="bfloat16", bnb_4bit_use_double_quant=True))
    spec = load_model(str(_copy(paths["single"], tmp_path / "nf4", quantization_config=q)))
    assert not spec.checkpoint.notes  # packed weights: the count is not compared
    # QLoRA with the checkpoint's settings: what memplan models, nothing to say
    assert not checkpoint_warnings(spec, make_setup(peft="qlora", precision="bf16"))
    (dq,) = checkpoint_warnings(spec, make_setup(peft="qlora", precision="bf16", double_quant=False))
    assert "--double-quant" in dq
    (lora,) = checkpoint_warnings(spec, make_setup(peft="lora"))
    assert "--peft qlora" in lora and "unquantized" in lora
    gptq = load_model(str(_copy(paths["single"], tmp_path / "gptq",
                                quantization_config=_quant(transformers.GPTQConfig(bits=4)))))
    (w,) = checkpoint_warnings(gptq, TrainingSetup())
    assert "gptq 4-bit, group size 128" in w and "does not model" in w and "GiB" in w


def test_estimate_from_a_folder_imports_no_torch(folders):
    paths, _ = folders
    code = (f"import sys, memplan; r = memplan.estimate({str(paths['sharded'])!r}, seq=64); "
            f"print(r.total_params, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(folders[1]), "False"]


def test_a_bare_folder_name_when_no_profile_has_it(folders, monkeypatch):
    paths, params = folders
    monkeypatch.chdir(paths["single"].parent)
    assert memplan.estimate("sharded", seq=64).total_params == params
    with pytest.raises(MemplanError, match="unknown model"):
        memplan.estimate("no-such-folder")
