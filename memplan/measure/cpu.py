"""--device cpu (CI): the step on real CPU tensors inside memplan's AllocTracker, opened by the same tracked session
as memplan.trace.trace_run(spec, setup, fake=False) (memplan.trace.session: tracker class and rounding,
CUDA-semantics corrections, materialization, tags), stepped and timed with time.perf_counter. There is no
reserved or device level."""
from __future__ import annotations

import contextlib

from memplan.categories import Phase
from memplan.measure.options import MeasureOptions
from memplan.measure.phases import (Outcome, PhaseBook, Recorder, lengths_for, phase_times, phases_block,
                                    run_steps, throughput)

CPU_DEVICE_REASON = "--device cpu: no device level (allocated bytes from memplan's tracker; no allocator, no NVML)"
ROUND_TO = 512  # as the trace: the CUDA caching allocator's rounding (memplan.trace.tracker)


def book_tracker(book: PhaseBook, base=None, **kw):
    """A tracker of class `base` (default: AllocTracker with the trace's CUDA-semantics op hooks) that also feeds
    the PhaseBook (subclassing changes no accounting); kw: base's arguments."""
    from memplan.trace import cuda as trace_cuda
    from memplan.trace.tracker import AllocTracker

    if base is None:
        base, kw = AllocTracker, dict(round_to=ROUND_TO, fake=False, op_hooks=trace_cuda.op_hooks())

    class BookTracker(base):
        def set_phase(self, phase):
            super().set_phase(phase)
            book.enter(phase)

        def set_mark(self, mark):
            super().set_mark(mark)
            book.mark(mark)

        def boundary(self):
            return self.total, None, None  # phase peaks come from the tracker's own phase_peaks

        def current(self):
            return self.total

    return BookTracker(**kw)


def measure_cpu(spec, setup, opts: MeasureOptions, book: PhaseBook, clock) -> Outcome:
    from memplan.trace.build import build
    from memplan.trace.runner import install_marks
    from memplan.trace.session import make_batch, quiet, tracked_session

    book.enter(Phase.LOAD)
    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet())
        built = build(spec, setup)
        if opts.instrument:
            tracker = book_tracker(book)
            book.reader = tracker
            book.reading = True
            fixed = (lambda: make_batch(spec, setup.batch, setup.seq)) if opts.lengths == "fixed" else None
            session = stack.enter_context(tracked_session(built, setup, tracker, fake=False, batch=fixed))
            loop, batch = session.loop, session.batch
        else:  # the overhead baseline: the same step, nothing tracked
            from memplan.trace import cuda as trace_cuda
            from memplan.trace.build import materialize
            from memplan.trace.step import TrainLoop

            tracker, session = Recorder(book), None
            stack.enter_context(trace_cuda.cuda_semantics(autocast=setup.precision.autocast))
            materialize(built.model, init_values=True)
            batch = make_batch(spec, setup.batch, setup.seq) if opts.lengths == "fixed" else None
            loop = TrainLoop(built.model, setup, tracker, built.compute_dtype)
            stack.callback(loop.close)
        lengths = lengths_for(setup, opts.lengths, opts.seed, opts.warmup + opts.steps + 1)

        def batches(offset):
            def get(i):
                if batch is not None:
                    return batch, setup.batch * setup.seq * setup.grad_accum
                b = make_batch(spec, setup.batch, lengths[offset + i])
                if session is not None:
                    session.track_batch(b)
                return b, setup.batch * lengths[offset + i] * setup.grad_accum  # iteration() runs grad_accum
            return get

        book.enter(None)  # load ends
        run_steps(loop, book, clock, batches(0), opts.warmup, after_first=loop.tag_states)
        if opts.instrument:
            tracker.start_window()  # peaks from here: the measured steps only
        times, tokens = [], []
        book.timing = True
        run_steps(loop, book, clock, batches(opts.warmup), opts.steps, times, tokens,
                  after_first=loop.tag_states if opts.warmup == 0 else None)
        book.timing = False
        if opts.marks and opts.instrument:  # one untimed probe step with the per-layer hooks on
            handles = install_marks(built, tracker)
            book.marks_on = True
            run_steps(loop, book, clock, batches(opts.warmup + opts.steps), 1)
            book.marks_on = False
            for h in handles:
                h.remove()

    measured = {**throughput(spec, setup, times, tokens, None), "warmup": opts.warmup, "lengths": opts.lengths,
                "phase_time_s": phase_times(book)}
    if not opts.instrument:
        return Outcome("ok", measured={**measured, "peak": None, "phases": None, "categories": None,
                                       "layers": []})
    measured.update(tracked_block(tracker, book, session.load_peak))
    notes = list(built.warnings)
    if setup.offload_activations:
        from memplan.estimate.offload import MEASURE_CPU_NOTE

        notes.append(MEASURE_CPU_NOTE)
    return Outcome("ok", measured=measured, warnings=notes)


def tracked_block(tracker, book, load_peak: int) -> dict:
    """A CPU record's memory fields from memplan's tracker (no CUDA levels: CPU_DEVICE_REASON) and the phase book;
    one copy for the one-process and the DeepSpeed workers (memplan.measure.deepspeed)."""
    peaks = {Phase.LOAD: load_peak, **tracker.phase_peaks}
    cats = tracker.categories_at(tracker.peak_seq)
    return {
        "peak": {"allocated_bytes": tracker.peak, "reserved_bytes": None, "device_bytes": None,
                 "device_reason": CPU_DEVICE_REASON, "phase": tracker.peak_phase.value},
        "phases": phases_block(book, peaks, {}),
        "categories": {c.value: int(n) for c, n in cats.items()},
        "context_bytes": None, "alloc_retries": None, "num_ooms": None, "layers": book.marks,
    }
