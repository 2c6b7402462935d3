"""Knowledge distillation's setup values: the frozen teacher beside the student (docs/distillation.md).

TrainingSetup carries them as its last fields (teacher, teacher_weights, distill_alpha, temperature); a setup
without a teacher leaves them at their defaults and TrainingSetup.to_dict() leaves them out, so record ids of
setups made before distillation existed do not change.

The step (memplan.trace.distill runs it; memplan.estimate.distill sizes it) is torchtune 0.6.1's
knowledge-distillation recipe (recipes/knowledge_distillation_single_device.py `_loss_step`): the student's
forward, then the teacher's under torch.no_grad, then torchtune's ForwardKLLoss (modules/loss/kd_losses.py) on the
two logits and the class loss, mixed as `(1 - kd_ratio) * class_loss + kd_ratio * kd_loss`.
"""
from __future__ import annotations

import math
from enum import Enum

from memplan.errors import MemplanError

DEFAULT_ALPHA = 0.5  # torchtune 0.6.1 recipe: self._kd_ratio = cfg.get("kd_ratio", 0.5)
DEFAULT_TEMPERATURE = 1.0  # torchtune's ForwardKLLoss has none (T = 1); Hinton et al. 2015 soften with T > 1
DISTILL_FIELDS = ("teacher", "teacher_weights", "distill_alpha", "temperature")


class TeacherWeights(str, Enum):
    """How the frozen teacher's weights are stored (the spellings of `memplan serve --weights`).

    auto         the student's compute dtype (bf16 under --precision bf16, fp32 under fp32): from_pretrained(dtype=)
    fp32 / bf16 / fp16  every parameter in that dtype
    nf4          bitsandbytes 4-bit NormalFloat linears (BitsAndBytesConfig(load_in_4bit=True), no double
                 quantization: its default), the rest (embeddings, norms, LM head) in the compute dtype
    int8         bitsandbytes LLM.int8 linears (int8 weights, one fp32 scale per row; traced: memplan.trace.int8)
    """

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    NF4 = "nf4"
    INT8 = "int8"


def check_distill(teacher, weights, alpha, temperature) -> None:
    """The distillation fields' own bounds (one line each); what needs the models (vocabularies) is checked by
    memplan.estimate.distill.validate."""
    if not isinstance(teacher, str):
        raise MemplanError(f"setup field teacher must be a model name or path, got {repr(teacher)[:40]}")
    if not isinstance(weights, TeacherWeights):
        raise MemplanError(f"setup field teacher_weights must be a TeacherWeights, got {weights!r}")
    for name, v in (("--distill-alpha", alpha), ("--temperature", temperature)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MemplanError(f"{name} must be a number, got {repr(v)[:40]}")
    if not 0 <= alpha <= 1:
        raise MemplanError(f"--distill-alpha must be in [0, 1], got {alpha}")
    if not 0 < temperature <= 1000:
        raise MemplanError(f"--temperature must be in (0, 1000], got {temperature}")
    if not teacher and (weights is not TeacherWeights.AUTO or alpha != DEFAULT_ALPHA
                        or temperature != DEFAULT_TEMPERATURE):
        raise MemplanError("--teacher-weights / --distill-alpha / --temperature need --teacher MODEL")
