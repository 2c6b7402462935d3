"""--engine deepspeed in `memplan measure --gpus N --zero K`: one rank of a DeepSpeed ZeRO job, run by a worker of
memplan.measure.distributed (launched by accelerate's DeepSpeed launcher: `accelerate launch --use_deepspeed
--deepspeed_config_file JOBDIR/ds_config.json`, see that module), on the default process group the worker joined.

The engine and its config are the trace's (memplan.trace.deepspeed: ds_config, open_engine, and on the CPU the
whole `session`: the patches, the untracked collectives, the tags, the batch), so a measurement and a trace run the
same DeepSpeed step and differ only where the hardware does.

  --device cpu   gloo ranks, DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu), real CPU tensors under memplan's
                 tracker (the trace's DsTracker, fed to the PhaseBook): allocated bytes per phase and category, no
                 reserved or device level. CI runs it (tests/test_measure_deepspeed.py): each rank's phase peaks
                 equal that rank's trace.
  --device cuda  NCCL ranks, DeepSpeed's CUDA accelerator, the caching allocator's counters and NVML read at phase
                 boundaries by memplan.measure.cuda.measure_cuda (its `build` / `make_loop` seams). WRITTEN, NEVER
                 RUN: no GPU has been lent to this project. There fp16 (DeepSpeed's loss scaler), ZeRO-0 and
                 ZeRO-Offload (DeepSpeedCPUAdam, JIT-built by DeepSpeed's op builder at the first step) are allowed,
                 which the CPU cannot run (memplan.measure.deepspeed_support.refusal).

What neither device runs gets one line and exit 2 (deepspeed_support.refusal): the trace's limits
(memplan.trace.support.deepspeed_unsupported), less, on CUDA, the three above.
"""
from __future__ import annotations

from memplan.categories import Phase
from memplan.measure.options import MeasureOptions
from memplan.measure.phases import Outcome, PhaseBook, phase_times, run_steps, throughput
from memplan.spec.setup import TrainingSetup

CPU_NOTE = ("DeepSpeed 0.19.8 measured on real CPU tensors over gloo (memplan.measure.deepspeed): allocated bytes per "
            "rank under memplan's tracker; collectives' own buffers not counted")


# ---- --device cpu ---------------------------------------------------------------------------------------------------
class Loop:
    """The trace's DeepSpeed iteration (memplan.trace.deepspeed.iteration, then the engine's states tagged, as
    trace_built does after each) behind the TrainLoop interface memplan.measure.phases.run_steps calls."""

    def __init__(self, engine, setup: TrainingSetup, tracker):
        self.engine, self.setup, self.tracker = engine, setup, tracker

    def iteration(self, batch: dict) -> None:
        from memplan.trace.deepspeed import iteration, tag_engine

        iteration(self.engine, batch, self.setup, self.tracker)
        tag_engine(self.engine, self.tracker)

    def close(self) -> None:  # the session (CPU) or measure_cuda's caller (CUDA) destroys the engine
        pass


def measure_cpu(spec, setup: TrainingSetup, opts: MeasureOptions, book: PhaseBook, clock) -> Outcome:
    """One rank on the CPU (module doc): the trace's session, warm-up and timed steps, then one untimed step with
    the per-layer marks; peaks from the first timed step on (the trace reports its last of ITERATIONS steps)."""
    from memplan.measure.cpu import ROUND_TO, book_tracker, tracked_block
    from memplan.trace import deepspeed as tds
    from memplan.trace.build import build
    from memplan.trace.runner import install_marks
    from memplan.trace.session import quiet

    if opts.lengths != "fixed":
        from memplan.errors import MemplanError

        raise MemplanError("--engine deepspeed measures fixed-shape batches (--lengths fixed), as the trace does")
    book.enter(Phase.LOAD)
    tracker = book_tracker(book, tds.DsTracker, round_to=ROUND_TO)
    book.reader = tracker
    book.reading = True
    tokens_per_step = setup.batch * setup.seq * setup.grad_accum
    with quiet():
        built = build(spec, setup)
        with tds.session(spec, setup, built, tracker) as ses:
            loop = Loop(ses.engine, setup, tracker)

            def batches(i):
                return ses.batch, tokens_per_step
            book.enter(None)  # load ends
            run_steps(loop, book, clock, batches, opts.warmup)
            tracker.start_window()  # peaks from here: the measured steps only
            times, tokens = [], []
            book.timing = True
            run_steps(loop, book, clock, batches, opts.steps, times, tokens)
            book.timing = False
            if opts.marks:  # one untimed probe step with the per-layer hooks on
                handles = install_marks(built, tracker)
                book.marks_on = True
                run_steps(loop, book, clock, batches, 1)
                book.marks_on = False
                for h in handles:
                    h.remove()
            load_peak = ses.load_peak
    measured = {**throughput(spec, setup, times, tokens, None), "warmup": opts.warmup, "lengths": opts.lengths,
                "phase_time_s": phase_times(book)}
    measured.update(tracked_block(tracker, book, load_peak))
    return Outcome("ok", measured=measured, warnings=[*built.warnings, CPU_NOTE])


# ---- --device cuda (written, never run: no GPU has been lent) -------------------------------------------------
class _Untracked:
    """open_engine's tracker on CUDA: the allocator's counters are read instead, nothing is tagged."""

    seq = 0

    def track(self, t, tag, op: str = "external") -> None:
        pass


class CudaStep:
    """measure_cuda's `build` and `make_loop` seams for DeepSpeed: the model built as the trace builds it (meta,
    then materialized on the host), deepspeed.initialize moving it to this rank's GPU (as HF Trainer / accelerate
    do without zero.Init: the whole model is on the host first), the trace's iteration stepping it."""

    def __init__(self):
        self.engine = None

    def build(self, spec, setup: TrainingSetup, device):
        import torch

        from memplan.trace import deepspeed as tds
        from memplan.trace.build import build

        tds.import_deepspeed("cuda").init_distributed(dist_backend=torch.distributed.get_backend())
        built = build(spec, setup)
        self.engine = tds.open_engine(built, setup, _Untracked(), accelerator="cuda")
        return built

    def make_loop(self, built, setup: TrainingSetup, recorder, device, cuda):
        engine = self.engine

        class CudaLoop(Loop):
            def close(self):
                engine.destroy()
        return CudaLoop(engine, setup, recorder)


def measure_cuda(spec, setup: TrainingSetup, opts: MeasureOptions, book: PhaseBook, clock, peak: float | None,
                 cuda=None, nvml=None) -> Outcome:
    """One rank on its GPU (module doc; NOT RUN yet): memplan.measure.cuda.measure_cuda with DeepSpeed's engine.
    `cuda` / `nvml`: measure_cuda's seams (tests/test_measure_deepspeed.py runs this path on its simulated CUDA)."""
    from memplan.measure.cuda import measure_cuda as run

    step = CudaStep()
    return run(spec, setup, opts, book, clock, peak, cuda=cuda, nvml=nvml, build=step.build,
               make_loop=step.make_loop)
