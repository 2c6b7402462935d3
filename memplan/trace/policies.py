"""Checkpointing policies and losses as the trace and measure tiers run them (docs/memory-techniques.md).

- full / every-k (Checkpointing.FULL, ckpt_every): transformers' torch.utils.checkpoint switch on each wrapped block,
  use_reentrant as the setup says (build.enable_checkpointing).
- op-selective (Checkpointing.OP_SELECTIVE): torchtitan's per-op SAC (torchtitan/distributed/activation_checkpoint.py,
  SelectiveAC._wrap_block): torch.utils.checkpoint.create_selective_checkpoint_contexts with a policy that saves the
  outputs of the compute-intensive ops (torch._functorch.partitioners.get_default_op_list().compute_intensive_ops:
  mm, addmm, bmm, the SDPA kernels, ...) and aten.max, but recomputes every second aten.mm of the block. On the CPU
  SDPA runs `_scaled_dot_product_flash_attention_for_cpu`, the CPU stand-in of the CUDA flash kernel the list
  names: it is saved too.
- selective (Checkpointing.SELECTIVE, Megatron): the attention core (the function transformers' attention
  interface calls: QK^T, softmax, dropout, P·V or the SDPA kernel) runs inside a non-reentrant checkpoint.
- chunked loss (Loss.CHUNKED): torchtune 0.6.1's CEWithChunkedOutputLoss, reimplemented line by line
  (`chunked_loss`; torchtune is not a dependency), with the LM head applied chunk by chunk as torchtune's
  TransformerDecoder does with num_output_chunks.
- logits_to_keep: the model called with logits_to_keep=K, the loss of transformers' ForCausalLMLoss on the last K
  positions (TRL's GRPO does the same on its completion tokens).
"""
from __future__ import annotations

import contextlib
import functools
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from memplan.spec.setup import Checkpointing, Loss, TrainingSetup

IGNORE_INDEX = -100  # CEWithChunkedOutputLoss(ignore_index=-100), torch's cross_entropy default


def _save_ops() -> frozenset:
    """torchtitan's _get_default_save_ops (the ops this CPU build has): compute-intensive ops and aten.max, plus the
    CPU flash-attention kernel standing in for CUDA's."""
    from torch._functorch.partitioners import get_default_op_list

    aten = torch.ops.aten
    ops = {op.default for op in get_default_op_list().compute_intensive_ops}
    ops |= {aten._scaled_dot_product_cudnn_attention.default, aten._scaled_dot_product_attention_math.default,
            aten.max.default, aten.linear.default, aten.topk.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default}
    return frozenset(ops)


# memplan.trace.session sets this while a step runs: called with each output op-level SAC caches for backward
# (an activation the checkpoint keeps, though no autograd pack hook sees it)
SAVED_TAGGER = None


class _SavedTagging(TorchDispatchMode):
    """Below the SAC caching mode: tags the outputs of the op the policy just chose to save."""

    def __init__(self, meta: dict):
        super().__init__()
        self.meta = meta

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.meta.pop("save", False) and SAVED_TAGGER is not None:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    SAVED_TAGGER(t)
        return out


def op_sac_context():
    """A fresh (forward, recompute) context pair for one block: torchtitan's wrapped_policy, its mm counters reset."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save, mm_ops = _save_ops(), (torch.ops.aten.mm.default, torch.ops.aten.linear.default)
    meta = {"forward_mm_count": 0, "recompute_mm_count": 0}

    def policy(ctx, func, *args, **kwargs):
        key = f"{'recompute' if ctx.is_recompute else 'forward'}_mm_count"
        if func in mm_ops:
            meta[key] += 1
        if func in save:
            if func in mm_ops and meta[key] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
            meta["save"] = not ctx.is_recompute
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    caching, cached = create_selective_checkpoint_contexts(policy)
    return _stacked(_SavedTagging(meta), caching), cached


@contextlib.contextmanager
def _stacked(tagging, caching):
    with tagging, caching:  # the caching mode on top: it decides, then the tagging mode sees the op run
        yield


def checkpoint_kwargs(setup: TrainingSetup) -> dict:
    """torch.utils.checkpoint keyword arguments of a wrapped block (RNG state lives on the host: not preserved)."""
    kw = {"use_reentrant": setup.ckpt_reentrant, "preserve_rng_state": False}
    if setup.checkpointing is Checkpointing.OP_SELECTIVE:
        kw["context_fn"] = op_sac_context
    return kw


def selective_attention(base, setup: TrainingSetup) -> None:
    """Megatron's selective recomputation: the attention interface of `base` (and its sub-configs) replaced by one
    that runs the original (sdpa, or the modeling file's eager_attention_forward) inside a checkpoint."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from memplan.errors import MemplanError

    if not getattr(base, "_supports_attention_backend", False):  # T5, BLOOM: attention written in their modules
        raise MemplanError(f"--checkpointing selective: {type(base).__name__} computes attention in its own modules, "
                           "not through transformers' attention interface, so the trace cannot recompute its core "
                           "(estimate-only for this model)")
    for cfg in [base.config] + [getattr(base.config, k) for k in getattr(base.config, "sub_configs", {})]:
        impl = getattr(cfg, "_attn_implementation", None)
        if impl is None or impl.startswith("memplan-"):
            continue
        name = f"memplan-selective-{impl}"
        AttentionInterface.register(name, functools.partial(_recomputed_core, impl))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
        cfg._attn_implementation = name


def _recomputed_core(impl: str, module, query, key, value, attention_mask, **kwargs):
    from torch.utils.checkpoint import checkpoint
    from transformers import AttentionInterface

    if impl == "eager":
        inner = sys.modules[type(module).__module__].eager_attention_forward
    else:
        inner = AttentionInterface._global_mapping[impl]

    def core(q, k, v, mask):
        return inner(module, q, k, v, mask, **kwargs)

    out, weights = checkpoint(core, query, key, value, attention_mask, use_reentrant=False,
                              preserve_rng_state=False)
    return out, weights


def uses_head_loss(setup: TrainingSetup) -> bool:
    """Whether the step computes the loss itself from the hidden states (chunked) or the logits it keeps."""
    return setup.loss is Loss.CHUNKED or setup.logits_to_keep > 0


def step_loss(model, base, batch: dict, setup: TrainingSetup):
    """The loss of one micro-batch as the setup computes it (the model's own unless uses_head_loss)."""
    if setup.logits_to_keep:
        k = setup.logits_to_keep
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       logits_to_keep=k).logits
        # transformers' ForCausalLMLoss: logits.float(), labels shifted left, the last position ignored
        labels = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:][:, -k:]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)
        return loss
    if setup.gpus > 1 or setup.zero > 0:  # through the engine: its root unit's forward returns the chunks
        with chunked_forward(base, setup.loss_chunks):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    else:
        logits = _chunked_logits(base, batch["input_ids"], batch.get("attention_mask"), setup.loss_chunks)
    labels = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]  # shifted as torchtune's recipes do
    loss = chunked_loss(logits, labels, setup.loss_chunks)
    del logits
    return loss


def _chunked_logits(base, input_ids, attention_mask, chunks: int) -> list:
    """torchtune 0.6.1 TransformerDecoder.forward with num_output_chunks (modules/transformer.py chunked_output):
    the backbone (its final norm included), then the output projection applied chunk by chunk."""
    backbone = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    head = base.get_output_embeddings()
    return [head(chunk) for chunk in hidden.chunk(chunks, dim=1)]


@contextlib.contextmanager
def chunked_forward(base, chunks: int):
    """`base` (the causal LM inside peft's wrappers and the engine) made to return the chunked logits from its own
    forward, as torchtune's distributed recipes call their model (recipes/full_finetune_distributed.py and
    lora_finetune_distributed.py: `logits = self._model(**batch)` on the FSDP2 root, then the loss outside): so the
    engine's forward hooks run (FSDP2's root unit gathers the embedding, final norm and LM head, which stay gathered
    into the backward; DDP prepares its reducer) and the loss is computed past the model, on the returned list."""
    def forward(input_ids=None, attention_mask=None, **_ignored):
        return _chunked_logits(base, input_ids, attention_mask, chunks)

    base.forward = forward  # an instance attribute: nn.Module.__call__ (and the engine's hooks) run it
    try:
        yield
    finally:
        del base.forward


def chunked_loss(logits: list, labels, num_output_chunks: int, ignore_index: int = IGNORE_INDEX):
    """torchtune 0.6.1 CEWithChunkedOutputLoss.forward, line for line (modules/loss/ce_chunked_output_loss.py)."""
    total_elements = (labels != ignore_index).sum()
    labels = [target_chunk.reshape(-1) for target_chunk in labels.chunk(num_output_chunks, dim=1)]
    logits = [logit_chunk.reshape(-1, logit_chunk.size(-1)) for logit_chunk in logits]
    total_loss = 0.0
    for logits_chunk, labels_chunk in zip(logits, labels):
        total_loss += F.cross_entropy(logits_chunk.float(), labels_chunk, ignore_index=ignore_index, reduction="sum")
    return total_loss / total_elements


__all__ = ["checkpoint_kwargs", "op_sac_context", "selective_attention", "step_loss", "chunked_loss",
           "uses_head_loss"]
