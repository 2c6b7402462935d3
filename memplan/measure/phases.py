"""Phase bookkeeping and the step loop shared by the CPU and CUDA measurements.

TrainLoop (memplan.trace.step) calls `set_phase` at every phase change; the measurement hands it a tracker whose
phase changes reach a PhaseBook. The book does two separate jobs, switched per pass so that they never share a
step:
  timing   a clock mark (CUDA event / perf_counter) at each boundary: the timed steps, where nothing else runs.
  reading  memory read at each boundary through `reader.boundary()` (end allocated, the phase's own peak, and for
           CUDA the reserved peak, with the peak counters reset for the next phase): the load and the memory pass.
On CUDA the two never overlap (the timed window holds CUDA events only; memory is read on untimed steps that
allocate what every steady-state step allocates). On the CPU the allocated bytes come from memplan's
AllocTracker, which is a dispatch mode around the whole run: CPU times include it (they are CI numbers only).
"""
from __future__ import annotations

import os
import random
import statistics
from dataclasses import dataclass, field
from typing import Callable

from memplan.categories import Phase
from memplan.estimate.flops import compute_dtype, flops_per_token
from memplan.measure.faults import faults_for, fire
from memplan.measure.timing import summarize
from memplan.spec.setup import TrainingSetup

PHASE_LOG_PREFIX = "memplan-measure-phase:"  # worker stderr lines: the phase a crashed worker died in


@dataclass
class Outcome:
    """What one measurement produced: status ok / oom / error, the phase it failed in, the measured block."""

    status: str
    failed_phase: str | None = None
    error: str | None = None
    measured: dict | None = None
    warnings: list[str] = field(default_factory=list)


class PhaseBook:
    """Fed at every phase boundary (TrainLoop's set_phase, and the loop at load / step ends); see the module doc.
    `reading` and `timing` are switched by the caller per pass."""

    def __init__(self, clock, reader, name: str | None, phase_log: bool):
        self.clock, self.reader = clock, reader
        self.phase: Phase | None = None
        self.reading = False
        self.timing = False
        self.ends: dict[Phase, int] = {}
        self.peaks: dict[Phase, int] = {}
        self.peaks_reserved: dict[Phase, int] = {}
        self.times: dict[Phase, list[float]] = {}
        self.marks_on = False
        self.marks: list[dict] = []
        self._step_marks: list = []
        self._faults = faults_for(name)
        self._log = phase_log

    def begin_step(self) -> None:
        """A step starts: phase times count from here (what came before, e.g. the load, is no step's)."""
        self._step_marks = []
        if self.reading:
            self.reader.boundary()  # the batch's own allocation is not a phase's peak

    def enter(self, phase: Phase | None) -> None:
        """Close the current phase; open `phase` (None: between steps)."""
        if self.reading and self.phase is not None:
            end, peak, peak_res = self.reader.boundary()
            self.ends[self.phase] = end
            if peak is not None:
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), peak)
            if peak_res is not None:
                self.peaks_reserved[self.phase] = max(self.peaks_reserved.get(self.phase, 0), peak_res)
        if self.timing:
            self._step_marks.append((phase, self.clock.mark()))
        self.phase = phase
        if phase is not None:
            if self._log:
                os.write(2, f"{PHASE_LOG_PREFIX} {phase.value}\n".encode())
            kind = self._faults.pop(phase.value, None)
            if kind is not None:
                fire(kind, phase.value)

    def mark(self, label: str) -> None:
        if self.marks_on:
            self.marks.append({"mark": label, "phase": self.phase.value if self.phase else None,
                               "allocated_bytes": self.reader.current()})

    def step_times(self) -> None:
        """After the clock's sync: add the step's phase durations (timed steps only)."""
        seq, self._step_marks = self._step_marks, []
        if not self.timing:
            return
        for (ph, a), (_, b) in zip(seq, seq[1:]):
            if ph is not None:
                self.times.setdefault(ph, []).append(self.clock.elapsed(a, b))


class Recorder:
    """The tracker interface TrainLoop and the layer marks call (track / set_phase / set_mark / seq), on a device
    where nothing needs tagging: phase changes go to the PhaseBook."""

    seq = 0

    def __init__(self, book: PhaseBook):
        self.book = book

    def track(self, t, tag, op: str = "external") -> None:
        pass

    def set_phase(self, phase: Phase) -> None:
        self.book.enter(phase)

    def set_mark(self, mark: str) -> None:
        self.book.mark(mark)


# ---- batches and steps -------------------------------------------------------------------------------------------
def lengths_for(setup: TrainingSetup, lengths: str, seed: int, n: int) -> list[int]:
    """Padded length of each of n steps' batches: --seq ("fixed", and packed rows), or ("varied") the longest of
    `batch` lengths drawn from the setup's distribution (memplan.spec.lengths; `varied` = uniform in [seq/2, seq]),
    capped at --seq and rounded up to --pad-to-multiple-of (memplan.estimate.lengths.padded)."""
    from memplan.estimate.lengths import padded
    from memplan.spec.lengths import VARIED, histogram, is_fixed

    if lengths == "fixed" or setup.packing:
        return [setup.seq] * n
    rng = random.Random(seed)
    pairs = histogram(VARIED if is_fixed(setup.lengths) else setup.lengths, setup.seq)
    values, weights = [l for l, _ in pairs], [c for _, c in pairs]
    return [padded(max(rng.choices(values, weights, k=setup.batch)), setup.seq, setup.pad_multiple)
            for _ in range(n)]


Batches = Callable[[int], tuple[dict, int]]  # step index -> (batch, tokens the optimizer step trains on)


def run_steps(loop, book: PhaseBook, clock, batches: Batches, n: int, times: list | None = None,
              tokens: list | None = None, after_first: Callable | None = None) -> None:
    """n steps; each one's time (clock marks around the iteration, read after the sync) when `times` is given."""
    for i in range(n):
        batch, ntok = batches(i)
        book.begin_step()
        t0 = clock.mark() if times is not None else None
        loop.iteration(batch)
        book.enter(None)
        t1 = clock.mark() if times is not None else None
        clock.sync()
        book.step_times()
        if times is not None:
            times.append(clock.elapsed(t0, t1))
            tokens.append(ntok)
        if i == 0 and after_first is not None:
            after_first()


def phase_times(book: PhaseBook) -> dict:
    return {p.value: statistics.median(v) for p, v in book.times.items() if v}


def phases_block(book: PhaseBook, peaks: dict, reserved: dict) -> dict:
    return {p.value: {"end_allocated_bytes": book.ends.get(p), "peak_allocated_bytes": peaks.get(p),
                      "peak_reserved_bytes": reserved.get(p)} for p in Phase if p in book.ends}


# ---- throughput ----------------------------------------------------------------------------------------------------
def mfu_dtype(setup: TrainingSetup, tf32: bool = False) -> str:
    """The GPU profile's tflops key for MFU: memplan.estimate.flops.compute_dtype (the one rule, also the
    throughput model's), with fp32 matmuls counted at the TF32 peak when the run enabled TF32."""
    key = compute_dtype(setup.precision)
    return "tf32" if key == "fp32" and tf32 else key


def peak_tflops(gpu, setup: TrainingSetup, tf32: bool = False) -> float | None:
    """The dense peak MFU is measured against; None without a GPU profile or a figure for the dtype."""
    if gpu is None:
        return None
    return gpu.peak_tflops(mfu_dtype(setup, tf32)) or None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation against a dense peak (TFLOPS); None without a peak."""
    if not peak or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak * 1e12)


def throughput(spec, setup, times: list[float], tokens: list[int], peak: float | None) -> dict:
    fpt = flops_per_token(spec, setup).model  # model FLOPs (no recomputation): the MFU numerator
    tps = sum(tokens) / sum(times) if times and sum(times) > 0 else 0.0
    return {"steps": len(times), "tokens_per_step": int(round(sum(tokens) / len(tokens))) if tokens else 0,
            "step_time_s": summarize(times), "tokens_per_s": tps, "model_flops_per_token": fpt,
            "mfu": mfu(tps, fpt, peak), "peak_tflops": peak}
