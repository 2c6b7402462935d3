"""The header of a .safetensors file, read in pure Python (no torch, no safetensors package): every tensor's name,
dtype, shape and byte range, without reading a byte of tensor data.

The format (huggingface/safetensors, docs "Format"): 8 bytes, a little-endian unsigned 64-bit header length N;
N bytes of UTF-8 JSON mapping each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into
the data that follows the header) plus an optional "__metadata__" map of strings; then the data.
read_header() checks what it relies on (a regular file, N within the format's own limit, offsets inside the file
and of the size dtype × shape says) and fails with one MemplanError naming the file otherwise.
"""
from __future__ import annotations

import math
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from memplan.errors import MemplanError
from memplan.spec.files import parse_json

# Largest header the format allows: safetensors' own MAX_HEADER_SIZE = 100_000_000 bytes
# (safetensors/src/tensor.rs); a longer one is refused by every reader, so it is not a checkpoint.
MAX_HEADER_BYTES = 100_000_000

# Bits per element of each safetensors dtype (safetensors/src/tensor.rs, enum Dtype and Dtype::bitsize).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}
# The floating-point dtypes a model's weights are held in, by the name torch (and config.json's "dtype") uses.
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, as its header describes it."""

    name: str
    dtype: str  # the safetensors dtype name: "BF16", "F32", "U8", ...
    shape: tuple[int, ...]
    nbytes: int  # its bytes in the file (data_offsets end - begin)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: tuple[TensorInfo, ...]
    metadata: dict  # "__metadata__": str -> str ({"format": "pt"} from save_pretrained)


def _fail(path: Path, why: str):
    raise MemplanError(f"safetensors file {path}: {why}")


def read_header(path) -> Header:
    """The tensors a .safetensors file holds (header only; the data is never read)."""
    p = Path(path)
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            _fail(p, "not a regular file")
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                _fail(p, f"{len(head)} bytes: shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                _fail(p, f"header length {n:,} exceeds the format's {MAX_HEADER_BYTES:,} bytes")
            if 8 + n > st.st_size:
                _fail(p, f"header length {n:,} runs past the end of the file ({st.st_size:,} bytes): truncated?")
            raw = f.read(n)
    except FileNotFoundError:
        raise MemplanError(f"safetensors file not found: {p}") from None
    except OSError as exc:
        raise MemplanError(f"cannot read safetensors file {p}: {exc.strerror or exc}") from None
    try:
        doc = parse_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        _fail(p, f"header is not JSON ({exc})")
    if not isinstance(doc, dict):
        _fail(p, "header is not a JSON object")
    data_bytes = st.st_size - 8 - n
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        _fail(p, "__metadata__ is not an object")
    return Header(p, tuple(_tensor(p, name, entry, data_bytes) for name, entry in doc.items()), meta)


def _tensor(p: Path, name: str, entry, data_bytes: int) -> TensorInfo:
    if not isinstance(entry, dict):
        _fail(p, f"tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        _fail(p, f"tensor {name!r} has no dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        _fail(p, f"tensor {name!r}: shape must be a list of non-negative integers, got {str(shape)[:40]}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        _fail(p, f"tensor {name!r}: data_offsets {str(offsets)[:40]} outside the file's {data_bytes:,} data bytes")
    nbytes = offsets[1] - offsets[0]
    bits = DTYPE_BITS.get(dtype)
    if bits is not None and nbytes != -(-math.prod(shape) * bits // 8):
        _fail(p, f"tensor {name!r}: {nbytes:,} bytes for a {dtype} tensor of shape {tuple(shape)}")
    return TensorInfo(name, dtype, tuple(shape), nbytes)
