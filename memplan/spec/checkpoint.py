"""A local checkpoint folder (`--model DIR`, as `save_pretrained` writes it): what its files say about the weights.

The model itself is always built from config.json (memplan.spec.families): that is the architecture the estimate
sizes. The folder adds what config.json alone cannot say, and each becomes a warning on every estimate, trace and
measurement of the model (memplan.estimate.validate), never a silent change of the setup the flags describe:

  * the tensors in the safetensors files (model.safetensors, or model.safetensors.index.json and its shards; headers
    only, memplan.spec.safetensors): their element count is checked against the spec's exact count, and a mismatch
    names the tensors on either side that the other lacks;
  * the stored dtype (the dtype holding most elements, else config.json's "dtype" / "torch_dtype"): when it is not
    the parameter dtype --precision holds, the warning says which precision holds them as stored
    (transformers 5's from_pretrained loads dtype="auto", the stored dtype, by default);
  * `quantization_config`: bitsandbytes 4-bit (nf4 / fp4) is what --peft qlora models (memplan.estimate.quant); any
    other setup, and every other method (bitsandbytes 8-bit, GPTQ, AWQ, fp8, ...), is estimated with unquantized
    weights as --precision says, and the warning gives the stored size from the headers.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Mapping

from memplan.errors import MemplanError
from memplan.spec.files import parse_json, read_text
from memplan.spec.safetensors import FLOAT_DTYPES, TensorInfo, read_header
from memplan.units import GiB

WEIGHTS = "model.safetensors"  # transformers.utils.SAFE_WEIGHTS_NAME
WEIGHTS_INDEX = "model.safetensors.index.json"  # transformers.utils.SAFE_WEIGHTS_INDEX_NAME
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # WEIGHTS_NAME / WEIGHTS_INDEX_NAME: pickles
# Largest index file read: 64 MiB (a 405B model's index is about 100 KiB: one line per tensor).
MAX_INDEX_BYTES = 64 * 2**20
# Most tensor names listed in a mismatch warning (the rest are counted).
NAMES_SHOWN = 4


class QuantMethod(str, Enum):
    """How quantization_config says the stored weights are held (its quant_method, transformers'
    QuantizationMethod, with bitsandbytes split by its bit width)."""

    BNB_4BIT = "bitsandbytes-4bit"  # load_in_4bit: Linear4bit, what --peft qlora models
    BNB_8BIT = "bitsandbytes-8bit"  # load_in_8bit: LLM.int8 Linear8bitLt (not modelled)
    GPTQ = "gptq"
    AWQ = "awq"
    FP8 = "fp8"  # fp8 / fbgemm_fp8
    OTHER = "other"  # any other quant_method (hqq, compressed-tensors, torchao, ...): named by its own string


@dataclass(frozen=True)
class Quantization:
    """A checkpoint's quantization_config, the fields that say how its weights are stored."""

    method: QuantMethod
    name: str  # quant_method as config.json spells it
    bits: int | None = None
    quant_type: str = ""  # bitsandbytes 4-bit: "nf4" or "fp4"
    compute_dtype: str = ""  # bitsandbytes 4-bit: bnb_4bit_compute_dtype
    double_quant: bool = False  # bitsandbytes 4-bit: bnb_4bit_use_double_quant
    group_size: int | None = None  # GPTQ / AWQ

    def describe(self) -> str:
        if self.method is QuantMethod.BNB_4BIT:
            dq = ", double quantization" if self.double_quant else ""
            return f"bitsandbytes 4-bit {self.quant_type}{dq}, compute dtype {self.compute_dtype}"
        bits = f" {self.bits}-bit" if self.bits else ""
        group = f", group size {self.group_size}" if self.group_size else ""
        name = {QuantMethod.BNB_8BIT: "bitsandbytes"}.get(self.method, self.name)
        return f"{name}{bits}{group}"


def _int(qc: Mapping, *keys) -> int | None:
    for k in keys:
        v = qc.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def parse_quantization(qc) -> Quantization | None:
    """config.json's quantization_config (None when absent). Defaults are transformers' own config classes'
    (utils/quantization_config.py: BitsAndBytesConfig bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype None =
    float32, bnb_4bit_use_double_quant=False; GPTQConfig group_size=128; AwqConfig group_size=128)."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise MemplanError(f"quantization_config must be an object, got {type(qc).__name__}")
    name = str(qc.get("quant_method") or ("bitsandbytes" if "load_in_4bit" in qc or "load_in_8bit" in qc else ""))
    if name == "bitsandbytes":
        if qc.get("load_in_4bit"):
            return Quantization(QuantMethod.BNB_4BIT, name, 4, str(qc.get("bnb_4bit_quant_type") or "fp4"),
                                str(qc.get("bnb_4bit_compute_dtype") or "float32"),
                                bool(qc.get("bnb_4bit_use_double_quant", False)))
        if qc.get("load_in_8bit"):
            return Quantization(QuantMethod.BNB_8BIT, name, 8)
        return None  # neither: from_pretrained quantizes nothing
    if name == "gptq":
        return Quantization(QuantMethod.GPTQ, name, _int(qc, "bits"), group_size=_int(qc, "group_size") or 128)
    if name == "awq":
        return Quantization(QuantMethod.AWQ, name, _int(qc, "bits", "w_bit"),
                            group_size=_int(qc, "group_size", "q_group_size") or 128)
    if name in ("fp8", "fbgemm_fp8"):
        return Quantization(QuantMethod.FP8, name, 8)
    return Quantization(QuantMethod.OTHER, name or "unnamed", _int(qc, "bits"))


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint folder's files say about its stored weights (see the module doc)."""

    folder: Path
    files: tuple[str, ...]  # the safetensors files read (names inside the folder)
    tensors: tuple[TensorInfo, ...]  # empty when the folder has no safetensors weights
    quantization: Quantization | None
    config_dtype: str = ""  # config.json "dtype" (transformers 5) or "torch_dtype"
    notes: tuple[str, ...] = ()  # model-level warnings (check_params): shown with every estimate

    @property
    def stored_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def stored_dtype(self) -> str:
        """The floating-point dtype (torch's name) holding most stored elements, else config.json's dtype."""
        floats = Counter()
        for t in self.tensors:
            if t.dtype in FLOAT_DTYPES:
                floats[FLOAT_DTYPES[t.dtype]] += t.numel
        return floats.most_common(1)[0][0] if floats else self.config_dtype


def _shard_name(folder: Path, name) -> str:
    """A shard file named by the index: a plain file name inside the folder (never a path out of it)."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise MemplanError(f"{folder / WEIGHTS_INDEX}: shard name {str(name)[:60]!r} is not a file name in {folder}")
    return name


def read_tensors(folder: Path) -> tuple[tuple[str, ...], tuple[TensorInfo, ...]]:
    """(safetensors files, their tensors): the index's shards, else model.safetensors, else none."""
    index = folder / WEIGHTS_INDEX
    if index.exists():
        try:
            doc = parse_json(read_text(index, "safetensors index", MAX_INDEX_BYTES))
        except ValueError as exc:
            raise MemplanError(f"safetensors index {index}: not JSON ({exc})") from None
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict):
            raise MemplanError(f"safetensors index {index} has no weight_map object")
        files = tuple(sorted({_shard_name(folder, f) for f in wmap.values()}))
        tensors = {}
        for f in files:
            for t in read_header(folder / f).tensors:
                tensors.setdefault(t.name, (f, t))
        for name, f in wmap.items():
            if tensors.get(name, (None,))[0] != f:
                raise MemplanError(f"{index} puts tensor {name!r} in {f}, which does not hold it")
        return files, tuple(t for _, t in tensors.values())
    if (folder / WEIGHTS).exists():
        return (WEIGHTS,), read_header(folder / WEIGHTS).tensors
    return (), ()


def read_checkpoint(folder: Path, config: Mapping) -> Checkpoint:
    """The checkpoint in `folder` whose config.json holds `config` (headers only; notes come from check_params)."""
    files, tensors = read_tensors(folder)
    dtype = config.get("dtype") or config.get("torch_dtype") or ""
    notes = ()
    if not files and any((folder / p).exists() for p in PICKLED):
        notes = (f"{folder} holds its weights as pytorch_model.bin (a pickle, which memplan does not open): tensor "
                 f"shapes and dtypes not checked",)
    return Checkpoint(folder, files, tensors, parse_quantization(config.get("quantization_config")),
                      dtype if isinstance(dtype, str) else "", notes)


_BLOCK = re.compile(r"\.\d+\.")  # "model.layers.3.self_attn..." -> the in-block path after the block index


def _spec_names(model) -> set[str]:
    """The parameter names of the spec's table, as suffixes of the full names (memplan.spec.families: a Linear's
    in-block path, a Tensor's name)."""
    names = {t.name for t in model.tensors}
    for lin in model.linears:
        names.add(lin.qualname + ".weight")
        if lin.bias:
            names.add(lin.qualname + ".bias")
    return names


def _matches(full: str, names: set[str]) -> bool:
    return any(full == n or full.endswith("." + n) for n in names)


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def check_params(ckpt: Checkpoint, model) -> tuple[str, ...]:
    """Warnings where the stored tensors' element count is not the spec's count (unquantized checkpoints: packed
    quantized tensors hold fewer elements). Tensors are compared by name, one per repeated block shape."""
    if not ckpt.tensors or ckpt.quantization is not None:
        return ()
    stored, spec = ckpt.stored_params, model.total_params
    if stored == spec:
        return ()
    names = _spec_names(model)
    block_paths = list(dict.fromkeys(_BLOCK.split(t.name, 1)[-1] for t in ckpt.tensors))
    extra = [n for n in block_paths if not _matches(n, names)]
    missing = sorted(n for n in names if not any(_matches(p, {n}) for p in block_paths))
    what = []
    if extra:
        what.append(f"stored tensors the spec lacks: {_listed(extra)}")
    if missing:
        what.append(f"spec tensors not stored: {_listed(missing)}")
    detail = "; ".join(what) or "every tensor name matches: a shape or the number of blocks differs"
    return (f"{ckpt.folder}: the safetensors hold {stored:,} parameters, memplan's spec of config.json counts "
            f"{spec:,} ({stored - spec:+,}); {detail}. The estimate sizes the spec",)


# The --precision values that hold parameters in each stored dtype (memplan.spec.setup.Precision.param_bytes)
HOLDS = {"float32": "fp32, bf16 or fp16 (autocast)", "bfloat16": "pure-bf16 or bf16-master",
         "float16": "fp16-master"}


def _param_dtype(setup) -> str:
    return "float32" if setup.precision.param_bytes == 4 else setup.precision.half_dtype


def checkpoint_warnings(model, setup) -> list[str]:
    """The warnings a model read from a checkpoint folder adds to an estimate of `setup` (module doc)."""
    ck = getattr(model, "checkpoint", None)
    if ck is None:
        return []
    out = list(ck.notes)
    q, p = ck.quantization, setup.precision.value
    if q is None:
        stored, held = ck.stored_dtype, _param_dtype(setup)
        if stored in HOLDS and stored != held:
            out.append(f"{ck.folder} stores {stored} weights; --precision {p} holds {held} parameters: estimated "
                       f"so (from_pretrained(dtype=torch.{held})); loaded as stored (transformers' dtype=\"auto\") "
                       f"they are what --precision {HOLDS[stored]} models")
        return out
    if q.method is QuantMethod.BNB_4BIT and setup.peft.value == "qlora":
        if q.double_quant != setup.lora.double_quant:
            flag = "--double-quant" if q.double_quant else "--no-double-quant"
            out.append(f"{ck.folder}: quantization_config has bnb_4bit_use_double_quant={q.double_quant}: give "
                       f"{flag} to estimate it (estimated as the flags say)")
        if q.quant_type != "nf4":
            out.append(f"{ck.folder}: bitsandbytes 4-bit {q.quant_type} is stored as nf4 is (two 4-bit codes per "
                       f"byte, one absmax per 64): estimated as nf4")
        if q.compute_dtype != setup.precision.half_dtype:
            out.append(f"{ck.folder}: bnb_4bit_compute_dtype is {q.compute_dtype}, --precision {p} computes in "
                       f"{setup.precision.half_dtype}: estimated in {setup.precision.half_dtype}")
        return out
    if q.method is QuantMethod.BNB_4BIT:
        out.append(f"{ck.folder} stores {q.describe()} weights (quantization_config): those train only through "
                   f"adapters, which --peft qlora models; --peft {setup.peft.value} is estimated with unquantized "
                   f"weights as --precision {p} says")
        return out
    stored = f"; stored they take {ck.stored_bytes / GiB:,.2f} GiB" if ck.tensors else ""
    out.append(f"{ck.folder} stores {q.describe()} weights (quantization_config), which memplan does not model: "
               f"estimated with unquantized weights as --precision {p} says{stored}")
    return out
