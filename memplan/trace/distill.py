"""Knowledge distillation as the trace and the CPU measurement run it: the frozen teacher built beside the student,
and the two-model loss (memplan.spec.distill names the recipe).

The step, torchtune 0.6.1's `_loss_step` (recipes/knowledge_distillation_single_device.py) with transformers
models: the student's forward (its own loss, transformers' ForCausalLMLoss, as memplan's standard loss, and its
logits, kept), then the teacher's forward under torch.no_grad (eval mode: nothing saved, its activations freed
layer by layer, only its logits kept), labels shifted as torchtune shifts them, torchtune's ForwardKLLoss
(`forward_kl`, line for line) on the two logits, and the mix `(1 - kd_ratio) * class_loss + kd_ratio * kd_loss`.
Temperature T ≠ 1 (torchtune has none): both logits divided by T before the softmaxes and the KL scaled by T²,
as Hinton et al. 2015 and transformers' ImageDistilTrainer example do.
Omitted from torchtune's loss: `if sum_masks == 0: return 0` (a host read; never true with random labels).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memplan.errors import MemplanError
from memplan.spec.distill import TeacherWeights
from memplan.spec.model import ModelSpec
from memplan.spec.setup import Attention, PeftMethod, TrainingSetup
from memplan.trace.build import DTYPES, Built, from_config, hf_config
from memplan.trace.int8 import quantize_linears_int8
from memplan.trace.qlora import quantize_linears

IGNORE_INDEX = -100  # ForwardKLLoss(ignore_index=-100), torchtune 0.6.1


def teacher_dtype(setup: TrainingSetup) -> torch.dtype:
    """The dtype the teacher's (unquantized) parameters are stored in."""
    w = setup.teacher_weights
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(w.value, setup.precision.half_dtype)
    return DTYPES[name]


def build_teacher(spec: ModelSpec, setup: TrainingSetup) -> nn.Module:
    """The teacher on the meta device: the transformers model in its dtype (NF4 / int8 linears through memplan's
    bitsandbytes stand-ins, memplan.trace.qlora / memplan.trace.int8: bitsandbytes' own Linear8bitLt does not run
    on fake tensors, the latter's doc says why), eval mode, every parameter frozen."""
    plain = TrainingSetup(dropout=setup.dropout)  # the teacher's own config: no PEFT, no KV cache
    config = hf_config(spec, plain)
    impl = "eager" if setup.attention is Attention.EAGER else "sdpa"
    with torch.device("meta"):
        teacher = from_config(spec, config, impl, teacher_dtype(setup))
        if setup.teacher_weights is TeacherWeights.NF4:
            head = teacher.get_output_embeddings()
            quantize_linears(teacher, {id(head)} if head is not None else set(),
                             DTYPES[setup.precision.half_dtype], False)  # BitsAndBytesConfig: no double quant
        elif setup.teacher_weights is TeacherWeights.INT8:
            head = teacher.get_output_embeddings()
            quantize_linears_int8(teacher, {id(head)} if head is not None else set())
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def attach_teacher(built: Built, setup: TrainingSetup) -> None:
    """Build the setup's teacher beside `built` (once; memplan.trace.session opens the step with it)."""
    if built.teacher is None:
        from memplan.spec.values import resolve_model

        built.teacher = build_teacher(resolve_model(setup.teacher), setup)


def forward_kl(student_logits, teacher_logits, labels, ignore_index: int = IGNORE_INDEX):
    """torchtune 0.6.1 ForwardKLLoss.forward (modules/loss/kd_losses.py), line for line (normalize=True)."""
    teacher_prob = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(student_logits)
    student_logprob = F.log_softmax(student_logits, dim=-1, dtype=torch.float32)
    prod_probs = torch.masked_fill(teacher_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def distill_loss(model, teacher, batch: dict, setup: TrainingSetup, mark=None):
    """One micro-batch's loss under distillation (module doc). `mark(label)` names the regions on the tracker."""
    mark = mark or (lambda _label: None)
    out = model(**batch)  # the student: its class loss (the model's own) and its logits
    class_loss, logits = out.loss, out.logits
    del out
    mark("teacher")
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"]).logits
    mark("distill_loss")
    labels = batch["labels"]
    ignore = torch.full((labels.shape[0], 1), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    labels = torch.hstack((labels[..., 1:], ignore)).reshape(-1)  # torchtune's shift
    logits = logits.reshape(-1, logits.size(-1))
    teacher_logits = teacher_logits.reshape(-1, teacher_logits.size(-1))
    t = setup.temperature
    if t != 1:
        logits, teacher_logits = logits / t, teacher_logits / t
    kd_loss = forward_kl(logits, teacher_logits, labels)
    if t != 1:
        kd_loss = kd_loss * (t * t)
    del logits, teacher_logits  # "free logits otherwise it peaks backward memory" (torchtune)
    a = setup.distill_alpha
    return (1 - a) * class_loss + a * kd_loss


def check_student(setup: TrainingSetup) -> None:
    """What the two-model step runs with: the student's own loss (its logits kept for the KL)."""
    if setup.loss.value != "standard" or setup.logits_to_keep:
        raise MemplanError("--teacher runs the KL on the full logits: it does not combine with --loss chunked / "
                           "liger-fused or --logits-to-keep")
    if setup.peft in (PeftMethod.PROMPT, PeftMethod.PREFIX):
        raise MemplanError(f"--teacher with --peft {setup.peft.value}: the student's virtual tokens change its "
                           "logits' length; not modelled")
