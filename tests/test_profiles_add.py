"""`memplan profiles add`: a user profile from a config.json, checked against transformers on the meta device
(memplan.trace.add_profile, memplan.trace.check_family), written where memplan.profiles reads it."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import memplan
from memplan import profiles
from memplan.cli import main
from memplan.errors import MemplanError
from memplan.spec import families
from memplan.spec.traits import TRAITS, NormKind

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from memplan.trace.check_family import build_meta, differences  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPLAN_PROFILES", str(tmp_path / "profiles"))
    profiles.clear_caches()
    yield tmp_path / "profiles"
    profiles.clear_caches()


@pytest.fixture
def folder(tmp_path) -> Path:
    """A folder holding the config.json transformers writes for a tiny Llama (no weights: only the config is read)."""
    transformers.LlamaConfig(**TINY).save_pretrained(tmp_path / "Tiny Llama")
    return tmp_path / "Tiny Llama"


def _meta_params(config: dict) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    return sum(p.numel() for p in model.parameters())


def test_add_writes_a_profile_memplan_reads(user_dir, folder, capsys):
    assert main(["profiles", "add", str(folder), "--alias", "me/tiny-llama"]) == 0
    out = capsys.readouterr().out
    path = user_dir / "models" / "tiny-llama.toml"  # the key defaults to the folder's name
    assert str(path) in out
    prof = tomllib.loads(path.read_text())
    written = json.loads((folder / "config.json").read_text())
    assert prof["expected_params"] == _meta_params(written)
    assert prof["aliases"] == ["me/tiny-llama"]
    # every architecture field of config.json, as it was; the file-writing ones left out
    assert prof["hf_config"] == {k: v for k, v in written.items()
                                 if v is not None and k not in ("transformers_version", "dtype", "architectures")}
    for name in ("tiny-llama", "me/tiny-llama"):
        assert memplan.estimate(name, seq=64).total_params == prof["expected_params"]
    assert main(["profiles", "list", "models"]) == 0
    assert "tiny-llama" in capsys.readouterr().out
    assert main(["profiles", "show", "me/tiny-llama"]) == 0
    assert "expected_params" in capsys.readouterr().out


def test_key_collisions(user_dir, folder, capsys):
    assert main(["profiles", "add", str(folder / "config.json"), "--key", "mine"]) == 0
    capsys.readouterr()
    assert main(["profiles", "add", str(folder), "--key", "mine"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err
    assert main(["profiles", "add", str(folder), "--key", "mine", "--force"]) == 0
    for args in (["--key", "llama-7b"], ["--key", "x", "--alias", "meta-llama/Llama-2-7b-hf"], ["--key", "Bad Key"]):
        assert main(["profiles", "add", str(folder), *args]) == 2, args
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert memplan.estimate("llama-7b").model == "llama-7b"  # the shipped profile, untouched


def test_unknown_model_type_points_at_the_docs(user_dir, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "flux-mamba-9000", "hidden_size": 64}))
    assert main(["profiles", "add", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "flux-mamba-9000" in err and "llama" in err and "docs/adding-a-family.md" in err
    assert (ROOT / "docs" / "adding-a-family.md").exists()
    assert not (user_dir / "models").exists()


def test_a_spec_that_disagrees_is_not_written(user_dir, folder, monkeypatch, capsys):
    """A builder that forgets the down projection: the meta model has it, so nothing is written."""
    real = families.FAMILIES["llama"]

    def forgetful(cfg):
        out = real(cfg)
        return {**out, "linears": tuple(l for l in out["linears"] if l.name != "down_proj")}

    monkeypatch.setitem(families.FAMILIES, "llama", forgetful)
    assert main(["profiles", "add", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "down_proj" in err and "LlamaForCausalLM" in err
    assert not (user_dir / "models").exists()


def test_check_family_finds_trait_and_table_differences(monkeypatch):
    spec = families.spec_from_config({"model_type": "llama", **TINY}, "tiny")
    model = build_meta(spec)
    assert differences(spec, model) == []
    monkeypatch.setitem(TRAITS, "llama", __import__("dataclasses").replace(TRAITS["llama"], norm=NormKind.LAYERNORM))
    wrong = families.spec_from_config({"model_type": "llama", **TINY}, "tiny")
    assert [d for d in differences(wrong, model) if d.startswith("norm:")]


@pytest.mark.parametrize("cfg", [
    dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32),
    dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
         vocab_size=100, max_position_embeddings=32),
    dict(model_type="t5", d_model=64, d_kv=8, d_ff=96, num_layers=2, num_heads=4, vocab_size=100),
])
def test_check_family_agrees_on_other_stacks(cfg):
    assert differences(families.spec_from_config(cfg, cfg["model_type"])) == []


def test_check_trace(user_dir, folder, capsys):
    assert main(["profiles", "add", str(folder), "--key", "traced", "--check-trace"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("trace check") and "error" in line
    error = float(line.rsplit("error ", 1)[1].rstrip("%"))
    assert abs(error) < 5  # tests/test_estimate_vs_trace.py holds the estimator to a few percent


def test_api_add_profile(user_dir, folder):
    added = memplan.api.add_profile(folder, key="api-tiny")
    assert added.path == user_dir / "models" / "api-tiny.toml" and added.model_class == "LlamaForCausalLM"
    assert memplan.estimate("api-tiny", seq=64).total_params == added.params
    with pytest.raises(MemplanError, match="exists"):
        memplan.api.add_profile(folder, key="api-tiny")


def test_without_torch_one_line(folder, tmp_path):
    code = ("import sys; sys.modules['torch'] = None; from memplan.cli import main; "
            f"sys.exit(main(['profiles', 'add', {str(folder)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "MEMPLAN_PROFILES": str(tmp_path)})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "memplan: error: memplan profiles add needs torch, transformers and peft: pip install 'memplan[torch]'"]
