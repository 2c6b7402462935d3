"""Knowledge distillation in the estimate: the frozen teacher's bytes beside the student's step (docs/distillation.md).

The step is memplan.spec.distill's (torchtune 0.6.1's `_loss_step` with its ForwardKLLoss; memplan.trace.distill
runs it). With t = micro-batch tokens and V the shared vocabulary, F = t·V·4 (an fp32 tensor over the logits),
M = t·V (a bool mask), L_s / L_t = t·V in the student's / teacher's logits dtype:

    every state       + the teacher's weights (`teacher_weight_bytes`: its dtype, or NF4 / int8 linears)
    teacher forward   the student's forward done (its class loss computed, its fp32 upcast freed, its logits L_s
                      kept) + the teacher's no-grad forward: one layer's live tensors at a time
                      (memplan.serve.estimate.layer_forward_bytes, the serving prefill's), then its logits L_t
    KL forward        + L_s + L_t + saved: softmax(teacher) F, isinf(student) M, log_softmax(student) F
                      + teacher_prob · student_logprob F and its masked_fill F (the peak: 4F + M + L_s + L_t);
                      T ≠ 1 divides the logits first (a copy replacing each, not beside the peak)
    KL backward       (the logits freed by `del`) the saved 2F + masked_fill's gradient F + the product's gradient
                      F, the mask freed: 4F; then log_softmax's gradient replaces them
    loss backward     the class loss's backward as without a teacher (nll_loss's and log_softmax's fp32
                      gradients), beside the KL's gradient of the logits (L_s) that autograd adds to it
The trace's run order (torchtune, TRL's GKDTrainer and transformers' distillation examples all run the student
first): the teacher's forward overlaps every activation the student saved, which is why that order is modelled.
"""
from __future__ import annotations

from dataclasses import replace
from enum import Enum
from functools import lru_cache

from memplan.categories import Category as C, Phase
from memplan.errors import MemplanError
from memplan.estimate.quant import nf4_bytes
from memplan.spec.distill import TeacherWeights
from memplan.spec.model import ModelSpec
from memplan.spec.setup import Loss, PeftMethod, Precision, TrainingSetup
from memplan.units import round_block

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
INT8_ROW_SCALE_BYTES = 4  # bitsandbytes LLM.int8: one fp32 absmax per output row (memplan.serve.weights)


class DistillMoment(str, Enum):
    """The moments distillation adds to memplan.estimate.phases' step (module doc)."""

    TEACHER_FORWARD = "teacher forward"
    KL_FORWARD = "KL forward"
    KL_BACKWARD = "KL backward"


def teacher_spec(setup: TrainingSetup) -> ModelSpec:
    from memplan.spec.values import resolve_model

    return resolve_model(setup.teacher)


def validate(model: ModelSpec, setup: TrainingSetup) -> list[str]:
    """Refuse what the two-model step cannot run (one line each); the warnings."""
    if not setup.teacher:
        return []
    teacher = teacher_spec(setup)
    if teacher.vocab != model.vocab:
        raise MemplanError(f"--teacher {teacher.name}: its vocabulary ({teacher.vocab:,}) is not the student's "
                           f"({model.name}: {model.vocab:,}); the KL needs one tokenizer for both")
    if getattr(model.arch, "value", model.arch) != "decoder" or getattr(teacher.arch, "value", teacher.arch) != "decoder":
        raise MemplanError("--teacher: distillation is modelled for decoder-only causal LMs (student and teacher)")
    if setup.loss is not Loss.STANDARD or setup.logits_to_keep:
        raise MemplanError("--teacher runs the KL on the full logits: it does not combine with --loss chunked / "
                           "liger-fused or --logits-to-keep")
    if setup.peft in (PeftMethod.PROMPT, PeftMethod.PREFIX):
        raise MemplanError(f"--teacher with --peft {setup.peft.value}: the student's virtual tokens change its "
                           "logits' length; not modelled")
    if setup.optimizer_in_backward or setup.gpus > 1 or setup.zero > 0:
        raise MemplanError("--teacher is modelled on one GPU without ZeRO or --optimizer-in-backward")
    w = teacher_weight_bytes(teacher, setup)
    size = f"{w / 2**30:,.2f} GiB" if w >= 2**30 else f"{w / 2**20:,.1f} MiB"
    warns = [f"distillation: teacher {teacher.name} ({setup.teacher_weights.value}) adds {size} of "
             f"weights (counted in weights), its no-grad forward and the KL's fp32 soft targets (loss = "
             f"{1 - setup.distill_alpha:g}·CE + {setup.distill_alpha:g}·KL, T = {setup.temperature:g})"]
    if setup.teacher_weights is TeacherWeights.INT8:
        warns.append("--teacher-weights int8: LLM.int8's outlier columns (inputs with |x| >= 6) are data and not "
                     "counted; each adds a column of the input and of the dequantized weight")
    return warns


def teacher_dtype_bytes(setup: TrainingSetup) -> int:
    """Bytes of the teacher's unquantized parameters (auto: the student's compute dtype; NF4 / int8: that too)."""
    return DTYPE_BYTES.get(setup.teacher_weights.value, setup.precision.compute_bytes)


def logits_dtype_bytes(setup: TrainingSetup) -> int:
    """The teacher's logits: autocast's compute dtype, else its parameters' dtype."""
    return setup.precision.compute_bytes if setup.precision.autocast else teacher_dtype_bytes(setup)


def teacher_weight_bytes(teacher: ModelSpec, setup: TrainingSetup) -> int:
    """Allocated bytes of the frozen teacher (each tensor rounded to the CUDA block, as the trace counts them)."""
    return _weight_bytes(teacher, setup.teacher_weights, teacher_dtype_bytes(setup))


@lru_cache(maxsize=256)
def _weight_bytes(teacher: ModelSpec, fmt: TeacherWeights, half: int) -> int:
    from memplan.estimate.params import param_groups

    quantized = fmt in (TeacherWeights.NF4, TeacherWeights.INT8)
    # peft=qlora marks the linears bitsandbytes quantizes (every nn.Linear but the LM head); its adapters are not
    # the teacher's and are skipped
    probe = TrainingSetup(precision=Precision.PURE_BF16, peft=PeftMethod.QLORA if quantized else PeftMethod.FULL)
    total = 0
    for g in param_groups(teacher, probe):
        if g.adapter:
            continue
        if g.nf4 and fmt is TeacherWeights.NF4:
            n = nf4_bytes(g.numel, False)  # BitsAndBytesConfig: bnb_4bit_use_double_quant=False
        elif g.nf4:
            n = round_block(g.numel) + round_block((g.rows or 1) * INT8_ROW_SCALE_BYTES)
        else:
            n = round_block(g.numel * half)
        total += n * g.count
    return total


def teacher_forward_bytes(teacher: ModelSpec, setup: TrainingSetup) -> int:
    """The teacher's no-grad forward at its largest, beside its logits once made: one layer's live tensors
    (the serving prefill's layer_forward_bytes), or the final hidden states and the logits."""
    from memplan.serve.estimate import layer_forward_bytes

    t, c = setup.tokens, logits_dtype_bytes(setup)
    layer = layer_forward_bytes(teacher, t, 1, c)
    if setup.teacher_weights is TeacherWeights.INT8:
        layer = max(layer, int8_mlp_bytes(teacher, t, c, setup.precision.half_dtype == "float16"))
    head = round_block(t * teacher.hidden * c) + round_block(t * teacher.vocab * c)
    return max(layer, head)


def int8_linear_extra(tokens: int, n_in: int, n_out: int, fp16: bool) -> tuple[int, int]:
    """Transients of one bitsandbytes Linear8bitLt forward on CUDA beyond its input and output (memplan.trace.int8
    cites bitsandbytes 0.50.2 line by line): (quantize, matmul). Quantize: the fp16 copy of the input (none when it
    is fp16), out_row int8, the abs in fp16 and its bool compare ([T, in] each), row_stats fp32 [T]. Matmul: out_row
    and row_stats kept, int8_linear_matmul's int32 [T, out] and int8_mm_dequant's fp16 [T, out] (the output itself
    when the input is fp16, else beside its `.to(dtype)` copy)."""
    quant = tokens * n_in * ((0 if fp16 else 2) + 1 + 2 + 1) + tokens * 4
    matmul = tokens * n_in + tokens * 4 + tokens * n_out * (4 + (0 if fp16 else 2))
    return quant, matmul


def int8_mlp_bytes(teacher: ModelSpec, tokens: int, c: int, fp16: bool) -> int:
    """A decoder layer's live bytes at its MLP with int8 linears: the hidden-size copies and rotary tables the
    serving layer model keeps (memplan.serve.estimate.layer_forward_bytes) plus, at each linear, what is alive
    around it (LlamaMLP: `down_proj(act_fn(gate_proj(x)) * up_proj(x))`: act(gate) beside up_proj's call, the
    product beside down_proj's; a plain MLP: fc1 then fc2 on the activation) and its int8 transients."""
    from memplan.serve.estimate import BASE_HIDDEN_COPIES
    from memplan.spec.traits import PositionKind

    h, i, t = teacher.hidden, teacher.intermediate, tokens
    copies = BASE_HIDDEN_COPIES + (1 if teacher.traits.position is PositionKind.LEARNED else 0)
    rotary = 2 * t * teacher.head_dim * c if teacher.traits.position is PositionKind.ROTARY else 0
    up_q, up_m = int8_linear_extra(t, h, i, fp16)
    down_q, down_m = int8_linear_extra(t, i, h, fp16)
    if teacher.gated_mlp:
        mlp = max(t * i * c + max(up_q, up_m + t * i * c),  # up_proj beside act(gate)
                  t * i * c + max(down_q, down_m + t * h * c))  # down_proj on the product
    else:
        mlp = max(max(up_q, up_m + t * i * c), t * i * c + max(down_q, down_m + t * h * c))
    return rotary + copies * t * h * c + mlp


def terms(model: ModelSpec, setup: TrainingSetup) -> dict:
    """The KL's byte terms (module doc): F, M, L_s, L_t and the student's class-loss upcast."""
    t, v = setup.tokens, model.vocab
    f = round_block(t * v * 4)
    ls = round_block(t * v * setup.precision.compute_bytes)
    upcast = f if setup.precision.compute_bytes != 4 else 0
    return {"F": f, "M": round_block(t * v), "Ls": ls, "Lt": round_block(t * v * logits_dtype_bytes(setup)),
            "upcast": upcast}


def adjust(states: tuple, model: ModelSpec, setup: TrainingSetup) -> tuple:
    """The student's step states (memplan.estimate.phases.step_states) with the teacher added (module doc)."""
    from memplan.estimate.phases import Moment, State

    teacher = teacher_spec(setup)
    w = teacher_weight_bytes(teacher, setup)
    k = terms(model, setup)
    f, m, ls, lt = k["F"], k["M"], k["Ls"], k["Lt"]
    out = []
    for s in states:
        c = dict(s.categories)
        c[C.WEIGHTS] = c.get(C.WEIGHTS, 0) + w
        if s.name is Moment.FORWARD:
            out.append(State(s.name, s.phase, c))
            # the class loss done: its upcast freed, the student's logits kept
            base = dict(c)
            base[C.TEMPORARIES] -= k["upcast"]
            tf = dict(base)
            tf[C.TEMPORARIES] += teacher_forward_bytes(teacher, setup)
            out.append(State(DistillMoment.TEACHER_FORWARD, Phase.FORWARD, tf))
            kl = dict(base)
            kl[C.ACTIVATIONS] += 2 * f + m  # softmax(teacher), isinf(student), log_softmax(student): saved
            kl[C.TEMPORARIES] += lt + 2 * f  # the teacher's logits, the product and its masked_fill
            out.append(State(DistillMoment.KL_FORWARD, Phase.FORWARD, kl))
            continue
        if s.name is Moment.LOSS_BACKWARD:
            kb = dict(c)
            loss_b = 2 * f  # the class loss's backward transients the state holds (phases.loss_bytes)
            kb[C.ACTIVATIONS] += 2 * f  # the KL's saved softmax and log_softmax, the mask freed
            kb[C.TEMPORARIES] += 2 * f - loss_b  # masked_fill's and the product's gradients
            out.append(State(DistillMoment.KL_BACKWARD, Phase.BACKWARD, kb))
            c[C.TEMPORARIES] += ls  # the KL's gradient of the logits, waiting to be added to the class loss's
        out.append(State(s.name, s.phase, c))
    return tuple(out)


def with_teacher(ms, setup: TrainingSetup):
    """The student's model states with the teacher's weights in `weights` (as the trace counts them)."""
    return replace(ms, weights=ms.weights + teacher_weight_bytes(teacher_spec(setup), setup))
