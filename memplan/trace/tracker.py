"""A light allocation tracker: a TorchDispatchMode that accounts every storage from birth to death.

Every op output whose storage has not been seen is a new allocation (its size rounded up to `round_to`, 512 B
as the CUDA caching allocator rounds every block); a weakref callback on the storage object frees it. Storages
are tagged with a category (weights, gradients, saved-for-backward, ...); the tag a storage holds when the run
ends is the one it is reported under (a gradient is born as a backward output and becomes `.grad` one op later;
a forward output becomes an activation when a later op saves it).

Nothing per allocation is done beyond a dict lookup and one list append, so a 7B step traces in seconds;
torch.distributed._tools.MemTracker, the reference, does far more per op. Runs on real or fake tensors alike.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memplan.categories import Category, Phase

# Internal tags (ints: they are compared on every op). Several map to one public Category.
W, MW, G, OS, ACT, TMP, CAST, DEQ, WS, INPUT, HOST = range(11)
# the data-parallel engines' buffers (memplan.trace.distributed tags them)
ALL_GATHER, REDUCE_SCATTER, UNSHARDED_GRAD, DDP_BUCKET = range(11, 15)
UNTRACKED = -1  # a `scope` whose tensors are no allocation of the step (DTensor's metadata propagation)
CATEGORY = {W: Category.WEIGHTS, MW: Category.MASTER_WEIGHTS, G: Category.GRADIENTS, OS: Category.OPTIMIZER_STATES,
            ACT: Category.ACTIVATIONS, TMP: Category.TEMPORARIES, CAST: Category.TEMPORARIES,
            DEQ: Category.TEMPORARIES, WS: Category.TEMPORARIES, INPUT: Category.TEMPORARIES,
            ALL_GATHER: Category.TEMPORARIES, REDUCE_SCATTER: Category.TEMPORARIES,
            UNSHARDED_GRAD: Category.GRADIENTS, DDP_BUCKET: Category.GRADIENTS}
DETAIL = {CAST: "temporaries.weight_casts",  # autocast weight cache and other copies of weights
          DEQ: "temporaries.dequantized",  # NF4 weights dequantized for one matmul
          WS: "temporaries.kernel_workspace",  # CUDA kernel scratch added explicitly (see memplan.trace.cuda)
          INPUT: "temporaries.inputs",  # the micro-batch's token ids and labels, alive for the whole step
          ALL_GATHER: "temporaries.fsdp_all_gather",  # FSDP2 copy-in / all-gather buffers, unsharded parameters
          REDUCE_SCATTER: "temporaries.fsdp_reduce_scatter",  # FSDP2 reduce-scatter input (and output in flight)
          UNSHARDED_GRAD: "gradients.fsdp_unsharded",  # a unit's full gradients before (or between) reductions
          DDP_BUCKET: "gradients.ddp_buckets"}  # DDP's flat all-reduce buckets
_WEIGHTS = (W, MW, ALL_GATHER)  # a cast of these is a weight cast (unsharded FSDP parameters included)
_TO_COPY = torch.ops.aten._to_copy.default
_RESIZE = torch.ops.aten.resize_.default
_ITEM = torch.ops.aten._local_scalar_dense.default


@dataclass
class Rec:
    """One allocation: bytes (rounded), tag, the event that made it and the one that freed it, the op."""

    nbytes: int
    tag: int
    born: int
    died: int | None
    op: str
    mark: str


class AllocTracker(TorchDispatchMode):
    """Tracks storage lifetimes. Use as a context manager (inside FakeTensorMode when tracing fake tensors).

    round_to: allocation granularity (512 = CUDA caching allocator; 1 = raw bytes as MemTracker counts on CPU).
    fake: answer data-dependent `.item()` calls with 1 (fake tensors hold no values; the sizes of the step do
          not depend on them: Adafactor's RMS, AdamW's step count).
    op_hooks: {op: fn(tracker, args, out)} called after an op, to add CUDA kernel differences.
    """

    def __init__(self, round_to: int = 512, fake: bool = False, op_hooks: dict | None = None):
        super().__init__()
        self.round_to = round_to
        self.fake = fake
        self.op_hooks = op_hooks or {}
        self.recs: list[Rec] = []
        self._live: dict[int, tuple[Rec, weakref.ref]] = {}
        self.seq = 0
        self.total = 0
        self.peak = 0
        self.peak_seq = 0
        self.overall_peak = 0
        self.phase = Phase.LOAD
        self.peak_phase = Phase.LOAD
        self.phase_peaks: dict[Phase, int] = {}
        self.phase_peak_seq: dict[Phase, int] = {}  # event at which each phase peak was reached
        self.marks: list[tuple[int, Phase, str]] = []  # (event seq, phase, mark) in order
        self.mark = ""
        self._free_cb = self._on_free
        self.default_tag = TMP  # what a new op output is tagged (a `scope` changes it)
        self.subclass = None  # a tensor subclass (DTensor) to let desugar first, so its local ops are seen

    # ---- accounting -------------------------------------------------------------------------------------------
    def _round(self, n: int) -> int:
        r = self.round_to
        return -(-n // r) * r

    def _alloc(self, rec: Rec) -> None:
        self.seq += 1
        rec.born = self.seq
        self.recs.append(rec)
        if rec.tag == HOST:
            return
        self.total += rec.nbytes
        if self.total > self.peak:
            self.peak = self.total
            self.peak_seq = self.seq
            self.peak_phase = self.phase
        if self.total > self.overall_peak:
            self.overall_peak = self.total
        if self.total > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.total
            self.phase_peak_seq[self.phase] = self.seq

    def _release(self, rec: Rec) -> None:
        self.seq += 1
        rec.died = self.seq
        if rec.tag != HOST:
            self.total -= rec.nbytes

    def _on_free(self, key: int, _ref) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self._release(entry[0])

    def _see(self, t: torch.Tensor, tag: int, op: str) -> Rec | None:
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse / nested: not produced by a training step
            return None
        key = id(st)
        entry = self._live.get(key)
        if entry is not None:
            return entry[0]
        rec = Rec(self._round(st.nbytes()), tag, 0, None, op, self.mark)
        self._live[key] = (rec, weakref.ref(st, partial(self._free_cb, key)))
        self._alloc(rec)
        return rec

    def transient(self, nbytes: int, op: str, tag: int = WS) -> None:
        """An allocation made and freed inside one kernel (CUDA workspace the CPU kernel does not make)."""
        rec = Rec(self._round(nbytes), tag, 0, None, op, self.mark)
        self._alloc(rec)
        self._release(rec)

    @contextlib.contextmanager
    def scope(self, tag: int):
        """Tag every allocation made inside as `tag` (an engine's buffers; host-side work)."""
        prev, self.default_tag = self.default_tag, tag
        try:
            yield
        finally:
            self.default_tag = prev

    def storage_resized(self, st) -> None:
        """`UntypedStorage.resize_` (FSDP2 frees and re-allocates unsharded parameters so; no dispatch mode sees
        it): the old allocation ends and a new one of the new size begins, with the same tag."""
        entry = self._live.get(id(st))
        if entry is None:
            return
        old, ref = entry
        new = self._round(st.nbytes())
        if new == old.nbytes:
            return
        self._release(old)
        rec = Rec(new, old.tag, 0, None, "resize_", self.mark)
        self._live[id(st)] = (rec, ref)
        self._alloc(rec)

    def host_peak(self, start: int, end: int) -> int:
        """The most host (CPU RAM) bytes alive at once in events (start, end]: offloaded parameters, gradients
        and optimizer states, the offloaded step's temporaries, host-side step counters."""
        live, deltas = 0, []
        for r in self.recs:
            if r.tag != HOST:
                continue
            if r.born <= start and (r.died is None or r.died > start):
                live += r.nbytes
            if start < r.born <= end:
                deltas.append((r.born, r.nbytes))
            if r.died is not None and start < r.died <= end:
                deltas.append((r.died, -r.nbytes))
        peak = live
        for _seq, n in sorted(deltas):
            live += n
            peak = max(peak, live)
        return peak

    def resize(self, t: torch.Tensor, nbytes: int) -> None:
        """Account a storage as `nbytes` (a CUDA kernel allocates a different size than the CPU one)."""
        rec = self._see(t, TMP, "resize")
        if rec is None:
            return
        new = self._round(nbytes)
        if rec.tag != HOST:
            self.total += new - rec.nbytes
        rec.nbytes = new

    # ---- tags -------------------------------------------------------------------------------------------------
    def track(self, t: torch.Tensor, tag: int, op: str = "external") -> None:
        """Register a tensor (made before tracking began, or outside dispatch) and force its tag. A DTensor is
        tracked by its local shard. A DDP bucket stays a bucket when a gradient viewing it is tracked."""
        t = getattr(t, "_local_tensor", t) if self.subclass is not None else t
        rec = self._see(t, tag, op)
        if rec is not None and rec.tag == DDP_BUCKET and tag == G:
            return
        if rec is not None and rec.tag != tag:
            self._retag(rec, tag)

    def _retag(self, rec: Rec, tag: int) -> None:
        if (rec.tag == HOST) != (tag == HOST):
            self.total += -rec.nbytes if tag == HOST else rec.nbytes
        rec.tag = tag

    def tag_of(self, t: torch.Tensor) -> int | None:
        entry = self._live.get(id(t.untyped_storage()))
        return None if entry is None else entry[0].tag

    def saved(self, t: torch.Tensor) -> None:
        """A tensor autograd saved for backward: a temporary becomes an activation (weights stay weights)."""
        entry = self._live.get(id(t.untyped_storage()))
        if entry is not None and entry[0].tag == TMP:
            entry[0].tag = ACT

    def set_phase(self, phase: Phase) -> None:
        self.phase = phase
        if self.total > self.phase_peaks.get(phase, 0):
            self.phase_peaks[phase] = self.total
            self.phase_peak_seq[phase] = self.seq
        self.marks.append((self.seq, phase, ""))

    def set_mark(self, mark: str) -> None:
        self.mark = mark
        self.marks.append((self.seq, self.phase, mark))

    def start_window(self) -> int:
        """Forget the peaks so far (the first iteration); the current live bytes start the new window."""
        self.peak = self.total
        self.peak_seq = self.seq
        self.peak_phase = self.phase
        self.phase_peaks = {}
        self.phase_peak_seq = {}
        return self.seq

    # ---- dispatch ---------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _ITEM and self.fake:
            dt = args[0].dtype
            return True if dt is torch.bool else (1.0 if dt.is_floating_point else 1)
        if self.subclass is not None and self.subclass in types:
            return NotImplemented  # the subclass runs its local ops, which come back here
        out = func(*args, **(kwargs or {}))
        if self.default_tag == UNTRACKED:
            return out
        if isinstance(out, torch.Tensor):
            tag = self.default_tag
            if func is _TO_COPY and tag == TMP and self.tag_of_arg(args[0]) in _WEIGHTS:
                tag = CAST
            self._see(out, tag, func.__name__)
        elif isinstance(out, (tuple, list)):
            name = None
            for o in out:
                if isinstance(o, torch.Tensor):
                    self._see(o, self.default_tag, name or (name := func.__name__))
                elif isinstance(o, (tuple, list)):
                    for oo in o:
                        if isinstance(oo, torch.Tensor):
                            self._see(oo, self.default_tag, func.__name__)
        if func is _RESIZE:
            self._resized(args[0])
        hook = self.op_hooks.get(func)
        if hook is not None:
            hook(self, args, kwargs or {}, out)
        return out

    def tag_of_arg(self, t) -> int | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._live.get(id(t.untyped_storage()))
        return None if entry is None else entry[0].tag

    def _resized(self, t: torch.Tensor) -> None:
        entry = self._live.get(id(t.untyped_storage()))
        if entry is not None:
            rec = entry[0]
            new = self._round(t.untyped_storage().nbytes())
            if new != rec.nbytes and rec.tag != HOST:
                self.total += new - rec.nbytes
                self._alloc(Rec(0, TMP, 0, None, "resize_", self.mark))  # peak bookkeeping only
            rec.nbytes = new

    # ---- after the run ----------------------------------------------------------------------------------------
    def live_at(self, seq: int) -> list[Rec]:
        """Allocations alive just after event `seq`."""
        return [r for r in self.recs if r.born <= seq and (r.died is None or r.died > seq) and r.tag != HOST]

    def by_tag(self, seq: int) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.live_at(seq):
            out[r.tag] = out.get(r.tag, 0) + r.nbytes
        return out

    def categories_at(self, seq: int) -> dict[Category, int]:
        cats = {c: 0 for c in Category}
        for tag, n in self.by_tag(seq).items():
            cats[CATEGORY[tag]] += n
        return cats

    def sweep(self, start: int, end: int) -> list[tuple[int, dict[int, int]]]:
        """Live bytes per tag after every event in (start, end]: one pass over the allocation records."""
        delta: dict[int, list[tuple[int, int]]] = {}
        live: dict[int, int] = {}
        for r in self.recs:
            if r.tag == HOST:
                continue
            if r.born <= start and (r.died is None or r.died > start):
                live[r.tag] = live.get(r.tag, 0) + r.nbytes
            if start < r.born <= end:
                delta.setdefault(r.born, []).append((r.tag, r.nbytes))
            if r.died is not None and start < r.died <= end:
                delta.setdefault(r.died, []).append((r.tag, -r.nbytes))
        rows = []
        for s in range(start + 1, end + 1):
            for tag, n in delta.get(s, ()):
                live[tag] = live.get(tag, 0) + n
            rows.append((s, dict(live)))
        return rows
