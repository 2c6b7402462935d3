"""DeepSpeed ZeRO 1 / 2 / 3 (--engine deepspeed) in the trace: DeepSpeed 0.19.8's own engine, one rank of an
N-rank job on a fake process group, on REAL CPU tensors.

What runs: `deepspeed.initialize` over memplan's model (memplan.trace.build, with its peft adapters and activation
checkpointing), materialized with real values, on the fake process group of torch.testing (backend "fake",
FakeStore: every collective returns at once and writes nothing), with DeepSpeed's CPU accelerator
(DS_ACCELERATOR=cpu). Then the engine's forward, `engine.backward` and `engine.step` for ITERATIONS steps under
memplan's AllocTracker; the last step is reported (DeepSpeed records its stage-3 module trace in the first).

Why real tensors, not FakeTensorMode: DeepSpeed's ZeRO builds its flat partitions by real `.data` swaps
(stage3.py _create_fp16_partitions_with_defragmentation reads `param.partition_numel()`, which its Init conversion
attaches to the parameter objects; under FakeTensorMode the parameters it converted are not the ones the optimizer
sees, and `_create_fp16_sub_groups` fails with "'Parameter' object has no attribute 'partition_numel'"). With real
tensors the whole engine runs unchanged, so the trace is limited to models whose one rank fits in host RAM
(MAX_PARAMS) and takes the CPU's time for one real step of that model.

The patches (`patched`), each replacing one DeepSpeed function that does not allocate a byte of the step:
  deepspeed/comm/torch.py build_shm_op   JIT-builds (ninja + a C++ compiler) and initializes the CPU accelerator's
                                         shared-memory all-reduce, which waits on shared-memory flags of the peer
                                         ranks a fake group does not have (the process hangs in
                                         TorchBackend.__init__). It serves inference_all_reduce only; returning None
                                         is DeepSpeed's own "no shm op" path (torch.distributed collectives).
  deepspeed/runtime/zero/utils.py        assert_ints_same_as_other_ranks (stage 3's check that every rank traced
                                         the same modules): a fake broadcast leaves -1 on ranks > 0; `same_as_rank0`
                                         makes the same two small tensors and skips the comparison.
  deepspeed/utils/groups.py, comm/comm.py   module-level process groups and backend, reset after each trace (a
                                         later trace runs on a new fake group).
  torch.nn.functional.linear             stage 3 replaces it with its memory-efficient linear for the rest of the
                                         process (partition_parameters.py _enable_mem_efficient_linear); it runs
                                         in this trace, as on a GPU, and torch's own is put back after it.

Against a real two-process gloo run of the same step under the same tracker (tests/deepspeed_cpu.py): equal to the
byte at every phase peak at stage 1 and 2, and at stage 3 but for the backward's peak, where gloo allocates
staging copies inside the reduce-scatter that the fake backend does not (docs/deepspeed.md). The trace leaves
collectives' internal allocations out (memplan.trace.distributed.COLLECTIVES, as under FSDP): NCCL's buffers are
outside the CUDA caching allocator.

Tags: DeepSpeed's flat half-precision weights (stage 1/2 `bit16_groups_flat`, stage 3 `fp16_partitioned_groups_flat`)
and the frozen parameters = weights; the fp32 master partitions = master_weights; the gradient partitions
(`grads_in_partition`, `grad_partitions_flat_buffer`), parameters' `.grad` and the fp32 gradient the optimizer
steps = gradients; the optimizer's states = optimizer_states; stage 3's gathered parameters
(fetch_sub_module) = temporaries.fsdp_all_gather; everything else a temporary until autograd saves it.
Ranks: DeepSpeed pads every rank's flat partition to the same size (stage_1_and_2.py
get_data_parallel_partitions: equal slices of a buffer padded to a multiple of the world size; stage 3 partitions
each parameter in ceil(numel / N) slices), so the model states are alike, but the backward is not: at stage 1/2 the
gradients a rank reduces into its partition, and the moment it does, depend on where its slice lies (measured on
the tiny Llama, world 2: rank 1's stage-2 backward peak is 3.4 % above rank 0's, rank 0's stage-1 one 7.9 % above
rank 1's). `trace_ranks` traces the first and the last rank and reports the larger peak.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
import sys
from typing import Iterator

import torch

from memplan.categories import Phase
from memplan.errors import MemplanError
from memplan.estimate.deepspeed import TRACE_MAX_PARAMS
from memplan.spec.setup import Precision, TrainingSetup
from memplan.trace.support import deepspeed_unsupported
from memplan.trace.tracker import ALL_GATHER, G, INPUT, MW, OS, W, AllocTracker

ITERATIONS = 3  # DeepSpeed's stage 3 records its module trace in step 1 and prefetches from step 2 on
# real tensors: one rank's model, fp32 init and states in host RAM (~16 B/param at worst); the one figure the estimate's
# coverage line and measure's CPU check read too
MAX_PARAMS = TRACE_MAX_PARAMS
COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "broadcast", "all_gather",
               "reduce_scatter", "all_to_all_single", "barrier")
NOTE = ("DeepSpeed 0.19.8 traced on real CPU tensors over a fake process group (memplan.trace.deepspeed): one rank "
        "of the job; collectives' own buffers not counted")


def ds_config(setup: TrainingSetup) -> dict:
    """The DeepSpeed config a user of `setup` writes (memplan.configfile.deepspeed reads the same keys)."""
    zero = {"stage": setup.zero, "reduce_bucket_size": setup.ds_reduce_bucket_size,
            "allgather_bucket_size": setup.ds_allgather_bucket_size,
            "stage3_prefetch_bucket_size": setup.ds_prefetch_bucket_size,
            "stage3_max_live_parameters": setup.ds_max_live_parameters,
            "stage3_max_reuse_distance": setup.ds_max_reuse_distance,
            "stage3_param_persistence_threshold": setup.ds_param_persistence_threshold,
            "sub_group_size": setup.ds_sub_group_size, "contiguous_gradients": setup.ds_contiguous_gradients}
    if setup.ds_overlap_comm is not None:
        zero["overlap_comm"] = setup.ds_overlap_comm
    # ZeRO-Offload / ZeRO-Infinity to the host (the trace refuses offload: memplan.trace.support; the CUDA measure
    # runs it, memplan.measure.deepspeed): pinned host buffers, DeepSpeed's own default (runtime/zero/
    # offload_config.py DeepSpeedZeroOffloadOptimizerConfig / ...ParamConfig pin_memory=False) is what a config that
    # names only the device gets; the HF / accelerate examples (ds_config_zero3.json) set pin_memory true
    if setup.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if setup.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": setup.batch, "gradient_accumulation_steps": setup.grad_accum,
            "bf16": {"enabled": setup.precision is Precision.BF16_MASTER},
            "fp16": {"enabled": setup.precision is Precision.FP16_MASTER},
            "zero_allow_untested_optimizer": True, "zero_optimization": zero, "steps_per_print": 10**9}


def import_deepspeed(accelerator: str = "cpu"):
    """deepspeed on the CPU accelerator (the CUDA one for a GPU measurement: memplan.measure.deepspeed; DeepSpeed
    picks its accelerator once, at its first import, from DS_ACCELERATOR), or one line naming the extra."""
    os.environ.setdefault("DS_ACCELERATOR", accelerator)
    try:
        import deepspeed
    except ImportError:
        raise MemplanError("--engine deepspeed needs deepspeed: pip install 'memplan[deepspeed]' "
                           "(DS_BUILD_OPS=0)") from None
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    return deepspeed


# the modules that import deepspeed/runtime/zero/utils.py assert_ints_same_as_other_ranks by name
CHECKING = ("utils", "partitioned_param_coordinator", "partition_parameters", "stage3")


def same_as_rank0(ints: list) -> None:
    """deepspeed/runtime/zero/utils.py assert_ints_same_as_other_ranks: stage 3 checks that every rank traced the
    same module order by broadcasting rank 0's list (a length, then the ints) and comparing. A fake group's
    broadcast writes nothing, so a rank other than 0 reads -1 and raises. The same two int64 tensors are made here
    (the bytes of the real check), and the comparison, which a single-process trace cannot fail, is skipped."""
    torch.tensor(len(ints), dtype=int)
    torch.tensor(ints if ints else [], dtype=int)


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """The module doc's patches, undone after."""
    comm = sys.modules["deepspeed.comm.torch"]  # `import deepspeed.comm.torch` would name torch itself
    orig = comm.build_shm_op
    comm.build_shm_op = lambda: None
    # DeepSpeed keeps its process groups (deepspeed/utils/groups.py) and its backend (deepspeed/comm/comm.py cdb)
    # in module globals: a later trace runs on a new fake group, so each trace starts from what it found
    checks = [m for m in (sys.modules.get("deepspeed.runtime.zero." + n) for n in CHECKING)
              if m is not None and hasattr(m, "assert_ints_same_as_other_ranks")]
    asserts = [m.assert_ints_same_as_other_ranks for m in checks]
    for m in checks:
        m.assert_ints_same_as_other_ranks = same_as_rank0
    groups, cdb = sys.modules["deepspeed.utils.groups"], sys.modules["deepspeed.comm.comm"]
    saved = {k: v for k, v in vars(groups).items() if k.startswith("_") and k[1:2].isupper() or k == "mesh_device"}
    backend = cdb.cdb
    # stage 3's parameter conversion swaps torch.nn.functional.linear for its memory-efficient one "until manually
    # reset" (runtime/zero/partition_parameters.py _enable_mem_efficient_linear): a later stage-1/2 trace in the same
    # process would run on it (traced: +1.4 MB on a LoRA stage-2 step), so each trace leaves it as it found it
    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = linear
        comm.build_shm_op = orig
        for m, fn in zip(checks, asserts):
            m.assert_ints_same_as_other_ranks = fn
        for k, v in saved.items():
            setattr(groups, k, v.copy() if isinstance(v, dict) else v)
        cdb.cdb = backend


@contextlib.contextmanager
def gather_tagging(tracker: AllocTracker) -> Iterator[None]:
    """Stage 3: parameters gathered for a module (partitioned_param_coordinator.py fetch_sub_module) are the
    all-gather temporaries FSDP's are."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coord

    orig = Coord.fetch_sub_module

    def fetch(self, *a, **k):
        with tracker.scope(ALL_GATHER):
            return orig(self, *a, **k)
    Coord.fetch_sub_module = fetch
    try:
        yield
    finally:
        Coord.fetch_sub_module = orig


class DsTracker(AllocTracker):
    """memplan's tracker, blind to the meta device: DeepSpeed sizes its flat buffers from meta copies of the
    parameters (stage_1_and_2.py __init__: `torch.zeros_like(param.data, device="meta")`), which allocate nothing."""

    def _see(self, t, tag, op):
        return None if t.device.type == "meta" else super()._see(t, tag, op)


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


# the optimizer's attributes by tag (deepspeed/runtime/zero/stage_1_and_2.py and stage3.py __init__ / backward)
STATE_ATTRS = {W: ("bit16_groups_flat", "fp16_partitioned_groups_flat"),
               MW: ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"),
               G: ("grads_in_partition", "grad_partitions_flat_buffer", "averaged_gradients")}


def tag_engine(engine, tracker: AllocTracker) -> None:
    """Tag what DeepSpeed holds (module doc): its flat buffers, the fp32 masters' gradients, the optimizer states,
    the parameters' gradients."""
    zero = engine.optimizer
    for tag, names in STATE_ATTRS.items():
        for n in names:
            for t in _tensors(getattr(zero, n, None)):
                if t.numel():
                    tracker.track(t, tag)
    for p in engine.module.parameters():
        part = getattr(p, "ds_tensor", None)  # stage 3: the partition (frozen ones too); the gathered p is not W
        if part is not None and part.numel():
            tracker.track(part, W)
        elif part is None and p.numel():
            tracker.track(p, W)
        if p.grad is not None:
            tracker.track(p.grad, G)
    for t in (t for n in STATE_ATTRS[MW] for t in _tensors(getattr(zero, n, None))):
        if t.grad is not None:
            tracker.track(t.grad, G)
    inner = getattr(zero, "optimizer", None)
    for state in getattr(inner, "state", {}).values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                tracker.track(v, OS)


def check(setup: TrainingSetup, total_params: int) -> None:
    what = deepspeed_unsupported(setup)
    if what:
        raise MemplanError(f"{what}: not traceable yet (use `memplan estimate`)")
    if total_params > MAX_PARAMS:
        raise MemplanError(f"--engine deepspeed is traced on real CPU tensors: {total_params:,} parameters is over "
                           f"{MAX_PARAMS:,} (use `memplan estimate`)")


OFFLOAD_OPTIMIZER = {"type": "AdamW", "params": {"lr": 1e-4}}  # memplan.trace.step.OPTIMIZERS' AdamW lr


def engine_config(setup: TrainingSetup) -> dict:
    """The config deepspeed.initialize is given: ds_config, and under offload the optimizer DeepSpeed builds itself.
    ZeRO-Offload steps on the host with DeepSpeedCPUAdam, which DeepSpeed makes from the config's optimizer
    (runtime/engine.py _configure_basic_optimizer); a client torch optimizer is refused under offload
    (zero_force_ds_cpu_optimizer). CUDA only: DeepSpeedCPUAdam is a compiled op (memplan.measure.deepspeed)."""
    config = ds_config(setup)
    if setup.offload_optimizer or setup.offload_params:
        config["optimizer"] = OFFLOAD_OPTIMIZER
    return config


def open_engine(built, setup: TrainingSetup, tracker: AllocTracker, accelerator: str = "cpu"):
    """deepspeed.initialize over `built` (materialized here with real values, on the host: deepspeed.initialize
    moves it to the accelerator's device) under `tracker` (a memplan.measure.phases.Recorder on CUDA, which tags
    nothing), on the current default process group."""
    from memplan.trace.build import materialize
    from memplan.trace.step import make_optimizer

    deepspeed = import_deepspeed(accelerator)
    for t in materialize(built.model, init_values=True):
        tracker.track(t, W)
    params = [p for p in dict.fromkeys(built.model.parameters()) if p.requires_grad]
    config = engine_config(setup)
    if "optimizer" in config:  # DeepSpeed builds DeepSpeedCPUAdam (engine_config)
        engine, *_ = deepspeed.initialize(model=built.model, model_parameters=params, config=config,
                                          dist_init_required=False)
    else:
        optimizer = make_optimizer(setup.optimizer, params)  # DeepSpeed's ZeRO replaces its parameter groups
        engine, *_ = deepspeed.initialize(model=built.model, optimizer=optimizer, config=config,
                                          dist_init_required=False)
    tag_engine(engine, tracker)
    # the optimizer that steps: ZeRO's and the bf16 / fp16 wrappers keep it as .optimizer; fp32 at stage 0 (CUDA only)
    # steps the client optimizer itself
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    step = inner.step

    def tagged_step(*a, **k):  # the fp32 gradient DeepSpeed hands its optimizer is a gradient, not a temporary
        tag_engine(engine, tracker)
        return step(*a, **k)
    inner.step = tagged_step
    return engine


@contextlib.contextmanager
def rank_env(rank: int, world: int) -> Iterator[None]:
    """The launcher's variables DeepSpeed's engine reads (LOCAL_RANK for its device; RANK / WORLD_SIZE), set for
    the session and restored after."""
    keys = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_SIZE": str(world)}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def grad_tagging(engine, setup: TrainingSetup, tracker: AllocTracker) -> list:
    """Stage 1 / 2: a parameter's `.grad` that autograd made and DeepSpeed left in place is a gradient (DESIGN.md's
    vocabulary: `gradients`), from the moment autograd accumulates it. Stage 1 (partition_gradients False,
    overlap_comm False by default) keeps every `.grad` to the backward's end: stage_1_and_2.py process_gradients
    reduces in the hook only `if self.partition_gradients or self.overlap_comm`; the engine's backward then calls
    reduce_gradients, which copies them into the IPG bucket. Without this hook they were tagged only at the step
    (tag_engine), after they had died, so the trace counted them as temporaries. The hook is registered after
    DeepSpeed's own (deepspeed/utils/torch.py register_grad_hook: register_post_accumulate_grad_hook) and runs
    after it: a `.grad` DeepSpeed has already replaced by a view of its bucket (stage 2, contiguous_gradients) is
    left alone, so no bucket is retagged. A label only: no byte changes."""
    if setup.zero not in (1, 2):
        return []

    def hook(p):
        g = p.grad
        if g is not None and g._base is None and g.untyped_storage().nbytes() == g.numel() * g.element_size():
            tracker.track(g, G)
    return [p.register_post_accumulate_grad_hook(hook) for p in engine.module.parameters() if p.requires_grad]


def _save(tracker: AllocTracker):
    def pack(x):
        tracker.saved(x)
        return x
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x)


def iteration(engine, batch: dict, setup: TrainingSetup, tracker: AllocTracker) -> int:
    """One optimizer step (grad_accum micro-batches; DeepSpeed steps at the boundary); returns the event at which
    the step began."""
    for _ in range(setup.grad_accum):
        tracker.set_phase(Phase.FORWARD)
        loss = engine(**batch).loss
        tracker.set_phase(Phase.BACKWARD)
        tracker.set_mark("loss.backward")
        engine.backward(loss)
        del loss
        tracker.set_phase(Phase.OPTIMIZER_STEP)
        tag_engine(engine, tracker)  # the gradients of this micro-batch (DeepSpeed's partitions, `.grad`)
        seq = tracker.seq
        engine.step()
    return seq


@dataclass
class Traced:
    """What one rank's DeepSpeed trace leaves (memplan.trace.runner.deepspeed_run makes the Result of it)."""

    tracker: AllocTracker
    built: object
    window: tuple[int, int]  # events (start, end] of the reported step
    grads_seq: int  # event at which its optimizer step began (every gradient alive)
    backward_seq: int  # event at which its (last) backward began
    load_peak: int
    rank: int
    world: int


@dataclass
class Session:
    """An opened DeepSpeed step (session): the engine, the batch, the load's peak. Emptied at the session's end."""

    engine: object
    batch: dict | None
    load_peak: int


@contextlib.contextmanager
def session(spec, setup: TrainingSetup, built, tracker: AllocTracker) -> Iterator[Session]:
    """Everything before the first step, on the current default process group under `tracker` (entered here): the
    launcher's variables, the patches, the untracked collectives, deepspeed.initialize, the batch, the stage-3
    gather and checkpoint tags, the stage-1/2 `.grad` tags (grad_tagging), the saved-tensor hook; the engine's
    teardown after. The trace (trace_built) and the CPU measurement (memplan.measure.deepspeed) step in it alike."""
    from memplan.trace import cuda, distributed
    from memplan.trace.session import checkpoint_tagging, make_batch

    check(setup, built.total_params)
    deepspeed = import_deepspeed()
    rank, world = distributed.world()
    with contextlib.ExitStack() as stack:
        stack.enter_context(rank_env(rank, world))
        stack.enter_context(patched())
        # the CUDA step's dropout, as every other trace runs it (memplan.trace.cuda.cuda_dropout: SDPA drops out
        # in-kernel, F.dropout saves a bool mask; the CPU's math-path fallback would save s² fp32 scores)
        stack.enter_context(cuda.cuda_dropout())
        # before DeepSpeed's backend exists: TorchBackend keeps references to the collectives it will call
        stack.enter_context(distributed.untracked_collectives(tracker, COLLECTIVES))
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        stack.enter_context(tracker)
        stack.enter_context(gather_tagging(tracker))
        engine = open_engine(built, setup, tracker)
        grad_hooks = grad_tagging(engine, setup, tracker)
        batch = make_batch(spec, setup.batch, setup.seq)
        for t in batch.values():
            tracker.track(t, INPUT)
        load_peak = max(tracker.phase_peaks.get(Phase.LOAD, 0), tracker.total)
        stack.enter_context(checkpoint_tagging(built.model, tracker))
        stack.enter_context(_save(tracker))
        s = Session(engine, batch, load_peak)
        del batch
        try:
            yield s
        finally:
            for h in grad_hooks:
                h.remove()
            engine.destroy()
            s.engine = s.batch = None
            del engine


def trace_built(spec, setup: TrainingSetup, built, round_to: int = 512, marks=None) -> Traced:
    """Trace `setup` (an --engine deepspeed one) on `built` on the current default process group, the last of
    ITERATIONS steps reported. marks(built, tracker) installs region marks and returns hook handles
    (memplan.trace.runner.install_marks)."""
    from memplan.trace import distributed

    rank, world = distributed.world()
    tracker = DsTracker(round_to=round_to)
    with session(spec, setup, built, tracker) as ses:
        handles = marks(built, tracker) if marks is not None else []
        for _ in range(ITERATIONS - 1):
            iteration(ses.engine, ses.batch, setup, tracker)
            tag_engine(ses.engine, tracker)
        start = tracker.start_window()
        grads_seq = iteration(ses.engine, ses.batch, setup, tracker)
        tag_engine(ses.engine, tracker)
        end = tracker.seq
        backward_seq = max(s for s, p, m in tracker.marks if p is Phase.BACKWARD and m == "" and s <= end)
        for h in handles:
            h.remove()
    return Traced(tracker, built, (start, end), grads_seq, backward_seq, ses.load_peak, rank, world)


RANKS_NOTE = (", the larger peak of the first and the last rank (DeepSpeed's partitions are equal-sized, but which "
              "gradients each rank reduces into its partition, and when, differs by rank)")


def candidate_ranks(world: int) -> tuple[int, ...]:
    """The ranks traced when no process group is given: the first and the last, whose partitions hold the two ends
    of the flat buffers (the top of the network, reduced first, and the embeddings)."""
    return tuple(dict.fromkeys((0, world - 1)))


def trace_ranks(spec, setup: TrainingSetup, round_to: int = 512, ranks=None, marks=None) -> Traced:
    """On the caller's process group if one is initialized, else each of `ranks` (default candidate_ranks) on its
    own fake group, the larger peak kept."""
    from memplan.trace import distributed
    from memplan.trace.build import build

    if torch.distributed.is_initialized():
        return trace_built(spec, setup, build(spec, setup), round_to, marks)
    best = None
    for r in ranks if ranks is not None else candidate_ranks(setup.gpus):
        with distributed.fake_world(r, setup.gpus):
            run = trace_built(spec, setup, build(spec, setup), round_to, marks)
        if best is None or run.tracker.peak > best.tracker.peak:
            best = run
    return best
