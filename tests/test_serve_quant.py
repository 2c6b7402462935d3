"""Quantized serving weights are byte-exact against the real packing (issue 14 §2).

Each format that runs here is applied for real on the CPU, the way a user loads it: a tiny bf16 checkpoint written
by transformers, then `from_pretrained(..., quantization_config=...)` with bitsandbytes' BitsAndBytesConfig or
transformers' TorchAoConfig around a torchao 0.18 config. The bytes of every tensor each quantized weight holds
(a torchao tensor subclass's __tensor_flatten__ leaves; bitsandbytes' SCB and QuantState tensors) are summed and
compared with memplan.serve.weights for the same format and group size. No expected number is typed in: the
library under test is the source. Formats that cannot run here are checked to be marked estimate-only, and to
really fail to run (so that the mark is dropped the day they run).
"""
from __future__ import annotations

import importlib.util
import json

import pytest

from memplan.errors import MemplanError
from memplan.serve import ServeSetup
from memplan.serve.setup import WeightFormat
from memplan.serve.weights import PACKINGS, TORCHAO, quantized_bytes, weight_bytes
from memplan.spec.families import spec_from_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Tiny Llama-style configs; shapes chosen against the group sizes and torchao's 16-multiple rule:
# A: head_dim 16, k/v out 32, intermediate 176 (a multiple of 16, not of 32 or 128).
# B: head_dim 20, k/v out 40 and intermediate 200 (not multiples of 16; hidden 80 is), tied embeddings.
CONFIG_A = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
            "tie_word_embeddings": False}
CONFIG_B = {**CONFIG_A, "hidden_size": 80, "intermediate_size": 200, "tie_word_embeddings": True}
# C: Mixtral-style MoE (transformers 5's fused 3-D experts and its router are not nn.Linear).
CONFIG_C = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
            "num_local_experts": 4, "num_experts_per_tok": 2}
CONFIGS = {"A": CONFIG_A, "B": CONFIG_B, "C": CONFIG_C}
# Linear shapes (n_in, n_out) for the per-tensor check: divisible and not by 16, 32 and 128.
SHAPES = [(64, 64), (64, 176), (176, 64), (100, 30), (96, 40), (256, 48), (200, 72)]


def leaves(t) -> list:
    """The plain tensors a weight holds: a torchao subclass's flattened leaves; bitsandbytes' Int8Params adds its
    SCB (CB is the data itself), Params4bit its QuantState (absmax, code; nested: offset and the second state)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        return [x for name in t.__tensor_flatten__()[0] for x in leaves(getattr(t, name))]
    out = [t.data if isinstance(t, torch.nn.Parameter) else t]
    if getattr(t, "SCB", None) is not None:
        out.append(t.SCB)
    qs = getattr(t, "quant_state", None)
    if qs is not None:
        out += [qs.absmax, qs.code]
        if qs.nested:
            out += [qs.offset, qs.state2.absmax, qs.state2.code]
    return out


def stored_bytes(tensors) -> int:
    """Storage bytes of the tensors, each storage once (tied weights, CB sharing the int8 data)."""
    seen, total = set(), 0
    for t in tensors:
        for leaf in leaves(t):
            st = leaf.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
    return total


def model_weight_bytes(model) -> int:
    """Every parameter's bytes (buffers such as the rotary inv_freq are not weights and not in the estimate)."""
    return stored_bytes(model.parameters())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One bf16 checkpoint per config, written by transformers (random values: only sizes matter)."""
    out = {}
    for name, cfg in CONFIGS.items():
        d = tmp_path_factory.mktemp(f"ckpt{name}")
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg),
                                                      dtype=torch.bfloat16).save_pretrained(d)
        out[name] = str(d)
    return out


def load(path: str, quantization_config, dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config,
                                                             dtype=dtype, device_map="cpu")


def memplan_bytes(cfg: dict, fmt: str, **kw) -> int:
    return weight_bytes(spec_from_config(cfg, "tiny"), ServeSetup(weights=fmt, **kw)).total


# --- plain dtypes: the baseline the quantized formats are measured against -----------------------------------------

@pytest.mark.parametrize("cfg", ["A", "B", "C"])
@pytest.mark.parametrize("fmt,dtype", [("bf16", "bfloat16"), ("fp32", "float32")])
def test_plain_weights_equal_transformers(checkpoints, cfg, fmt, dtype):
    model = load(checkpoints[cfg], None, getattr(torch, dtype))
    assert model_weight_bytes(model) == memplan_bytes(CONFIGS[cfg], fmt)


# --- bitsandbytes: LLM.int8 and NF4 -------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", ["A", "B", "C"])
@pytest.mark.parametrize("fmt,double_quant", [("int8", False), ("nf4", False), ("nf4", True)])
def test_bitsandbytes_model_bytes(checkpoints, cfg, fmt, double_quant):
    pytest.importorskip("bitsandbytes")
    if fmt == "int8":
        q, dtype = transformers.BitsAndBytesConfig(load_in_8bit=True), torch.float16  # int8 computes in fp16
    else:
        q, dtype = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=double_quant,
                                                   bnb_4bit_compute_dtype=torch.bfloat16), torch.bfloat16
    model = load(checkpoints[cfg], q, dtype)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == ("Linear8bitLt" if fmt == "int8" else "Linear4bit")  # really quantized
    assert model_weight_bytes(model) == memplan_bytes(CONFIGS[cfg], fmt, double_quant=double_quant)


@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_bitsandbytes_tensor_bytes(n_in, n_out):
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    w = torch.randn(n_out, n_in, dtype=torch.float16)
    p8 = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
    assert stored_bytes([p8]) == sum(quantized_bytes(WeightFormat.INT8, n_in, n_out, 128, False))
    for dq in (False, True):
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        parts = [packed, state.absmax, state.code] + ([state.offset, state.state2.absmax, state.state2.code]
                                                      if dq else [])
        assert stored_bytes(parts) == sum(quantized_bytes(WeightFormat.NF4, n_in, n_out, 128, dq))


# --- torchao 0.18 ------------------------------------------------------------------------------------------------

def torchao_config(fmt: WeightFormat, group_size: int):
    """The torchao config a --weights format names (memplan.serve.weights' module doc)."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                      Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig)
    from torchao.quantization.granularity import PerGroup

    return {WeightFormat.TORCHAO_INT8: lambda: Int8WeightOnlyConfig(),
            WeightFormat.TORCHAO_FP8: lambda: Float8WeightOnlyConfig(),
            WeightFormat.TORCHAO_FP8_DYNAMIC: lambda: Float8DynamicActivationFloat8WeightConfig(),
            WeightFormat.TORCHAO_INT4: lambda: Int4WeightOnlyConfig(group_size=group_size),
            WeightFormat.TORCHAO_INTX4: lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                     granularity=PerGroup(group_size)),
            }[fmt]()


@pytest.fixture
def fp8_dynamic_on_cpu(monkeypatch):
    """Float8DynamicActivationFloat8WeightConfig asserts a CUDA 8.9+ device before it packs
    (quant_api._check_hardware_support); the packing itself is CPU code, run here with that check lifted."""
    pytest.importorskip("torchao")
    import torchao.quantization.quant_api as qa

    monkeypatch.setattr(qa, "_check_hardware_support", lambda granularity: None)


RUNS_HERE = [WeightFormat.TORCHAO_INT8, WeightFormat.TORCHAO_FP8, WeightFormat.TORCHAO_FP8_DYNAMIC,
             WeightFormat.TORCHAO_INTX4]


@pytest.mark.parametrize("fmt", RUNS_HERE, ids=lambda f: f.value)
@pytest.mark.parametrize("n_in,n_out", SHAPES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torchao_tensor_bytes(fp8_dynamic_on_cpu, fmt, n_in, n_out, dtype):
    from torchao.quantization import quantize_

    group = 16
    lin = torch.nn.Linear(n_in, n_out, bias=False).to(getattr(torch, dtype))
    half = lin.weight.element_size()
    if fmt is WeightFormat.TORCHAO_INTX4 and n_in % group:
        with pytest.raises(AssertionError, match="divisible"):
            quantize_(lin, torchao_config(fmt, group))
        with pytest.raises(MemplanError, match="multiple of --group-size"):
            quantized_bytes(fmt, n_in, n_out, group, False, half)
        return
    quantize_(lin, torchao_config(fmt, group))
    assert stored_bytes([lin.weight]) == sum(quantized_bytes(fmt, n_in, n_out, group, False, half))


@pytest.mark.parametrize("fmt,cfg,group", [
    (WeightFormat.TORCHAO_INT8, "A", 128), (WeightFormat.TORCHAO_INT8, "B", 128),
    (WeightFormat.TORCHAO_FP8, "A", 128), (WeightFormat.TORCHAO_FP8, "B", 128),
    (WeightFormat.TORCHAO_FP8_DYNAMIC, "A", 128), (WeightFormat.TORCHAO_FP8_DYNAMIC, "B", 128),  # B: skipped dims
    (WeightFormat.TORCHAO_INTX4, "A", 16), (WeightFormat.TORCHAO_INTX4, "B", 8),
    (WeightFormat.TORCHAO_INT8, "C", 128), (WeightFormat.TORCHAO_FP8_DYNAMIC, "C", 128),
    (WeightFormat.TORCHAO_INTX4, "C", 32),
], ids=lambda x: x.value if isinstance(x, WeightFormat) else str(x))
def test_torchao_model_bytes(checkpoints, fp8_dynamic_on_cpu, fmt, cfg, group):
    q = transformers.TorchAoConfig(torchao_config(fmt, group))
    model = load(checkpoints[cfg], q, torch.bfloat16)
    kinds = {type(m.weight).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds - {"Parameter"}, kinds  # some linears really hold a torchao tensor subclass
    assert type(model.lm_head.weight).__name__ == "Parameter"  # TorchAoConfig leaves the LM head
    assert model_weight_bytes(model) == memplan_bytes(CONFIGS[cfg], fmt.value, group_size=group)


def test_torchao_intx4_refuses_an_undivided_input_like_torchao():
    # config A's down_proj takes 176 inputs: 176 % 32 != 0. transformers reports torchao's AssertionError as a
    # conversion error; memplan refuses with one line.
    with pytest.raises(MemplanError, match="176 is not"):
        memplan_bytes(CONFIG_A, "torchao-intx4", group_size=32)


# --- serve --trace: generate() on fake tensors with torchao's packed weights ---------------------------------------

def rounded(n: int) -> int:
    return -(-n // 512) * 512  # the trace's AllocTracker rounds every storage to 512 B (CUDA's caching allocator)


@pytest.mark.parametrize("fmt,group", [(WeightFormat.TORCHAO_INT8, 128), (WeightFormat.TORCHAO_FP8, 128),
                                       (WeightFormat.TORCHAO_FP8_DYNAMIC, 128), (WeightFormat.TORCHAO_INTX4, 16)],
                         ids=lambda x: x.value if isinstance(x, WeightFormat) else str(x))
def test_serve_trace_holds_the_real_packing(checkpoints, fp8_dynamic_on_cpu, fmt, group):
    """The traced model's weights are the storages TorchAoConfig really loads (each rounded as the trace rounds it,
    buffers included as the trace includes them), and generate() runs to the same cache as bf16."""
    from memplan.trace.serve import trace_serve
    from memplan.trace.serve_quant import torchao_config as traced_config

    assert type(traced_config(fmt, group)) is type(torchao_config(fmt, group))
    spec = spec_from_config(CONFIG_A, "tiny")
    setup = ServeSetup(weights=fmt, group_size=group, prompt_len=8, gen_len=3, concurrency=2)
    traced = trace_serve(spec, setup)
    real = load(checkpoints["A"], transformers.TorchAoConfig(torchao_config(fmt, group)), torch.bfloat16)
    seen, want = set(), 0
    for t in [*real.parameters(), *real.buffers()]:
        for leaf in leaves(t):
            st = leaf.untyped_storage()
            if (st.data_ptr(), st.nbytes()) not in seen:
                seen.add((st.data_ptr(), st.nbytes()))
                want += rounded(st.nbytes())
    assert traced.weights == want
    assert traced.kv_cache == trace_serve(spec, ServeSetup(prompt_len=8, gen_len=3, concurrency=2)).kv_cache > 0


# The estimate's torchao term (memplan.serve.estimate.dequant_moment) against the trace: the peak falls inside a
# linear that holds its dequantized weight (or fp8-dynamic's quantized activation). The bar: the serving fixed
# grid's 1.5% (tests/test_serve.py TOLERANCE); issue 14's 3% for the family grid below.
TRACE_TOLERANCE = 0.015
GRID_BAR = 0.03
MEDIUM = {**CONFIG_A, "hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 8, "vocab_size": 1024,
          "max_position_embeddings": 4096}


TRACED_FORMATS = [WeightFormat.TORCHAO_INT8, WeightFormat.TORCHAO_FP8, WeightFormat.TORCHAO_FP8_DYNAMIC,
                  WeightFormat.TORCHAO_INTX4]


@pytest.mark.parametrize("fmt,c,p,g,cache", [  # each format once, prefill-heavy and short prompts both covered
    (WeightFormat.TORCHAO_INT8, 2, 96, 3, "dynamic"), (WeightFormat.TORCHAO_FP8, 1, 8, 3, "static"),
    (WeightFormat.TORCHAO_FP8_DYNAMIC, 2, 96, 3, "static"), (WeightFormat.TORCHAO_INTX4, 1, 8, 3, "dynamic"),
], ids=lambda x: x.value if isinstance(x, WeightFormat) else str(x))
def test_estimate_vs_trace_torchao(fmt, c, p, g, cache):
    pytest.importorskip("torchao")
    from memplan.serve import estimate_serve
    from memplan.trace.serve import trace_serve

    m = spec_from_config(MEDIUM, "medium")
    s = ServeSetup(weights=fmt, group_size=32, concurrency=c, prompt_len=p, gen_len=g, max_seq=p + g + 8,
                   hf_cache=cache)
    err = estimate_serve(m, s).allocated_bytes / trace_serve(m, s).peak_allocated - 1
    print(f"{fmt.value} {c}×({p}+{g}) {cache}: {100 * err:+.2f}%")
    assert abs(err) <= TRACE_TOLERANCE, f"{100 * err:+.2f}%"


@pytest.mark.slow
def test_estimate_vs_trace_torchao_families():
    """tests/test_serve.py's 7 tiny families × 4 traced torchao formats × 2 setups: `pytest -m slow
    tests/test_serve_quant.py -k families -s` prints the table docs/serving.md quotes."""
    pytest.importorskip("torchao")
    from test_serve import TINY

    from memplan.serve import estimate_serve
    from memplan.trace.serve import trace_serve

    worst = 0.0
    for family, cfg in TINY.items():
        m = spec_from_config(cfg, f"tiny-{family}")
        for fmt in TRACED_FORMATS:
            for c, p, g, cache in ((2, 300, 4, "dynamic"), (1, 16, 3, "static")):
                s = ServeSetup(weights=fmt, group_size=32, concurrency=c, prompt_len=p, gen_len=g, max_seq=p + g + 40,
                               hf_cache=cache)
                t, e = trace_serve(m, s), estimate_serve(m, s)
                err = e.allocated_bytes / t.peak_allocated - 1
                worst = max(worst, abs(err))
                print(f"{family:8} {fmt.value:20} {c}×({p}+{g}) {cache:7}: trace {t.peak_allocated:,} estimate "
                      f"{e.allocated_bytes:,} ({100 * err:+.2f}%)")
    assert worst <= GRID_BAR, f"{100 * worst:.2f}%"


def test_serve_trace_refuses_what_cannot_pack_here():
    from memplan.trace.serve import check_traceable

    spec = spec_from_config(CONFIG_A, "tiny")
    for fmt in ("torchao-int4", "int8", "nf4", "awq-int4"):
        with pytest.raises(MemplanError, match="estimate-only"):
            check_traceable(spec, ServeSetup(weights=fmt, group_size=16, prompt_len=8, gen_len=3))


# --- what cannot run here says so, and really cannot run -----------------------------------------------------------

@pytest.mark.parametrize("packing", ["plain", "plain_int32", "tile_packed_to_4d", "preshuffled"])
def test_torchao_int4_does_not_pack_on_the_cpu(packing):
    pytest.importorskip("torchao")
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    assert PACKINGS[WeightFormat.TORCHAO_INT4].verified is None
    lin = torch.nn.Linear(128, 64, bias=False).to(torch.bfloat16)
    with pytest.raises((ImportError, NotImplementedError, AssertionError, RuntimeError)):
        quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format=packing))


@pytest.mark.parametrize("fmt,module", [(WeightFormat.GPTQ_INT4, "auto_gptq"), (WeightFormat.GPTQ_INT4, "gptqmodel"),
                                        (WeightFormat.AWQ_INT4, "awq"), (WeightFormat.FP8, "vllm")])
def test_estimate_only_formats_lack_their_library(fmt, module):
    assert PACKINGS[fmt].verified is None and PACKINGS[fmt].why_estimate_only
    assert importlib.util.find_spec(module) is None, f"{module} is installed now: check {fmt.value} against it"


def test_every_format_names_its_packing():
    assert set(PACKINGS) == set(WeightFormat)
    assert {f for f in WeightFormat if f.value.startswith("torchao-")} == TORCHAO
    for fmt, p in PACKINGS.items():
        assert p.modelled and ("byte-exact" in p.line()) == (p.verified is not None), fmt


LENS = ["--prompt-len", "16", "--gen-len", "8"]  # within the tiny configs' 128 positions


def test_serve_cli_prints_the_packing(capsys, tmp_path):
    from memplan.cli import main

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(CONFIG_A))
    assert main(["serve", "--model", str(cfg), "--weights", "torchao-int4", "--group-size", "32", *LENS]) == 0
    out = capsys.readouterr().out
    assert "Int4WeightOnlyConfig" in out and "estimate-only" in out
    assert main(["serve", "--model", str(cfg), "--weights", "torchao-intx4", "--group-size", "32", *LENS]) == 2
    assert "multiple of --group-size 32" in capsys.readouterr().err
