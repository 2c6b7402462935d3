"""Knowledge distillation (--teacher): setup fields, refusals, the estimate against the trace of the real two-model
step, the CPU measurement against the trace, and the reimplemented torchtune loss against its definition.

Fast: tiny llama student and teacher (vocab 256) from config files. `-m slow` traces the real-profile setups of
memplan.calibrate.distill.DISTILL (benchmarks/distill_grid.py writes their report).
"""
from __future__ import annotations

import json

import pytest

from memplan.api import make_setup
from memplan.cli import main
from memplan.errors import MemplanError
from memplan.spec.distill import DISTILL_FIELDS
from memplan.spec.setup import TrainingSetup

STUDENT = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)
TEACHER = dict(STUDENT, hidden_size=128, intermediate_size=320, num_hidden_layers=3)
OTHER_VOCAB = dict(TEACHER, vocab_size=320)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    out = {}
    for name, cfg in (("student", STUDENT), ("teacher", TEACHER), ("other", OTHER_VOCAB)):
        p = d / name / "config.json"
        p.parent.mkdir()
        p.write_text(json.dumps(cfg))
        out[name] = str(p)
    return out


# ---- setup fields ------------------------------------------------------------------------------------------------
def test_setups_without_a_teacher_keep_their_dict_and_record_id():
    """The distillation fields are left out of to_dict() at their defaults: a record id (sha1 of the setup dict)
    of every setup made before distillation existed is unchanged."""
    d = TrainingSetup().to_dict()
    assert not set(DISTILL_FIELDS) & set(d)
    with_teacher = make_setup(teacher="gpt2-medium", temperature=2.0).to_dict()
    assert with_teacher["teacher"] == "gpt2-medium" and with_teacher["temperature"] == 2.0
    assert with_teacher["teacher_weights"] == "auto"


@pytest.mark.parametrize("kw, words", [
    (dict(temperature=2.0), "need --teacher"),
    (dict(teacher="gpt2-medium", distill_alpha=1.5), "--distill-alpha must be in [0, 1]"),
    (dict(teacher="gpt2-medium", temperature=0.0), "--temperature must be in"),
    (dict(teacher="gpt2-medium", teacher_weights="int4"), "unknown teacher_weights"),
])
def test_bad_distillation_fields_are_refused(kw, words):
    with pytest.raises(MemplanError, match=words.replace("[", r"\[").replace("]", r"\]")):
        make_setup(**kw)


def test_a_teacher_with_another_vocabulary_is_one_line_and_exit_2(configs, capsys):
    rc = main(["estimate", "-m", configs["student"], "--teacher", configs["other"], "--seq", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "vocabulary (320)" in err[0] and ": 256)" in err[0]


@pytest.mark.parametrize("extra", [["--loss", "chunked"], ["--logits-to-keep", "8"], ["--peft", "prompt"],
                                   ["--gpus", "2", "--zero", "3"]])
def test_what_the_two_model_step_does_not_run_is_refused(configs, capsys, extra):
    rc = main(["estimate", "-m", configs["student"], "--teacher", configs["teacher"], "--seq", "64", *extra])
    assert rc == 2 and "--teacher" in capsys.readouterr().err


# ---- estimate vs trace ---------------------------------------------------------------------------------------------
def _compare(configs, **kw):
    from memplan.estimate import estimate_spec
    from memplan.spec.values import resolve_model
    from memplan.trace import trace

    model = resolve_model(configs["student"])
    setup = make_setup(teacher=configs["teacher"], batch=2, seq=64, **kw)
    return model, setup, estimate_spec(model, setup), trace(model, setup)[0]


TINY_SETUPS = [  # the last two slow-marked: the whole file stays under a minute in the default run
    dict(precision="bf16"),
    dict(precision="pure-bf16", peft="lora", teacher_weights="nf4"),
    pytest.param(dict(precision="fp32", temperature=2.0, distill_alpha=0.9), marks=pytest.mark.slow),
    pytest.param(dict(precision="bf16", teacher_weights="fp32", checkpointing="full"), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kw", TINY_SETUPS, ids=["bf16", "lora-nf4-teacher", "fp32-T2", "fp32-teacher-ckpt"])
def test_estimate_within_3_percent_of_the_two_model_trace(configs, kw):
    pytest.importorskip("torch")
    _, _, est, tr = _compare(configs, **kw)
    err = (est.peak.allocated_bytes - tr.peak.allocated_bytes) / tr.peak.allocated_bytes
    assert abs(err) <= 0.03, (err, est.categories, tr.categories)


@pytest.mark.parametrize("fmt", ["nf4", "int8", pytest.param("auto", marks=pytest.mark.slow),
                                 pytest.param("fp32", marks=pytest.mark.slow)])
def test_teacher_weights_are_byte_exact_against_the_trace(configs, fmt):
    """The teacher's frozen parameters (and NF4 buffers) as the trace materializes them, to the block: what the
    estimate leaves out, as for the student, is the rotary embedding's two inv_freq buffers (one 512-byte block
    each in the trace)."""
    pytest.importorskip("torch")
    from memplan.estimate import distill
    from memplan.spec.values import resolve_model
    from memplan.trace import trace

    model = resolve_model(configs["student"])
    plain = make_setup(batch=2, seq=64, precision="pure-bf16", peft="lora")
    setup = make_setup(batch=2, seq=64, precision="pure-bf16", peft="lora", teacher=configs["teacher"],
                       teacher_weights=fmt)
    alone, both = trace(model, plain)[0], trace(model, setup)[0]
    teacher = distill.teacher_weight_bytes(resolve_model(configs["teacher"]), setup)
    assert 0 <= both.model_states.weights - alone.model_states.weights - teacher <= 2 * 512


def test_bitsandbytes_linear8bitlt_does_not_run_on_fake_tensors():
    """Why int8 teachers trace through memplan.trace.int8's stand-in (its module doc): the installed bitsandbytes'
    Int8Params refuses a FakeTensor, and at LLM.int8's threshold its fake quantization kernel asks for a
    data-dependent size. When a bitsandbytes release changes either, this fails: trace the real module then."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode

    from memplan.trace.int8 import THRESHOLD

    with FakeTensorMode():
        with pytest.raises(RuntimeError, match="FakeTensor"):
            bnb.nn.Int8Params(torch.empty(4, 8, dtype=torch.int8), requires_grad=False, has_fp16_weights=False)
        a = torch.empty(3, 8, dtype=torch.float16)
        with pytest.raises(DynamicOutputShapeException):
            torch.ops.bitsandbytes.int8_vectorwise_quant(a, THRESHOLD)


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp32", marks=pytest.mark.slow)])
def test_int8_teacher_within_3_percent_of_the_trace(configs, tmp_path, precision):
    """An int8 teacher whose MLP is the peak (hidden 256, MLP 1024, the student's vocabulary): its Linear8bitLt
    transients (memplan.estimate.distill.int8_mlp_bytes) against the stand-in's trace."""
    pytest.importorskip("torch")
    from memplan.estimate import estimate_spec
    from memplan.spec.values import resolve_model
    from memplan.trace import trace

    p = tmp_path / "config.json"
    p.write_text(json.dumps(dict(STUDENT, hidden_size=256, intermediate_size=1024, num_attention_heads=8)))
    model = resolve_model(configs["student"])
    for weights in ("bf16", "int8") if precision == "bf16" else ("int8",):
        setup = make_setup(teacher=str(p), batch=2, seq=256, precision=precision, teacher_weights=weights)
        est, tr = estimate_spec(model, setup), trace(model, setup)[0]
        err = (est.peak.allocated_bytes - tr.peak.allocated_bytes) / tr.peak.allocated_bytes
        assert abs(err) <= 0.03, (weights, err, est.categories, tr.categories)


def test_the_teacher_is_frozen_and_in_eval_mode(configs):
    pytest.importorskip("torch")
    from memplan.spec.values import resolve_model
    from memplan.trace.build import build
    from memplan.trace.distill import attach_teacher

    setup = make_setup(teacher=configs["teacher"], seq=64)
    built = build(resolve_model(configs["student"]), setup)
    attach_teacher(built, setup)
    assert not built.teacher.training
    assert not any(p.requires_grad for p in built.teacher.parameters())
    assert built.trainable_params == built.total_params  # the teacher is no parameter of the student


# ---- the loss --------------------------------------------------------------------------------------------------
def test_forward_kl_is_soft_target_cross_entropy():
    """torchtune's ForwardKLLoss is −Σ p_teacher · log p_student averaged over unmasked tokens: cross-entropy with the
    teacher's probabilities as soft targets (torch computes that independently)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from memplan.trace.distill import forward_kl

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(12, 7, generator=g), torch.randn(12, 7, generator=g)
    labels = torch.randint(0, 7, (12,), generator=g)
    labels[3] = -100
    keep = labels != -100
    want = F.cross_entropy(s[keep], F.softmax(t[keep], dim=-1))
    assert torch.allclose(forward_kl(s, t, labels), want, atol=1e-6)


# ---- measure and the API ----------------------------------------------------------------------------------------
def test_cpu_measurement_equals_the_fake_trace(configs):
    """The CPU measurement runs the same two-model step on real tensors: byte-identical to the trace."""
    pytest.importorskip("torch")
    from memplan.measure import harness
    from memplan.spec.values import resolve_model
    from memplan.trace import trace

    model = resolve_model(configs["student"])
    setup = make_setup(batch=2, seq=64, teacher=configs["teacher"])
    ref = trace(model, setup)[0]
    out = harness.measure(model, setup, harness.MeasureOptions(device="cpu", steps=2, warmup=1))
    assert out.status == "ok", out.error
    assert out.measured["peak"]["allocated_bytes"] == ref.peak.allocated_bytes
    assert out.measured["categories"] == {c.value: int(b) for c, b in ref.categories.items()}


def test_api_estimate_takes_a_teacher(configs):
    import memplan

    alone = memplan.estimate(configs["student"], seq=64, batch=2)
    both = memplan.estimate(configs["student"], seq=64, batch=2, teacher=configs["teacher"])
    assert both.peak.allocated_bytes > alone.peak.allocated_bytes
    assert both.categories[next(c for c in both.categories if c.value == "weights")] > \
        alone.categories[next(c for c in alone.categories if c.value == "weights")]
    assert any("teacher" in w for w in both.warnings)


# ---- the real-profile setups (slow) ------------------------------------------------------------------------------
def _distill_setups():
    from memplan.calibrate.distill import DISTILL

    return DISTILL


@pytest.mark.slow
@pytest.mark.parametrize("kw", _distill_setups(), ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_profile_setups_within_3_percent_of_trace(kw):
    pytest.importorskip("torch")
    from memplan.calibrate import compare

    row = compare(kw)
    assert abs(row.error) <= 0.03, row
    assert not row.category_failures(), row.category_failures()


def test_gpu_path_runs_the_two_model_step_driven_on_the_cpu(configs):
    """The GPU measurement's build (memplan.measure.cuda.build_on_device) and loop, driven with device="cpu" as
    tests/test_measure.py drives them: the teacher materialized on the device and called by the loop."""
    pytest.importorskip("torch")
    import warnings

    from memplan.measure import cuda as mcuda, phases
    from memplan.measure.timing import CpuClock
    from memplan.spec.values import resolve_model
    from memplan.trace.session import make_batch

    spec = resolve_model(configs["student"])
    setup = make_setup(precision="bf16", batch=2, seq=16, teacher=configs["teacher"])
    built = mcuda.build_on_device(spec, setup, "cpu")
    assert all(p.device.type == "cpu" for p in built.teacher.parameters())
    book = phases.PhaseBook(CpuClock(), None, None, phase_log=False)

    class Cuda:
        autocast_device = "cpu"

    loop = mcuda._default_loop(built, setup, phases.Recorder(book), "cpu", Cuda)
    assert loop.teacher is built.teacher
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop.iteration(make_batch(spec, 2, 16, "cpu"))
    assert loop.optimizer.state
    with pytest.raises(MemplanError, match="--device cpu"):
        mcuda.build_on_device(spec, make_setup(batch=2, seq=16, teacher=configs["teacher"], teacher_weights="nf4"),
                              "cpu")


def test_the_teachers_forward_flops_join_the_step():
    """Predicted speed: the teacher's no-grad forward (2·N_teacher + its attention core per token) is added to the
    student's forward FLOPs; nothing else changes."""
    from memplan.estimate.flops import flops_per_token, teacher_forward_flops

    alone = flops_per_token(_spec("llama-3.2-1b"), make_setup(seq=1024))
    setup = make_setup(seq=1024, teacher="llama-3.2-3b")
    both = flops_per_token(_spec("llama-3.2-1b"), setup)
    assert both.forward - alone.forward == pytest.approx(teacher_forward_flops(setup))
    assert both.backward_weight == alone.backward_weight
    # 2·N of llama-3.2-3b's matmuls dominates: more than 2·3e9 FLOPs per token (3.2B parameters, tied head)
    assert teacher_forward_flops(setup) > 2 * 3e9


def _spec(name):
    from memplan.spec.values import resolve_model

    return resolve_model(name)


def test_records_carry_the_teacher_and_check_its_types():
    """A measured record's setup round-trips with the teacher (memplan.measure.record.check_setup, setup_from_dict)."""
    from memplan.measure.record import check_setup
    from memplan.spec.values import setup_from_dict

    setup = make_setup(teacher="gpt2-medium", teacher_weights="nf4", distill_alpha=0.25, temperature=2.0)
    assert setup_from_dict(check_setup(setup.to_dict())) == setup
    for bad in ({"teacher": 3}, {"temperature": "hot"}, {"distill_alpha": -1}):
        with pytest.raises(MemplanError):
            check_setup(bad)
