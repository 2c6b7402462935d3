"""Padding vs packing over a sequence-length distribution (TrainingSetup.lengths / packing / pad_multiple): pure.

Padded batches (HF DataCollatorWithPadding, `padding="longest"`: dynamic padding) are padded to the longest
sequence of the batch: a sequence longer than --seq is truncated to it (tokenizer `max_length`), and the batch's
length is rounded up to a multiple of pad_multiple (`pad_to_multiple_of`, applied after the longest is found, so it
may pass --seq). With b sequences drawn iid from the distribution (F its CDF), the batch length is g(max) with
g(L) = round_up(min(L, seq), m), and its expectation is exact:

    E[g(max)] = Σ_L g(L) · (F(L)^b − F(L−1)^b)          (P(max = L) for b iid draws of a discrete law)

Memory is set by the worst batch: g(the distribution's largest length); throughput by the expected one.
Packing (TRL `packing=True`, torchtune PackedDataset) concatenates documents into rows of exactly --seq tokens
(the last row of an epoch aside), so the peak is a row of --seq and no token is padding; a document longer than
--seq is split across rows (TRL's "wrapped" strategy, torchtune's split_across_pack): memplan counts packed rows
as full. torchtune's SFT packing (split_across_pack=False) pads each pack's tail instead: not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from memplan.spec.lengths import histogram, is_fixed, label
from memplan.spec.setup import TrainingSetup


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def padded(length: int, seq: int, multiple: int) -> int:
    """A batch's padded length when its longest sequence has `length` tokens (g above)."""
    return round_up(min(length, seq), multiple)


def expected_max(pairs, b: int, g=lambda n: n) -> float:
    """E[g(max of b iid draws)] of a histogram ((length, count), ...) sorted by length: Σ g(L)(F(L)^b − F(L−1)^b)."""
    total = sum(c for _, c in pairs)
    out, below, prev = 0.0, 0, 0.0
    for length, count in pairs:
        below += count
        f = (below / total) ** b
        out += g(length) * (f - prev)
        prev = f
    return out


def mean(pairs, g=lambda n: n) -> float:
    total = sum(c for _, c in pairs)
    return sum(g(l) * c for l, c in pairs) / total


def shaped(setup: TrainingSetup) -> bool:
    """Whether the setup's batches are not plain batch × seq rows (a distribution, or rounding)."""
    return not is_fixed(setup.lengths) or setup.pad_multiple > 1 or setup.packing


def worst_length(setup: TrainingSetup) -> int:
    """The padded length of the longest batch (packing: the packed row, --seq)."""
    if setup.packing:
        return setup.seq
    return padded(histogram(setup.lengths, setup.seq)[-1][0], setup.seq, setup.pad_multiple)


def seq_bound(setup: TrainingSetup) -> int | None:
    """The longest --seq that still changes padded batches of an absolute distribution (uniform / histogram): its
    largest length; past it --seq truncates nothing (fit's sequence search stops there). None otherwise."""
    if setup.packing or setup.lengths in ("fixed", "varied"):
        return None
    return histogram(setup.lengths, setup.seq)[-1][0]


@dataclass(frozen=True)
class LengthStats:
    """One setup's batches over its length distribution (per micro-batch row, tokens)."""

    distribution: str  # memplan.spec.lengths.label
    packing: bool
    worst_length: int  # the longest padded batch's length (packing: --seq): where the peak is
    expected_length: float  # expected padded length of a batch of `batch` rows: what is computed
    real_tokens: float  # expected real (non-pad) tokens per row
    typical_length: int  # expected_length rounded: the batch shape "typical memory" is estimated at

    @property
    def waste(self) -> float:
        """Padding as a fraction of the tokens computed."""
        return 1 - self.real_tokens / self.expected_length if self.expected_length else 0.0

    def to_dict(self) -> dict:
        return {"distribution": self.distribution, "packing": self.packing, "worst_length": self.worst_length,
                "expected_length": self.expected_length, "real_tokens_per_row": self.real_tokens,
                "typical_length": self.typical_length, "padding_waste": self.waste}


def stats(setup: TrainingSetup) -> LengthStats:
    pairs = histogram(setup.lengths, setup.seq)
    seq, m = setup.seq, setup.pad_multiple
    if setup.packing:  # full rows of real tokens
        return LengthStats(label(setup.lengths), True, seq, float(seq), float(seq), seq)
    expected = expected_max(pairs, setup.batch, lambda n: padded(n, seq, m))
    real = mean(pairs, lambda n: min(n, seq))
    return LengthStats(label(setup.lengths), False, worst_length(setup), expected, real,
                       max(1, min(round(expected), worst_length(setup))))


def at_length(setup: TrainingSetup, length: int) -> TrainingSetup:
    """The plain batch × length setup whose step has the memory of a batch padded to `length` (what the estimate
    and the trace run)."""
    return replace(setup, seq=length, lengths="fixed", packing=False, pad_multiple=1,
                   logits_to_keep=min(setup.logits_to_keep, length))


def pack_row(setup: TrainingSetup, seed: int = 0) -> tuple[int, ...]:
    """Document lengths of one packed row of --seq tokens: documents drawn from the distribution (a seeded draw)
    laid end to end, the last one cut at the row's end (the trace's position_ids restart at 0 at each one)."""
    import random

    pairs = histogram(setup.lengths, setup.seq)
    rng, docs, left = random.Random(seed), [], setup.seq
    values, weights = [l for l, _ in pairs], [c for _, c in pairs]
    while left > 0:
        n = min(rng.choices(values, weights)[0], left)
        docs.append(n)
        left -= n
    return tuple(docs)


PACKING_MASK_NOTE = ("--packing with --attention {att}: transformers 5.24 reads the packed position_ids "
                     "(masking_utils.find_packed_sequence_indices) and builds a block-diagonal {b}×1×{s}×{s} boolean "
                     "mask ({mib:,.0f} MiB) for {att}; the fake-tensor trace cannot read the position_ids (data) and "
                     "neither tier counts it. With --attention flash (varlen over the packed documents, as TRL's "
                     "padding_free requires) there is no mask and no cross-document attention is computed")
PADDING_MASK_NOTE = ("padded batches with --attention {att}: the padding attention_mask becomes a {b}×1×{s}×{s} boolean "
                     "mask ({mib:,.0f} MiB) that neither tier counts (both run the all-ones mask transformers skips); "
                     "--attention flash unpads instead (no mask)")


def mask_note(setup: TrainingSetup, length: int) -> str | None:
    """What a real padded or packed batch allocates that the traced one does not (sdpa / eager masks)."""
    if setup.attention.value == "flash" or not shaped(setup):
        return None
    mib = setup.batch * length * length / 2**20
    note = PACKING_MASK_NOTE if setup.packing else PADDING_MASK_NOTE
    return note.format(att=setup.attention.value, b=setup.batch, s=length, mib=mib)
