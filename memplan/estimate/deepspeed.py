"""DeepSpeed ZeRO 1 / 2 / 3 (--engine deepspeed): the per-GPU buffers DeepSpeed 0.19.8 allocates beyond the ZeRO
paper's model states, sized from its config (TrainingSetup.ds_*, DeepSpeed's defaults) as its code allocates them.

The model states themselves are the ZeRO paper's (memplan.estimate.weights.model_states): half-precision weights
(whole at stage 1/2: `bit16_groups_flat`; a 1/N partition at stage 3: `ds_tensor`), the fp32 master partition
(`single_partition_of_fp32_groups` / `fp32_partitioned_groups_flat`), the optimizer states of that partition, and the
half-precision gradient partition (stage 2: `grads_in_partition`; stage 3: `grad_partitions_flat_buffer`). Checked
against DeepSpeed itself on the CPU (gloo, world size 2, memplan's AllocTracker; docs/deepspeed.md): the load bytes
are these to the byte.

What this module adds, each from DeepSpeed 0.19.8's source (paths under deepspeed/runtime/zero/):

  ipg bucket       stage_1_and_2.py setup_buckets(): `torch.empty(reduce_bucket_size)` in the gradient dtype when
                   contiguous_gradients, a second one when overlap_comm, from the backward's first gradient hook until
                   the backward's end (_release_ipg_buffers); stage3.py __init__: one `torch.empty(reduce_bucket_size)`
                   per parameter dtype, allocated at initialize and kept. Not capped by the model's size: a small
                   model pays the whole bucket (reduce_bucket_size = 5e8 elements -> 1 GB in bf16).
  stage-3 grads    stage3.py __init__: `grad_partitions_flat_buffer = torch.zeros(sum(partition_numel))`: the
                   gradient partition exists from initialize on (on the host, pinned, under offload_optimizer).
  persistent       stage-3 parameters under stage3_param_persistence_threshold elements are never released once
                   gathered (partition_parameters.py, ds_persist): each rank holds them whole from the first forward
                   on, beside their partition.
  gathered         partitioned_param_coordinator.py release_sub_module -> __params_to_release: a parameter is
                   kept gathered after its module's forward when the prefetcher marked it for a later step
                   (__most_recent_step_id_param_fetched_for: "reuse skipped by prefetch") or it is reused within
                   stage3_max_reuse_distance elements; with a prefetch bucket every parameter the backward fetches
                   again stays gathered into the backward, up to stage3_max_live_parameters, less what no backward
                   fetches (no_backward_fetch; gathered() below, logged on DeepSpeed itself).
  coalesced        stage 3: each prefetch is gathered into one flat buffer that lives beside the parameters' own
  prefetches       copies until the prefetch's last parameter is fetched (top_block_gathered: a state in the last
                   block's forward); the backward releases each module's parameters after its gradient, and a
                   whole-model IPG bucket is reduce-scattered once, at the backward's end (backward_low_end).
  linear inputs    stage 3's memory-efficient linear (linear.py LinearFunctionForZeroStage3) saves every nn.Linear's
                   input (saves_linear_inputs; memplan.estimate.activations.Ctx.linear_saves_input).
  one reduce       stage 1/2 whose IPG bucket holds every gradient reduce once, at the backward's end, flattening the
                   whole gradient (whole_bucket).
  grads in         stage 1/2: stage_1_and_2.py copy_grads_in_partition's flat buffer of the rank's whole tensors
  partition        (grads_in_partition below), from the first reduced bucket holding one of them to the step.
  half adapters    bf16 / fp16 enabled: engine.py _cast_module_mixed_precision casts the LoRA adapters too
                   (memplan.estimate.weights.half_adapters).
  fp32 gradient    stage_1_and_2.py step(): `flat_grad_partition.to(fp32)` for the whole partition, the half one
                   freed first; stage3.py _prepare_fp32_grad_for_sub_group(): one sub-group (sub_group_size elements)
                   at a time, the half buffer kept. On the host under offload_optimizer.
  all-gather       stage 1/2 re-gathers the updated half weights after the step with all_gather_into_tensor into the
                   flat weights themselves (runtime/utils.py all_gather_dp_groups): allgather_bucket_size sizes no
                   buffer when the backend has all_gather_into_tensor (NCCL and gloo on torch >= 2.0).

The trace runs DeepSpeed itself (memplan.trace.deepspeed, real CPU tensors, models up to 2B parameters); the
estimate's output says whether a setup is one it runs (traced-and-checked) or not (estimate-only: ZeRO-0, offload,
fp16, ...; coverage() / note(), the JSON's "deepspeed" field).
"""
from __future__ import annotations

from dataclasses import dataclass

from memplan.categories import Category as C, Phase
from memplan.estimate.optimizer import step_temporary_bytes
from memplan.estimate.params import ParamGroup, param_groups
from memplan.spec.model import ModelSpec, Role, Stack, TensorKind
from memplan.spec.setup import Engine, Fp8Recipe, Optimizer, PeftMethod, Precision, TrainingSetup
from memplan.units import round_block

SIZED = ("buffers sized from DeepSpeed 0.19.8's code and config defaults (memplan.estimate.deepspeed, "
         "docs/deepspeed.md)")
# memplan.trace.deepspeed runs DeepSpeed itself on real CPU tensors: what it runs (memplan.trace.support
# deepspeed_unsupported, MAX_PARAMS; tests/test_deepspeed.py checks the two agree). The estimate tier cannot import
# the trace tier (tools/check_imports.py), so the conditions are restated here; the size limit is defined here and
# read by the trace and by `memplan measure --device cpu` (memplan.measure.options).
TRACE_MAX_PARAMS = 2 * 10**9
TRACED_PRECISIONS = (Precision.BF16_MASTER, Precision.FP32)  # fp16: the CPU accelerator refuses it
TRACED_OPTIMIZERS = (Optimizer.ADAMW, Optimizer.ADAMW_FORLOOP, Optimizer.ADAMW_FUSED, Optimizer.SGD)


@dataclass(frozen=True)
class Coverage:
    """Whether this DeepSpeed setup's terms are checked against a trace of DeepSpeed itself, and why not."""

    checked_by_trace: bool
    reason: str  # what `memplan trace` does not run ("" when checked)


def coverage(model: ModelSpec, setup: TrainingSetup) -> Coverage:
    """Traced-and-checked (memplan trace runs DeepSpeed 0.19.8 on this setup: the estimator's terms are those its
    grids check, reports/estimate_vs_trace_deepspeed*.md) or estimate-only, with the reason."""
    from memplan.estimate.lengths import shaped

    if setup.zero == 0:
        why = "ZeRO-0 (DeepSpeed's stage 0 is plain data parallelism)"
    elif setup.offload_params or setup.offload_optimizer:
        why = "offload (DeepSpeedCPUAdam is a compiled op)"
    elif setup.precision not in TRACED_PRECISIONS:
        why = f"--precision {setup.precision.value} (DeepSpeed's CPU accelerator refuses fp16)"
    elif setup.optimizer not in TRACED_OPTIMIZERS:
        why = f"--optimizer {setup.optimizer.value} (traced: AdamW and SGD)"
    elif shaped(setup):
        why = "--lengths / --packing"
    elif (setup.peft is PeftMethod.QLORA or setup.teacher or setup.offload_activations
          or setup.fp8 is not Fp8Recipe.NONE):
        why = "QLoRA, --teacher, --offload-activations or --fp8"
    elif model.total_params > TRACE_MAX_PARAMS:
        why = f"{model.total_params:,} parameters (the trace runs real CPU tensors: up to {TRACE_MAX_PARAMS:,})"
    else:
        return Coverage(True, "")
    return Coverage(False, why)


def note(model: ModelSpec, setup: TrainingSetup) -> str:
    """The estimate's one line on where its DeepSpeed terms come from (traced-and-checked or estimate-only)."""
    c = coverage(model, setup)
    if c.checked_by_trace:
        return (f"--engine deepspeed: traced-and-checked: {SIZED}, checked against `memplan trace`, which runs "
                f"DeepSpeed itself on this setup on the CPU (reports/estimate_vs_trace_deepspeed*.md)")
    return f"--engine deepspeed: estimate-only ({c.reason} is not traced): {SIZED}, not checked against a run"


def saves_linear_inputs(model: ModelSpec, setup: TrainingSetup) -> bool:
    """Stage 3 runs every nn.Linear through its memory-efficient linear (runtime/zero/linear.py
    LinearFunctionForZeroStage3, swapped in for torch.nn.functional.linear by partition_parameters.py
    _enable_mem_efficient_linear when zero_optimization.memory_efficient_linear, default True): its setup_context
    saves the input for backward whether the weight trains or not (torch's linear saves it only for a trained
    weight), so under LoRA every frozen projection keeps its input. GPT-2's Conv1D projections are not nn.Linear
    (their addmm is torch's): they save as on one GPU."""
    return (setup.engine is Engine.DEEPSPEED and setup.zero == 3 and setup.shards > 1
            and not model.traits.conv1d)


def overlap_comm(setup: TrainingSetup) -> bool:
    """DeepSpeedZeroConfig.overlap_comm_valid: unset means True at stage 3, False below."""
    return setup.ds_overlap_comm if setup.ds_overlap_comm is not None else setup.zero == 3


@dataclass(frozen=True)
class DsTerms:
    """DeepSpeed's buffers on one GPU, in bytes (module docstring for each source)."""

    ipg_bucket: int  # reduce_bucket_size elements in the gradient dtype (x2 with overlap_comm at stage 1/2)
    persistent: int  # stage 3: persistent (never partitioned) small parameters, whole, beside their partition
    gathered_fwd: int  # stage 3: parameters gathered at the forward's end (reuse window + prefetch)
    gathered_bwd: int  # stage 3: inside the backward: one module's parameters, the prefetch, its unsharded gradient,
    #                    the reduce-scatter's copy of the bucket
    fp32_grad: int  # the fp32 gradient the optimizer steps (stage 3: one sub-group), 0 when offloaded
    step_group: int  # the fp32 tensor one optimizer step runs on (its step temporaries scale with it)


def _half(setup: TrainingSetup) -> int:
    return setup.precision.param_bytes


def walks_mlp(setup: TrainingSetup) -> bool:
    """Whether memplan.estimate.phases walks a block's MLP backward (MlpBackward) under DeepSpeed: stage 1 / 2
    (whole parameters) peak inside it as FSDP2 does (the DeepSpeed grid's fp32 LoRA + checkpointing setups: -8.6 %
    without the walk, -0.6 % with it; reports/estimate_vs_trace_deepspeed.md). Not stage 3, whose gathered
    parameters (gathered below) already bound its backward."""
    return setup.engine is Engine.DEEPSPEED and setup.zero in (1, 2) and setup.shards > 1


def ipg_bucket(setup: TrainingSetup, trains: bool) -> int:
    if setup.zero == 0 or not trains or not setup.ds_contiguous_gradients:
        return 0
    copies = 2 if overlap_comm(setup) and setup.zero < 3 else 1
    return copies * round_block(setup.ds_reduce_bucket_size * _half(setup))


def _split(groups: tuple[ParamGroup, ...], threshold: int) -> tuple[int, int, int]:
    """(partitioned elements, persistent elements, largest partitioned tensor) of stage 3."""
    part = pers = largest = 0
    for g in groups:
        if g.numel < threshold:
            pers += g.total
        else:
            part += g.total
            largest = max(largest, g.numel)
    return part, pers, largest


def persistent_extra(groups: tuple[ParamGroup, ...], setup: TrainingSetup) -> int:
    """Stage 3: persistent parameters are gathered whole at their first use and never released, beside their
    partition (model_states counts the partition). Measured on DeepSpeed (docs/deepspeed.md): with every parameter
    under the threshold, the live bytes from the second step on are 2P above those with none, not 2P - 2P/N."""
    return sum(round_block(g.numel * _half(setup)) * g.count for g in groups
               if g.numel < setup.ds_param_persistence_threshold and not g.nf4)


def no_backward_fetch(model: ModelSpec, groups: tuple[ParamGroup, ...], setup: TrainingSetup) -> int:
    """Stage 3: partitioned elements no backward fetches. DeepSpeed gathers a module's parameters in the backward
    from the hook it puts on the module's outputs (parameter_offload.py _register_deepspeed_module ->
    _post_forward_module_hook -> PreBackwardFunctionForModule), which runs only when an output requires grad: a
    frozen module whose input needs no gradient is used once, in the forward. Under an adapter method (the
    embeddings frozen, block 0's adapters the first trained tensors) those are the frozen input embeddings (the
    token embedding unless the LM head shares it) and block 0's frozen query / key / value projections, whose input
    is the normed embeddings. Traced (the DeepSpeed grid, LoRA): 458,752 elements less gathered at the loss's
    backward than under full fine-tuning = the 262,144-element embedding + block 0's q, k, v (3 x 65,536).
    Full fine-tuning: 0. With checkpointed blocks: 0, as traced (the grid's LoRA + checkpointing setups hold the
    whole model at the loss's backward): transformers' gradient_checkpointing_enable calls
    enable_input_require_grads (modeling_utils.py: input_ids models and PEFT), so the embeddings' output requires
    grad and every module's does. --peft freeze keeps whole frozen blocks out of the backward too (not modelled:
    0)."""
    if setup.peft in (PeftMethod.FULL, PeftMethod.FREEZE) or setup.checkpointing.wraps_blocks:
        return 0
    t = setup.ds_param_persistence_threshold
    token = model.vocab * model.hidden
    out = sum(g.total for g in groups if g.kind is TensorKind.EMBEDDING and not g.trainable and g.numel >= t
              and not (model.tie_embeddings and g.numel == token))
    qkv = (Role.Q, Role.K, Role.V, Role.QKV)
    first = [l for l in model.linears if l.role in qkv and l.stack is (Stack.ENCODER if model.encoder_layers
                                                                         else Stack.DECODER)]
    return out + sum(l.weight_numel for l in first if l.weight_numel >= t)


def gathered(model: ModelSpec, groups: tuple[ParamGroup, ...], setup: TrainingSetup) -> tuple[int, int]:
    """Stage 3 (forward's end, inside the backward) bytes of gathered parameters and unsharded gradients.

    partitioned_param_coordinator.py (complete module trace, from the second step on): release_sub_module frees a
    module's parameters after its forward unless __params_to_release keeps them, for either of two reasons:
      - reuse: the parameter occurs again in the module trace within stage3_max_reuse_distance elements of the
        modules that follow (the forward to the end and back: the top max_reuse_distance / 2 elements, and the
        module that crosses the line; measured 32,832 elements kept at max_reuse_distance 50,000 with
        8,192-element modules);
      - "reuse skipped by prefetch": fetch_sub_module's prefetcher pops the parameter trace ahead of the current
        module, marks each parameter it pops with the step of that use (__most_recent_step_id_param_fetched_for),
        and a parameter so marked for a later step is not released. With a prefetch bucket (> 0) the traced
        forward keeps, this way, every parameter the backward fetches again (release_sub_module logged on the
        DeepSpeed grid's stage-3 LoRA setup: every forward release kept by the mark; at the forward's end
        2,686,976 elements gathered = the partitioned model less no_backward_fetch), bounded by
        stage3_max_live_parameters (the prefetcher pops only while __n_available_params is under it).
    The backward releases each module after its gradient (no later use). So the forward's end and the loss's
    backward hold every partitioned parameter the backward fetches, up to max_live_parameters; without a prefetch
    bucket, the reuse window. Backward: that, + the module's unsharded gradient + the reduce-scatter's copy of a
    bucket."""
    part, _, largest = _split(groups, setup.ds_param_persistence_threshold)
    h = _half(setup)
    reuse = setup.ds_max_reuse_distance
    kept = min(part, reuse // 2 + largest) if reuse > 0 else 0
    prefetch = min(setup.ds_prefetch_bucket_size, setup.ds_max_live_parameters, part)
    fwd = min(part, kept + prefetch)
    bwd = min(part, largest + prefetch)
    fetched_back = max(0, part - no_backward_fetch(model, groups, setup))
    live = min(fetched_back, setup.ds_max_live_parameters) if setup.ds_prefetch_bucket_size > 0 else 0
    fwd, bwd = max(fwd, live), max(bwd, live)
    trainable = sum(g.total for g in groups if g.trainable)
    grad = largest if trainable else 0
    # the reduce-scatter of a full bucket copies it (runtime/comm/coalesced_collectives.py reduce_scatter_coalesced:
    # `torch.cat(tensor_partitions_lst_with_padding)`)
    scatter = min(setup.ds_reduce_bucket_size, trainable) if setup.ds_contiguous_gradients else 0
    return round_block(fwd * h), round_block(bwd * h) + round_block(grad * h) + round_block(scatter * h)


def forward_params(groups: tuple[ParamGroup, ...], blocks: int, threshold: int) -> list[tuple[int, int]]:
    """(elements, block) of each partitioned parameter (numel >= stage3_param_persistence_threshold) in the order
    the forward fetches them: the input embeddings (block -1), block by block in module order, then the rest
    outside the blocks (the LM head, block `blocks`). A tied LM head is the embedding, gathered already: not
    fetched again."""
    first = [g for g in groups if g.outside and "embed" in g.name and g.numel >= threshold]
    inside = [g for g in groups if not g.outside and g.numel >= threshold]
    last = [g for g in groups if g.outside and g not in first and g.numel >= threshold]
    L = max(blocks, 1)
    out = [(g.numel, -1) for g in first for _ in range(g.count)]
    for b in range(L if inside else 0):
        out += [(g.numel, b) for g in inside for _ in range(max(1, g.count // L))]
    out += [(g.numel, L) for g in last for _ in range(g.count)]
    return out


def prefetch_chunks(sizes: list[int], bucket: int) -> list[tuple[int, int]]:
    """(first, last) index of each coalesced prefetch: partitioned_param_coordinator.py fetch_sub_module pops the
    parameter queue `while numel_prefetching < max_params_to_prefetch` (stage3_prefetch_bucket_size), so each
    prefetch is the shortest run of the next parameters holding at least a bucket (the last one may hold less), and
    __all_gather_params_ gathers it with one all_gather_coalesced."""
    out, start, acc = [], 0, 0
    for i, n in enumerate(sizes):
        acc += n
        if acc >= bucket:
            out.append((start, i))
            start, acc = i + 1, 0
    if start < len(sizes):
        out.append((start, len(sizes) - 1))
    return out


def top_block_gathered(model: ModelSpec, groups: tuple[ParamGroup, ...], setup: TrainingSetup) -> int:
    """Stage 3 with a prefetch bucket: the most bytes of gathered parameters inside the last block's forward, the
    coalesced prefetches' flat buffers included (0 when not modelled: no prefetch bucket, or a partitioned model
    over stage3_max_live_parameters).

    partition_parameters.py _all_gather_dtype gathers a prefetch into one `flat_tensor` of all its parameters; the
    handle (AllGatherCoalescedHandle) keeps views of it (`partitions`) and the coordinator keeps the handle in
    __inflight_param_registry under each of its parameters until that parameter's module is fetched. At the first
    of them, handle.wait() gives every parameter of the prefetch its own copy (`param.data = torch.cat(partitions)`),
    so the flat buffer lives beside those copies until the prefetch's last parameter is fetched. The prefetcher
    issues one prefetch per fetch_sub_module call (containers and parameter-less modules included), up to
    max_live_parameters gathered at once: a model under that limit has every prefetch in flight from the forward's
    first modules on (logged on the held-out grid's 4-block Llama of hidden 1024, reports/trace_cache_deepspeed_
    heldout.jsonl: two prefetches of 50,593,792 and 11,272,192 elements issued before the embedding's fetch, 224.9 MB
    of gathered bytes at it, the first flat buffer freed at the last block's up projection). After fetching the
    forward's i-th parameter: the copies of every prefetch begun (less those released after their forward:
    no_backward_fetch) + the flat buffers of the prefetches not yet finished."""
    per_block = block_gathered(model, groups, setup)
    inside = [b for b in per_block if b < model.blocks]
    return per_block[max(inside)] if inside else 0


def block_gathered(model: ModelSpec, groups: tuple[ParamGroup, ...], setup: TrainingSetup) -> dict[int, int]:
    """Stage 3 with a prefetch bucket: {block: the most bytes gathered while its forward fetches} (block -1 the
    embeddings, `model.blocks` what follows the last block), as top_block_gathered counts them: the copies of every
    prefetch begun less no_backward_fetch, and the flat buffers of those not finished. Empty when not modelled."""
    bucket = setup.ds_prefetch_bucket_size
    t = setup.ds_param_persistence_threshold
    order = forward_params(groups, model.blocks, t)
    total = sum(n for n, _ in order)
    if bucket <= 0 or not order or total > setup.ds_max_live_parameters:
        return {}
    chunks = prefetch_chunks([n for n, _ in order], bucket)
    size = [sum(n for n, _ in order[a:b + 1]) for a, b in chunks]
    released = no_backward_fetch(model, groups, setup)
    best: dict[int, int] = {}
    for i, (_, b) in enumerate(order):
        copies = sum(z for (a, _), z in zip(chunks, size) if a <= i)
        flats = sum(z for (_, e), z in zip(chunks, size) if e > i)
        best[b] = max(best.get(b, 0), copies - released + flats)
    return {b: round_block(n * _half(setup)) for b, n in best.items()}


def backward_low_end(model: ModelSpec, setup: TrainingSetup) -> tuple[int, int]:
    """Stage 3: the (lowest block's backward, backward's end) bytes that replace gathered()'s backward figure
    (DsTerms.gathered_bwd) there.

    partitioned_param_coordinator.py release_sub_module releases each module's parameters after its backward
    (__params_to_release: nothing later in the trace uses them again, and no prefetch marks them), so at the
    lowest block's backward only that block's parameters and the embeddings below it (kept from the forward for
    their own backward: a tied LM head's too) are gathered, not the whole model; at the backward's end none are.
    The reduce-scatter's copy of a bucket (gathered()'s `scatter`) is made when the IPG bucket fills: with
    reduce_bucket_size at least the trainable elements (DeepSpeed's default 5e8 for any model under 500M
    parameters) only once, at the backward's end (stage3.py independent_gradient_partition_epilogue ->
    __reduce_and_partition_ipg_grads), so not at the lowest block. Found on the held-out grid's gpt2 full
    fine-tuning (+3.3 %: the estimate's lowest-block state held the whole model gathered and the whole gradient's
    copy)."""
    groups = param_groups(model, setup)
    h = _half(setup)
    order = forward_params(groups, model.blocks, setup.ds_param_persistence_threshold)
    fetched = max(0, sum(n for n, b in order if b <= 0) - no_backward_fetch(model, groups, setup))
    part = sum(n for n, _ in order)
    trainable = sum(g.total for g in groups if g.trainable)
    _, _, largest = _split(groups, setup.ds_param_persistence_threshold)
    grad = round_block(largest * h) if trainable else 0
    scatter = round_block(min(setup.ds_reduce_bucket_size, trainable) * h) if setup.ds_contiguous_gradients else 0
    whole = setup.ds_reduce_bucket_size >= trainable
    low = round_block(min(fetched, part) * h) + grad + (0 if whole else scatter)
    return low, grad + scatter


def terms(model: ModelSpec, setup: TrainingSetup) -> DsTerms:
    groups = param_groups(model, setup)
    trainable = sum(g.total for g in groups if g.trainable)
    n = setup.shards
    partition = -(-trainable // n)
    sub = min(partition, setup.ds_sub_group_size) if setup.zero == 3 else partition
    fp32 = 0 if setup.offload_optimizer else round_block(sub * 4)
    fwd = bwd = pers = 0
    if setup.zero == 3:
        fwd, bwd = gathered(model, groups, setup)
        pers = persistent_extra(groups, setup)
    return DsTerms(ipg_bucket(setup, trainable > 0), pers, fwd, bwd, fp32, round_block(sub * 4))


def unreduced(groups: tuple[ParamGroup, ...], setup: TrainingSetup) -> int:
    """Stage 2 inside the backward: gradients made and not yet reduced into the partition. With contiguous_gradients
    one at a time (autograd's new tensor, before it is copied into the IPG bucket); without, a whole bucket of them
    (reduce_bucket_size elements: stage_1_and_2.py reduce_independent_p_g_buckets_and_remove_grads)."""
    train = [g for g in groups if g.trainable]
    if not train:
        return 0
    if setup.ds_contiguous_gradients:
        return max(round_block(g.numel * _half(setup)) for g in train)
    return round_block(min(setup.ds_reduce_bucket_size, sum(g.total for g in train)) * _half(setup))


# memplan.estimate.phases.Moment values this module reads (by value: it cannot import phases, which imports it)
HEAD_BACKWARD, BACKWARD_END = "LM-head backward", "backward end"
HEAD_STATES = (HEAD_BACKWARD, "LM-head gradient cast")
TOP_STATES, FIRST_HOOK = ("top block backward", "top block MLP backward"), "top block first gradient hook"
FORWARD, TOP_BLOCK_GATHERED, BLOCK_GATHERED = "forward", "top block gathered", "block gathered"
LOWEST = "lowest"  # the lowest saved / trained block's backward moments ("lowest saved block backward", ...)
# stage_1_and_2.py __init__: nccl_start_alignment_factor = 2, the flat buffer padded to a multiple of it x world size
ALIGNMENT = 2


def flat_order(groups: tuple[ParamGroup, ...], blocks: int) -> list[int]:
    """Elements of each trainable tensor in the order DeepSpeed flattens them (the model's parameters() order, as
    the optimizer's parameter group lists them): the embeddings, then block by block, then the rest outside the
    blocks (the final norm, the LM head)."""
    train = [g for g in groups if g.trainable]
    first = [g for g in train if g.outside and "embed" in g.name]
    inside = [g for g in train if not g.outside]
    last = [g for g in train if g.outside and g not in first]
    per_block = [(g.numel, max(1, g.count // max(blocks, 1))) for g in inside]
    out = [g.numel for g in first for _ in range(g.count)]
    for _ in range(max(blocks, 1) if inside else 0):
        out += [n for n, k in per_block for _ in range(k)]
    out += [g.numel for g in last for _ in range(g.count)]
    return out


def partition_tensor_numel(groups: tuple[ParamGroup, ...], blocks: int, n: int) -> list[int]:
    """Per rank: the elements of the whole tensors whose slice of the flat buffer overlaps the rank's partition
    (stage_1_and_2.py params_in_partition: a tensor crossing a partition boundary is in both ranks' lists)."""
    sizes = flat_order(groups, blocks)
    total = sum(sizes)
    step = ALIGNMENT * n
    part = -(-total // step) * step // n
    out = [0] * n
    start = 0
    for numel in sizes:
        end = start + numel
        for r in range(start // part, min(n, -(-end // part))):
            out[r] += numel
        start = end
    return out


def grads_in_partition(model: ModelSpec, setup: TrainingSetup) -> tuple[int, int]:
    """Stage 1 / 2 with contiguous_gradients (no offload): stage_1_and_2.py copy_grads_in_partition allocates
    `grads_in_partition = torch.empty(sum of params_in_partition numel)` in the gradient dtype at the first reduced
    bucket holding one of the rank's tensors (whole tensors: a boundary-crossing one counts whole), and the rank's
    `.grad`s become views of it; _release_ipg_buffers drops the reference, but averaged_gradients
    (independent_gradient_partition_epilogue -> get_flat_partition(return_tensor_list=True)) keeps views of it to
    the step. (_use_compact_grad_partition_buffer skips it only when grad_accum_dtype is fp32 and the model dtype is
    not: grad_accum_dtype defaults to the model dtype, engine.py get_data_types.) Returns (last rank, worst rank)
    bytes: the last rank holds the top of the network, reduced first."""
    if setup.zero not in (1, 2) or setup.shards == 1 or not setup.ds_contiguous_gradients or setup.offload_optimizer:
        return 0, 0
    per = partition_tensor_numel(param_groups(model, setup), model.blocks, setup.shards)
    if not any(per):
        return 0, 0
    return round_block(per[-1] * _half(setup)), round_block(max(per) * _half(setup))


def whole_bucket(model: ModelSpec, setup: TrainingSetup) -> bool:
    """Stage 1 / 2 (contiguous gradients, no offload) whose IPG bucket holds every trainable gradient
    (reduce_bucket_size >= the trainable elements: DeepSpeed's default 5e8 for any model under 500M parameters).
    stage_1_and_2.py reduce_independent_p_g_buckets_and_remove_grads reduces only when the next gradient would
    overflow the bucket, so nothing is reduced before the backward's end: each gradient is copied into the bucket
    and its `.grad` becomes a view of it (the bucket holds them; no gradient partition exists yet), and the one
    reduce (reduce_ipg_grads -> average_tensor -> allreduce_and_scatter -> allreduce_bucket `self.flatten(bucket)`)
    copies the whole gradient into one new tensor before copy_grads_in_partition makes the partition. Found on the
    held-out grid (reports/estimate_vs_trace_deepspeed_heldout.md: stage 1 +3.9 %, stage 2 -4.1 / -4.2 % before)."""
    if setup.zero not in (1, 2) or setup.shards == 1 or not setup.ds_contiguous_gradients or setup.offload_optimizer:
        return False
    return setup.ds_reduce_bucket_size >= sum(g.total for g in param_groups(model, setup) if g.trainable)


def accumulate_late(model: ModelSpec, setup: TrainingSetup) -> int:
    """Under accumulation, the embeddings' new gradient that memplan.estimate.phases holds beside the carried one at
    the backward's end (its `late_new`), in the gradient dtype."""
    if setup.grad_accum == 1:
        return 0
    return round_block(sum(g.total for g in param_groups(model, setup) if g.trainable and g.kind is TensorKind.EMBEDDING)
                       * _half(setup))


def zero_buffers(model: ModelSpec, setup: TrainingSetup) -> tuple[int, int]:
    """phases.zero_buffers for DeepSpeed: the (forward, backward) working buffers the step's states hold. Stage 1
    reduces only at the backward's end (the full gradients are model states there); the IPG bucket is adjust()'s."""
    if setup.shards == 1 or setup.zero == 1:
        return 0, 0
    if setup.zero == 2:
        return 0, unreduced(param_groups(model, setup), setup)
    t = terms(model, setup)
    return t.gathered_fwd, t.gathered_bwd


def _with(state, **add):
    cats = dict(state.categories)
    for k, v in add.items():
        cats[C(k)] = v
    return state._replace(categories=cats)


def _with_top_block_gathered(states: tuple, model: ModelSpec, setup: TrainingSetup, acts) -> tuple:
    """Stage 3: a state in the last block's forward, before the forward's end (the FORWARD state), holding the
    coalesced prefetches' flat buffers beside the gathered parameters (top_block_gathered): the activations of
    every block and of the embeddings (`acts`: memplan.estimate.activations.Activations), no LM head nor loss yet.
    Made from the FORWARD state (its Moment enum by value: this module cannot import phases)."""
    groups = param_groups(model, setup)
    gathered = top_block_gathered(model, groups, setup)
    i = next((k for k, s in enumerate(states) if s.name.value == FORWARD), None)
    if not gathered or i is None:
        return states
    fwd = states[i]
    cats = {**fwd.categories, C.ACTIVATIONS: acts.total - acts.outside + acts.early, C.TEMPORARIES: gathered}
    top = fwd._replace(name=type(fwd.name)(TOP_BLOCK_GATHERED), categories=cats)
    # ... and the lower block where the most is gathered, when more than at the top: the first prefetch's flat
    # buffer lives beside its copies until its last parameter's module, so under checkpointing (little saved) a low
    # block's forward holds the most (the held-out-2 grid's Qwen2 widths, 4 blocks, 8 GPUs, fp32 LoRA, checkpointed:
    # 557.8 MB gathered in block 0's forward, two flat buffers, the whole model, beside the first one's copies;
    # -2.36 % and temporaries -64 MB without this state, -0.00 % with it). Activations: the embeddings' and those
    # saved by the blocks up to it, its own included.
    low = {b: n for b, n in block_gathered(model, groups, setup).items() if 0 <= b < model.blocks - 1 and n > gathered}
    if not low:
        return (*states[:i], top, *states[i:])
    b = max(low, key=lambda k: (low[k], -k))
    work = 0
    if acts.ckpt(b) and model.gated_mlp:  # a checkpointed block saves nothing: its MLP's working set, at act(gate)
        # · up, is temporaries (act(gate), up, their product, the MLP's input and the mid-block residual; the
        # held-out-2 grid's Qwen2 widths, 4 ranks, bf16-master, full, checkpointed: 8.0 MiB, the trace's forward
        # peak then above its loss backward's, as the estimate's; activations +36.7 MB before)
        t, c = setup.model_tokens, _half(setup)
        work = 3 * round_block(t * model.intermediate * c) + 2 * round_block(t * model.hidden * c)
    cats = {**fwd.categories, C.ACTIVATIONS: acts.early + sum(acts.per_block[:b + 1]), C.TEMPORARIES: low[b] + work}
    below = fwd._replace(name=type(fwd.name)(BLOCK_GATHERED), categories=cats)
    return (*states[:i], below, top, *states[i:])


def head_unhooked(model: ModelSpec, setup: TrainingSetup) -> bool:
    """Stage 1 / 2: no gradient hook has run by the LM head's backward moments (HEAD_STATES), so the IPG bucket,
    which stage_1_and_2.py reduce_independent_p_g_buckets_and_remove_grads allocates at the first hook, does not
    exist yet there: no untied LM head trains (a tied one's gradient waits for the embedding's own, the last).
    As the held-out-2 grid's Qwen2 widths (tied), stage 2, fp32, LoRA, checkpointed show it: the estimate's LM-head
    state held the bucket and outgrew the trace's peak, the block below the top's MLP walk (activations -17 MB)."""
    return not any(g.outside and g.trainable and g.matmul and g.kind is not TensorKind.EMBEDDING
                   for g in param_groups(model, setup))


def qkv_first_hook(model: ModelSpec, setup: TrainingSetup, acts) -> bool:
    """Stage 1 / 2, the top block not checkpointed (`acts`: memplan.estimate.activations.Activations), nothing
    trained but query / key / value projections (their adapters: peft's default LoRA targets) in the blocks and
    nothing outside: the first gradient hook, and so the IPG bucket, comes inside the top block's attention
    backward, after its MLP's and attention's saved tensors are freed, not at the block's backward start nor in its
    MLP walk (TOP_STATES, which hold every saved tensor). Alive then: what the blocks below saved, the bucket. As
    the held-out grids' stage-1 / 2 fp32 LoRA rows show it: gpt2, 4 ranks (activations +19.6 MB; +2.30 % before
    head_unhooked) and the 2048-wide Llama, 2 ranks (activations +30.8 MB, +1.20 %)."""
    if setup.zero not in (1, 2) or setup.shards == 1 or acts.ckpt(-1) or not acts.per_block:
        return False
    qkv = tuple(l.qualname for l in model.linears if l.role in (Role.Q, Role.K, Role.V, Role.QKV)
                and l.stack is not Stack.OUTSIDE)
    trained = [g for g in param_groups(model, setup) if g.trainable]
    return bool(trained) and all(not g.outside and any(q in g.name for q in qkv) for g in trained)


def adjust(states: tuple, model: ModelSpec, setup: TrainingSetup, ms, acts) -> tuple:
    """The step's states (memplan.estimate.phases.step_states) with DeepSpeed's buffers: the IPG bucket, stage 3's
    gradient partition from initialize on and its persistent parameters, and the optimizer step's fp32 gradient."""
    if setup.engine is not Engine.DEEPSPEED or setup.shards == 1:
        return states
    t = terms(model, setup)
    z3 = setup.zero == 3
    if z3:
        states = _with_top_block_gathered(states, model, setup, acts)
        low, end = backward_low_end(model, setup)
    gip_last, gip_max = grads_in_partition(model, setup)
    unhooked = head_unhooked(model, setup)
    qkv_hook = qkv_first_hook(model, setup, acts)
    whole = whole_bucket(model, setup)
    full = round_block(sum(g.total for g in param_groups(model, setup) if g.trainable) * _half(setup))
    out, backward_seen, head_done = [], False, False
    for s in states:
        cats = s.categories
        if s.phase is Phase.BACKWARD and gip_max and whole:  # one reduce, at the backward's end (whole_bucket)
            cats = dict(cats)
            if s.name.value == BACKWARD_END:
                if setup.zero == 1:  # every `.grad` alive, then moved into the bucket and flattened: the same bytes
                    cats[C.GRADIENTS] = max(cats[C.GRADIENTS], full)
                else:  # stage 2: the gradients are in the bucket; its flattened copy beside it (and, from the
                    # second micro-batch on, the rank's gradient partition, grads_in_partition, accumulating), no
                    # unreduced gradient (zero_buffers) nor the embeddings' new one beside a carried one
                    # (accumulate_late): each went into the bucket. The held-out grids' stage-2 whole-bucket rows:
                    # Llama widths, bf16-master, full, +1.80 % -> -0.00 %; with accumulation, Qwen2 widths
                    # bf16-master +1.38 % -> 0.00 % (gradients -90 MB and temporaries +117 MB before) and a fp32
                    # Llama -2.03 % -> 0.00 %
                    cats[C.GRADIENTS] = gip_max if setup.grad_accum > 1 else 0
                    cats[C.TEMPORARIES] = (cats[C.TEMPORARIES] - zero_buffers(model, setup)[1]
                                           - accumulate_late(model, setup) + full)
            s = s._replace(categories=cats)
        elif s.phase is Phase.BACKWARD and gip_max:  # the flat gradient partition of the rank (grads_in_partition)
            cats = dict(cats)
            if s.name.value == BACKWARD_END:
                # stage 1 reduces after the backward (reduce_gradients: process_gradients reduces in the hooks only
                # when partition_gradients or overlap_comm), every `.grad` still alive beside the buffer
                cats[C.GRADIENTS] = (cats[C.GRADIENTS] + gip_max if setup.zero == 1
                                     else max(cats[C.GRADIENTS], gip_max))
            elif setup.zero == 2 and head_done:  # the last rank's first bucket: right after the LM head's
                cats[C.GRADIENTS] = max(cats[C.GRADIENTS], gip_last)
            head_done = head_done or s.name.value == HEAD_BACKWARD
            s = s._replace(categories=cats)
        # gathered at their first forward; released for the optimizer step and gathered again after it (measured:
        # the step's peak is the same with every parameter persistent as with none)
        pers = 0 if s.phase in (Phase.LOAD, Phase.OPTIMIZER_STEP) else t.persistent
        tmp, grads = cats[C.TEMPORARIES] + pers, cats[C.GRADIENTS]
        if z3:  # the flat gradient partition lives from initialize on (zeros until the backward fills it)
            grads = max(grads, ms.gradients)
        if s.phase is Phase.OPTIMIZER_STEP:
            # stage 1/2 free the half partition before stepping the fp32 one; stage 3 keeps its flat buffer
            grads = (ms.gradients if z3 else 0) + t.fp32_grad
            tmp = pers + (0 if setup.offload_optimizer else
                                  step_temporary_bytes(setup.optimizer, t.step_group, t.step_group))
        if z3 and s.phase is Phase.BACKWARD and (s.name.value.startswith(LOWEST) or s.name.value == BACKWARD_END):
            tmp += (low if s.name.value.startswith(LOWEST) else end) - t.gathered_bwd  # backward_low_end
        if z3:
            tmp += t.ipg_bucket
        elif s.phase is Phase.BACKWARD:  # set up at the first parameter's gradient hook (head_unhooked)
            later = unhooked and s.name.value in HEAD_STATES or qkv_hook and s.name.value in TOP_STATES
            tmp += t.ipg_bucket if backward_seen and not later else 0
            backward_seen = True
            if qkv_hook and s.name.value == TOP_STATES[0]:
                out.append(_with(s._replace(name=type(s.name)(FIRST_HOOK)), temporaries=tmp + t.ipg_bucket,
                                 gradients=grads,
                                 activations=cats[C.ACTIVATIONS] - acts.per_block[-1]))
        out.append(_with(s, temporaries=tmp, gradients=grads))
    return tuple(out)


def communication(model: ModelSpec, setup: TrainingSetup) -> tuple[float, float]:
    """(gradient, parameter) bytes one GPU sends per optimizer step under DeepSpeed (ring collectives), no offload
    traffic (memplan.estimate.flops.communication_per_step takes its DeepSpeed stage-3 parameter volume from
    here). As the ZeRO paper's 2Ψ / 2Ψ / 3Ψ, but for what DeepSpeed skips at
    stage 3: parameters kept gathered over the forward-backward turn (the reuse window, gathered() above) are not
    gathered again by the backward, and persistent parameters are gathered once per step (after it), not per
    micro-batch. Stage 1 reduces once per step (at the accumulation boundary, stage_1_and_2.py
    reduce_ready_partitions_and_remove_grads), stage 2 and 3 every micro-batch."""
    n = setup.gpus
    if n == 1 or setup.zero == 0:
        return 0.0, 0.0
    ring = (n - 1) / n
    groups = param_groups(model, setup)
    trainable = sum(g.total for g in groups if g.trainable)
    h = _half(setup)
    grads = trainable * h * ring * (1 if setup.zero == 1 else setup.grad_accum)
    if setup.zero < 3:
        return grads, trainable * h * ring  # the updated weights all-gathered after the step
    part, pers, largest = _split(groups, setup.ds_param_persistence_threshold)
    reuse = setup.ds_max_reuse_distance
    kept = min(part, reuse // 2 + largest) if reuse > 0 else 0
    return grads, ((2 * part - kept) * setup.grad_accum + pers) * h * ring
