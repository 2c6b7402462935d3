"""Run a setup's real training step on fake (or real) CPU tensors under the allocation tracker."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from memplan.categories import Category, Phase
from memplan.errors import MemplanError
from memplan.estimate import lengths
from memplan.estimate.result import ModelStates, Peak, Result
from memplan.spec.model import ModelSpec
from memplan.spec.setup import Engine, Precision, TrainingSetup
from memplan.spec.traits import TRAITS
from memplan.trace import cuda, distributed
from memplan.trace.build import Built, build
from memplan.trace.session import make_batch, quiet, tracked_session
from memplan.trace.timeline import TimelineRow
from memplan.trace.tracker import ACT, CATEGORY, DETAIL, G, MW, OS, W, AllocTracker, Rec

ITERATIONS = 2  # the first builds optimizer state; the second is the steady state reported


@dataclass
class TraceRun:
    """Everything a trace produced: the Result, the timeline rows (when asked) and the raw records."""

    result: Result
    rows: list[TimelineRow]
    tracker: AllocTracker
    window: tuple[int, int]  # events (start, end] of the reported iteration
    backward_seq: int  # event at which the reported iteration's (last) backward began
    built: Built = field(repr=False)

    def detail_at_peak(self) -> dict[str, int]:
        """Bytes at the peak by category, temporaries split into sub-keys (weight casts, dequantized, ...)."""
        out: dict[str, int] = {}
        for tag, n in self.tracker.by_tag(self.tracker.peak_seq).items():
            key = DETAIL.get(tag, CATEGORY[tag].value)
            out[key] = out.get(key, 0) + n
        return out

    def top_at_peak(self, n: int = 20, phase: Phase | None = None) -> list[Rec]:
        """The largest allocations alive at the peak (of `phase`, if given)."""
        seq = self.tracker.peak_seq if phase is None else self.tracker.phase_peak_seq[phase]
        return sorted(self.tracker.live_at(seq), key=lambda r: -r.nbytes)[:n]

    def mark_at(self, seq: int) -> str:
        """The region (embed / blockN / head / ...backward) an event happened in."""
        mark = ""
        for s, _p, m in self.tracker.marks:
            if s >= seq:
                break
            mark = m
        return mark

    def saved_by_mark(self) -> dict[str, int]:
        """Activations (saved for backward) alive when the reported backward begins, by the forward region
        (embed / blockN / final_norm / head / loss) that made them."""
        out: dict[str, int] = {}
        for r in self.tracker.live_at(self.backward_seq):
            if r.tag == ACT:
                out[r.mark] = out.get(r.mark, 0) + r.nbytes
        return out


# the library result's levels (memplan trace on the command line adds the estimate's overhead: with_overhead)
NO_OVERHEAD = "reserved = device = allocated: the trace has no allocator fragmentation or CUDA context"

def _final_norm(built: Built):
    """The norm after the last block (the last module named as the family's traits say, outside the blocks)."""
    wanted = TRAITS[built.base.config.model_type].final_norm
    inside = {id(m) for b in built.blocks for m in b.modules()}
    found = None
    for name, m in built.base.named_modules():
        if wanted and name.rsplit(".", 1)[-1] == wanted and id(m) not in inside:
            found = m
    return found


def install_marks(built: Built, tracker) -> list:
    """Module hooks that mark the region (embed / blockN / final_norm / head / loss, and each region's backward)
    on `tracker.set_mark`; returns the hook handles."""
    handles = []

    def regions():
        emb = built.base.get_input_embeddings()
        if emb is not None:
            yield "embed", emb
        for i, blk in enumerate(built.blocks):
            yield f"block{i}", blk
        norm = _final_norm(built)
        if norm is not None:
            yield "final_norm", norm
        head = built.base.get_output_embeddings()
        if head is not None:
            yield "head", head

    for label, mod in regions():
        def pre(_m, _a, label=label):
            tracker.set_mark(label)

        def post(_m, _a, out, label=label):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda _g: tracker.set_mark(label + ".backward"))
            if label == "head":  # what follows the LM head in forward is the loss (upcast, log_softmax, nll)
                tracker.set_mark("loss")

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


def _rows(tracker: AllocTracker, start: int, end: int) -> list[TimelineRow]:
    marks = [m for m in tracker.marks if m[0] <= end]
    rows, mi, phase, mark = [], 0, Phase.LOAD, ""
    cats = [Category.WEIGHTS, Category.MASTER_WEIGHTS, Category.GRADIENTS, Category.OPTIMIZER_STATES,
            Category.ACTIVATIONS, Category.TEMPORARIES]
    for seq, live in tracker.sweep(start, end):
        while mi < len(marks) and marks[mi][0] < seq:
            _, phase, m = marks[mi]
            mark = m  # a phase change (m == "") clears the region
            mi += 1
        per = dict.fromkeys(cats, 0)
        for tag, n in live.items():
            per[CATEGORY[tag]] += n
        vals = [per[c] for c in cats]
        rows.append(TimelineRow(seq, phase.value, mark, *vals, sum(vals)))
    return rows


def trace_run(spec: ModelSpec, setup: TrainingSetup, *, fake: bool = True, round_to: int = 512,
              cuda_kernels: bool = True, timeline: bool = False,
              observer: Callable | None = None) -> TraceRun:
    """Trace two iterations of `setup` on `spec`; report the second.

    fake=False runs the same step on real CPU tensors (small models: tests compare it with the fake run and
    with MemTracker). round_to=1 counts raw bytes. cuda_kernels=False leaves out the CUDA attention-kernel
    corrections (memplan.trace.cuda, item 4). observer(model, optimizer, batch) may return a context manager
    entered around the reported iteration (e.g. a MemTracker, to compare its peak with result.peak).
    """
    run = _shaped_run if lengths.shaped(setup) else _trace_run
    if setup.engine is Engine.DEEPSPEED and distributed.engaged(setup):  # DeepSpeed's engine, real tensors
        return deepspeed_run(spec, setup, round_to, timeline)
    with quiet():
        try:
            return run(spec, setup, fake, round_to, cuda_kernels, timeline, observer)
        except RuntimeError as exc:
            if "Expected inputs of BF16 type" in str(exc):  # torch's grouped_mm (MoE experts) meta kernel
                raise MemplanError(f"{spec.name} with {setup.precision.value} is not traceable: its MoE experts "
                                   "run torch grouped_mm, whose fake-tensor kernel takes bf16 weights only; "
                                   "trace --pure-bf16 or --bf16-master") from None
            raise


def _shaped_run(spec, setup, fake, round_to, cuda_kernels, timeline, observer) -> TraceRun:
    """A length distribution / packing (memplan.estimate.lengths): the step of the worst padded batch (the padding
    mask all ones, as the estimate assumes: lengths.mask_note), or of a packed row with its position_ids restarting
    at each document (TRL's padding-free / torchtune's packed batches)."""
    from dataclasses import replace

    length = lengths.worst_length(setup)
    docs = lengths.pack_row(setup) if setup.packing else None
    run = _trace_run(spec, lengths.at_length(setup, length), fake, round_to, cuda_kernels, timeline, observer, docs)
    shape = (f"a packed row of {length} tokens ({len(docs)} documents, position_ids restarting at each)" if docs
             else f"the worst padded batch, {setup.batch} × {length} tokens")
    note = lengths.mask_note(setup, length)
    run.result = replace(run.result, setup=setup, warnings=run.result.warnings + (f"traced at {shape}",)
                         + ((note,) if note else ()))
    return run


def deepspeed_run(spec: ModelSpec, setup: TrainingSetup, round_to: int = 512, timeline: bool = False,
                  ranks=None) -> TraceRun:
    """--engine deepspeed: DeepSpeed's own engine on real CPU tensors (memplan.trace.deepspeed), the worse of
    `ranks` (default: the first and the last) reported."""
    from memplan.trace.deepspeed import NOTE, RANKS_NOTE, trace_ranks

    with quiet():
        t = trace_ranks(spec, setup, round_to, ranks, marks=install_marks)
    tracker, (start, end) = t.tracker, t.window
    at_end = tracker.by_tag(end)
    states = ModelStates(weights=at_end.get(W, 0), master_weights=at_end.get(MW, 0),
                         gradients=tracker.categories_at(t.grads_seq)[Category.GRADIENTS],
                         optimizer_states=at_end.get(OS, 0))
    p = tracker.peak
    warnings = (*t.built.warnings, NO_OVERHEAD, NOTE, f"per-rank figures: rank {t.rank} of {t.world}{RANKS_NOTE}")
    cats = tracker.categories_at(tracker.peak_seq)
    result = Result(model=spec.name, setup=setup, model_states=states, categories=cats,
                    peak=Peak(allocated_bytes=p, reserved_bytes=p, device_bytes=p, phase=tracker.peak_phase),
                    trainable_params=t.built.trainable_params, total_params=t.built.total_params,
                    phase_peaks={Phase.LOAD: t.load_peak, **tracker.phase_peaks}, tier="trace", warnings=warnings,
                    rank=t.rank)
    return TraceRun(result, _rows(tracker, start, end) if timeline else [], tracker, (start, end), t.backward_seq,
                    t.built)


def packed_positions(docs: tuple[int, ...], batch: int) -> torch.Tensor:
    """position_ids of `batch` packed rows of documents `docs` (each restarting at 0), as TRL's padding-free
    collator (DataCollatorWithFlattening) and torchtune's PackedDataset make them."""
    row = torch.cat([torch.arange(n) for n in docs])
    return row.unsqueeze(0).expand(batch, -1).contiguous()


def _trace_run(spec, setup, fake, round_to, cuda_kernels, timeline, observer, docs=None) -> TraceRun:
    built = build(spec, setup)
    if not distributed.engaged(setup) or torch.distributed.is_initialized():  # the caller's group, if any
        return _traced(spec, setup, built, fake, round_to, cuda_kernels, timeline, observer, docs)
    with distributed.fake_world(distributed.worst_rank(built, setup), setup.gpus):
        return _traced(spec, setup, built, fake, round_to, cuda_kernels, timeline, observer, docs)


def _batch(spec, setup, docs) -> dict:
    b = make_batch(spec, setup.batch, setup.seq)
    if docs:
        b["position_ids"] = packed_positions(docs, setup.batch)
    return b


def _traced(spec, setup, built, fake, round_to, cuda_kernels, timeline, observer, docs=None) -> TraceRun:
    tracker = AllocTracker(round_to=round_to, fake=fake, op_hooks=cuda.op_hooks() if cuda_kernels else None)
    warnings = list(built.warnings)
    if cuda_kernels and setup.precision is Precision.FP32 and setup.attention.value != "eager":
        warnings.append("fp32 SDPA: CUDA memory-efficient kernel's backward scratch is not modelled")
        if spec.kv_heads != spec.heads:
            warnings.append("fp32 SDPA with grouped-query attention: CUDA's memory-efficient kernel rejects GQA "
                            "and torch falls back to the math kernel (s² scores); the trace shows the fused kernel")
    if setup.offload_activations:
        from memplan.estimate.offload import TRACE_NOTE

        warnings.append(TRACE_NOTE)
    warnings.append(NO_OVERHEAD)
    with tracked_session(built, setup, tracker, fake=fake,
                         batch=lambda: _batch(spec, setup, docs)) as session:
        loop, batch, load_peak = session.loop, session.batch, session.load_peak
        handles = install_marks(built, tracker)
        for it in range(ITERATIONS - 1):
            loop.iteration(batch)
            if it == 0:
                loop.tag_states()
        start = tracker.start_window()
        with observer(built.model, loop.optimizer, batch) if observer else contextlib.nullcontext():
            loop.iteration(batch)
        end = tracker.seq
        backward_seq = max(s for s, p, m in tracker.marks if p is Phase.BACKWARD and m == "" and s <= end)
        grads_seq, paged = loop.grads_seq, loop.paged_bytes
        for h in handles:
            h.remove()
        del batch, loop, session

    at_end, at_step = tracker.by_tag(end), tracker.by_tag(grads_seq)
    states = ModelStates(weights=at_end.get(W, 0), master_weights=at_end.get(MW, 0),
                         gradients=tracker.categories_at(grads_seq)[Category.GRADIENTS],  # DDP buckets too
                         optimizer_states=at_end.get(OS, 0),
                         cpu_bytes=tracker.host_peak(start, end) if (setup.offload_params or setup.offload_activations)
                         else 0, paged_bytes=paged)
    rank = None
    if distributed.engaged(setup):
        r, n = distributed.world()
        rank = r
        warnings.append(distributed.rank_note(built, setup, r, n, states.cpu_bytes))
    cats = tracker.categories_at(tracker.peak_seq)
    p = tracker.peak
    assert sum(cats.values()) == p, (cats, p)
    result = Result(
        model=spec.name, setup=setup, model_states=states, categories=cats,
        peak=Peak(allocated_bytes=p, reserved_bytes=p, device_bytes=p, phase=tracker.peak_phase),
        trainable_params=built.trainable_params, total_params=built.total_params,
        phase_peaks={Phase.LOAD: load_peak, **tracker.phase_peaks}, tier="trace", warnings=tuple(warnings),
        rank=rank,
    )
    rows = _rows(tracker, start, end) if timeline else []
    return TraceRun(result, rows, tracker, (start, end), backward_seq, built)


def trace(model: ModelSpec, setup: TrainingSetup, timeline: bool = False) -> tuple[Result, list[TimelineRow]]:
    run = trace_run(model, setup, timeline=timeline)
    return run.result, run.rows
