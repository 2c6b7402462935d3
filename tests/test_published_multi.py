"""Published multi-GPU runs re-scored (issue 11): torchtitan's FSDP2 Llama 3.1 8B and Answer.AI's FSDP + LoRA.

Every published figure, its setup and its source are in tests/data/published.toml (docs/published.md); the
reconciliation, term by term, is docs/multi-gpu.md "Published runs". Both sources report reserved memory after the
whole run (the caching allocator's high-water mark); Answer.AI also gives the allocated peak of two runs.
"""
from __future__ import annotations

import pytest

from memplan.api import make_setup
from memplan.estimate import estimate_spec, pools
from memplan.estimate.overhead import Overhead
from memplan.estimate.phases import parameters
from memplan.estimate.weights import ADAPTER_BYTES, fsdp_units
from memplan.profiles import load_model
from memplan.units import GiB
from published import PUBLISHED

TT = PUBLISHED["torchtitan_fsdp_memory"]
TT_RUNS = [(8, TT["llama_3_1_8b_8_gpus"]), (128, TT["llama_3_1_8b_128_gpus"])]
BARS = PUBLISHED["accuracy_bars"]


def torchtitan_setup(gpus: int, ckpt: str = "op-selective"):
    # [torchtitan_fsdp_memory] config: FSDP2 over every rank, MixedPrecisionPolicy(bf16, fp32), local batch 2 × 8192
    return make_setup(gpus=gpus, zero=3, precision="fsdp-bf16", batch=2, seq=8192, checkpointing=ckpt,
                      attention="sdpa")


@pytest.fixture(scope="module")
def llama31():
    return load_model("llama-3.1-8b")


@pytest.mark.parametrize("gpus, published", TT_RUNS)
def test_torchtitan_between_full_and_no_checkpointing(llama31, gpus, published):
    """Op-level SAC keeps more than full AC and less than none: the published reserved peak lies between memplan's
    two bounds at both GPU counts."""
    def reserved(ckpt):
        return pools.roomy_reserved(llama31, estimate_spec(llama31, torchtitan_setup(gpus, ckpt)))

    assert reserved("full") < published * GiB < reserved("none")


def implied_fragmentation(model, gpus: int, published_gib: float) -> float:
    """The default stream's fragmentation the published reserved figure implies once memplan's other terms are
    taken out: its allocated peak plus torchtitan's unresharded last block ([torchtitan_fsdp_memory]
    last_block_unresharded: its gathered parameters are alive at the loss, where memplan's peak is), the side-stream
    pools (memplan.estimate.pools) and the cuBLAS workspace."""
    setup = torchtitan_setup(gpus)
    r = estimate_spec(model, setup)
    u = parameters(model, setup).unsharded
    _root, block, _ = fsdp_units(u, setup)
    default = r.peak.allocated_bytes + TT["last_block_unresharded"] * block.gathered
    side = pools.roomy_reserved(model, r) - r.peak.reserved_bytes
    return (published_gib * GiB - Overhead().cublas_workspace - side) / default - 1


def test_torchtitan_one_fragmentation_explains_both_gpu_counts(llama31):
    """The published peaks differ by 15.4 GiB between 8 and 128 GPUs, more than memplan's allocated peaks do: FSDP2's
    reduce-scatter stream keeps every sharded gradient reserved (14× larger on 8 GPUs than on 128) where the default
    stream cannot reuse it. With the side-stream pools counted, one fragmentation of the default stream explains both
    runs: the implied fractions agree within 1 percentage point (10.7% and 11.1%; without the pools they would be
    14.4% and 19.3%, 4.9 points apart)."""
    (n1, p1), (n2, p2) = TT_RUNS
    f1, f2 = implied_fragmentation(llama31, n1, p1), implied_fragmentation(llama31, n2, p2)
    assert abs(f1 - f2) <= 0.01, (f1, f2)
    assert f1 > Overhead().fragmentation and f2 > Overhead().fragmentation  # memplan's 5% (an assumption) is low here


@pytest.mark.parametrize("gpus, published", TT_RUNS)
def test_torchtitan_reserved_peak(llama31, gpus, published):
    """What memory_reserved() reports on a GPU with room (pools.roomy_reserved: the estimate's reserved level plus
    FSDP2's side-stream pools) is 5.6% under both published peaks; the estimate's reserved level alone is 12.5% /
    8.9% under. The remainder is the default stream's fragmentation beyond memplan's assumed 5% (see the test above)
    and torchtitan's unresharded last block (0.41 GiB); held within 6.5%, which the remainder (5.6%) fits."""
    r = estimate_spec(llama31, torchtitan_setup(gpus))
    assert -0.065 <= pools.roomy_reserved(llama31, r) / GiB / published - 1 < 0
    assert r.peak.reserved_bytes < pools.roomy_reserved(llama31, r)  # the pools are not in the fit verdict


# --- Answer.AI fsdp_qlora, Llama-2-7B LoRA on 2 × RTX 3090 ---------------------------------------------------------

AA = PUBLISHED["answerai_fsdp_lora_7b_allocated"]
# peft of February-March 2024 (v0.10, the README's install) gives the LoRA layers their base layer's dtype:
# peft/tuners/lora/layer.py LoraLayer.update_layer, `self.to(weight.device, dtype=weight.dtype)` (bf16 here); the
# fp32 upcast memplan follows (weights.ADAPTER_BYTES, peft's autocast_adapter_dtype=True) arrived with peft PR 1706
# (2024-05-16), first released in peft 0.12.0.
PEFT_2024_ADAPTER_BYTES = 2
ADAM_STATES = 2  # torch AdamW: exp_avg and exp_avg_sq, in the parameter's dtype


def answerai_setup(seq: int):
    return make_setup(gpus=AA["gpus"], zero=3, precision="pure-bf16", peft="lora", lora_rank=AA["lora_rank"],
                      lora_alpha=AA["lora_alpha"], lora_targets=tuple(AA["lora_targets"]), checkpointing="full",
                      ckpt_reentrant=True, batch=1, seq=seq, attention="sdpa")


@pytest.mark.parametrize("i", range(len(AA["seq"])))
def test_answerai_lora_7b_allocated_peak(i):
    """The two runs whose allocated peak is published: memplan's allocated peak, with the adapters in bf16 as the
    peft of the time made them (their weights and AdamW states: trainable × 2 B × 3 fewer bytes over the 2 GPUs),
    within LLMem's multi-GPU bar ([accuracy_bars] llmem_multi_gpu_error, 3%). The run is FSDP1 (flat parameters,
    per-LoRA-linear units), which memplan does not model: the bar is the check that FSDP2's per-rank terms carry
    over."""
    seq, published = AA["seq"][i], AA["peak_allocated_gib"][i]
    r = estimate_spec(load_model("llama-2-7b"), answerai_setup(seq))
    adapters = r.trainable_params * (ADAPTER_BYTES - PEFT_2024_ADAPTER_BYTES) * (1 + ADAM_STATES) // AA["gpus"]
    got = (r.peak.allocated_bytes - adapters) / GiB
    assert abs(got / published - 1) <= BARS["llmem_multi_gpu_error"], (got, published)


# --- the side-stream pools themselves (memplan.estimate.pools) -----------------------------------------------------

POOL_MODEL = "llama-3.2-1b"  # tied embeddings: the root unit is one 128256 × 2048 table


def pools_of(**kw):
    model = load_model(POOL_MODEL)
    setup = make_setup(seq=256, **kw)
    return model, estimate_spec(model, setup), pools.side_pools(parameters(model, setup).unsharded, setup)


@pytest.mark.parametrize("kw", [dict(gpus=8, zero=3, precision="fsdp-bf16"), dict(gpus=4, zero=2),
                                dict(gpus=2, zero=3, peft="lora"), dict(gpus=2, zero=3, peft="qlora"),
                                dict(gpus=4, zero=3, peft="freeze", train_layers=2)])
def test_reduce_scatter_pool_is_the_sharded_gradients(kw):
    """The reduce-scatter pool (summed over fsdp_units' reduce-scatter outputs) is the per-rank sharded gradient
    bytes the model states count by another path (weights.fsdp_states), and the all-gather pool is the root's flat
    output, the embedding table in the gathered dtype (4 B: fp32 shards; 2 B: MixedPrecisionPolicy's bf16)."""
    model, r, sp = pools_of(**kw)
    assert sp.reduce_scatter == r.model_states.gradients > 0
    gathered = 2 if kw.get("precision") == "fsdp-bf16" else 4
    assert sp.all_gather == pytest.approx(model.vocab * model.hidden * gathered, rel=1e-3)


def test_offloaded_gradients_leave_one_unit_in_the_pool():
    """CPUOffloadPolicy copies each reduce-scatter output to the host and frees it: the pool keeps the largest
    unit's, and no sharded gradient stays on the GPU."""
    _, r, sp = pools_of(gpus=4, zero=3, offload_params=True)
    _, _, kept = pools_of(gpus=4, zero=3)
    assert r.model_states.gradients == 0 < sp.reduce_scatter < kept.reduce_scatter


@pytest.mark.parametrize("kw", [dict(gpus=4, zero=1), dict(gpus=4, zero=0), dict(gpus=1, zero=3),
                                dict(gpus=4, zero=3, engine="deepspeed", precision="bf16-master")])
def test_no_side_pools_without_fsdp2(kw):
    """DDP (ZeRO-0 / 1), one GPU and DeepSpeed allocate no FSDP2 side-stream buffers: the roomy reserved level is
    the estimate's own."""
    model, r, sp = pools_of(**kw)
    assert sp == pools.NO_POOLS and pools.roomy_reserved(model, r) == r.peak.reserved_bytes
