"""`memplan fit`: every setup it returns fits by the estimator, its largest micro-batch and sequence length are
the largest (one more step does not fit, or it is the cap), the ranking is sorted, and the CLI's exit codes."""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from memplan import fit as F
from memplan.api import make_setup, resolve_gpu, resolve_model
from memplan.spec.setup import Checkpointing, Engine, Optimizer, PeftMethod, Precision
from memplan.cli import main
from memplan.errors import MemplanError
from memplan.estimate import estimate_spec
from memplan.cli.fit import NOTHING_FITS_EXIT

CASES = [  # (model, gpu, gpus, seq, space): small enough to search whole in a test
    ("gpt2", "l4", 1, 1024, F.Space()),
    ("llama-7b", "a100-40gb", 8, 2048, F.Space(optimizers=(Optimizer.ADAMW, Optimizer.ADAMW_8BIT))),
    ("qwen2.5-0.5b", "t4", 2, 512, F.Space(precisions=(Precision.FP32, Precision.BF16),
                                           checkpointing=(Checkpointing.NONE, Checkpointing.FULL))),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def searched(request):
    name, gpu, gpus, seq, space = request.param
    model, g = resolve_model(name), resolve_gpu(gpu)
    query = F.Query(base=make_setup(gpus=gpus), seq=seq)
    return model, g, query, F.fit(model, g, query, space), space


def _device(model, setup, gpu):
    return estimate_spec(model, setup, gpu).peak.device_bytes


def test_every_returned_setup_fits_by_estimate(searched):
    model, g, query, report, _ = searched
    assert report.rows
    for r in report.rows:
        res = estimate_spec(model, r.setup, g)
        assert res.fits and res.peak.device_bytes <= report.limit_bytes
        assert res.peak.device_bytes == r.peak_device_bytes
        assert r.setup.batch == r.max_batch and r.setup.seq == query.seq


def test_one_more_micro_batch_does_not_fit(searched):
    model, g, query, report, _ = searched
    for r in report.rows:
        if r.batch_at_cap:
            assert r.max_batch == query.max_batch
        else:
            assert _device(model, replace(r.setup, batch=r.max_batch + 1), g) > report.limit_bytes


def test_longest_sequence_is_the_longest_on_the_grid(searched):
    model, g, query, report, _ = searched
    for r in report.rows:
        at = replace(r.setup, batch=query.min_batch, seq=r.max_seq)
        assert _device(model, at, g) <= report.limit_bytes
        nxt = (r.max_seq // F.SEQ_STEP + 1) * F.SEQ_STEP
        if r.seq_at_cap:
            assert nxt > F.seq_cap(model, query)
        else:
            assert _device(model, replace(at, seq=nxt), g) > report.limit_bytes


def test_ranked_by_predicted_tokens_per_s(searched):
    report = searched[3]
    speeds = [r.throughput["tokens_per_s"] for r in report.rows]
    assert speeds == sorted(speeds, reverse=True)


def test_optimizers_that_tie_share_one_row(searched):
    """No two rows of one (precision, peft, ckpt, zero, engine, offload) give the same answer: the optimizers that
    do not change it are listed on one row, every listed optimizer fits at that row's micro-batch, and nothing is
    lost."""
    model, g, query, report, space = searched
    seen = {}
    for r in report.rows:
        s = r.setup
        key = (s.precision, s.peft, s.checkpointing, s.zero, s.engine, F.Offload.of(s))
        for other in seen.get(key, []):
            assert not F._ties(r, other, g), (key, r.optimizers, other.optimizers)
        seen.setdefault(key, []).append(r)
        assert s.optimizer in r.optimizers
        for o in r.optimizers:
            assert _device(model, replace(s, optimizer=o), g) <= r.peak_device_bytes <= report.limit_bytes
    assert sum(len(r.optimizers) for r in report.rows) == report.fitting


@pytest.mark.parametrize("key", list(F.SortKey))
def test_sort_keys(key):
    model, g = resolve_model("qwen2.5-0.5b"), resolve_gpu("t4")
    report = F.fit(model, g, F.Query(base=make_setup(), seq=512), F.Space(precisions=(Precision.FP32,)), key)
    first = {F.SortKey.TOKENS: lambda r: -r.throughput["tokens_per_s"], F.SortKey.BATCH: lambda r: -r.max_batch,
             F.SortKey.SEQ: lambda r: -r.max_seq, F.SortKey.MEMORY: lambda r: r.peak_device_bytes}[key]
    values = [first(r) for r in report.rows]
    assert len(report.rows) > 3 and values == sorted(values) and report.sort is key


def test_left_out_choices_do_not_fit(searched):
    """Completeness: every valid choice missing from the answer fails at (min_batch, seq)."""
    model, g, query, report, space = searched
    got = {(r.setup.precision, o, r.setup.peft, r.setup.checkpointing, r.setup.zero, r.setup.engine,
            F.Offload.of(r.setup), r.setup.optimizer_in_backward, r.setup.fp8, r.setup.packing,
            r.setup.offload_activations) for r in report.rows for o in r.optimizers}
    for choice in space.choices(query.base.gpus):
        if choice[:-2] in got:  # the last two (loss, ckpt_every) are None here: the base's
            continue
        s = F._choice_setup(query.base, *choice)
        if s is None:
            continue
        try:
            assert _device(model, replace(s, batch=query.min_batch, seq=query.seq), g) > report.limit_bytes
        except MemplanError:
            pass  # refused by the estimator (e.g. prefix tuning with checkpointing)


def test_several_gpus_search_engine_and_offload_and_skip_what_setup_refuses(searched):
    """With --gpus > 1 every engine × offload the space names is tried; TrainingSetup's refusals (optimizer-only
    offload under FSDP2, fsdp-bf16 outside FSDP2 ZeRO-2/3, autocast under DeepSpeed) are skipped and counted."""
    model, g, query, report, space = searched
    choices = list(space.choices(query.base.gpus))
    assert report.searched == len(choices)
    refused = sum(F._choice_setup(query.base, *c) is None for c in choices)
    assert report.invalid >= refused
    if query.base.gpus == 1:
        assert {(c[5], c[6]) for c in choices} == {(space.engines[0], F.Offload.NONE)}
        return
    assert {(c[5], c[6]) for c in choices} == {(e, o) for e in space.engines for o in space.offloads}
    seen = {(r.setup.engine, F.Offload.of(r.setup)) for r in report.rows}
    assert (Engine.FSDP, F.Offload.NONE) in seen and (Engine.DEEPSPEED, F.Offload.NONE) in seen
    assert (Engine.FSDP, F.Offload.OPTIMIZER) not in seen
    for r in report.rows:
        s = r.setup
        assert s.engine is Engine.DEEPSPEED or not s.offload_optimizer or s.offload_params
        assert s.engine is Engine.FSDP or not s.precision.autocast


def test_offload_rows_report_host_ram_per_node():
    # host RAM per node = the estimator's offloaded bytes per GPU × the GPUs of one node, min(gpus, gpus_per_node)
    model, g = resolve_model("llama-3.2-1b"), resolve_gpu("a100-40gb")
    space = F.Space(precisions=(Precision.BF16_MASTER,), optimizers=(Optimizer.ADAMW,), pefts=(PeftMethod.FULL,),
                    checkpointing=(Checkpointing.FULL,), zeros=(2, 3))
    for gpus, per_node in ((4, 8), (16, 8), (16, 2)):
        base = make_setup(gpus=gpus, gpus_per_node=per_node)
        report = F.fit(model, g, F.Query(base=base, seq=1024, max_batch=8), space)
        offloading = [r for r in report.rows if F.Offload.of(r.setup) is not F.Offload.NONE]
        assert offloading and all(r.host_bytes == 0 for r in report.rows if r not in offloading)
        for r in offloading:
            cpu = estimate_spec(model, r.setup, g).model_states.cpu_bytes
            assert r.host_bytes == cpu > 0
            assert r.host_bytes_per_node == cpu * min(gpus, per_node)
            assert r.to_dict()["host_bytes_per_node"] == r.host_bytes_per_node


def test_equal_speed_prefers_no_offload():
    model, g = resolve_model("llama-3.2-1b"), resolve_gpu("a100-80gb")
    space = F.Space(precisions=(Precision.BF16_MASTER,), optimizers=(Optimizer.ADAMW,), pefts=(PeftMethod.LORA,),
                    checkpointing=(Checkpointing.NONE,), zeros=(3,), engines=(Engine.DEEPSPEED,))
    report = F.fit(model, g, F.Query(base=make_setup(gpus=2), seq=1024, max_batch=4), space)
    rows = [r for r in report.rows if r.max_batch == 4]
    speeds = {r.throughput["tokens_per_s"] for r in rows}
    if len(speeds) == 1 and len(rows) > 1:
        assert F.Offload.of(rows[0].setup) is F.Offload.NONE


@pytest.mark.parametrize("name,kw", [
    ("llama-7b", dict(precision="bf16")), ("llama-7b", dict(peft="qlora", checkpointing="full")),
    ("gpt2", dict(attention="eager", precision="fp32")), ("llama-3.1-8b", dict(peft="lora", zero=3, gpus=8)),
    ("t5-3b", dict(optimizer="adafactor", checkpointing="selective")), ("mixtral-8x7b", dict(peft="qlora")),
])
def test_memory_grows_with_batch_and_seq(name, kw):
    """The search's premise, checked rather than assumed: device bytes never fall as batch or seq grow."""
    m, g = resolve_model(name), resolve_gpu("h100-sxm")
    base = make_setup(**kw)
    by_batch = [_device(m, replace(base, batch=b, seq=512), g) for b in range(1, 33)]
    assert by_batch == sorted(by_batch)
    top = min(m.max_positions, 8192)
    by_seq = [_device(m, replace(base, batch=2, seq=s), g) for s in range(128, top + 1, 128)]
    assert by_seq == sorted(by_seq)


@settings(max_examples=max(300, settings().max_examples), deadline=None)  # more under "explore"
@given(st.lists(st.integers(0, 50), min_size=1, max_size=60), st.integers(0, 1500), st.integers(1, 5),
       st.integers(0, 300))
def test_search_answer_is_a_boundary_whatever_memory_does(steps, limit, start, base):
    """For any memory curve (here random, not even monotone) the answer fits and the next point does not; for
    monotone curves it is the largest that fits (the same as a linear scan)."""
    grid = F._Grid(start, 1, start + len(steps) - 1)
    curve = {start + i: base + sum(steps[:i + 1]) for i in range(len(steps))}  # monotone
    wobbly = {v: b + (37 * v % 11) * (v % 3) for v, b in curve.items()}  # not monotone
    for mem in (curve, wobbly):
        if mem[start] > limit:
            continue
        i = F._largest(grid, mem.__getitem__, limit)
        v = grid.value(i)
        assert mem[v] <= limit
        assert v == start + len(steps) - 1 or mem[v + 1] > limit
    if curve[start] <= limit:
        assert grid.value(F._largest(grid, curve.__getitem__, limit)) == max(v for v, b in curve.items()
                                                                             if b <= limit)


def test_seq_grid_starts_at_the_query_and_steps_by_128():
    g = F._Grid(1000, 128, 2000)
    assert [g.value(i) for i in range(g.n)] == [1000, 1024, 1152, 1280, 1408, 1536, 1664, 1792, 1920]
    assert F._Grid(2048, 128, 2048).n == 1


def test_query_and_space_validation():
    with pytest.raises(MemplanError):
        F.Query(base=make_setup(), seq=2048, margin=1.5)
    with pytest.raises(MemplanError):
        F.Query(base=make_setup(), seq=2048, min_batch=4, max_batch=2)
    with pytest.raises(MemplanError):
        F.Space(pefts=())


# --- CLI ---------------------------------------------------------------------------------------------------
def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_table_json_csv(capsys):
    rc, out, _ = run(capsys, "fit", "--model", "gpt2", "--gpu", "t4", "--peft", "lora,full", "--top", "1")
    assert rc == 0 and "tokens/s/GPU" in out and "more rows (--top 0 shows all)" in out
    rc, out, _ = run(capsys, "fit", "--model", "gpt2", "--gpu", "t4", "--peft", "lora", "-f", "json")
    d = json.loads(out)
    assert rc == 0 and d["fitting"] == sum(len(r["optimizers"]) for r in d["rows"]) > 0
    assert d["seq"] == 1024  # gpt2 has 1024 positions
    m, g = resolve_model("gpt2"), resolve_gpu("t4")
    for row in d["rows"]:
        s = make_setup(precision=row["precision"], optimizer=row["optimizer"], peft=row["peft"],
                       checkpointing=row["checkpointing"], batch=row["max_batch"], seq=row["seq"])
        assert estimate_spec(m, s, g).peak.device_bytes <= d["limit_bytes"]
    rc, out, _ = run(capsys, "fit", "--model", "gpt2", "--gpu", "t4", "--peft", "lora", "-f", "csv", "--top", "3")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and len(rows) == 3 and rows[0]["rank"] == "1"


def test_cli_constraints(capsys):
    rc, out, _ = run(capsys, "fit", "--model", "llama-3.2-1b", "--gpu", "a100-80gb", "--gpus", "4", "--max-zero", "1",
                     "--precision", "bf16", "--peft", "full", "--optimizer", "adamw", "--seq", "1024", "-f", "json")
    d = json.loads(out)
    assert rc == 0 and {r["zero"] for r in d["rows"]} <= {0, 1} and {r["precision"] for r in d["rows"]} == {"bf16"}


def test_cli_searches_engines_and_reports_host_ram_per_node(capsys):
    rc, out, _ = run(capsys, "fit", "--model", "llama-3.2-1b", "--gpu", "a100-40gb", "--gpus", "16",
                     "--gpus-per-node", "4", "--precision", "bf16-master", "--peft", "full", "--optimizer", "adamw",
                     "--checkpointing", "full", "--zero", "3", "--engine", "deepspeed", "--offload", "none,all",
                     "--max-batch", "4", "--seq", "1024", "-f", "json")
    d = json.loads(out)
    assert rc == 0 and d["gpus_per_node"] == 4
    assert {(r["engine"], r["offload"]) for r in d["rows"]} == {("deepspeed", "none"), ("deepspeed", "all")}
    for r in d["rows"]:
        assert r["host_bytes_per_node"] == 4 * r["host_bytes_per_gpu"]
        assert (r["host_bytes_per_gpu"] > 0) == (r["offload"] == "all")
    rc, out, _ = run(capsys, "fit", "--model", "llama-3.2-1b", "--gpu", "a100-40gb", "--gpus", "16",
                     "--gpus-per-node", "4", "--precision", "bf16-master", "--peft", "full", "--optimizer", "adamw",
                     "--checkpointing", "full", "--zero", "3", "--max-batch", "4", "--seq", "1024")
    assert rc == 0 and "engine" in out and "host GiB/node" in out and "× 4 GPUs per node" in out


def test_cli_unknown_gpu_is_exit_2(capsys):
    rc, _, err = run(capsys, "fit", "--model", "gpt2", "--gpu", "a100-90gb")
    assert rc == 2 and err.startswith("memplan: error: unknown GPU") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [
    ["--precision", "fp64"], ["--peft", "magic"], ["--zero", "5"], ["--zero", "x"], ["--margin", "1"],
    ["--min-batch", "0"], ["--seq", "4096"], ["--max-zero", "-1"], ["--top", "-1"], ["--engine", "megatron"],
    ["--offload", "disk"], ["--offload", ","], ["--gpus-per-node", "0"],
])
def test_cli_bad_input_is_exit_2(capsys, argv):
    rc, _, err = run(capsys, "fit", "--model", "gpt2", "--gpu", "t4", *argv)
    assert rc == 2 and err.startswith("memplan: error:") and len(err.strip().splitlines()) == 1


def test_cli_nothing_fits_is_exit_1_with_a_message(capsys):
    rc, out, err = run(capsys, "fit", "--model", "llama-2-70b", "--gpu", "t4", "--peft", "full", "--precision",
                       "fp32")
    assert rc == NOTHING_FITS_EXIT == 3
    assert out == "" and err.startswith("memplan: nothing fits") and "T4" in err


def _cells(line: str) -> list[str]:
    return [c for c in re.split(r" {2,}", line.strip()) if c]


def test_columns_never_run_together():
    """Widths come from the content and columns are at least two spaces apart, however long a value is."""
    from memplan.render import columns

    lines = columns(["optimizer", "peft", "n"], [["paged-adamw-8bit", "qlora", 1], ["sgd", "a" * 50, 12345]],
                    right={2})
    assert "paged-adamw-8bit  qlora" in lines[1] and "a" * 50 in lines[2]
    assert [_cells(x) for x in lines] == [["optimizer", "peft", "n"], ["paged-adamw-8bit", "qlora", "1"],
                                          ["sgd", "a" * 50, "12345"]]


def test_cli_table_columns_are_separated(capsys):
    """The issue's case: fit's optimizer and peft columns ran together (`paged-adamw-8bitqlora`)."""
    rc, out, _ = run(capsys, "fit", "--model", "llama-3.1-8b", "--gpu", "a100-40gb", "--optimizer",
                     "paged-adamw-8bit", "--peft", "qlora", "--precision", "pure-bf16", "--group", "none")
    lines = out.splitlines()
    head = next(i for i, x in enumerate(lines) if x.lstrip().startswith("#"))
    n = len(_cells(lines[head]))
    rows = [x for x in lines[head + 1:] if x.split()[0].isdigit()]
    assert rc == 0 and rows and "paged-adamw-8bitqlora" not in out
    for x in rows:
        cells = _cells(x)
        assert len(cells) == n and cells[1] == "qlora" and cells[-1] == "paged-adamw-8bit"


def test_cli_groups_by_method_and_states_the_batch_assumption(capsys):
    rc, out, _ = run(capsys, "fit", "--model", "gpt2", "--gpu", "t4", "--peft", "lora,full,ia3", "--top", "2")
    assert rc == 0
    groups = [x.split(":")[0][3:] for x in out.splitlines() if x.startswith("-- ")]
    assert sorted(groups) == ["full", "ia3", "lora"]
    assert F.BATCH_NOTE in out
    rc, out, _ = run(capsys, "fit", "--model", "gpt2", "--gpu", "t4", "--peft", "lora", "--sort", "batch", "-f",
                     "json")
    d = json.loads(out)
    batches = [r["max_batch"] for r in d["rows"]]
    assert rc == 0 and d["note"] == F.BATCH_NOTE and d["sort"] == "batch" and batches == sorted(batches,
                                                                                                 reverse=True)
    assert all(r["optimizer"] in r["optimizers"] for r in d["rows"])


def test_cli_nothing_fits_hints_only_what_was_not_searched(capsys):
    rc, _, err = run(capsys, "fit", "--model", "llama-2-70b", "--gpu", "t4", "--peft", "full,qlora")
    assert rc == NOTHING_FITS_EXIT and "nothing fits" in err and "--peft qlora" not in err
    rc, _, err = run(capsys, "fit", "--model", "llama-2-70b", "--gpu", "t4", "--peft", "full", "--precision", "fp32")
    assert rc == NOTHING_FITS_EXIT and "--peft qlora" in err


def test_default_precisions_add_fsdp_bf16_on_several_bf16_gpus():
    # fsdp-bf16 needs FSDP2 ZeRO-2/3, so one GPU never searches it; GPUs without bf16 search the fp16 set
    a100, t4 = resolve_gpu("a100-80gb"), resolve_gpu("t4")
    assert Precision.FSDP_BF16 not in F.default_precisions(a100, 1)
    assert F.default_precisions(a100, 8) == F.DEFAULT_PRECISIONS + (Precision.FSDP_BF16,)
    assert F.default_precisions(t4, 8) == F.FP16_PRECISIONS
