"""One tracked session: a built model materialized inside an AllocTracker, ready to step.

The trace (memplan.trace.runner.trace_run, fake or real CPU tensors) and the CPU measurement
(memplan.measure.cpu) both open their step through `tracked_session`, so what they count is set up once: the
CUDA-semantics corrections (memplan.trace.cuda), the tracker entered, dequantized NF4 weights tagged,
parameters and buffers materialized and tagged as weights, the inputs tagged, checkpointed block inputs and
recomputed saves tagged as activations, the TrainLoop (optimizer, master weights) created, the load peak read,
and every tensor autograd saves tagged. Per-layer marks are the caller's (the trace keeps them on for every
iteration; the measurement only on its probe step): memplan.trace.runner.install_marks.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from memplan.categories import Phase
from memplan.spec.model import ModelSpec
from memplan.spec.setup import TrainingSetup
from memplan.trace import cuda, distributed, policies
from memplan.trace.build import Built, materialize
from memplan.trace.qlora import NF4Linear
from memplan.trace.step import TrainLoop
from memplan.trace.tracker import DEQ, INPUT, W, AllocTracker


@dataclass
class Session:
    """What `tracked_session` opened: the model, its tracker, the loop that steps it, and the load's peak (bytes
    alive or peaking before the first step: weights, inputs, master weights)."""

    built: Built
    tracker: AllocTracker
    loop: TrainLoop
    load_peak: int
    batch: dict | None  # the batch made at the session's start (None: the caller makes and tags each one)

    def track_batch(self, batch: dict) -> None:
        """Tag a batch made after the session opened (varied lengths) as inputs."""
        for t in batch.values():
            self.tracker.track(t, INPUT)


def make_batch(spec: ModelSpec, batch: int, seq: int, device="cpu") -> dict:
    """Random token ids and labels as a collator makes them (labels a separate tensor; shifted inside the loss);
    encoder-decoder models also get decoder input ids."""
    v = spec.vocab
    out = {"input_ids": torch.randint(0, v, (batch, seq), device=device),
           "labels": torch.randint(0, v, (batch, seq), device=device)}
    if getattr(spec.arch, "value", spec.arch) == "encoder-decoder":
        out["decoder_input_ids"] = torch.randint(0, v, (batch, seq), device=device)
    return out


@contextlib.contextmanager
def quiet():
    """Library chatter (transformers config notes, deprecations) is not the tool's output."""
    import warnings as w

    import transformers

    fake_log = logging.getLogger("torch._subclasses.fake_tensor")  # logs a failing meta kernel, then raises
    verbosity, level = transformers.logging.get_verbosity(), fake_log.level
    transformers.logging.set_verbosity_error()
    fake_log.setLevel(logging.CRITICAL)
    try:
        with w.catch_warnings():
            w.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        fake_log.setLevel(level)


@contextlib.contextmanager
def as_real_tensors():
    """transformers refuses to skip the causal mask when it sees a FakeTensor (it assumes torch.export tracing,
    where data cannot be read) and would then pass an explicit mask to SDPA: a different kernel and different
    allocations than the real step. While tracing, fake tensors are reported as real; the data-dependent checks
    this enables (e.g. "is the padding mask all ones") read 1 / True from the tracker."""
    import transformers.utils.import_utils as iu

    orig = getattr(iu, "is_fake_tensor", None)
    if orig is None:  # older transformers: no such check
        yield
        return
    iu.is_fake_tensor = lambda x: False
    try:
        yield
    finally:
        iu.is_fake_tensor = orig


def _tag_saved(tracker: AllocTracker, obj) -> None:
    if isinstance(obj, torch.Tensor):
        tracker.saved(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _tag_saved(tracker, o)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tag_saved(tracker, o)


@contextlib.contextmanager
def checkpoint_tagging(model, tracker: AllocTracker):
    """Under activation checkpointing, what is kept for backward is each block's inputs (held by the checkpoint)
    and, during recomputation, what the recomputed block saves: tag both as activations."""
    import torch.utils.checkpoint as cp

    wrapped = []
    for m in model.modules():
        fn = m.__dict__.get("_gradient_checkpointing_func")
        if fn is None:
            continue

        def ckpt(func, *args, _fn=fn, **kw):
            _tag_saved(tracker, args)
            _tag_saved(tracker, getattr(func, "keywords", {}))
            return _fn(func, *args, **kw)

        m._gradient_checkpointing_func = ckpt
        wrapped.append((m, fn))
    orig = cp._recomputation_hook

    class _Tagging(orig):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            pack = self.pack_hook

            def tagged(x):
                tracker.saved(x)
                return pack(x)
            self.pack_hook = tagged

    cp._recomputation_hook = _Tagging
    policies.SAVED_TAGGER = tracker.saved  # op-level SAC's cached outputs (memplan.trace.policies)
    try:
        yield
    finally:
        policies.SAVED_TAGGER = None
        cp._recomputation_hook = orig
        for m, fn in wrapped:
            m._gradient_checkpointing_func = fn


@contextlib.contextmanager
def tracked_session(built: Built, setup: TrainingSetup, tracker: AllocTracker, *, fake: bool,
                    batch: Callable[[], dict] | None = None) -> Iterator[Session]:
    """Open the step of `built` under `tracker` (see the module doc). `batch()`, when given, makes the batch
    inside the session's tensor mode, tagged before the load peak is read (the trace's one batch, the
    measurement's fixed one); None: the caller makes and tags each batch (Session.track_batch). fake=True runs on FakeTensorMode tensors
    (values never computed) and materializes without initial values. A --gpus/--zero setup runs its engine on
    torch.distributed's current default process group (memplan.trace.distributed: the caller initializes it)."""
    if setup.teacher:  # --teacher: the frozen teacher beside the student (memplan.trace.distill)
        from memplan.trace.distill import attach_teacher

        attach_teacher(built, setup)
    engine = distributed.engaged(setup)
    if engine and distributed.uses_fsdp(setup):
        distributed.apply_engine(built, setup)  # FSDP2 shards the meta model, before anything is allocated
    with contextlib.ExitStack() as stack:
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            stack.enter_context(as_real_tensors())
        stack.enter_context(cuda.cuda_semantics(autocast=setup.precision.autocast))
        stack.enter_context(tracker)
        if engine:
            stack.enter_context(distributed.engine_tagging(tracker, setup))
        NF4Linear.tagger = lambda w: tracker.track(w, DEQ)
        stack.callback(setattr, NF4Linear, "tagger", None)
        if engine and distributed.uses_fsdp(setup):
            distributed.tag_sharded(tracker, *distributed.materialize_sharded(built.model, not fake), setup)
        else:
            for t in materialize(built.model, init_values=not fake):
                tracker.track(t, W)
            if engine:
                distributed.apply_engine(built, setup, tracker)  # DDP wraps the materialized model
        if built.teacher is not None:  # --teacher: its frozen weights are weights too
            for t in materialize(built.teacher, init_values=not fake):
                tracker.track(t, W)
        stack.enter_context(checkpoint_tagging(built.model, tracker))
        made = batch() if batch is not None else None
        if made is not None:
            for t in made.values():
                tracker.track(t, INPUT)
        loop = TrainLoop(built.model, setup, tracker, built.compute_dtype)
        loop.teacher = built.teacher
        stack.callback(loop.close)
        load_peak = max(tracker.phase_peaks.get(Phase.LOAD, 0), tracker.total)

        def pack(x):
            tracker.saved(x)
            return x.detach() if x.requires_grad else x

        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x))
        yield Session(built, tracker, loop, load_peak, made)
