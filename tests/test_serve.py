"""memplan serve (the inference estimate, memplan.serve): hand counts from configs and the cited layouts, vLLM's block
arithmetic as its code writes it, tensor parallelism, the searches, the CLI's contract. Pure Python, no torch.

Sources of the expected numbers: the model profiles' config values and exact parameter counts (profiles/models/,
from the Hugging Face configs and transformers on the meta device); the KV formula and the 800 KB OPT-13B figure of
the PagedAttention paper (Kwon et al. 2023, section 3); the packed layouts named in memplan/serve/weights.py; vLLM's
formulas named in memplan/serve/vllm.py (docs/serving.md lists them all).
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from memplan.api import serve
from memplan.cli import main
from memplan.errors import MemplanError
from memplan.profiles import load_gpu, load_model
from memplan.serve import ServeSetup, estimate_serve
from memplan.serve.estimate import logits_bytes, layer_forward_bytes
from memplan.serve.kv import dynamic_tokens, kv_bytes_per_token
from memplan.serve.setup import WeightFormat
from memplan.serve.weights import quantized_bytes, weight_bytes
from memplan.spec.families import spec_from_config
from memplan.estimate.overhead import CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES


def cli(capsys, *args):
    rc = main(["serve", *args])
    out, err = capsys.readouterr()
    return rc, out, err


# --- KV cache bytes per token: hand counts from the configs -----------------------------------------------------

def test_kv_bytes_per_token_llama31_8b_hand_count():
    # meta-llama/Llama-3.1-8B config: 32 layers, 8 key/value heads, head_dim = 4096 / 32 = 128
    m = load_model("llama-3.1-8b")
    assert kv_bytes_per_token(m, 1, 2) == 2 * 32 * 8 * 128 * 2 == 131_072
    assert kv_bytes_per_token(m, 1, 1) == 65_536  # fp8
    assert serve(m, gpu="l4", engine="vllm", kv_dtype="fp8", concurrency=1).kv_bytes_per_token == 65_536
    assert serve(m, weights="fp32").kv_bytes_per_token == 262_144  # "auto" follows the fp32 compute dtype


def test_gqa_vs_mha_vs_mqa():
    mha = load_model("llama-2-7b")  # 32 heads, no num_key_value_heads: 32 kv heads
    gqa = load_model("llama-3.1-8b")  # 32 heads, 8 kv heads, same layers and head_dim
    assert kv_bytes_per_token(mha, 1, 2) == 2 * 32 * 32 * 128 * 2 == 4 * kv_bytes_per_token(gqa, 1, 2)
    mqa = spec_from_config({**dict(load_model("llama-3.1-8b").hf_config), "num_key_value_heads": 1}, "mqa")
    assert kv_bytes_per_token(mqa, 1, 2) == 2 * 32 * 1 * 128 * 2


def test_mla_caches_the_latent():
    # deepseek-ai/DeepSeek-V3 config.json (the profile): 61 layers, kv_lora_rank 512, qk_rope_head_dim 64; transformers
    # 5.24's DeepseekV3Attention caches kv_nope [b, 1, s, 512] and k_rot [b, 1, s, 64]; vLLM's MLAAttentionSpec
    # pages one latent of 576 per token, replicated on every TP rank
    m = load_model("deepseek-v3")
    assert (m.layers, m.latent.kv_rank, m.latent.rope_dim) == (61, 512, 64)
    assert kv_bytes_per_token(m, 1, 2) == kv_bytes_per_token(m, 8, 2) == 61 * (512 + 64) * 2 == 70_272
    r = serve(m, gpu="h200", engine="vllm", tp=8, weights="fp8", concurrency=1, prompt_len=1000, gen_len=100,
              max_seq=4096)
    assert r.paged.page_size_bytes == 16 * 576 * 2


def test_published_opt13b_800kb_per_token():
    # Kwon et al. 2023 (PagedAttention, section 3): "for the 13B parameter OPT model, the KV cache of a single token
    # demands 800 KB of space, calculated as 2 (key and value vectors) × 5120 (hidden state size) × 40 (number of
    # layers) × 2 (bytes per FP16)". Config: facebook/opt-13b config.json (hidden_size 5120, 40 layers, 40 heads).
    cfg = {"model_type": "opt", "hidden_size": 5120, "ffn_dim": 20480, "num_hidden_layers": 40,
           "num_attention_heads": 40, "vocab_size": 50272, "max_position_embeddings": 2048,
           "word_embed_proj_dim": 5120}
    m = spec_from_config(cfg, "opt-13b")
    assert serve(m, weights="fp16").kv_bytes_per_token == 2 * 5120 * 40 * 2 == 819_200  # 800 KiB


def test_sliding_window_caps_the_cache():
    m = load_model("mistral-7b")  # sliding_window 4096 (mistralai/Mistral-7B-v0.1 config.json)
    per_token = kv_bytes_per_token(m, 1, 2)
    long = dict(prompt_len=6000, gen_len=1000, max_seq=8192)
    dyn = serve(m, hf_cache="dynamic", **long)
    # DynamicSlidingWindowLayer keeps a view of window - 1 tokens of its last torch.cat: the storage is the whole
    # prompt after the prefill, window - 1 kept plus the new token after a decode step
    assert dynamic_tokens(m, 6000, 6000) == 6000 and dynamic_tokens(m, 6999) == 4096
    assert dynamic_tokens(m, 100) == 100
    assert dyn.categories["kv_cache"] == (6000 if dyn.phase == "prefill" else 4096) * per_token
    static = serve(m, **long)
    assert static.categories["kv_cache"] == 4096 * per_token  # StaticSlidingWindowLayer: min(window, max_len)
    full = load_model("llama-3.1-8b")
    assert serve(full, **long).categories["kv_cache"] == 8192 * kv_bytes_per_token(full, 1, 2)


def test_hf_static_vs_dynamic_cache():
    m = load_model("llama-3.1-8b")
    per_token = kv_bytes_per_token(m, 1, 2)
    s = serve(m, concurrency=3, prompt_len=100, gen_len=28, max_seq=512)
    assert s.categories["kv_cache"] == 3 * 512 * per_token  # StaticCache sized to max_seq
    d = serve(m, concurrency=3, prompt_len=100, gen_len=28, max_seq=512, hf_cache="dynamic")
    kv = d.categories["kv_cache"]
    assert kv in (3 * 100 * per_token, 3 * 128 * per_token)  # prompt at the prefill peak, or all 128 at the end


# --- weights: the stored layouts --------------------------------------------------------------------------------

def test_quantized_layouts_hand_count():
    n = 4096 * 4096
    # gptq: qweight int32 [4096/8, 4096], qzeros int32 [32, 4096/8], scales fp16 [32, 4096], g_idx int32 [4096]
    assert quantized_bytes(WeightFormat.GPTQ_INT4, 4096, 4096, 128, False) == (n // 2, 32 * 512 * 4 + 32 * 4096 * 2
                                                                              + 4096 * 4)
    # awq: qweight int32 [4096, 4096/8], qzeros int32 [32, 512], scales fp16 [32, 4096]; no g_idx
    assert quantized_bytes(WeightFormat.AWQ_INT4, 4096, 4096, 128, False) == (n // 2, 32 * 512 * 4 + 32 * 4096 * 2)
    assert quantized_bytes(WeightFormat.AWQ_INT4, 4096, 4096, 64, False)[1] == 64 * 512 * 4 + 64 * 4096 * 2
    # LLM.int8: int8 CB plus one fp32 SCB per output row
    assert quantized_bytes(WeightFormat.INT8, 4096, 4096, 128, False) == (n, 4096 * 4)
    # NF4: two codes per byte, one fp32 absmax per 64 weights, the 16-entry fp32 code
    assert quantized_bytes(WeightFormat.NF4, 4096, 4096, 128, False) == (n // 2, n // 64 * 4 + 16 * 4)
    # NF4 + double quant: uint8 absmax, fp32 offset, code, one fp32 per 256 blocks, the 256-entry dynamic code
    assert quantized_bytes(WeightFormat.NF4, 4096, 4096, 128, True) == (
        n // 2, n // 64 + 4 + 16 * 4 + n // 64 // 256 * 4 + 256 * 4)
    assert quantized_bytes(WeightFormat.FP8, 4096, 4096, 128, False) == (n, 4)  # one fp32 scale per tensor


@pytest.mark.parametrize("key", ["llama-3.1-8b", "mixtral-8x7b", "gpt2", "qwen2.5-0.5b"])
def test_bf16_weights_are_two_bytes_per_parameter(key):
    """Every parameter, MoE experts all resident, against the profile's exact count."""
    m = load_model(key)
    assert weight_bytes(m, ServeSetup()).total == 2 * m.expected_params
    assert weight_bytes(m, ServeSetup(weights="fp32")).total == 4 * m.expected_params


def test_quantized_weights_shrink_in_order():
    m = load_model("llama-3.1-8b")
    sizes = {f.value: weight_bytes(m, ServeSetup(weights=f)).total for f in WeightFormat}
    assert sizes["fp32"] > sizes["bf16"] == sizes["fp16"] > sizes["int8"] > sizes["fp8"] - 1 > sizes["nf4"]
    assert sizes["gptq-int4"] > sizes["awq-int4"]  # g_idx
    # unquantized: embeddings and LM head (128256 × 4096 each) and the norms stay 2 bytes
    w = weight_bytes(m, ServeSetup(weights="awq-int4"))
    assert w.unquantized == 2 * (2 * 128256 * 4096 + (2 * 32 + 1) * 4096)
    assert w.scales > 0


def test_tensor_parallel_splits_weights_and_kv_heads():
    m = load_model("llama-3.1-8b")
    one, two = serve(m), serve(m, tp=2)
    assert two.kv_bytes_per_token * 2 == one.kv_bytes_per_token
    norms = (2 * 32 + 1) * 4096 * 2  # replicated on every GPU
    assert two.weights.total == (one.weights.total - norms) // 2 + norms
    # tp 16 > 8 kv heads: vLLM replicates, one kv head per GPU
    assert serve(m, tp=16).kv_bytes_per_token == 2 * 32 * 1 * 128 * 2


def test_tp_divisibility_errors(capsys, tmp_path):
    rc, out, err = cli(capsys, "--model", "llama-3.1-8b", "--tp", "3")
    assert rc == 2 and err.count("\n") == 1 and "32 attention heads" in err
    cfg = tmp_path / "config.json"  # 12 heads, 6 kv heads: tp 4 divides neither way
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048,
                               "num_hidden_layers": 2, "num_attention_heads": 12, "num_key_value_heads": 6,
                               "vocab_size": 1000}))
    rc, out, err = cli(capsys, "--model", str(cfg), "--tp", "4")
    assert rc == 2 and err.count("\n") == 1 and "key/value heads" in err


# --- vLLM's paged cache -----------------------------------------------------------------------------------------

def test_vllm_block_arithmetic_as_its_code_writes_it():
    m, g = load_model("llama-3.1-8b"), load_gpu("l4")
    r = serve(m, gpu=g, engine="vllm", weights="awq-int4", kv_dtype="fp8", prompt_len=7000, gen_len=1000,
              max_seq=8192, concurrency=1)
    p = r.paged
    # L4 (23,034 MiB, no "a100", < 70 GiB): max_num_batched_tokens 2048, max_num_seqs 256 (EngineArgs defaults)
    assert (p.max_num_batched_tokens, p.max_num_seqs) == (2048, 256)
    peak = r.weights.total + CUBLAS_WORKSPACE_BYTES + max(layer_forward_bytes(m, 2048, 1, 2),
                                                           logits_bytes(m, 256, 2, 2))
    available = int(g.memory_bytes * 0.9 - peak - CUDA_CONTEXT_BYTES)  # determine_available_memory
    assert p.available_bytes == available
    page = 2 * 16 * 8 * 128 * 1  # real_page_size_bytes: 2 · block_size · kv heads · head_size · fp8
    assert p.page_size_bytes == page
    assert p.num_blocks == available // page // 32  # get_num_blocks
    assert p.blocks_per_request == -(-8192 // 16) == 512  # FullAttentionSpec.max_memory_usage_bytes / page
    assert p.max_concurrency == p.num_blocks / 512  # get_max_concurrency_for_kv_cache_config
    assert p.blocks_per_seq == 500 and p.paged_waste_tokens == 0 and p.static_waste_tokens == 192
    assert r.categories["kv_cache"] == p.num_blocks * page * 32


def test_vllm_waste_is_under_one_block():
    m, g = load_model("llama-3.1-8b"), load_gpu("h100")
    for length in (1, 15, 16, 17, 1000):
        p = serve(m, gpu=g, engine="vllm", prompt_len=length, gen_len=1, max_seq=2048, concurrency=1).paged
        assert 0 <= p.paged_waste_tokens < 16
        assert p.paged_waste_tokens == -(-(length + 1) // 16) * 16 - (length + 1)
        assert p.static_waste_tokens == 2048 - (length + 1)
    # H100 SXM (81,559 MiB, no "a100"): the large-GPU defaults, 8192 and 1024
    assert (p.max_num_batched_tokens, p.max_num_seqs) == (8192, 1024)


def test_vllm_sliding_window_blocks():
    m = load_model("mistral-7b")
    p = serve(m, gpu="a100-80gb", engine="vllm", prompt_len=16000, gen_len=1000, max_seq=32768, concurrency=1).paged
    # SlidingWindowSpec: cdiv(min(window - 1 + max_num_batched_tokens, max_model_len), block_size) + 1; A100 → 2048
    assert p.max_num_batched_tokens == 2048
    assert p.blocks_per_request == -(-(4095 + 2048) // 16) + 1


def test_vllm_refuses_what_vllm_refuses(capsys):
    rc, _, err = cli(capsys, "--model", "llama-3.1-8b", "--gpu", "t4", "--engine", "vllm", "-c", "1")
    assert rc == 2 and "bf16" in err  # _check_if_gpu_supports_dtype
    rc, out, err = cli(capsys, "--model", "llama-3.2-1b", "--gpu", "t4", "--engine", "vllm", "--weights", "fp16",
                       "-c", "1")
    assert rc == 0 and ": fits" in out


# --- searches ---------------------------------------------------------------------------------------------------

def test_solve_concurrency_hf_is_the_largest_that_fits():
    m, g = load_model("llama-3.1-8b"), load_gpu("l4")
    r = serve(m, gpu=g, solve="concurrency")
    c = r.setup.concurrency
    assert r.fits and c > 1
    assert not serve(m, gpu=g, concurrency=c + 1).fits


def test_solve_concurrency_vllm_is_its_max_concurrency():
    r = serve("llama-3.1-8b", gpu="l4", engine="vllm", weights="awq-int4", kv_dtype="fp8", prompt_len=7000,
              gen_len=1000, max_seq=8192, solve="concurrency")
    assert r.setup.concurrency == int(r.paged.max_concurrency) and r.fits
    assert not serve("llama-3.1-8b", gpu="l4", engine="vllm", weights="awq-int4", kv_dtype="fp8", prompt_len=7000,
                     gen_len=1000, max_seq=8192, concurrency=r.setup.concurrency + 1).fits


def test_solve_context():
    m, g = load_model("llama-3.1-8b"), load_gpu("l4")
    r = serve(m, gpu=g, concurrency=4, solve="context")
    n = r.setup.max_seq
    assert r.fits and n > 1024 and r.setup.prompt_len == n - 256
    assert not serve(m, gpu=g, concurrency=4, max_seq=n + 1, prompt_len=n + 1 - 256).fits


# --- speed ------------------------------------------------------------------------------------------------------

def test_decode_is_bandwidth_bound_and_reads_weights_plus_kv():
    m, g = load_model("llama-3.1-8b"), load_gpu("h100")
    r = serve(m, gpu=g, concurrency=1, prompt_len=1000, gen_len=200)
    t = r.throughput
    assert t.decode_bound == "bandwidth" and t.prefill_bound == "compute"
    kv_read = (1000 + 100) * r.kv_bytes_per_token  # mean context over the generation
    assert t.decode_bytes_per_step == r.weights.total + kv_read
    assert t.tokens_per_s_per_seq == pytest.approx(3350e9 / (r.weights.total + kv_read))
    many = serve(m, gpu=g, concurrency=8, prompt_len=1000, gen_len=200).throughput
    assert many.tokens_per_s_total == pytest.approx(8 * many.tokens_per_s_per_seq)
    assert many.tokens_per_s_total > t.tokens_per_s_total


# --- the CLI's contract -----------------------------------------------------------------------------------------

BAD = [
    ["--tp", "3"], ["--weights", "int3"], ["--kv-dtype", "fp8"], ["--engine", "vllm"], ["--max-seq", "100"],
    ["--max-seq", "200000"], ["--prompt-len", "0"], ["--gen-len", "-1"], ["--group-size", "0"],
    ["--weights", "gptq-int4", "--group-size", "100"], ["--tp", "2", "--gpus", "4"], ["-c", "0"],
    ["--gpu", "l4", "--solve", "concurrency", "-c", "2"], ["--gpu", "nope"], ["--gpu", "l4", "--engine", "vllm",
                                                                              "--gpu-memory-utilization", "1.5"],
    ["--gpu", "v100-32gb", "--weights", "fp8"], ["--gpu", "v100-32gb", "--engine", "vllm", "--weights", "fp16",
                                                 "--kv-dtype", "fp8"],
    ["--block-size", "0"], ["--solve", "both"], ["--concurrency", "nan"],
]


@pytest.mark.parametrize("args", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_input_is_one_line_and_exit_2(capsys, args):
    rc, out, err = cli(capsys, "--model", "llama-3.1-8b", *args)
    assert rc == 2, (out, err)
    assert err.startswith("memplan: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_encoder_model_refused(capsys):
    rc, _, err = cli(capsys, "--model", "bert-base-uncased")
    assert rc == 2 and "decoder-only" in err


def test_formats(capsys):
    args = ["--model", "llama-3.1-8b", "--gpu", "l4", "--engine", "vllm", "--weights", "awq-int4",
            "--kv-dtype", "fp8", "--max-seq", "8192", "--prompt-len", "7000", "--gen-len", "1000"]
    rc, out, _ = cli(capsys, *args)
    assert rc == 0 and "blocks of 16 tokens" in out and "note: solved" in out and "fits" in out
    rc, out, _ = cli(capsys, *args, "--format", "json")
    d = json.loads(out)
    assert rc == 0 and d["vllm"]["num_blocks"] > 0 and d["setup"]["concurrency"] == int(d["vllm"]["max_concurrency"])
    rc, out, _ = cli(capsys, *args, "--format", "csv")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 2 and "vllm_num_blocks" in lines[0]


def test_result_is_frozen():
    r = serve("gpt2", prompt_len=512)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.device_bytes = 0
    with pytest.raises(MemplanError):
        serve("gpt2", bogus=1)


def test_estimate_path_imports_no_torch():
    code = ("import sys, memplan, memplan.serve, memplan.cli, memplan.api; memplan.api.serve('gpt2', prompt_len=512); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# --- estimate vs trace: the real generate() on fake tensors (memplan.trace.serve) --------------------------------

TINY = {  # tiny configs of each family: activations are a large share, so the estimate's model shows
    "llama": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000,
              "max_position_embeddings": 4096},
    "qwen2": {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000,
              "max_position_embeddings": 4096, "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3,
                "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000,
                "max_position_embeddings": 4096, "sliding_window": 256},
    "gpt2": {"model_type": "gpt2", "n_embd": 256, "n_layer": 3, "n_head": 8, "vocab_size": 32000, "n_positions": 4096},
    "opt": {"model_type": "opt", "hidden_size": 256, "ffn_dim": 1024, "num_hidden_layers": 3,
            "num_attention_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
            "word_embed_proj_dim": 256},
    "phi": {"model_type": "phi", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 3,
            "num_attention_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096},
    "mixtral": {"model_type": "mixtral", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000,
                "max_position_embeddings": 4096, "num_local_experts": 4, "num_experts_per_tok": 2},
    # issue 14's MoE families: expert width below the dense width, Qwen2-MoE's gated shared expert, DeepSeek-V3's
    # multi-head latent attention, fp32 sigmoid router, shared experts and a dense first block
    "qwen2_moe": {"model_type": "qwen2_moe", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3,
                  "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000,
                  "max_position_embeddings": 4096, "num_experts": 8, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 128, "shared_expert_intermediate_size": 512},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3,
                  "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 32000,
                  "max_position_embeddings": 4096, "num_experts": 8, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 128},
    "deepseek_v3": {"model_type": "deepseek_v3", "hidden_size": 256, "intermediate_size": 704,
                    "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2,
                    "topk_group": 1, "moe_intermediate_size": 128, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "q_lora_rank": 64, "kv_lora_rank": 32, "qk_rope_head_dim": 16,
                    "qk_nope_head_dim": 32, "v_head_dim": 32},
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")  # traced in bf16 only (memplan.trace.serve)
# The estimate's layer model (memplan.serve.estimate.layer_forward_bytes) was set from these traces; docs/serving.md
# quotes the figures. Every family holds within 1.5% on the fixed grid; the seeded grids are held to issue 14's 3%.
TOLERANCE = 0.015
GRID_TOLERANCE = 0.03


def test_trace_cli_agrees_with_the_estimate(capsys, tmp_path):
    pytest.importorskip("torch")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY["llama"]))
    for cache in ("dynamic", "static"):
        rc, out, err = cli(capsys, "--model", str(cfg), "-c", "2", "--prompt-len", "128", "--gen-len", "3",
                           "--cache", cache, "--trace", "-f", "json")
        assert rc == 0, err
        d = json.loads(out)
        assert d["trace"]["peak_allocated"] == pytest.approx(d["peak"]["allocated_bytes"], rel=0.01)
        per_token = d["kv_bytes_per_token"]
        kept = 2 * (128 + 3 - 1) if cache == "dynamic" else 2 * (128 + 3)  # the last token is never fed back
        assert d["trace"]["kv_cache"] == pytest.approx(kept * per_token, rel=0.01)
    rc, _, err = cli(capsys, "--model", str(cfg), "--engine", "vllm", "--gpu", "l4", "--trace")
    assert rc == 2 and "estimate-only" in err


@pytest.mark.slow
@pytest.mark.parametrize("family", list(TINY))
def test_estimate_vs_trace_grid(family):
    """Each family × cache × (bf16, 2 × 300 prompt tokens) and (fp32, 4 × 64): `pytest -m slow tests/test_serve.py
    -k grid -s` prints the table docs/serving.md quotes."""
    pytest.importorskip("torch")
    from memplan.trace.serve import trace_serve

    m = spec_from_config(TINY[family], f"tiny-{family}")
    for cache in ("dynamic", "static"):
        for c, p, g, w in ((2, 300, 4, "bf16"), (4, 64, 3, "fp32")):
            if m.experts > 1 and w == "fp32":
                continue  # not traceable: transformers' grouped expert matmul is bf16 only on the CPU
            s = ServeSetup(concurrency=c, prompt_len=p, gen_len=g, max_seq=p + g + 40, hf_cache=cache, weights=w)
            t, e = trace_serve(m, s), estimate_serve(m, s)
            err = e.allocated_bytes / t.peak_allocated - 1
            print(f"{family:8} {cache:7} {c}×({p}+{g}) {w}: trace {t.peak_allocated:,} estimate "
                  f"{e.allocated_bytes:,} ({100 * err:+.2f}%)")
            assert abs(err) <= TOLERANCE


def test_mla_attention_peak_follows_the_trace():
    """DeepSeek-V3 with its attention as the peak (16 heads of 64 + 16, one narrow expert per token): the MLA terms
    (memplan.serve.estimate.latent_attention_elems) against the real generate() on fake tensors."""
    pytest.importorskip("torch")
    from memplan.trace.serve import trace_serve

    cfg = dict(TINY["deepseek_v3"], num_attention_heads=16, num_key_value_heads=16, qk_nope_head_dim=64,
               v_head_dim=64, moe_intermediate_size=32, intermediate_size=128, num_experts_per_tok=1)
    m = spec_from_config(cfg, "tiny-mla-attention")
    s = ServeSetup(concurrency=2, prompt_len=300, gen_len=3, max_seq=323, hf_cache="dynamic", weights="bf16")
    e, t = estimate_serve(m, s), trace_serve(m, s)
    per_token = 3 * (32 + 16) * 2  # the latent: layers · (kv_lora_rank + qk_rope_head_dim) · bf16
    assert t.kv_cache == 2 * (300 + 3 - 1) * per_token  # the cache at the end of generate()
    assert e.phase == "prefill" and e.categories["kv_cache"] == 2 * 300 * per_token
    assert abs(e.allocated_bytes / t.peak_allocated - 1) <= TOLERANCE


def seeded_grid(seed: int, per_family: int = 16) -> list[tuple[str, ServeSetup]]:
    """per_family setups per family drawn with `seed`: concurrency 1-8, prompt 8-512, generation 2-6 tokens, cache,
    weights dtype (bf16 / fp16 / fp32; MoE bf16 only, see memplan.trace.serve)."""
    import random

    rng = random.Random(seed)
    out = []
    for family in TINY:
        for _ in range(per_family):
            dtypes = ("bf16",) if family in MOE else ("bf16", "fp16", "fp32")
            p, g = rng.randint(8, 512), rng.randint(2, 6)
            out.append((family, ServeSetup(concurrency=rng.randint(1, 8), prompt_len=p, gen_len=g,
                                           max_seq=p + g + rng.randint(0, 64), hf_cache=rng.choice(("dynamic", "static")),
                                           weights=rng.choice(dtypes))))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_estimate_vs_trace_seeded_grid(seed):
    """10 families × 16 setups per seed (160 each): `pytest -m slow tests/test_serve.py -k seeded -s` prints the worst
    error per family."""
    pytest.importorskip("torch")
    from memplan.trace.serve import trace_serve

    worst: dict[str, float] = {}
    for family, s in seeded_grid(seed):
        m = spec_from_config(TINY[family], f"tiny-{family}")
        err = estimate_serve(m, s).allocated_bytes / trace_serve(m, s).peak_allocated - 1
        worst[family] = max(worst.get(family, 0.0), abs(err))
    line = f"seed {seed}: " + ", ".join(f"{f} {100 * e:.2f}%" for f, e in worst.items())
    print(line)
    assert max(worst.values()) <= GRID_TOLERANCE, line
