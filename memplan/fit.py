"""`memplan fit`: which setups fit a GPU, with their largest micro-batch and sequence length, ranked by speed.

A *choice* is one point of the setup space (precision × optimizer × PEFT method × checkpointing × ZeRO stage ×
engine × offload, the rest fixed by the query; combinations TrainingSetup refuses, such as fsdp-bf16 without
FSDP or optimizer-only offload under FSDP2, are skipped and counted, not errors). Engine and offload are searched
with --gpus > 1 (one GPU runs ZeRO-0, nothing to shard or offload). Rows with offload report the host RAM their
node needs: the per-GPU offloaded bytes × the GPUs of one node (min(gpus, gpus_per_node)).

For each choice the search finds, at the device level with a margin (peak.device_bytes ≤ (1 − margin) · GPU
memory):

- max_batch: the largest micro-batch in [min_batch, max_batch cap] that fits at the query's sequence length;
- max_seq: the largest sequence length that fits at min_batch, among the query's length and the multiples of
  128 above it up to the model's max_position_embeddings (and the --max-seq cap).

Technique axes (issue 13): the memory techniques that are opt-in are searched when asked for, each beside its
absence, and left at the query's base setup otherwise, so the default space is the one above:
--optimizer-in-backward, --offload-activations, --fp8 RECIPES, --loss a comma list (standard, chunked[:N],
liger-fused), --ckpt-every a comma list (full / op-selective choices), packing with --lengths, --optimizer-impl a
comma list (folded into the optimizers searched: with_impls). --reentrant and --logits-to-keep are flags applied to
every choice, not searched: reentrant and non-reentrant checkpointing keep the same storages at the peak in every
setup traced, so their estimate is the same (docs/memory-techniques.md "Reentrant vs non-reentrant"), and keeping
K logits changes the job (its loss), not how it is run. docs/memory-techniques.md "fit" lists every technique flag.

Choices that do not fit at (min_batch, seq) are left out. The rest are ranked (SortKey, `--sort`) by predicted
tokens/sec per GPU (memplan.estimate.throughput.predict at max_batch), then by larger micro-batch, longer sequence,
less memory; or by micro-batch, sequence length or memory first.

Micro-batch and speed: the throughput model assumes a utilization that does not depend on the micro-batch (no
source memplan holds gives that dependence, and memplan does not invent a curve), so predicted tokens/s is the
same at every micro-batch that fits, apart from communication. Rows are predicted at their largest micro-batch,
ties go to the larger one, and the output says that the assumption is made (BATCH_NOTE).

Ties: choices that differ only by the optimizer and get the same answer (max batch, max seq, predicted speed,
and peak memory within TIE_FRACTION of the GPU) are one row listing those optimizers (FitRow.optimizers),
instead of one row per optimizer.

Search: memory grows with micro-batch and with sequence length for everything else fixed (tests/test_fit.py
checks this on sampled setups rather than assuming it), and is close to linear in each, so each search
extrapolates and interpolates (regula falsi, with bisection as the fallback) instead of bisecting blindly:
about four estimates per search where plain bisection over 1024 batch sizes takes ten. Whatever memory does,
the answer x satisfies "x fits and the next grid point does not (or x is the cap)": the tests hold it to that.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from itertools import product
from typing import Callable

from memplan.errors import MemplanError
from memplan.spec.gpu import GpuSpec
from memplan.spec.model import ModelSpec
from memplan.spec.setup import (ABSURD_TOKENS, DEFAULT_LOSS_CHUNKS, Checkpointing, Engine, Fp8Recipe, Loss, Optimizer,
                                OptimizerImpl, PeftMethod, Precision, TrainingSetup)

SEQ_STEP = 128  # sequence lengths searched: multiples of 128 (kernel-friendly tile sizes)
DEFAULT_MARGIN = 0.05  # keep 5% of device memory free: allocator spikes and library workspaces vary by version
DEFAULT_MAX_BATCH = 1024
DEFAULT_MAX_SEQ = 131072

# The default space. fp16 / fp16-master are left out because their memory equals their bf16 counterparts' (plus
# a GradScaler's few bytes) and their predicted speed is the same; pass --precision to search them.
DEFAULT_PRECISIONS = (Precision.FP32, Precision.BF16, Precision.BF16_MASTER, Precision.PURE_BF16)
# ... on a GPU without bf16 tensor cores (GpuSpec.bf16: T4, V100): fp16 with a GradScaler instead (no pure-fp16:
# fp16 optimizer states underflow, memplan has no such precision)
FP16_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.FP16_MASTER)


def default_precisions(gpu, gpus: int = 1) -> tuple[Precision, ...]:
    """The precisions fit searches when none is asked for: bf16 ones where the GPU has bf16, else fp16 ones;
    on several bf16 GPUs FSDP2's fsdp-bf16 too (it needs ZeRO-2/3)."""
    if not gpu.bf16:
        return FP16_PRECISIONS
    return DEFAULT_PRECISIONS + ((Precision.FSDP_BF16,) if gpus > 1 else ())
# adamw-forloop, momentum and the paged variants add nothing a user picks for memory over these five.
DEFAULT_OPTIMIZERS = (Optimizer.ADAMW, Optimizer.ADAMW_FUSED, Optimizer.ADAMW_8BIT, Optimizer.ADAFACTOR,
                      Optimizer.SGD)
# --peft freeze (head only by default) is left out: it is fast because it trains only the head, a different job
# from the others, and would top every ranking; pass --peft freeze (and --train-layers) to search it.
DEFAULT_PEFTS = tuple(p for p in PeftMethod if p is not PeftMethod.FREEZE)
DEFAULT_CHECKPOINTING = tuple(Checkpointing)
# Optimizers whose peaks differ by less than 1% of the GPU's memory tie (with the same max batch, max seq and
# speed): a fifth of the 5% DEFAULT_MARGIN, which itself covers allocator and library variation of that size.
TIE_FRACTION = 0.01
BATCH_NOTE = ("utilization is assumed independent of the micro-batch (no measured dependence to draw on), so "
              "predicted tokens/s barely changes with it; each row is predicted at its largest micro-batch")


class Offload(str, Enum):
    """What a choice offloads to CPU RAM (TrainingSetup's offload flags per engine)."""

    NONE = "none"
    OPTIMIZER = "optimizer"  # DeepSpeed ZeRO-Offload: optimizer states and gradient partitions (--offload-optimizer)
    ALL = "all"  # FSDP2 CPUOffloadPolicy (--offload-params); DeepSpeed ZeRO-3 --offload-optimizer --offload-params

    def flags(self, engine: Engine) -> dict:
        if self is Offload.NONE:
            return {"offload_optimizer": False, "offload_params": False}
        if self is Offload.OPTIMIZER:
            return {"offload_optimizer": True, "offload_params": False}
        return {"offload_optimizer": engine is Engine.DEEPSPEED, "offload_params": True}

    @staticmethod
    def of(setup: TrainingSetup) -> "Offload":
        if setup.offload_params:
            return Offload.ALL
        return Offload.OPTIMIZER if setup.offload_optimizer else Offload.NONE


@dataclass(frozen=True)
class LossChoice:
    """One value of fit's loss axis (--loss standard,chunked:N,liger-fused): the loss and its chunk count."""

    loss: Loss = Loss.STANDARD
    chunks: int = DEFAULT_LOSS_CHUNKS  # --loss chunked:N; the default for the other losses (TrainingSetup's rule)

    @property
    def text(self) -> str:
        return f"{self.loss.value}:{self.chunks}" if self.loss is Loss.CHUNKED else self.loss.value


def with_impls(optimizers: tuple[Optimizer, ...], impls: tuple[OptimizerImpl, ...]
               ) -> tuple[tuple[Optimizer, ...], tuple[str, ...]]:
    """--optimizer-impl foreach,fused,for-loop over the searched optimizers: each one run by every asked
    implementation it has (the implementation is folded into the Optimizer value: adamw + fused = adamw-fused,
    memplan.spec.setup.IMPLEMENTATIONS). An optimizer with no torch implementations (bitsandbytes' kernels) is
    searched as it is; one whose implementations are all unasked is left out. Returns the optimizers and one note
    per optimizer left out."""
    from memplan.spec.setup import IMPLEMENTATIONS

    out, notes = [], []
    for o in optimizers:
        variants = IMPLEMENTATIONS.get(o.base)
        if variants is None:
            notes.append(f"--optimizer-impl: {o.value} runs its own kernel (no torch implementations); searched as "
                         f"it is")
            out.append(o)
            continue
        mine = [variants[i] for i in impls if i in variants]
        if not mine:
            notes.append(f"--optimizer-impl {','.join(i.value for i in impls)}: {o.base.value} has no such "
                         f"implementation (it has {', '.join(i.value for i in variants)}); left out")
        out.extend(mine)
    if not out:
        raise MemplanError(f"--optimizer-impl {','.join(i.value for i in impls)} leaves no optimizer to search")
    return tuple(dict.fromkeys(out)), tuple(dict.fromkeys(notes))


class SortKey(str, Enum):
    """What fit ranks by first (`--sort`); the rest break ties in the order tokens, batch, seq, memory."""

    TOKENS = "tokens"  # predicted tokens/s per GPU, fastest first
    BATCH = "batch"  # largest micro-batch at --seq first
    SEQ = "seq"  # longest sequence at --min-batch first
    MEMORY = "memory"  # smallest peak device memory first


@dataclass(frozen=True)
class Space:
    """The axes searched; every combination is a choice (invalid combinations are skipped)."""

    precisions: tuple[Precision, ...] = DEFAULT_PRECISIONS
    optimizers: tuple[Optimizer, ...] = DEFAULT_OPTIMIZERS
    pefts: tuple[PeftMethod, ...] = DEFAULT_PEFTS
    checkpointing: tuple[Checkpointing, ...] = DEFAULT_CHECKPOINTING
    zeros: tuple[int, ...] = (0, 1, 2, 3)
    engines: tuple[Engine, ...] = tuple(Engine)
    offloads: tuple[Offload, ...] = tuple(Offload)
    # --optimizer-in-backward (fit's flag) searches (False, True): torchtune's optimizer_in_bwd frees each gradient
    # inside backward (one GPU, --grad-accum 1; memplan.estimate.phases.in_backward)
    in_backward: tuple[bool, ...] = (False,)
    # --fp8 (fit's flag) searches these torchao float8 recipes beside none, on GPUs with fp8 tensor cores only
    # (GpuSpec.fp8; memplan.estimate.fp8): they change autocast's weight cache and the matmul rate
    fp8s: tuple[Fp8Recipe, ...] = (Fp8Recipe.NONE,)
    # padded batches and/or packed rows (TrainingSetup.packing); fit's CLI searches both when --lengths gives a
    # distribution (memplan.estimate.lengths: the worst padded batch vs a row of --seq, real tokens/s)
    packings: tuple[bool, ...] = (False,)
    # --offload-activations (fit's flag) searches (False, True): torchtune's OffloadActivations (one GPU, FSDP2;
    # memplan.estimate.offload): less device memory, host RAM and host-link time in its place
    offload_activations: tuple[bool, ...] = (False,)
    # --loss as a comma list (fit's CLI): every choice with each loss (torchtune's chunked CE, Liger's fused CE:
    # memplan.estimate, the logits they never materialize); empty: the query's base setup's loss
    losses: tuple[LossChoice, ...] = ()
    # --ckpt-every as a comma list: each full / op-selective choice wrapping every K-th block for each K
    # (torchtitan's selective_ac_option=K); empty: the base setup's ckpt_every
    ckpt_everys: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("precisions", "optimizers", "pefts", "checkpointing", "zeros", "engines", "offloads"):
            if not getattr(self, name):
                raise MemplanError(f"fit: the {name} list is empty")
        if any(z not in (0, 1, 2, 3) for z in self.zeros):
            raise MemplanError(f"fit: ZeRO stages are 0-3, got {list(self.zeros)}")
        if any(k < 1 for k in self.ckpt_everys):
            raise MemplanError(f"--ckpt-every must be positive, got {list(self.ckpt_everys)}")

    def choices(self, gpus: int):
        """(precision, optimizer, peft, checkpointing, zero, engine, offload, in_backward, fp8, packing,
        offload_activations, loss, ckpt_every) tuples; one GPU has nothing to shard or offload: ZeRO 0, the first
        engine, no offload; optimizer-in-backward runs on one GPU, activation offloading there and under FSDP2 (setup
        refuses the rest). loss / ckpt_every None: the base setup's; a policy that wraps no blocks takes only the first
        ckpt_every (it has none)."""
        if gpus > 1:
            zeros, engines, offloads, inb = self.zeros, self.engines, self.offloads, (False,)
        else:
            zeros, engines, offloads, inb = (min(self.zeros),), self.engines[:1], (Offload.NONE,), self.in_backward
        everys = self.ckpt_everys or (None,)
        return (c for c in product(self.precisions, self.optimizers, self.pefts, self.checkpointing, zeros, engines,
                                   offloads, inb, self.fp8s, self.packings, self.offload_activations,
                                   self.losses or (None,), everys)
                if c[-1] is everys[0] or c[3].wraps_blocks)

    @property
    def size(self) -> int:
        """Choices at most (one GPU and the policies that wrap no blocks collapse some axes)."""
        return (len(self.precisions) * len(self.optimizers) * len(self.pefts) * len(self.checkpointing)
                * len(self.zeros) * len(self.engines) * len(self.offloads) * len(self.in_backward)
                * len(self.fp8s) * len(self.packings) * len(self.offload_activations) * max(1, len(self.losses))
                * max(1, len(self.ckpt_everys)))


@dataclass(frozen=True)
class Query:
    """What fit searches for: the fixed part of the setup (base), the sequence length, bounds and margin."""

    base: TrainingSetup  # gpus, lora rank/targets, attention, grad_accum, ... (its batch/seq are ignored)
    seq: int
    min_batch: int = 1
    max_batch: int = DEFAULT_MAX_BATCH
    max_seq: int = DEFAULT_MAX_SEQ
    margin: float = DEFAULT_MARGIN

    def __post_init__(self):
        if not 0 <= self.margin < 1:
            raise MemplanError(f"--margin must be in [0, 1), got {self.margin}")
        if self.min_batch <= 0 or self.max_batch < self.min_batch:
            raise MemplanError(f"need 1 ≤ --min-batch ≤ --max-batch, got {self.min_batch} and {self.max_batch}")
        if self.seq <= 0 or self.max_seq <= 0:
            raise MemplanError("--seq and --max-seq must be positive")


@dataclass(frozen=True)
class FitRow:
    """One choice that fits: the largest micro-batch at the query's seq, the largest seq at min_batch."""

    setup: TrainingSetup  # at max_batch and the query's seq
    max_batch: int
    batch_at_cap: bool  # max_batch is the --max-batch cap: more may fit
    max_seq: int  # at min_batch
    seq_at_cap: bool  # max_seq is the model's positions or the --max-seq cap
    peak_device_bytes: int  # at max_batch
    headroom_bytes: int  # against the whole GPU memory (the margin is inside it)
    throughput: dict  # memplan.estimate.throughput.Throughput.to_dict() at max_batch
    optimizers: tuple[Optimizer, ...] = field(default=())  # the optimizers that tie on this row (setup's included)
    host_bytes: int = 0  # offloaded to CPU RAM per GPU at max_batch

    @property
    def host_bytes_per_node(self) -> int:
        """CPU RAM one node needs for the offloaded states of its GPUs."""
        return self.host_bytes * min(self.setup.gpus, self.setup.gpus_per_node)

    def __post_init__(self):
        if not self.optimizers:
            object.__setattr__(self, "optimizers", (self.setup.optimizer,))

    def to_dict(self) -> dict:
        s = self.setup
        t = self.throughput
        return {"precision": s.precision.value, "optimizer": s.optimizer.value,
                "optimizers": [o.value for o in self.optimizers], "peft": s.peft.value,
                "checkpointing": s.checkpointing.value, "zero": s.zero, "engine": s.engine.value,
                "offload": Offload.of(s).value, "fp8": s.fp8.value, "gpus": s.gpus, "gpus_per_node": s.gpus_per_node, "seq": s.seq,
                "max_batch": self.max_batch, "batch_at_cap": self.batch_at_cap, "max_seq": self.max_seq,
                "seq_at_cap": self.seq_at_cap, "peak_device_bytes": self.peak_device_bytes,
                "headroom_bytes": self.headroom_bytes, "host_bytes_per_gpu": self.host_bytes,
                "host_bytes_per_node": self.host_bytes_per_node, "tokens_per_s": t["tokens_per_s"],
                "tokens_per_s_total": t["tokens_per_s_total"], "step_s": t["step_s"], "mfu": t["mfu"],
                "offload_activations": s.offload_activations,
                **({"loss": LossChoice(s.loss, s.loss_chunks).text} if s.loss is not Loss.STANDARD else {}),
                **({"ckpt_every": s.ckpt_every} if s.ckpt_every != 1 else {}),
                **({"packing": s.packing, "padding_waste": t.get("padding_waste", 0.0)}
                   if s.lengths != "fixed" or s.packing else {})}


@dataclass(frozen=True)
class FitReport:
    model: str
    gpu: GpuSpec
    query: Query
    searched: int  # choices tried
    invalid: int  # choices the setup rules or the estimator refuse (e.g. QLoRA with fp32, prefix with checkpointing)
    rows: tuple[FitRow, ...]  # ranked, optimizers that tie merged
    estimates: int  # estimator calls made
    fitting: int = 0  # choices that fit (before ties are merged)
    sort: SortKey = SortKey.TOKENS

    @property
    def limit_bytes(self) -> int:
        return int(self.gpu.memory_bytes * (1 - self.query.margin))


class _Grid:
    """Candidate values: start, then the multiples of `step` above start, up to cap."""

    def __init__(self, start: int, step: int, cap: int):
        self.start, self.step = start, step
        self.first = (start // step + 1) * step  # the first multiple of step above start
        self.n = 1 + max(0, (cap - self.first) // step + 1) if cap >= self.first else 1

    def value(self, i: int) -> int:
        return self.start if i == 0 else self.first + (i - 1) * self.step

    def index_below(self, v: float) -> int:
        """Largest index whose value ≤ v (0 at least)."""
        if v < self.first:
            return 0
        return min(self.n - 1, int((v - self.first) // self.step) + 1)


def _largest(grid: _Grid, mem: Callable[[int], int | None], limit: int, guess: float | None = None) -> int:
    """Index of the largest grid value that fits, given that index 0 fits. mem(v) is the device peak at v
    (None when the estimator refuses v: treated as not fitting); `guess` is an optional first value to try.

    Unbracketed, it extrapolates the line through the last two fitting points to the limit (doubling while
    memory is flat, e.g. while the optimizer step's peak dominates); bracketed, it interpolates between the
    fitting and the failing end (regula falsi), bisecting whenever a step fails to halve the bracket. Every probe
    lies strictly inside the bracket, so it ends with lo fitting and lo + 1 failing or past the grid, whatever
    the shape of mem."""
    known: dict[int, int | None] = {}

    def at(i):
        if i not in known:
            known[i] = mem(grid.value(i))
        return known[i]

    lo, hi, prev, bisect = 0, grid.n, None, False  # lo fits; hi is the first index known not to (n: past the grid)
    while hi - lo > 1:
        m_lo = at(lo)
        if guess is not None:
            i, guess = grid.index_below(guess), None
        elif bisect:
            i = (lo + hi) // 2
        elif hi < grid.n and at(hi) is not None:  # m_lo ≤ limit < m_hi
            v_lo, v_hi = grid.value(lo), grid.value(hi)
            i = grid.index_below(v_lo + (limit - m_lo) / (at(hi) - m_lo) * (v_hi - v_lo))
        elif prev is not None and m_lo > at(prev):
            slope = (m_lo - at(prev)) / (grid.value(lo) - grid.value(prev))
            i = grid.index_below(grid.value(lo) + (limit - m_lo) / slope)
        else:
            i = 2 * lo if lo else 1  # flat so far: double
        i = min(max(i, lo + 1), hi - 1)
        width = hi - lo
        m = at(i)
        if m is not None and m <= limit:
            prev, lo = lo, i
        else:
            hi = i
        bisect = hi < grid.n and 2 * (hi - lo) > width and not bisect
    return lo


def _host_bytes(model: ModelSpec, gpu: GpuSpec, setup: TrainingSetup) -> int:
    """Bytes one GPU's offloaded states (or activations) take in CPU RAM (0 without offload)."""
    from memplan.estimate import estimate_spec

    if not (setup.offload_optimizer or setup.offload_params or setup.offload_activations):
        return 0
    return int(estimate_spec(model, setup, gpu).model_states.cpu_bytes)


def _estimator(model: ModelSpec, gpu: GpuSpec, counter: list[int]):
    from memplan.estimate import estimate_spec
    from memplan.estimate.overhead import default_overhead

    overhead = default_overhead()[0]  # the calibrated file's (`memplan calibrate --write`) when there is one

    def device_bytes(setup: TrainingSetup) -> int | None:
        counter[0] += 1
        try:
            return estimate_spec(model, setup, gpu, overhead).peak.device_bytes
        except MemplanError:
            return None

    return device_bytes


def _choice_setup(base: TrainingSetup, precision, optimizer, peft, ckpt, zero, engine=Engine.FSDP,
                  offload=Offload.NONE, in_backward=False, fp8=Fp8Recipe.NONE, packing=False,
                  offload_activations=False, loss: LossChoice | None = None,
                  ckpt_every: int | None = None) -> TrainingSetup | None:
    every, reentrant = (base.ckpt_every if ckpt_every is None else ckpt_every), base.ckpt_reentrant
    if not ckpt.wraps_blocks:
        every, reentrant = 1, False  # they apply to block-wrapping policies only
    losses = {} if loss is None else {"loss": loss.loss, "loss_chunks": loss.chunks}
    try:
        return replace(base, precision=precision, optimizer=optimizer, peft=peft, checkpointing=ckpt, zero=zero,
                       engine=engine, optimizer_in_backward=in_backward, fp8=fp8, **offload.flags(engine),
                       packing=packing, pad_multiple=1 if packing else base.pad_multiple,
                       offload_activations=offload_activations, ckpt_every=every, ckpt_reentrant=reentrant,
                       **losses)
    except MemplanError:  # an impossible combination (QLoRA with fp32, offload without ZeRO, fsdp-bf16 under DDP...)
        return None


def seq_cap(model: ModelSpec, query: Query) -> int:
    return min(model.max_positions, query.max_seq) if model.max_positions > 0 else query.max_seq


def _sized(setup: TrainingSetup, batch: int, seq: int) -> TrainingSetup:
    """`setup` at another micro-batch and sequence length, without dataclasses.replace's re-validation: the
    search makes ~15,000 of these per second of budget and replace() costs more than a third of an estimate.
    Safe because only batch and seq change, the callers keep both positive and batch·seq ≤ ABSURD_TOKENS, and
    every other field was validated when `setup` was built."""
    out = object.__new__(TrainingSetup)
    out.__dict__.update(setup.__dict__, batch=batch, seq=seq)
    return out


def _search_choice(setup: TrainingSetup, query: Query, max_seq: int, limit: int, m0: int, device_bytes):
    """(max batch, its index is the cap, its peak, max seq, its index is the cap) of one choice that fits at
    (min_batch, seq) with peak m0."""
    seq, b0 = query.seq, query.min_batch
    bytes_b = {b0: m0}

    def mem_b(b):
        if b not in bytes_b:
            bytes_b[b] = None if b * seq > ABSURD_TOKENS else device_bytes(_sized(setup, b, seq))
        return bytes_b[b]

    bgrid = _Grid(b0, 1, query.max_batch)
    bi = _largest(bgrid, mem_b, limit)
    batch = bgrid.value(bi)
    # memory grows by about the same bytes per token whether the tokens come as batch or as sequence: the batch
    # search's first step seeds the sequence search's first guess (regula falsi corrects it when it is not)
    guess = None
    if bytes_b.get(b0 + 1) is not None and bytes_b[b0 + 1] > m0:
        per_token = (bytes_b[b0 + 1] - m0) / seq
        guess = seq + (limit - m0) / (per_token * b0)
    bytes_s = {seq: m0}

    def mem_s(s):
        if s not in bytes_s:
            bytes_s[s] = None if s * b0 > ABSURD_TOKENS else device_bytes(_sized(setup, b0, s))
        return bytes_s[s]

    sgrid = _Grid(seq, SEQ_STEP, max_seq)
    si = _largest(sgrid, mem_s, limit, guess)
    return batch, bi == bgrid.n - 1, bytes_b[batch], sgrid.value(si), si == sgrid.n - 1


def sort_key(key: SortKey):
    """The ranking order for `key` (the first criterion), the others breaking ties. Ranked by speed, a choice
    that offloads comes after one that does not at the same predicted speed: the throughput model does not time
    the CPU optimizer step of offload, which is slower in practice, not faster."""
    crit = {SortKey.TOKENS: lambda r: (-r.throughput["tokens_per_s"], r.host_bytes > 0),
            SortKey.BATCH: lambda r: -r.max_batch, SortKey.SEQ: lambda r: -r.max_seq,
            SortKey.MEMORY: lambda r: r.peak_device_bytes}
    order = [key] + [k for k in SortKey if k is not key]
    return lambda r: tuple(crit[k](r) for k in order)


def _ties(a: FitRow, b: FitRow, gpu: GpuSpec) -> bool:
    """Same answer but for the optimizer: same max batch and seq (and caps), same speed, close peaks."""
    ta, tb = a.throughput["tokens_per_s"], b.throughput["tokens_per_s"]
    return ((a.max_batch, a.batch_at_cap, a.max_seq, a.seq_at_cap) == (b.max_batch, b.batch_at_cap, b.max_seq,
                                                                       b.seq_at_cap)
            and abs(ta - tb) <= 1e-9 * max(ta, tb, 1.0)
            and abs(a.peak_device_bytes - b.peak_device_bytes) <= TIE_FRACTION * gpu.memory_bytes)


def merge_ties(rows: list[FitRow], gpu: GpuSpec) -> list[FitRow]:
    """One row per run of optimizers that tie within a (precision, peft, checkpointing, zero, engine, offload) choice:
    the row of the largest peak among them (every listed optimizer fits there), listing the optimizers by peak."""
    groups: dict[tuple, list[list[FitRow]]] = {}
    for r in rows:
        s = r.setup
        runs = groups.setdefault((s.precision, s.peft, s.checkpointing, s.zero, s.engine, Offload.of(s),
                                  s.optimizer_in_backward, s.fp8, s.packing, s.offload_activations, s.loss,
                                  s.loss_chunks, s.ckpt_every), [])
        for run in runs:
            if all(_ties(r, o, gpu) for o in run):
                run.append(r)
                break
        else:
            runs.append([r])
    out = []
    for runs in groups.values():
        for run in runs:
            run.sort(key=lambda r: (r.peak_device_bytes, r.setup.optimizer.value))
            out.append(replace(run[-1], optimizers=tuple(r.setup.optimizer for r in run)))
    return out


def technique_suffix(s: TrainingSetup) -> str:
    """The searched technique values of a row beside its optimizers in fit's table (fp8 recipe, loss, every-k)."""
    parts = [f"fp8 {s.fp8.value}" if s.fp8 is not Fp8Recipe.NONE else "",
             f"loss {LossChoice(s.loss, s.loss_chunks).text}" if s.loss is not Loss.STANDARD else "",
             f"every {s.ckpt_every} blocks" if s.ckpt_every != 1 else ""]
    return "".join(f" · {p}" for p in parts if p)


def by_method(rows) -> list[tuple[PeftMethod, list[FitRow]]]:
    """Rows grouped by PEFT method, each group in the given (ranked) order, groups by their best row."""
    groups: dict[PeftMethod, list[FitRow]] = {}
    for r in rows:
        groups.setdefault(r.setup.peft, []).append(r)
    return list(groups.items())


def fit(model: ModelSpec, gpu: GpuSpec, query: Query, space: Space = Space(),
        sort: SortKey = SortKey.TOKENS) -> FitReport:
    """Search the space; see the module docstring."""
    from memplan.estimate import lengths
    from memplan.estimate.throughput import shaped_throughput
    from memplan.measure.utilization import utilization

    if gpu is None:
        raise MemplanError("memplan fit needs --gpu")
    if any(f is not Fp8Recipe.NONE for f in space.fp8s) and not gpu.fp8:  # never proposed where it cannot run
        raise MemplanError(f"--fp8: the {gpu.label} (compute capability {gpu.capability_label}) has no fp8 tensor "
                           f"cores (8.9 or newer: L4, L40, RTX 4090, H100, H200, B200; MI300X)")
    limit = int(gpu.memory_bytes * (1 - query.margin))
    counter = [0]
    device_bytes = _estimator(model, gpu, counter)
    max_seq = seq_cap(model, query)
    if query.seq > max_seq:
        raise MemplanError(f"--seq {query.seq} exceeds the {max_seq} positions searched for {model.name}")
    rows, searched, invalid = [], 0, 0
    utils = {}
    for choice in space.choices(query.base.gpus):
        searched += 1
        setup = _choice_setup(query.base, *choice)
        m0 = None if setup is None else device_bytes(_sized(setup, query.min_batch, query.seq))
        if m0 is None:
            invalid += 1
            continue
        if m0 > limit:
            continue
        bound = lengths.seq_bound(setup)  # an absolute length distribution: a longer --seq changes nothing
        cap = max_seq if bound is None else max(query.seq, min(max_seq, bound))
        batch, batch_cap, peak, longest, seq_cap_hit = _search_choice(setup, query, cap, limit, m0, device_bytes)
        best = replace(setup, batch=batch, seq=query.seq)
        if setup.precision not in utils:
            utils[setup.precision] = utilization(gpu, best)
        thr = shaped_throughput(model, best, gpu, utils[setup.precision])  # real tokens/s over --lengths
        rows.append(FitRow(setup=best, max_batch=batch, batch_at_cap=batch_cap, max_seq=longest,
                           seq_at_cap=seq_cap_hit, peak_device_bytes=peak, headroom_bytes=gpu.memory_bytes - peak,
                           throughput=thr, host_bytes=_host_bytes(model, gpu, best)))
    merged = sorted(merge_ties(rows, gpu), key=sort_key(sort))
    return FitReport(model=model.name, gpu=gpu, query=query, searched=searched, invalid=invalid, rows=tuple(merged),
                     estimates=counter[0], fitting=len(rows), sort=sort)
