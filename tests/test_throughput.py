"""The throughput model: FLOPs per token against the published formulas, ZeRO communication volumes against the
ZeRO paper, the step-time model, the utilization lookup from committed records, and its wiring into estimate.

Expected values are the published formulas evaluated on the model's exact numbers (parameter counts from the
profiles, which tests/test_params_exact.py holds to transformers), never fitted constants.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from memplan.api import make_setup, resolve_gpu, resolve_model
from memplan.cli import main
from memplan.estimate.flops import attention_layers, communication_per_step, flops_per_token
from memplan.spec.model import TensorKind
from memplan.estimate.throughput import DEFAULT_UTILIZATION, Overlap, Utilization, predict
from memplan.measure.utilization import throughput_comparison, utilization
from published import PUBLISHED

ROOT = Path(__file__).resolve().parent.parent


def non_embedding_matmul_params(name: str) -> int:
    """N of PaLM's 6N: the exact parameter count less embeddings, norms and biases (not matmul weights); a
    tied embedding is the LM head's weight, so it counts once, as the head."""
    m = resolve_model(name)
    emb = sum(t.numel * t.count for t in m.tensors if t.kind is TensorKind.EMBEDDING)
    other = sum(t.numel * t.count for t in m.tensors if t.kind is not TensorKind.EMBEDDING)
    biases = sum(l.out_features * l.count for l in m.linears if l.bias)
    head = m.vocab * m.hidden if m.tie_embeddings else 0
    return m.total_params - emb - other - biases + head


@pytest.mark.parametrize("name", ["llama-7b", "gpt2", "qwen2.5-0.5b", "mistral-7b"])
def test_dense_full_training_is_palm_6n_plus_attention(name):
    # PaLM appendix B (tests/data/published.toml [palm_flops]): 6·N + 12·L·h·s per token, h = heads·head_dim
    m = resolve_model(name)
    s = make_setup(seq=1024)
    f = flops_per_token(m, s)
    n = non_embedding_matmul_params(name)
    assert f.model == pytest.approx(6 * n + 12 * m.layers * m.q_dim * 1024, rel=1e-12)
    assert f.recompute == 0 and f.hardware == f.model


def test_lora_skips_only_the_frozen_weight_gradients():
    # frozen weights: forward 2N + activation gradient 2N; adapters train: 6·N_adapter.
    # N_adapter = 4,194,304 for LLaMA-7B LoRA r=8 on q,v (peft's print_trainable_parameters; tests/test_peft_counts.py)
    m = resolve_model("llama-7b")
    f = flops_per_token(m, make_setup(peft="lora", seq=2048))
    n = non_embedding_matmul_params("llama-7b")
    n_adapter = 4_194_304
    assert f.backward_weight == 2 * n_adapter
    assert f.model == pytest.approx(4 * n + 6 * n_adapter + 12 * m.layers * m.q_dim * 2048, rel=1e-12)


def test_full_checkpointing_adds_one_forward_of_the_blocks():
    # [palm_flops] recompute_forward_factor: full activation recomputation adds one forward (≈ 8N); the LM head is
    # outside the checkpointed blocks, so exactly 2·N_blocks + the attention core's forward
    m = resolve_model("llama-7b")
    s = make_setup(seq=2048)
    plain, ckpt = flops_per_token(m, s), flops_per_token(m, replace(s, checkpointing=make_setup(
        checkpointing="full").checkpointing))
    n = non_embedding_matmul_params("llama-7b")
    head = m.vocab * m.hidden
    assert ckpt.model == plain.model  # MFU's numerator excludes rematerialization (PaLM)
    assert ckpt.recompute == pytest.approx(2 * (n - head) + 4 * m.layers * m.q_dim * 2048, rel=1e-12)
    per_n = (ckpt.hardware - 12 * m.layers * m.q_dim * 2048 - 4 * m.layers * m.q_dim * 2048) / n
    eight = PUBLISHED["palm_flops"]["recompute_forward_factor"]
    assert eight - 0.1 < per_n < eight
    sel = flops_per_token(m, make_setup(seq=2048, checkpointing="selective"))
    assert sel.recompute == pytest.approx(4 * m.layers * m.q_dim * 2048, rel=1e-12)  # attention core only


def test_freeze_head_only_runs_no_backward_through_the_blocks():
    m = resolve_model("llama-7b")
    f = flops_per_token(m, make_setup(peft="freeze", train_layers=0, seq=512))
    n = non_embedding_matmul_params("llama-7b")
    head = m.vocab * m.hidden
    assert f.model == pytest.approx(2 * n + 4 * head + 4 * m.layers * m.q_dim * 512, rel=1e-12)
    half = flops_per_token(m, make_setup(peft="freeze", train_layers=m.layers // 2, seq=512))
    assert f.model < half.model < flops_per_token(m, make_setup(seq=512)).model


def test_prompt_tuning_pays_for_its_virtual_tokens():
    m = resolve_model("gpt2")
    s = make_setup(peft="prompt", num_virtual_tokens=64, seq=256)
    plain_frozen = flops_per_token(m, make_setup(peft="ia3", seq=320))  # same frozen base, no weight grads
    f = flops_per_token(m, s)
    assert f.forward == pytest.approx(plain_frozen.forward * 320 / 256, rel=1e-12)


def test_mixtral_counts_only_the_routed_experts():
    # Mistral AI, "Mixtral of experts" (2023-12-11): 46.7B parameters in all, 12.9B used per token
    m = resolve_model("mixtral-8x7b")
    f = flops_per_token(m, make_setup(seq=1024))
    embedding = m.vocab * m.hidden
    assert (f.forward / 2 + embedding) / 1e9 == pytest.approx(12.9, abs=0.06)


def test_encoder_decoder_counts_cross_attention():
    m = resolve_model("t5-3b")
    assert attention_layers(m) == m.encoder_layers + 2 * m.layers


@pytest.mark.parametrize("precision", ["bf16-master", "fp16-master"])
def test_deepspeed_communication_volumes_follow_the_zero_paper(precision):
    # ZeRO (arXiv:1910.02054, section 7): DDP all-reduce 2Ψ; ZeRO-1/2 the same (reduce-scatter Ψ + all-gather Ψ);
    # ZeRO-3 3Ψ = 1.5× (16-bit parameters and gradients, as DeepSpeed keeps them); ring factor (N−1)/N. The paper
    # gathers every parameter again in the backward: DeepSpeed's reuse window and persistent parameters off
    m = resolve_model("llama-7b")
    s = make_setup(precision=precision, gpus=8, engine="deepspeed", zero=1, ds_max_reuse_distance=0,
                   ds_param_persistence_threshold=0)
    psi = m.total_params
    ddp = 2 * psi * 2 * 7 / 8
    assert communication_per_step(m, replace(s, zero=0)).total == pytest.approx(ddp, rel=1e-12)
    for z in (1, 2):
        assert communication_per_step(m, replace(s, zero=z)).total == pytest.approx(ddp, rel=1e-12)
    assert communication_per_step(m, replace(s, zero=3)).total == pytest.approx(1.5 * ddp, rel=1e-12)
    assert communication_per_step(m, replace(s, gpus=1)).total == 0


def test_pytorch_engines_move_what_their_collectives_move():
    # pure bf16 (2 B everywhere), 8 ranks, ring factor 7/8: DDP all-reduce 2Ψ; DDP + ZeroRedundancyOptimizer adds
    # the owners' broadcasts of the updated partitions (Ψ in all); FSDP2 reshard_after_forward=False gathers once
    # (forward) and reduce-scatters once = 2Ψ; reshard_after_forward=True gathers in backward too = 3Ψ
    m = resolve_model("llama-7b")
    s = make_setup(precision="pure-bf16", gpus=8)
    psi = m.total_params * 2 * 7 / 8
    want = {0: 2 * psi, 1: 3 * psi, 2: 2 * psi, 3: 3 * psi}
    for z, v in want.items():
        c = communication_per_step(m, replace(s, zero=z))
        assert c.total == pytest.approx(v, rel=1e-12), z
        assert c.to_gpu_bytes == c.to_host_bytes == 0


def test_fsdp_bf16_gathers_bf16_and_reduces_fp32():
    # FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) over fp32 shards: the all-gather moves
    # 2 B/param twice (forward, backward), the reduce-scatter 4 B/param once: equal volumes. Without a policy
    # (autocast --bf16) FSDP2 gathers the fp32 shards as stored: 4 B/param.
    m = resolve_model("llama-3.1-8b")
    psi = m.total_params
    c = communication_per_step(m, make_setup(precision="fsdp-bf16", gpus=8, zero=3))
    assert c.gradient_bytes == pytest.approx(psi * 4 * 7 / 8, rel=1e-12)
    assert c.parameter_bytes == pytest.approx(2 * psi * 2 * 7 / 8, rel=1e-12)
    auto = communication_per_step(m, make_setup(precision="bf16", gpus=8, zero=3))
    assert auto.parameter_bytes == pytest.approx(2 * psi * 4 * 7 / 8, rel=1e-12)


def test_gradient_accumulation_gathers_every_micro_batch_and_reduces_as_told():
    # FSDP2 ZeRO-3 re-gathers in each micro-batch; gradients reduce once under no_sync (accelerate's default)
    # or every micro-batch with --sync-each-batch; DeepSpeed ZeRO-2 reduces into partitions every micro-batch
    m = resolve_model("llama-3.2-1b")
    one = communication_per_step(m, make_setup(precision="fsdp-bf16", gpus=4, zero=3))
    four = communication_per_step(m, make_setup(precision="fsdp-bf16", gpus=4, zero=3, grad_accum=4))
    sync = communication_per_step(m, make_setup(precision="fsdp-bf16", gpus=4, zero=3, grad_accum=4,
                                                sync_each_batch=True))
    assert four.parameter_bytes == pytest.approx(4 * one.parameter_bytes, rel=1e-12)
    assert four.gradient_bytes == pytest.approx(one.gradient_bytes, rel=1e-12)
    assert sync.gradient_bytes == pytest.approx(4 * one.gradient_bytes, rel=1e-12)
    ds = dict(precision="bf16-master", gpus=4, zero=2, engine="deepspeed")
    assert communication_per_step(m, make_setup(grad_accum=4, **ds)).gradient_bytes == pytest.approx(
        4 * communication_per_step(m, make_setup(**ds)).gradient_bytes, rel=1e-12)


def test_peft_reduces_only_trainable_gradients():
    m = resolve_model("llama-7b")
    c = communication_per_step(m, make_setup(peft="lora", gpus=4))
    assert c.gradient_bytes == pytest.approx(2 * 4_194_304 * 4 * 3 / 4)  # fp32 adapters, all-reduce 2Ψ(N−1)/N


def test_qlora_under_zero3_reduces_adapters_and_gathers_the_packed_4bit_weights():
    # FSDP + QLoRA (quant_storage=bf16): the NF4 weights are sharded and all-gathered packed, 0.5 B/param (two
    # codes per byte), where LoRA gathers the same weights in bf16 (2 B); the LM head stays bf16 in both; only the
    # adapters (4,194,304 fp32 for LLaMA-7B r=8 on q,v; tests/test_peft_counts.py) are reduced
    m = resolve_model("llama-7b")
    kw = dict(gpus=2, zero=3, precision="pure-bf16")
    lora = communication_per_step(m, make_setup(peft="lora", **kw))
    qlora = communication_per_step(m, make_setup(peft="qlora", **kw))
    assert qlora.gradient_bytes == lora.gradient_bytes == pytest.approx(4_194_304 * 4 / 2)
    nf4 = non_embedding_matmul_params("llama-7b") - m.vocab * m.hidden  # the blocks' linear weights
    assert lora.parameter_bytes - qlora.parameter_bytes == pytest.approx(2 * (2 - 0.5) * nf4 / 2, rel=1e-12)


def test_offload_copies_shards_over_the_host_link():
    # FSDP2 CPUOffloadPolicy: each all-gather (forward and backward) first copies the rank's fp32 shard to the
    # GPU, 2·4Ψ/N; the reduced fp32 gradient shard goes back, 4Ψ/N. H100 SXM host link: PCIe Gen5 x16,
    # 64 GB/s per direction (H100 datasheet: 128 GB/s); the link is full duplex, so the busier direction counts
    m, g = resolve_model("llama-3.1-8b"), resolve_gpu("h100-sxm")
    psi = m.total_params
    s = make_setup(precision="fsdp-bf16", gpus=8, zero=3, offload_params=True, seq=2048)
    c = communication_per_step(m, s)
    assert c.to_gpu_bytes == pytest.approx(2 * 4 * psi / 8, rel=1e-12)
    assert c.to_host_bytes == pytest.approx(4 * psi / 8, rel=1e-12)
    t = predict(m, s, g, Utilization(0.4, "test"))
    assert t.host_s == pytest.approx(2 * 4 * psi / 8 / 64e9, rel=1e-12)
    assert t.comm_s == pytest.approx(c.total / 450e9 + t.host_s, rel=1e-12)  # NVLink 4: 450 GB/s per direction
    # DeepSpeed ZeRO-Offload: bf16 gradient partitions out, updated bf16 partitions back, 2Ψ/N each way
    d = communication_per_step(m, make_setup(precision="bf16-master", gpus=8, zero=2, engine="deepspeed",
                                             offload_optimizer=True))
    assert d.to_host_bytes == pytest.approx(2 * psi / 8, rel=1e-12) and d.to_gpu_bytes == d.to_host_bytes


def test_traffic_between_nodes_uses_the_inter_node_bandwidth():
    # DGX H100: NVLink 4 450 GB/s per GPU per direction inside the node; eight 400 Gb/s ConnectX-7 adapters,
    # 50 GB/s per GPU, between nodes (DGX H100 datasheet). A ring leaves each node once: one rank's bytes leave
    # the node over its 8 adapters, min(450, 8 × 50) = 400 GB/s; one GPU per node leaves 50 GB/s
    m, g = resolve_model("llama-3.1-8b"), resolve_gpu("h100-sxm")
    assert (g.interconnect_gbs, g.inter_node_gbs) == (450, 400 / 8)
    u = Utilization(0.4, "test")
    s = make_setup(precision="fsdp-bf16", gpus=16, zero=3, seq=2048)
    c = communication_per_step(m, s).total
    for per_node, gbs in ((16, 450), (8, 400), (4, 200), (1, 50)):
        t = predict(m, replace(s, gpus_per_node=per_node), g, u)
        assert t.network_gbs == gbs and t.comm_s == pytest.approx(c / (gbs * 1e9), rel=1e-12), per_node
    # a profile naming no inter-node system keeps its own figure and says so
    t = predict(m, make_setup(peft="lora", gpus=4, gpus_per_node=2), resolve_gpu("rtx-4090"), u)
    assert t.network_gbs == 32 and "no inter-node bandwidth" in t.link


def test_communication_time_is_monotone():
    m, g = resolve_model("llama-3.2-1b"), resolve_gpu("h100-sxm")
    u = Utilization(0.4, "test")
    base = make_setup(precision="fsdp-bf16", zero=3, seq=1024)

    def comm(**kw):
        return predict(m, replace(base, **kw), g, u).comm_s

    gpus = [comm(gpus=n) for n in (1, 2, 4, 8, 16, 64)]
    assert gpus == sorted(gpus) and gpus[0] == 0
    per_node = [comm(gpus=16, gpus_per_node=k) for k in (16, 8, 4, 2, 1)]
    assert per_node == sorted(per_node)
    accum = [comm(gpus=8, grad_accum=a) for a in (1, 2, 4)]
    assert accum == sorted(accum) and accum[0] < accum[-1]
    assert comm(gpus=8) < comm(gpus=8, offload_params=True)
    zeros = [predict(m, make_setup(precision="bf16-master", engine="deepspeed", gpus=8, zero=z), g, u).comm_s
             for z in (2, 3)]
    assert zeros[0] < zeros[1]


def test_step_time_is_compute_or_communication():
    m, g = resolve_model("llama-7b"), resolve_gpu("a100-80gb")
    u = Utilization(0.5, "test")
    one = predict(m, make_setup(seq=2048, batch=2), g, u)
    f = flops_per_token(m, make_setup(seq=2048, batch=2))
    assert one.comm_s == 0
    a100 = PUBLISHED["gpu_dense_peaks"]["a100_bf16"] * 1e12  # A100 dense bf16 312 TFLOPS
    assert one.step_s == pytest.approx(4096 * f.hardware / (a100 * 0.5))
    assert one.mfu == pytest.approx(0.5) and one.tokens_per_s == pytest.approx(4096 / one.step_s)
    many = predict(m, make_setup(seq=2048, batch=2, gpus=8, zero=3), g, u)
    assert many.comm_s == pytest.approx(many.comm_bytes / 300e9)  # A100 SXM4 NVLink 300 GB/s per direction
    assert many.step_s == max(many.compute_s, many.comm_s)
    serial = predict(m, make_setup(seq=2048, batch=2, gpus=8, zero=3), g, u, Overlap.NONE)
    assert serial.step_s == pytest.approx(serial.compute_s + serial.comm_s)
    ckpt = predict(m, make_setup(seq=2048, batch=2, checkpointing="full"), g, u)
    assert ckpt.mfu < 0.5 and ckpt.utilization == 0.5  # recomputation is work MFU does not credit


def _record(gpu: str | None, tokens_per_s: float, precision="bf16", device="cuda", status="ok") -> dict:
    """A committed-style record (docs/record-schema.md), as an input to the lookup."""
    setup = make_setup(precision=precision, batch=4, seq=2048).to_dict()
    return {"schema_version": 1, "record_id": "x", "name": None, "model": "llama-3.2-1b", "setup": setup,
            "device": device, "status": status, "failed_phase": None, "error": None, "estimate": {},
            "measured": {"tokens_per_s": tokens_per_s, "mfu": None},
            "gpu": {"name": "NVIDIA H100 80GB HBM3", "profile": gpu, "memory_bytes": 85520809984}}


def test_utilization_is_the_median_of_committed_records(tmp_path):
    root = tmp_path / "measurements"
    (root / "h100-sxm").mkdir(parents=True)
    recs = [_record("h100-sxm", t) for t in (20_000.0, 30_000.0, 50_000.0)]
    recs.append(_record("h100-sxm", 1.0, device="cpu"))  # CPU records never count
    recs.append(_record("h100-sxm", 1.0, status="oom"))
    (root / "h100-sxm" / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{torn")
    m, g = resolve_model("llama-3.2-1b"), resolve_gpu("h100-sxm")
    setup = make_setup(batch=4, seq=2048)
    u = utilization(g, setup, root)
    assert u.value == pytest.approx(30_000 * flops_per_token(m, setup).hardware / 989.4e12)  # H100 bf16 dense
    assert "median of 3" in u.source
    assert utilization(g, make_setup(precision="fp32"), root).value == DEFAULT_UTILIZATION  # per precision
    assert utilization(resolve_gpu("a100-80gb"), setup, root).value == DEFAULT_UTILIZATION  # per GPU
    assert utilization(g, setup, tmp_path / "absent").value == DEFAULT_UTILIZATION


def test_throughput_comparison_rows():
    gpu_rec = _record("h100-sxm", 30_000.0)
    cpu_rec = {**_record(None, 120.0, device="cpu"), "gpu": None}
    failed = _record("h100-sxm", 0.0, status="oom")
    rows = throughput_comparison([gpu_rec, cpu_rec, failed])
    assert len(rows) == 2
    g, c = rows
    # independently: one GPU, no communication, so tokens/s = peak · utilization / FLOPs per token, with PaLM's
    # 6N + 12·L·h·s ([palm_flops]) and H100 SXM's dense bf16 989 TFLOPS ([gpu_dense_peaks], ±0.1 %: the profile
    # has 989.4); the repository commits no H100 records, so the utilization is the documented default 40 %,
    # inside the observed 33-46 % ([observed_mfu])
    m = resolve_model("llama-3.2-1b")
    mfu = PUBLISHED["observed_mfu"]
    assert mfu["llama_3_1_8b_fsdp_8xh100"][0] <= DEFAULT_UTILIZATION <= mfu["fms_fsdp_7b_h100"]
    palm = 6 * non_embedding_matmul_params("llama-3.2-1b") + 12 * m.layers * m.q_dim * 2048
    want = PUBLISHED["gpu_dense_peaks"]["h100_sxm_bf16"] * 1e12 * DEFAULT_UTILIZATION / palm
    assert g["predicted_tokens_per_s"] == pytest.approx(want, rel=1e-3)
    assert g["ratio"] == pytest.approx(want / 30_000, rel=1e-3)
    assert c["measured_tokens_per_s"] == 120.0 and c["predicted_tokens_per_s"] is None


def test_estimate_shows_throughput_with_a_gpu(capsys):
    assert main(["estimate", "--model", "llama-7b", "--gpu", "h100-sxm", "--gpus", "8", "--zero3", "-f",
                 "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    t = d["throughput"]
    assert t["tokens_per_s"] > 0 and 0 < t["mfu"] <= t["utilization"] and t["step_s"] >= t["compute_s"]
    assert main(["estimate", "--model", "llama-7b", "--gpu", "h100-sxm"]) == 0
    assert "tokens/s per GPU" in capsys.readouterr().out
    assert main(["estimate", "--model", "llama-7b", "-f", "json"]) == 0
    assert "throughput" not in json.loads(capsys.readouterr().out)
    import memplan

    assert memplan.estimate("llama-7b", gpu="a100-80gb").throughput["tokens_per_s"] > 0
    assert memplan.estimate("llama-7b").throughput is None


def test_design_card_command_does_no_throughput_work():
    code = ("import sys; from memplan.cli import main; main(['estimate', '--model', 'llama-7b', '--adam', "
            "'--bf16', '--zero3']); print(sorted(m for m in ('memplan.estimate.throughput', "
            "'memplan.measure.utilization', 'memplan.estimate.flops', 'pandas', 'plotly', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_every_gpu_profile_has_a_sourced_host_link_and_says_what_it_knows_between_nodes():
    # every figure names its source beside it; a profile without a multi-node reference system says so
    for path in sorted((ROOT / "profiles" / "gpus").glob("*.toml")):
        g = resolve_gpu(path.stem)
        lines = {ln.split("=")[0].strip(): ln for ln in path.read_text().splitlines()}
        assert g.host_link_gbs > 0 and "#" in lines["host_link_gbs"], path.name
        if g.inter_node_gbs:
            assert "#" in lines["inter_node_gbs"] and g.inter_node_gbs <= g.interconnect_gbs, path.name
        else:
            assert any(k.startswith("# inter_node_gbs: unknown") for k in lines), path.name
