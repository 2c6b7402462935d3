"""Build the model a setup trains, on the meta device: transformers model, PEFT, quantized base, dtypes.

Nothing here allocates memory: the model is built under `torch.device("meta")` (peft injects adapters there
and, as by default, keeps them in fp32) and `materialize` later gives every
parameter and buffer a (fake or real) CPU storage inside the tracker, so the load itself is accounted.
`module.to()` is never used on fake tensors (it fails under FakeTensorMode: parameters are swapped in place).

Dtypes: parameters are fp32 for fp32 / fp16 / bf16 (autocast) / fsdp-bf16 (FSDP2 casts its all-gather) and half
for the master and pure-bf16 precisions, passed to `from_config(dtype=...)` as from_pretrained(dtype=...) would (buffers such as rotary inv_freq stay as
the modeling code makes them); adapters peft creates stay fp32, as peft's default does.
PEFT: full (everything trains) · freeze (the last `train_layers` blocks and the output embedding, i.e. the LM
head, tied embedding included) · lora / dora / ia3 / prompt / prefix through peft (targets = setup.lora.targets
or peft's defaults for the model type) · qlora (every nn.Linear but the LM head replaced by the NF4 stand-in of
memplan.trace.qlora, then LoRA; `build(quantize=...)` swaps the stand-in for bitsandbytes' Linear4bit on a
GPU) · adapter (memplan.trace.adapters) · bitfit (parameters named *bias).
Dropout: setup.dropout=False zeroes the config's dropout probabilities; None / True keep the config's.
QLoRA without peft.prepare_model_for_kbit_training: that helper (peft/utils/other.py) upcasts every fp16/bf16
parameter that is not Params4bit (embeddings, norms, LM head) to fp32 and turns on input gradients and
checkpointing. memplan keeps the dtypes the --precision gives (as a get_peft_model on the quantized base does),
so the estimate, the trace and the measurement agree; a user who calls it holds those non-quantized weights in
fp32 (4 instead of 2 bytes each) and should model that with --precision bf16 (fp32 parameters under autocast).
The KV cache is off (config.use_cache=False) except for prefix tuning, which feeds its prefix through it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn as nn

from memplan.errors import MemplanError
from memplan.spec.model import ModelSpec
from memplan.spec.setup import Attention, Checkpointing, PeftMethod, Precision, TrainingSetup
from memplan.trace.adapters import add_adapters
from memplan.trace.qlora import NF4Linear, quantize_linears

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Built:
    model: nn.Module  # what the step calls (a PeftModel when peft is used)
    base: nn.Module  # the transformers model
    blocks: list[nn.Module]
    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    trainable_params: int
    total_params: int
    warnings: list[str] = field(default_factory=list)
    teacher: nn.Module | None = None  # --teacher: the frozen teacher (memplan.trace.distill.attach_teacher)


def check_traceable(setup: TrainingSetup) -> None:
    from memplan.trace.support import unsupported

    what = unsupported(setup, engines=True)
    if what:
        raise MemplanError(f"{what}: not traceable yet (use `memplan estimate`)")


def dtypes(precision: Precision) -> tuple[torch.dtype, torch.dtype]:
    """(parameter dtype, compute dtype)."""
    param = torch.float32 if precision in (Precision.FP32, Precision.FP16, Precision.BF16, Precision.FSDP_BF16) else \
        DTYPES[precision.half_dtype]
    return param, DTYPES[precision.half_dtype]


def hf_config(spec: ModelSpec, setup: TrainingSetup):
    import transformers

    cfg = dict(spec.hf_config)
    mt = cfg.get("model_type")
    if setup.dropout is False:  # None / True: as the config says
        for k, v in list(cfg.items()):
            if isinstance(v, float) and ("dropout" in k or "pdrop" in k):
                cfg[k] = 0.0
    try:
        config = transformers.AutoConfig.for_model(**cfg)
    except (ValueError, KeyError) as exc:
        raise MemplanError(f"{spec.name}: transformers {transformers.__version__} does not know model_type "
                           f"'{mt}' ({exc})") from None
    if setup.peft is not PeftMethod.PREFIX:
        config.use_cache = False  # training: no KV cache (the cache would only alias tensors autograd saves)
    return config


def _auto_class(spec: ModelSpec):
    import transformers

    return {"decoder": transformers.AutoModelForCausalLM, "encoder": transformers.AutoModelForMaskedLM,
            "encoder-decoder": transformers.AutoModelForSeq2SeqLM}[getattr(spec.arch, "value", spec.arch)]


def from_config(spec: ModelSpec, config, impl: str, dtype):
    try:
        return _auto_class(spec).from_config(config, attn_implementation=impl, dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        return _auto_class(spec).from_config(config, attn_implementation=impl, torch_dtype=dtype)


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (transformers' GradientCheckpointingLayer), outermost only, in module order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks, seen = [], set()
    for name, m in model.named_modules():
        if isinstance(m, GradientCheckpointingLayer) and not any(name.startswith(p + ".") for p in seen):
            blocks.append(m)
            seen.add(name)
    if not blocks:  # older modeling code: the longest ModuleList
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        blocks = list(max(lists, key=len)) if lists else []
    return blocks


def _peft_task(spec: ModelSpec) -> str | None:
    return {"decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM"}.get(getattr(spec.arch, "value", spec.arch))


def peft_config(spec: ModelSpec, setup: TrainingSetup):
    import peft

    m, task = setup.peft, _peft_task(spec)
    # the family's targets (what the estimate counts) where peft has no default for the model type (Mixtral)
    targets = list(setup.lora.targets) or list(spec.traits.lora_targets) or None
    if targets and "all-linear" in targets:
        targets = "all-linear"  # peft's keyword, only as a plain string
    if m in (PeftMethod.LORA, PeftMethod.DORA, PeftMethod.QLORA):
        return peft.LoraConfig(r=setup.lora.rank, lora_alpha=setup.lora.alpha, target_modules=targets,
                               use_dora=m is PeftMethod.DORA, task_type=task)
    if m is PeftMethod.IA3:
        return peft.IA3Config(task_type=task)
    if task is None:
        raise MemplanError(f"--peft {m.value} is not traceable for encoder-only models (peft has no MLM task)")
    if m is PeftMethod.PROMPT:
        return peft.PromptTuningConfig(num_virtual_tokens=setup.num_virtual_tokens, task_type=task)
    return peft.PrefixTuningConfig(num_virtual_tokens=setup.num_virtual_tokens, task_type=task)


def _freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _apply_peft(spec, setup, base, blocks, param_dtype, compute_dtype, quantize):
    """Returns the model the step calls."""
    m = setup.peft
    if m is PeftMethod.FULL:
        return base
    if m is PeftMethod.FREEZE:
        _freeze_all(base)
        keep = blocks[len(blocks) - setup.train_layers:] if setup.train_layers else []
        head = base.get_output_embeddings()
        for mod in list(keep) + ([head] if head is not None else []):
            for p in mod.parameters():
                p.requires_grad_(True)
        return base
    if m is PeftMethod.BITFIT:
        _freeze_all(base)
        n = 0
        for name, p in base.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
                n += 1
        if not n:
            raise MemplanError(f"--peft bitfit: {spec.name} has no bias parameters to train")
        return base
    if m is PeftMethod.ADAPTER:
        _freeze_all(base)
        add_adapters(blocks, spec.hidden, setup.adapter_size, param_dtype, spec.traits.adapter_sites)
        return base
    import peft

    if m is PeftMethod.QLORA:
        head = base.get_output_embeddings()
        quantize(base, {id(head)} if head is not None else set(), compute_dtype, setup.lora.double_quant)
    try:
        # peft's default (autocast_adapter_dtype=True) keeps adapter weights in fp32 over a half-precision base,
        # and its forward casts the input to the adapter dtype: traced as users run it
        return peft.get_peft_model(base, peft_config(spec, setup))
    except ValueError as exc:
        raise MemplanError(f"--peft {m.value} on {spec.name}: {exc}") from None


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) over unique parameters; an NF4 weight counts its logical (unpacked) weights."""
    nf4 = {id(m.weight): m.logical_numel for m in model.modules() if isinstance(m, NF4Linear)}
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = nf4.get(id(p), p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


Quantizer = Callable[[nn.Module, set, torch.dtype, bool], int]


def build(spec: ModelSpec, setup: TrainingSetup, quantize: Quantizer = quantize_linears) -> Built:
    """The model `setup` trains, on the meta device (see the module doc). `quantize(base, keep_ids,
    compute_dtype, double_quant)` replaces the base's linear layers under --peft qlora: the NF4 stand-in here;
    the CUDA measurement passes bitsandbytes' Linear4bit (memplan.measure.cuda), so both tiers build through
    this one path (attention fallback, checkpointing switch, peft config)."""
    import transformers

    from memplan.estimate import validate

    check_traceable(setup)
    if quantize is quantize_linears and setup.peft is PeftMethod.QLORA and setup.zero >= 2:
        # FSDP shards the NF4 weights stored in the compute dtype (bnb_4bit_quant_storage, the FSDP + QLoRA recipe)
        quantize = partial(quantize_linears, storage=dtypes(setup.precision)[1])
    checked = validate(spec, setup)  # the estimator's refusals and warnings: one validation for every tier
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # config sanity notes (token ids of tiny test vocabularies)
    try:
        built = _build(spec, setup, quantize)
        built.warnings[:0] = checked
        return built
    finally:
        transformers.logging.set_verbosity(verbosity)


def _build(spec: ModelSpec, setup: TrainingSetup, quantize: Quantizer) -> Built:
    config = hf_config(spec, setup)
    param_dtype, compute_dtype = dtypes(setup.precision)
    impl = "eager" if setup.attention is Attention.EAGER else "sdpa"
    notes = []
    if setup.attention is Attention.FLASH:
        if setup.precision is Precision.FP32:
            raise MemplanError("flash attention needs fp16/bf16 compute; use --attention sdpa with fp32")
        notes.append("attention flash traced as SDPA's FlashAttention-2 kernel (same allocations)")
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:
            base = from_config(spec, config, impl, param_dtype)
        except ValueError as exc:
            if impl != "sdpa" or "does not support an attention implementation" not in str(exc):
                arch = getattr(spec.arch, "value", spec.arch)
                raise MemplanError(f"{spec.name}: cannot build a {arch} model for model_type "
                                   f"'{config.model_type}' ({exc})") from None
            base = from_config(spec, config, "eager", param_dtype)  # what transformers itself falls back to
            notes.append(f"{type(base).__name__} has no SDPA attention: traced with eager attention")
        blocks = find_blocks(base)
        model = _apply_peft(spec, setup, base, blocks, param_dtype, compute_dtype, quantize)
        if setup.fp8.value != "none":
            from memplan.trace.fp8 import convert

            notes.append(f"--fp8 {setup.fp8.value}: {convert(base, setup)} linears run torchao's Float8Linear "
                         "(eager: the high-precision input is saved, the fp8 casts are remade in backward)")
        enable_checkpointing(base, blocks, setup)
    model.train()
    trainable, total = count_params(model)
    if trainable == 0:
        raise MemplanError(f"--peft {setup.peft.value} leaves nothing to train on {spec.name}")
    return Built(model, base, blocks, param_dtype, compute_dtype, trainable, total, notes)


def enable_checkpointing(base: nn.Module, blocks: list[nn.Module], setup: TrainingSetup) -> None:
    """The setup's checkpointing policy on `base` (memplan.trace.policies), through transformers' switch: every
    block gets the checkpoint function, and those the policy does not wrap (ckpt_every) are turned off again."""
    from memplan.trace.policies import checkpoint_kwargs, selective_attention

    if setup.checkpointing is Checkpointing.SELECTIVE:
        selective_attention(base, setup)
        return
    if not setup.checkpointing.wraps_blocks:
        return
    kwargs = checkpoint_kwargs(setup)
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = setup.wrapped(i)


def materialize(model: nn.Module, init_values: bool, device="cpu") -> list[torch.Tensor]:
    """Give every meta parameter / buffer / tensor attribute a storage on `device` (fake under FakeTensorMode;
    the measure tier passes the GPU), keeping ties. With init_values (real tensors), fill them N(0, 0.02)
    (integers zero) so the real step computes finite numbers. Returns the new parameters and buffers."""
    memo: dict[int, torch.Tensor] = {}

    def new(t):
        if id(t) not in memo:
            x = torch.empty(t.shape, dtype=t.dtype, device=device)
            if init_values:
                with torch.no_grad():
                    x.normal_(0.0, 0.02) if x.is_floating_point() else x.zero_()
            if isinstance(t, nn.Parameter):
                x = nn.Parameter(x, requires_grad=t.requires_grad)
            memo[id(t)] = x
        return memo[id(t)]

    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in list(store.items()):
                if t is not None and t.device.type == "meta":
                    store[k] = new(t)
        for k, v in list(vars(mod).items()):
            if isinstance(v, torch.Tensor) and v.device.type == "meta":
                setattr(mod, k, new(v))
            elif isinstance(v, dict) and not k.startswith("_"):  # e.g. peft's prompt_tokens per adapter
                for kk, vv in list(v.items()):
                    if isinstance(vv, torch.Tensor) and vv.device.type == "meta":
                        v[kk] = new(vv)
    return list(memo.values())
