"""Lion (lion-pytorch 0.2.5), Adam-mini (adam-mini 1.1.1) and --optimizer-impl foreach | fused | for-loop.

The oracle is the trace, which constructs the real optimizer (torch's, lion-pytorch's, Adam-mini's) and runs its
real `step()` (memplan.trace.step.make_optimizer): the states' bytes are compared exactly, the optimizer-step
peak (where the implementations differ: their temporaries) within PEAK_TOL, on a tiny Llama whose peak is the step.
Adam-mini's refusals are checked against Adam-mini itself: its own step fails on what memplan refuses.
"""
from __future__ import annotations

import json

import pytest

from memplan.errors import MemplanError
from memplan.estimate.optimizer import adam_mini_block
from memplan.spec.setup import IMPLEMENTATIONS, Optimizer, OptimizerImpl
from memplan.spec.values import make_setup

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from memplan.calibrate import PEAK_TOL  # noqa: E402
from memplan.categories import Phase  # noqa: E402
from memplan.cli import main  # noqa: E402
from memplan.estimate import estimate_spec  # noqa: E402
from memplan.spec.families import spec_from_config  # noqa: E402
from memplan.trace import trace, trace_run  # noqa: E402
from memplan.trace.step import make_optimizer  # noqa: E402

# vocab 2048 × hidden 128: the embedding and the LM head are the largest tensors, batch 1 × seq 16 puts the peak
# at the optimizer step, where the implementations differ
TINY = dict(model_type="llama", hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2048, max_position_embeddings=256, tie_word_embeddings=False)
SPEC = spec_from_config(TINY, "tiny-llama-optim")
NEEDS = {Optimizer.LION: "lion_pytorch", Optimizer.LION_FOREACH: "lion_pytorch", Optimizer.ADAM_MINI: "adam_mini",
         **{o: "bitsandbytes" for o in (Optimizer.LION_32BIT, Optimizer.LION_8BIT, Optimizer.PAGED_LION,
                                        Optimizer.PAGED_LION_8BIT)}}
STEPPED = [o for variants in IMPLEMENTATIONS.values() for o in variants.values()]


def _need(opt: Optimizer) -> None:
    if opt in NEEDS:
        pytest.importorskip(NEEDS[opt], reason=f"--optimizer {opt.value} needs the optim extra")


# every implementation under autocast (fp32 states); the new optimizers' states in bf16 too (pure-bf16)
CASES = [(o, "bf16") for o in dict.fromkeys([*STEPPED, *NEEDS])] + [(o, "pure-bf16") for o in NEEDS]


@pytest.mark.parametrize("opt,precision", CASES, ids=lambda v: getattr(v, "value", v))
def test_states_exact_and_step_peak_within_tolerance(opt, precision):
    _need(opt)
    setup = make_setup(batch=1, seq=16, optimizer=opt.value, precision=precision)
    est = estimate_spec(SPEC, setup)
    tr, _ = trace(SPEC, setup)
    assert est.model_states.optimizer_states == tr.model_states.optimizer_states
    e, t = est.phase_peaks[Phase.OPTIMIZER_STEP], tr.phase_peaks[Phase.OPTIMIZER_STEP]
    assert abs(e - t) <= PEAK_TOL * t, (opt.value, e, t)


def test_implementations_differ_as_the_trace_says():
    """The estimate orders the implementations' step peaks as the trace does (foreach > for-loop > fused for
    AdamW: group-sized, two-tensor-sized, no temporaries)."""
    peaks = {}
    for opt in (Optimizer.ADAMW, Optimizer.ADAMW_FORLOOP, Optimizer.ADAMW_FUSED):
        setup = make_setup(batch=1, seq=16, optimizer=opt.value, precision="bf16")
        peaks[opt] = (estimate_spec(SPEC, setup).phase_peaks[Phase.OPTIMIZER_STEP],
                      trace(SPEC, setup)[0].phase_peaks[Phase.OPTIMIZER_STEP])
    for tier in (0, 1):
        assert peaks[Optimizer.ADAMW][tier] > peaks[Optimizer.ADAMW_FORLOOP][tier] > peaks[Optimizer.ADAMW_FUSED][tier]


@pytest.mark.parametrize("opt,kw", [(Optimizer.ADAMW, dict(foreach=True)), (Optimizer.ADAMW_FUSED, dict(fused=True)),
                                    (Optimizer.ADAMW_FORLOOP, dict(foreach=False)),
                                    (Optimizer.SGD_FUSED, dict(fused=True)),
                                    (Optimizer.SGD_FORLOOP, dict(foreach=False)),
                                    (Optimizer.MOMENTUM_FUSED, dict(fused=True, momentum=0.9)),
                                    (Optimizer.ADAFACTOR_FORLOOP, dict(foreach=False))])
def test_each_implementation_is_forced(opt, kw):
    """On CPU tensors torch would default to the for-loop: the trace names the implementation CUDA runs."""
    p = torch.nn.Parameter(torch.zeros(4, 4))
    o = make_optimizer(opt, [p])
    assert {k: o.defaults[k] for k in kw} == kw


def test_impl_flag_folds_into_the_optimizer():
    assert make_setup(optimizer="sgd", optimizer_impl="fused").optimizer is Optimizer.SGD_FUSED
    assert make_setup(optimizer_impl="for-loop").optimizer is Optimizer.ADAMW_FORLOOP
    assert make_setup(optimizer="adamw-fused", optimizer_impl="fused").optimizer is Optimizer.ADAMW_FUSED
    assert make_setup(optimizer="lion", optimizer_impl="foreach").optimizer is Optimizer.LION_FOREACH
    assert Optimizer.MOMENTUM_FORLOOP.base is Optimizer.MOMENTUM
    assert Optimizer.MOMENTUM_FORLOOP.impl is OptimizerImpl.FOR_LOOP
    with pytest.raises(MemplanError, match="adafactor has no fused"):
        make_setup(optimizer="adafactor", optimizer_impl="fused")
    with pytest.raises(MemplanError, match="unknown optimizer implementation"):
        make_setup(optimizer_impl="fastest")


def test_cli_impl_and_bad_input(capsys):
    assert main(["estimate", "--model", "qwen2.5-0.5b", "--optimizer", "sgd", "--optimizer-impl", "fused", "--seq",
                 "256", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["optimizer"] == "sgd-fused"
    assert main(["estimate", "--model", "qwen2.5-0.5b", "--optimizer", "adam-mini", "--optimizer-impl",
                 "foreach"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adam-mini has no foreach implementation" in err[0]


def test_transformers_lion_names_are_bitsandbytes_lion():
    """transformers' lion_32bit / lion_8bit / paged_lion_* are bitsandbytes' Lion (trainer_optimizer.py), with
    states of its own (fp32 whatever the parameter dtype, or 8-bit), not lion-pytorch's."""
    names = {"lion_32bit": Optimizer.LION_32BIT, "lion_8bit": Optimizer.LION_8BIT,
             "paged_lion_32bit": Optimizer.PAGED_LION, "paged_lion_8bit": Optimizer.PAGED_LION_8BIT}
    for name, opt in names.items():
        assert make_setup(optimizer=name).optimizer is opt and opt.bitsandbytes


def test_missing_package_is_one_line(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    with pytest.raises(MemplanError, match="pip install --no-deps lion-pytorch==0.2.5"):
        make_optimizer(Optimizer.LION, [torch.nn.Parameter(torch.zeros(2))])


# ---- Adam-mini's partition --------------------------------------------------------------------------------------
def _tiny_llama():
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TINY))


def _step_adam_mini(model):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = make_optimizer(Optimizer.ADAM_MINI, [p for _, p in params], names=[n for n, _ in params], model=model)
    for _, p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt, params


def test_adam_mini_partition_matches_the_real_optimizer():
    """Adam-mini's own state for every tensor of a Llama: the rule memplan applies to its name, and the state's
    shapes (vmean per head of dim²/n_heads elements, per row, or one)."""
    pytest.importorskip("adam_mini")
    opt, params = _step_adam_mini(_tiny_llama())
    head = TINY["hidden_size"] ** 2 // TINY["num_attention_heads"]
    kinds = set()
    for name, p in params:
        st, kind = opt.state[p], adam_mini_block(name)
        kinds.add(kind)
        want = {"adam": tuple(p.shape), "heads": (p.numel() // head, 1), "rows": (p.shape[0], 1), "whole": ()}[kind]
        got = tuple(st["v"].shape) if kind == "adam" else tuple(st["vmean"].shape)
        assert got == want, (name, kind, got)
    assert kinds == {"heads", "rows", "whole"}


def test_adam_mini_refusals_are_where_its_step_fails():
    """LoRA on q_proj: memplan refuses, and Adam-mini's own step fails on the same tensors (its view by heads)."""
    pytest.importorskip("adam_mini")
    peft = pytest.importorskip("peft")
    with pytest.raises(MemplanError, match="no whole number of heads"):
        estimate_spec(SPEC, make_setup(batch=1, seq=16, optimizer="adam-mini", peft="lora", precision="fp32",
                                       lora_targets="q_proj"))
    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(RuntimeError):
        _step_adam_mini(model)
    # LoRA on v_proj only: both run
    estimate_spec(SPEC, make_setup(batch=1, seq=16, optimizer="adam-mini", peft="lora", precision="fp32",
                                   lora_targets="v_proj"))
    _step_adam_mini(peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=8, target_modules=["v_proj"])))


def test_adam_mini_vector_rule_and_gpus():
    """OPT's final_layer_norm: a vector under the output rule (Adam-mini slices m[:, 0:1])."""
    opt = spec_from_config(dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                num_attention_heads=4, vocab_size=512, max_position_embeddings=256,
                                word_embed_proj_dim=64), "tiny-opt-mini")
    with pytest.raises(MemplanError, match="final_layer"):
        estimate_spec(opt, make_setup(batch=1, seq=16, optimizer="adam-mini", precision="fp32"))
    with pytest.raises(MemplanError, match="one GPU"):
        make_setup(optimizer="adam-mini", gpus=2, zero=1)


def test_adam_mini_trace_with_lora_on_values():
    """The trace hands Adam-mini peft's parameter names (lora_A / lora_B under v_proj: one vmean per row)."""
    pytest.importorskip("adam_mini")
    setup = make_setup(batch=1, seq=16, optimizer="adam-mini", peft="lora", precision="pure-bf16",
                       lora_targets="v_proj,o_proj")
    est, (tr, _) = estimate_spec(SPEC, setup), trace(SPEC, setup)
    assert est.model_states.optimizer_states == tr.model_states.optimizer_states
    assert abs(est.peak.allocated_bytes - tr.peak.allocated_bytes) <= PEAK_TOL * tr.peak.allocated_bytes


@pytest.mark.parametrize("opt", ["lion", "adam-mini"])
def test_measure_cpu_runs_the_real_optimizer_and_agrees_with_the_trace(opt, tmp_path, capsys):
    """`memplan measure --device cpu` steps real tensors with lion-pytorch's / Adam-mini's optimizer; its
    allocated peak equals the trace's."""
    _need(Optimizer(opt))
    config, results = tmp_path / "config.json", tmp_path / "r.jsonl"
    config.write_text(json.dumps(TINY))
    rc = main(["measure", "--model", str(config), "--device", "cpu", "--optimizer", opt, "--precision", "fp32",
               "--batch", "1", "--seq", "16", "--steps", "1", "--warmup", "1", "--results", str(results), "-f", "json"])
    assert rc == 0, capsys.readouterr().err
    (rec,) = [json.loads(line) for line in results.read_text().splitlines()]
    traced, _ = trace(spec_from_config(TINY, "config"), make_setup(batch=1, seq=16, optimizer=opt, precision="fp32"))
    assert rec["measured"]["peak"]["allocated_bytes"] == traced.peak.allocated_bytes
