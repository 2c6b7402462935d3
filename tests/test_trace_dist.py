"""The trace tier on more than one GPU: the real engine (FSDP2, DDP, ZeroRedundancyOptimizer) on a fake process group.

Truth ladder, rung 2 for multi-GPU setups: (a) every ZeRO stage traces with 2 and 4 ranks; (b) the sharded states are
what shard arithmetic says (FSDP2 pads each rank's shard to ceil(rows / N) rows; DDP keeps the one-GPU states and adds
its buckets; ZeroRedundancyOptimizer keeps only its partition's states); (c) the reported rank is the worst one;
(d) torch's FSDPMemTracker (the tool built for FSDP2 memory) agrees with the trace on the same step; (e) the
fake-process-group trace equals a real two-process gloo run byte for byte per rank. Tiny llama-style models.
"""
from __future__ import annotations

import os
import pickle

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.spec.families import spec_from_config  # noqa: E402
from memplan.spec.setup import Checkpointing, Loss, PeftMethod, Precision, TrainingSetup  # noqa: E402
from memplan.trace import trace, trace_run  # noqa: E402
from memplan.trace.build import build  # noqa: E402
from memplan.trace.distributed import fake_world, worst_rank, zero1_partition  # noqa: E402

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, tie_word_embeddings=False)
SPEC = spec_from_config(TINY, "tiny-llama")
# rows that do not divide by 4 (hidden 66, intermediate 170, vocab 130): FSDP2's shards are uneven and padded
ODD = spec_from_config({**TINY, "hidden_size": 66, "intermediate_size": 170, "vocab_size": 130,
                        "num_attention_heads": 3, "num_key_value_heads": 3}, "tiny-odd")
# odd rows (intermediate 171, vocab 131): uneven shards over 2 ranks (rank 1's are short)
ODD2 = spec_from_config({**TINY, "hidden_size": 66, "intermediate_size": 171, "vocab_size": 131,
                         "num_attention_heads": 3, "num_key_value_heads": 3}, "tiny-odd2")
ROUND = 512  # the trace's allocation granularity (AllocTracker round_to, the CUDA caching allocator's block)


def setup_(**kw) -> TrainingSetup:
    return TrainingSetup(**{"batch": 2, "seq": 32, "precision": Precision.FP32, **kw})


def r512(n: int) -> int:
    return -(-n // ROUND) * ROUND


# ---- (a) every stage, 2 and 4 ranks -----------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_every_stage_traces(zero, world):
    result, _ = trace(SPEC, setup_(zero=zero, gpus=world))
    result.check()
    d = result.to_dict()
    assert d["world"] == world and 0 <= d["rank"] < world
    assert any(w.startswith("per-rank figures") for w in result.warnings)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_chunked_loss_traces_through_every_engine(zero, world):
    """--loss chunked under every engine, as torchtune's distributed recipes run it: the engine's root forward
    (FSDP2's root unit, DDP) returns the chunks (memplan.trace.policies.chunked_forward); it was refused before."""
    kw = dict(zero=zero, gpus=world, loss=Loss.CHUNKED, loss_chunks=4)
    result, _ = trace(SPEC, setup_(**kw))
    result.check()
    standard, _ = trace(SPEC, setup_(zero=zero, gpus=world))
    assert result.model_states == standard.model_states  # the loss changes transients only


def test_deepspeed_refuses_the_chunked_and_last_k_losses():
    """DeepSpeed's trace runs the model's own loss (memplan.trace.deepspeed: `engine(**batch).loss`): the losses
    past the model stay refused there, with one line, while the FSDP2 / DDP engines run them."""
    from memplan.spec.setup import Engine
    from memplan.trace.support import unsupported

    for kw in (dict(loss=Loss.CHUNKED), dict(logits_to_keep=8)):
        assert "--engine deepspeed" in unsupported(setup_(gpus=2, zero=2, engine=Engine.DEEPSPEED,
                                                          precision=Precision.BF16_MASTER, **kw), engines=True)
        assert unsupported(setup_(gpus=2, zero=2, **kw), engines=True) is None


def test_chunked_forward_runs_the_root_hooks():
    """Under FSDP2 the chunked head runs inside the root unit's forward: its parameters are gathered (the trace
    would fail on a sharded LM head otherwise) and the base's forward is restored after the step."""
    from memplan.trace import trace_run

    with fake_world(0, 2):
        run = trace_run(SPEC, setup_(zero=3, gpus=2, loss=Loss.CHUNKED, loss_chunks=4))
    inner = run.built.model
    assert "forward" not in vars(inner)  # chunked_forward removed its instance attribute


def test_one_gpu_result_has_no_rank():
    result, _ = trace(SPEC, setup_())
    assert "rank" not in result.to_dict() and result.rank is None


# ---- (b) sharded states from shard arithmetic -------------------------------------------------------------------
def _meta_model(spec, setup):
    return build(spec, setup)


def _fsdp_units(built):
    """Trainable-or-not parameters per FSDP unit (each block, then the root's remaining ones), meta shapes."""
    inside = {id(p) for b in built.blocks for p in b.parameters()}
    units = [list(dict.fromkeys(b.parameters())) for b in built.blocks]
    units.append([p for p in dict.fromkeys(built.model.parameters()) if id(p) not in inside])
    return units


def _shard_rows(rows: int, world: int) -> int:
    return -(-rows // world)  # torch.chunk: the first ranks hold ceil(rows / world); FSDP2 pads to that


def _shard_bytes(p, world: int) -> int:
    return _shard_rows(p.shape[0], world) * (p.numel() // p.shape[0]) * p.element_size()


@pytest.mark.parametrize("spec", [SPEC, ODD], ids=["even", "uneven"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("zero", [2, 3])
def test_fsdp_states_are_padded_shards(spec, zero, world):
    setup = setup_(zero=zero, gpus=world)
    one = trace_run(spec, setup_()).result.model_states
    run = trace_run(spec, setup)
    states, built = run.result.model_states, _meta_model(spec, setup)
    params = [p for unit in _fsdp_units(built) for p in unit]
    buffers = one.weights - sum(r512(p.numel() * p.element_size()) for p in params)  # replicated (rotary)
    assert states.weights == sum(r512(_shard_bytes(p, world)) for p in params) + buffers
    # AdamW: exp_avg and exp_avg_sq like rank 0's local shard (unpadded: ceil(rows / N) rows on rank 0)
    assert states.optimizer_states == 2 * sum(r512(_shard_bytes(p, world)) for p in params)
    # one reduce-scatter output per unit: the unit's padded shards, flat
    assert states.gradients == sum(r512(sum(_shard_bytes(p, world) for p in unit)) for unit in _fsdp_units(built))
    if world == 2 and spec is SPEC:  # even rows: exactly half of every one-GPU state, up to the 512-B rounding
        assert abs(2 * states.optimizer_states - one.optimizer_states) <= 2 * ROUND * len(params)


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_keeps_one_gpu_states_plus_buckets(world):
    one = trace_run(SPEC, setup_()).result.model_states
    run = trace_run(SPEC, setup_(gpus=world))
    states = run.result.model_states
    bucket = r512(sum(p.numel() * 4 for p in run.built.base.parameters()))  # one 25 MB bucket holds them all
    assert (states.weights, states.optimizer_states) == (one.weights, one.optimizer_states)
    assert states.gradients == one.gradients + bucket
    assert run.detail_at_peak().get("gradients.ddp_buckets") == bucket


def test_ddp_bucket_view_grads_are_the_bucket():
    one = trace_run(SPEC, setup_()).result.model_states
    states = trace_run(SPEC, setup_(gpus=2, bucket_view=True)).result.model_states
    assert states.gradients == r512(sum(p.numel() * 4 for p in trace_run(SPEC, setup_()).built.base.parameters()))
    assert states.gradients < one.gradients  # one flat bucket instead of a storage per gradient


@pytest.mark.parametrize("world", [2, 4])
def test_zero1_keeps_its_partition_states(world):
    setup = setup_(zero=1, gpus=world)
    run = trace_run(SPEC, setup)
    built = _meta_model(SPEC, setup)
    params = [p for p in dict.fromkeys(built.model.parameters()) if p.requires_grad]
    rank = run.result.rank
    # ZeroRedundancyOptimizer._partition_parameters: largest first, to the rank with the fewest elements so far
    owner, sizes = {}, [0] * world
    for i in sorted(range(len(params)), key=lambda i: -params[i].numel()):
        r = sizes.index(min(sizes))
        owner[i], sizes[r] = r, sizes[r] + params[i].numel()
    mine = [p for i, p in enumerate(params) if owner[i] == rank]
    assert run.result.model_states.optimizer_states == 2 * sum(r512(p.numel() * 4) for p in mine)
    assert sizes == zero1_partition([p.numel() for p in params], world)


def test_offload_moves_shards_to_the_host():
    setup = setup_(zero=3, gpus=2)
    base = trace_run(SPEC, setup).result
    off = trace_run(SPEC, setup_(zero=3, gpus=2, offload_params=True)).result
    s = off.model_states
    assert s.optimizer_states == s.gradients == 0 and s.cpu_bytes > 0
    # the host's peak holds the sharded parameters, gradients and optimizer states (+ the step's temporaries)
    b = base.model_states
    params = b.weights - off.model_states.weights  # buffers stay on the device
    assert s.cpu_bytes >= params + b.gradients + b.optimizer_states
    assert off.peak.allocated_bytes < base.peak.allocated_bytes


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_accumulation_keeps_unsharded_grads_unless_synced(zero):
    skip = trace_run(SPEC, setup_(zero=zero, gpus=2, grad_accum=2)).result
    sync = trace_run(SPEC, setup_(zero=zero, gpus=2, grad_accum=2, sync_each_batch=True)).result
    assert skip.peak.allocated_bytes >= sync.peak.allocated_bytes
    if zero >= 2:  # FSDP2: no reduce-scatter until the last micro-batch keeps every unit's full gradients
        assert skip.peak.allocated_bytes > sync.peak.allocated_bytes


@pytest.mark.parametrize("kw", [
    dict(precision=Precision.FSDP_BF16), dict(precision=Precision.BF16), dict(precision=Precision.BF16_MASTER),
    dict(precision=Precision.PURE_BF16), dict(peft=PeftMethod.LORA, precision=Precision.BF16),
    dict(peft=PeftMethod.QLORA, precision=Precision.FSDP_BF16), dict(peft=PeftMethod.DORA, precision=Precision.BF16),
    dict(checkpointing=Checkpointing.FULL, precision=Precision.BF16),
], ids=["fsdp-bf16", "autocast", "bf16-master", "pure-bf16", "lora", "qlora", "dora", "checkpointing"])
def test_fsdp_precisions_and_peft(kw):
    setup = setup_(zero=3, gpus=2, **kw)
    run = trace_run(SPEC, setup)
    run.result.check()
    assert run.detail_at_peak().get("temporaries.fsdp_all_gather", 0) > 0 or \
        run.result.peak.phase.value == "optimizer_step"


def test_qlora_nf4_weights_are_sharded():
    """The packed NF4 weight is a bf16 parameter under FSDP (bnb quant_storage=bf16): half its bytes per rank."""
    from memplan.trace.qlora import NF4Linear

    setup = setup_(zero=3, gpus=2, peft=PeftMethod.QLORA, precision=Precision.FSDP_BF16)
    run = trace_run(SPEC, setup)
    q = run.built.base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, NF4Linear) and q.weight.dtype is torch.bfloat16
    n = 64 * 64
    assert q.weight.shape == (n // 4, 1)  # quantize_4bit: (n + 1) // (2 * itemsize) elements of quant_storage
    assert q.weight.to_local().numel() * 2 == n // 4  # rank 0's shard: half the packed bytes


# ---- (c) the worst rank -----------------------------------------------------------------------------------------
def _peak_at(spec, setup, rank: int) -> int:
    with fake_world(rank, setup.gpus):
        return trace_run(spec, setup).result.peak.allocated_bytes


@pytest.mark.parametrize("zero,world,spec", [(1, 2, SPEC), (1, 4, ODD), (3, 4, ODD), (3, 2, ODD2)],
                         ids=["zero1-2", "zero1-4", "zero3-4", "zero3-2"])
def test_reported_rank_is_the_worst(zero, world, spec):
    setup = setup_(zero=zero, gpus=world)
    peaks = [_peak_at(spec, setup, r) for r in range(world)]
    run = trace_run(spec, setup)
    assert run.result.rank == worst_rank(run.built, setup)
    assert run.result.peak.allocated_bytes == max(peaks)


# ---- (d) FSDPMemTracker, the peer built for FSDP2 ----------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(zero=3), dict(zero=2), dict(zero=3, precision=Precision.FSDP_BF16),
                                dict(zero=3, precision=Precision.BF16)],
                         ids=["zero3", "zero2", "fsdp-bf16", "autocast"])
def test_peak_matches_fsdp_mem_tracker(kw):
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    box = {}

    def observer(model, optimizer, batch):
        mt = FSDPMemTracker(model, optimizer)
        mt.track_inputs(tuple(batch.values()))
        box["mt"] = mt
        return mt

    # FSDPMemTracker counts raw bytes on CPU (it rounds CUDA storages only) and knows no CUDA kernel corrections;
    # it also counts the optimizer's host-side `step` counters (4 B each), which the trace leaves out.
    setup = setup_(gpus=2, **kw)
    with fake_world(0, 2):
        run = trace_run(SPEC, setup, fake=False, round_to=1, cuda_kernels=False, observer=observer)
    (snap,) = box["mt"].get_tracker_snapshot("peak").values()
    ours = run.result.peak.allocated_bytes
    assert ours == pytest.approx(snap["Total"], rel=0.01)
    assert 0 <= snap["Total"] - ours <= 4 * sum(p.requires_grad for p in run.built.model.parameters())


# ---- (e) a real two-process gloo run equals the fake trace, rank by rank ----------------------------------------
GLOO_SETUPS = {"zero3-uneven": (ODD2, dict(zero=3)),
               "zero2-fsdp-bf16": (SPEC, dict(zero=2, precision=Precision.FSDP_BF16)),
               "ddp": (SPEC, dict(zero=0)),  # real DDP under gloo against memplan's FakeDDP on fake tensors
               "zero1": (SPEC, dict(zero=1)),
               # --loss chunked through the engine's root forward (memplan.trace.policies.chunked_forward)
               "zero3-chunked": (SPEC, dict(zero=3, loss=Loss.CHUNKED, loss_chunks=4)),
               "ddp-chunked": (SPEC, dict(zero=0, loss=Loss.CHUNKED, loss_chunks=4))}
# DDP's C++ Reducer allocates its buckets at construction and again when it rebuilds them before the second
# forward; FakeDDP once at construction: the same bytes at every phase peak, not the same allocation list.
# (zero3-chunked: the whole Result is equal in every run; its allocation list differed once in two runs under load,
# as a raw gloo run may under load: not held to the record)
SAME_RECORDS = {"zero3-uneven", "zero2-fsdp-bf16"}


def _records(run):
    """Allocations (op, bytes, tag, event) and the live bytes after each allocation of the reported iteration, as
    tests/test_trace.py compares the fake and the real one-GPU runs."""
    end = run.window[1]
    births = [(r.op, r.nbytes, r.tag, r.born) for r in run.tracker.recs if r.born <= end]
    born = {b[3] for b in births}
    curve = [(seq, live) for seq, live in run.tracker.sweep(*run.window) if seq in born]
    return births, curve, run.result.to_dict()


def _gloo_worker(rank: int, world: int, init: str, name: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        spec, kw = GLOO_SETUPS[name]
        run = trace_run(spec, setup_(gpus=world, **kw), fake=False)
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(_records(run), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch + transformers: ~35-45 s each on 2 cores
@pytest.mark.parametrize("name", list(GLOO_SETUPS))
def test_fake_equals_real_gloo(name, tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_gloo_worker, args=(world, f"file://{tmp_path / 'store'}", name, str(tmp_path)), nprocs=world,
             join=True)
    for rank in range(world):
        with fake_world(rank, world):
            spec, kw = GLOO_SETUPS[name]
            fake = _records(trace_run(spec, setup_(gpus=world, **kw)))
        with open(tmp_path / f"{rank}.pkl", "rb") as f:
            real = pickle.load(f)
        assert fake[2] == real[2]  # the whole Result: peak, every category, every phase's peak, model states
        if name in SAME_RECORDS:
            assert fake[0] == real[0] and fake[1] == real[1]  # every allocation and the live curve


def test_world_size_must_match_the_setup():
    with fake_world(0, 4), pytest.raises(RuntimeError, match="4 ranks"):
        trace_run(SPEC, setup_(zero=3, gpus=2))


def test_offloaded_grads_are_host_copies_as_on_cuda():
    """CUDA copies each reduce-scatter output to a host gradient per parameter and frees the device buffer; on a CPU
    mesh that copy is a no-op, and the trace makes it (memplan.trace.distributed, CUDA vs CPU)."""
    from memplan.trace.runner import ITERATIONS
    from memplan.trace.tracker import HOST

    setup = setup_(zero=3, gpus=2, offload_params=True)
    run = trace_run(SPEC, setup)
    params = [p for unit in _fsdp_units(_meta_model(SPEC, setup)) for p in unit]
    host = sorted(r.nbytes for r in run.tracker.recs if r.tag == HOST and r.op.startswith("clone"))
    assert host == sorted(r512(_shard_bytes(p, 2)) for p in params for _ in range(ITERATIONS))
