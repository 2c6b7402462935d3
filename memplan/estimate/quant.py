"""Storage of quantized tensors, as bitsandbytes lays it out."""
from __future__ import annotations

from memplan.units import round_block

# bitsandbytes.functional.quantize_4bit: NF4 packs two 4-bit codes per uint8 and keeps one absmax per block
# of 64 weights (blocksize=64 default for Linear4bit / BitsAndBytesConfig).
NF4_BLOCK = 64
# Double quantization (compress_statistics=True) quantizes the absmax to uint8 in blocks of 256, keeping one
# fp32 absmax per 256 blocks, an fp32 offset and a 256-entry fp32 dynamic code (bitsandbytes QuantState.state2).
NF4_DQ_BLOCK = 256
NF4_CODE_ENTRIES = 16  # the NF4 code book, fp32, kept per QuantState
DYNAMIC_CODE_ENTRIES = 256


def nf4_storages(numel: int, double_quant: bool) -> tuple[int, ...]:
    """Byte sizes of the separate storages one NF4-quantized weight of `numel` elements keeps on the GPU."""
    blocks = -(-numel // NF4_BLOCK)
    packed = -(-numel // 2)
    if not double_quant:
        return packed, blocks * 4, NF4_CODE_ENTRIES * 4
    blocks2 = -(-blocks // NF4_DQ_BLOCK)
    return packed, blocks, 4, NF4_CODE_ENTRIES * 4, blocks2 * 4, DYNAMIC_CODE_ENTRIES * 4


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """Allocated bytes (each storage rounded to the CUDA block) of one NF4 weight."""
    return sum(round_block(b) for b in nf4_storages(numel, double_quant))


# bitsandbytes 8-bit optimizers: blockwise quantized states (one fp32 absmax per 256 values) for tensors of at
# least min_8bit_size = 4096 elements; smaller tensors keep 32-bit states (bitsandbytes/optim/optimizer.py).
OPT8_BLOCK = 256
OPT8_MIN_SIZE = 4096


def adam8bit_state_bytes(numel: int) -> int:
    """Both Adam states of one tensor under bitsandbytes AdamW8bit."""
    if numel < OPT8_MIN_SIZE:
        return 2 * round_block(numel * 4)
    return 2 * (round_block(numel) + round_block(-(-numel // OPT8_BLOCK) * 4))
