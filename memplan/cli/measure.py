"""`memplan measure`: run one configuration (or a sweep of them, each in a fresh worker) and record peak memory
per phase and level, tokens/s and MFU beside memplan's estimate.

Exit codes: 0 done; 1 the configuration did not fit (oom) or its step failed (error; for --gpus / --zero also a
rank that was killed or did not report before --timeout-s); 2 bad input (one `memplan: error:` line, before any
work); 130 interrupted (finished records kept).
"""

import math
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from memplan.cli.options import Format, FormatOpt, with_setup_options_optional_model
from memplan.cli.progress import Progress, ProgressOpt
from memplan.errors import MemplanError


class Device(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


def default_results(stem: str, device: str, gpu_profile: str | None) -> Path:
    """reports/measurements/<gpu>/<stem>.jsonl for a GPU with a profile (the committed records); reports/
    <stem>-<device>.jsonl otherwise (CPU records are CI artefacts, never committed under measurements/)."""
    if device == "cuda" and gpu_profile:
        return Path("reports") / "measurements" / gpu_profile / f"{stem}.jsonl"
    return Path("reports") / f"{stem}-{device}.jsonl"


def _gpu_context(device: str, gpu_opt):
    """(GpuInfo or None, the GpuSpec for estimate/MFU or None, warnings). --gpu overrides NVML's match."""
    from memplan.measure.memory import detect_gpu
    from memplan.profiles import load_gpu

    warns = []
    if device != "cuda":
        return None, gpu_opt, warns
    info = detect_gpu()
    gpu = gpu_opt
    if gpu is None and info.profile:
        gpu = load_gpu(info.profile)
    if gpu is None:
        if info.nvml_name:
            warns.append(f"NVML reports '{info.nvml_name}' and no GPU profile matches it (profiles/gpus/*.toml "
                         "nvml_names): fit, headroom and MFU are left out; pass --gpu NAME")
        else:
            warns.append(f"GPU not identified ({info.reason}): fit, headroom and MFU are left out; pass --gpu NAME")
    return info, gpu, warns


def _gpu_block(info, gpu) -> dict | None:
    if info is None or info.nvml_name is None:
        return None
    return {"name": info.nvml_name, "profile": gpu.name if gpu else None, "memory_bytes": info.memory_bytes}


def _emit_record(rec: dict, fmt: Format) -> None:
    from memplan import render
    from memplan.measure import reconcile

    if fmt is Format.json:
        typer.echo(render.to_json(rec))
        return
    row = reconcile.compare(rec, estimate="recorded")
    if fmt is Format.csv:
        typer.echo(render.to_csv([row]), nl=False)
        return
    typer.echo(summary_text(rec, row))


def summary_text(rec: dict, row: dict) -> str:
    from memplan.measure.reconcile import LEVELS, fmt_bytes, fmt_pct

    s = rec["setup"]
    lines = [f"{rec['model']} · {s['precision']} · {s['optimizer']} · peft {s['peft']} · micro-batch {s['batch']} × "
             f"seq {s['seq']} · checkpointing {s['checkpointing']} · attention {s['attention']} · {rec['device']}"
             + (f" ({rec['gpu']['name']})" if rec.get("gpu") else "")]
    if rec["status"] != "ok":
        what = "did NOT fit: out of memory" if rec["status"] == "oom" else "failed"
        lines.append(f"[measure] {what} in {rec['failed_phase'] or 'an unknown phase'}: {rec['error']}")
        est = (rec.get("estimate") or {}).get("peak") or {}
        if est:
            lines.append(f"  estimate: allocated {fmt_bytes(est.get('allocated_bytes'))}, device "
                         f"{fmt_bytes(est.get('device_bytes'))}")
        for e in rec.get("ranks") or []:
            lines.append(f"  rank {e['rank']}: {e['status']}" + (f" in {e['failed_phase']}" if e.get("failed_phase")
                                                                 else "") + (f": {e['error']}" if e.get("error")
                                                                             else ""))
        return "\n".join(lines)
    m = rec["measured"]
    st = m["step_time_s"]
    tps = "tokens/s unknown" if m["tokens_per_s"] is None else f"{m['tokens_per_s']:,.0f} tokens/s"
    lines.append(f"[measure] {m['steps']} timed steps after {m['warmup']} warm-up: step {st['median']:.4f} s "
                 f"(median), {tps}"
                 + (f", MFU {100 * m['mfu']:.1f}% of {m['peak_tflops']:g} TFLOPS" if m.get("mfu") is not None else ""))
    lines.append(f"  {'level':<12}{'estimate':>14}{'measured':>14}{'error':>9}")
    for lv in LEVELS:
        lines.append(f"  {lv:<12}{fmt_bytes(row[f'est_{lv}_bytes']):>14}{fmt_bytes(row[f'meas_{lv}_bytes']):>14}"
                     f"{fmt_pct(row[f'err_{lv}_pct']):>9}")
    if "est_roomy_reserved_bytes" in row:  # FSDP2: reserved on a roomy GPU (memplan.estimate.pools)
        lines.append(f"  reserved on a roomy GPU (side-stream pools): estimate "
                     f"{fmt_bytes(row['est_roomy_reserved_bytes'])}, measured {fmt_bytes(row['meas_reserved_bytes'])}, "
                     f"error {fmt_pct(row['err_roomy_reserved_pct'])}")
    lines.append(f"  peak phase: estimate {row['est_peak_phase']}, measured {row['meas_peak_phase']}")
    lines.append("  phase peaks (allocated, measured): " + ", ".join(
        f"{p} {fmt_bytes(v['peak_allocated_bytes'])}" for p, v in (m.get("phases") or {}).items()))
    if m["peak"].get("device_reason"):
        lines.append(f"  device level empty: {m['peak']['device_reason']}")
    lines.extend(rank_lines(rec, row))
    if m.get("context_bytes") is not None:
        lines.append(f"  CUDA context {fmt_bytes(m['context_bytes'])}, allocator retries {m['alloc_retries']}")
    for w in rec.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def rank_lines(rec: dict, row: dict | None = None) -> list[str]:
    """A multi-rank record's per-rank figures (memplan.measure.reconcile.rank_table: each rank's allocated peak
    overall and per phase, its tokens/s, the worst rank marked); the job's figures above are the max over ranks."""
    from memplan.measure.reconcile import rank_table

    if not rec.get("ranks"):
        return []
    m = rec.get("measured") or {}
    return [f"  {len(rec['ranks'])} rank(s) ({m.get('launcher') or '?'}, {m.get('backend') or '?'}): job "
            f"{m.get('tokens_per_s_total') or 0:,.0f} tokens/s, {m.get('tokens_per_s') or 0:,.0f} per GPU"] + \
        ["  " + line for line in rank_table([rec], None if row is None else [row])]


StepsOpt = Annotated[int, typer.Option("--steps", help="Timed training steps.")]
WarmupOpt = Annotated[int, typer.Option("--warmup", help="Untimed steps first (the first creates optimizer state).")]


@with_setup_options_optional_model
def measure_cmd(
    model, gpu, setup, changed,
    device: Annotated[Device, typer.Option("--device", help="cuda (the attached GPU, found through torch and "
                                           "NVML), cpu (real CPU tensors under memplan's tracker: CI), or auto: "
                                           "cuda when available, else an error.")] = Device.auto,
    steps: StepsOpt = 3,
    warmup: WarmupOpt = 1,
    snapshot: Annotated[Optional[str], typer.Option("--snapshot", help="CUDA: write the memory-history snapshot "
                                                    "(torch.cuda.memory._record_memory_history) to FILE; open it at "
                                                    "pytorch.org/memory_viz.")] = None,
    results: Annotated[Optional[str], typer.Option("--results", help="JSON Lines file the record(s) are appended to "
                                                   "(default reports/measurements/<gpu>/<name>.jsonl on a GPU, "
                                                   "reports/<name>-cpu.jsonl on the CPU).")] = None,
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="Measure every configuration of a TOML/JSON sweep "
                                                 "file (or a suite name from profiles/suites/), each in a fresh "
                                                 "subprocess.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="--sweep: skip configurations already in the results "
                                         "file (error records are measured again unless --no-retry-errors).")]
    = False,
    retry_errors: Annotated[bool, typer.Option("--retry-errors/--no-retry-errors", help="--sweep --resume: measure "
                                               "configurations whose only record is an error (a crash, a timeout, "
                                               "a worker killed with its sweep) again.")] = True,
    chunk: Annotated[Optional[int], typer.Option("--chunk", help="--sweep: run only chunk K of the plan (chunks of "
                                                 "at most --max-minutes; see --plan).")] = None,
    max_minutes: Annotated[Optional[float], typer.Option("--max-minutes", help="--sweep: chunk size in estimated "
                                                         "minutes (default: the suite's, else 8).")] = None,
    plan: Annotated[bool, typer.Option("--plan", help="--sweep: list the configurations, their estimates, "
                                            "estimated minutes and chunks; measure nothing.")] = False,
    timeout_s: Annotated[Optional[float], typer.Option("--timeout-s", help="--sweep: give up on a configuration "
                                                       "after this many seconds (recorded as an error); --gpus / "
                                                       "--zero: kill every rank of a job not done by then (default "
                                                       "1800).")] = None,
    memory_cap_gib: Annotated[Optional[float], typer.Option("--memory-cap-gib", help="CUDA: cap the caching "
                                                            "allocator at this many GiB (emulate a smaller GPU; "
                                                            "a suite's memory_cap_gib applies too).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Label stored in the record.")] = None,
    record_to: Annotated[Optional[str], typer.Option("--record-to", hidden=True,
                                                     help="Internal (sweep worker): append the record here, print "
                                                     "nothing, report phases on stderr.")] = None,
    fmt: FormatOpt = Format.table,
    progress: ProgressOpt = False,
    serve: Annotated[bool, typer.Option("--serve", help="Serving is measured by `memplan serve --measure` (the "
                                        "serving flags are memplan serve's); this flag says so.")] = False,
):
    """Run the configuration on the attached GPU (or --device cpu): peak memory per phase and level, tokens/s, MFU,
    and memplan's estimate beside them, appended as a JSON Lines record.

    Examples: memplan measure --model llama-3.2-1b --bf16 --batch 8 --seq 2048 ·
    memplan measure --model ./tiny/config.json --device cpu --batch 2 --seq 64 ·
    memplan measure --model ./tiny/config.json --device cpu --gpus 2 --zero 3 (a worker per rank, gloo) ·
    memplan measure --sweep validation --chunk 1 ·
    memplan measure --device cpu -- python3 train.py --lr 1e-4 (your own command, instrumented: its setup
    detected, docs/measure-wrap.md)
    """
    if serve:
        raise MemplanError("a serving setup is measured by `memplan serve --measure` (with --weights, --kv-dtype, "
                           "--cache, --concurrency, --prompt-len, --gen-len, --device); docs/serving.md")
    for flag, v in (("--max-minutes", max_minutes), ("--timeout-s", timeout_s), ("--memory-cap-gib", memory_cap_gib)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise MemplanError(f"{flag} must be a finite number > 0, got {v:g}")
    command = wrapped_command()
    if command is not None:  # `memplan measure [OPTIONS] -- COMMAND ...` (memplan.measure.wrap)
        given = [f for f, on in (("--model", model is not None), ("--sweep", sweep is not None),
                                 ("--snapshot", snapshot), ("--record-to", record_to), ("--resume", resume),
                                 ("--chunk", chunk is not None), ("--plan", plan), ("--max-minutes", max_minutes),
                                 ("--memory-cap-gib", memory_cap_gib), ("--steps", steps != 3),
                                 ("--no-retry-errors", not retry_errors))
                 if on] + [f"--{c.replace('_', '-')}" for c in changed]
        if given:
            raise MemplanError(f"with a command after --, the setup and the steps are the command's own: "
                               f"{', '.join(given)} do not apply")
        return _measure_wrapped(command, gpu, device.value, warmup, results, name, timeout_s, fmt,
                                Progress("measure", progress))
    if sweep is not None:
        if model is not None or changed:
            flags = ["--model"] * (model is not None) + [f"--{c.replace('_', '-')}" for c in changed]
            raise MemplanError(f"with --sweep, setup options belong in the sweep file (got {', '.join(flags)})")
        if snapshot or record_to or name:
            raise MemplanError("--snapshot, --name and --record-to apply to one configuration, not to --sweep")
        return _sweep(sweep, gpu, device, results, resume, chunk, max_minutes, plan, timeout_s, memory_cap_gib,
                      fmt, retry_errors)
    if model is None:
        raise MemplanError("give --model (one configuration) or --sweep FILE")
    multi = setup.gpus > 1 or setup.zero > 0  # one worker per rank (memplan.measure.distributed)
    if resume or chunk is not None or plan or max_minutes is not None or not retry_errors or \
            (timeout_s is not None and not multi):
        raise MemplanError("--resume, --no-retry-errors, --chunk, --max-minutes, --plan and --timeout-s need --sweep "
                           "(--timeout-s also applies to a --gpus / --zero job)")
    return _measure_one(model, gpu, setup, device, steps, warmup, step_lengths(setup), snapshot, results, memory_cap_gib,
                        name, record_to, fmt, Progress("measure", progress and record_to is None), timeout_s)


def wrapped_command() -> list[str] | None:
    """The user's command after `--` (memplan.cli.split_command put it in the context), or None."""
    try:  # the click typer runs on (typer ≥ 0.20 vendors it as typer._click), as memplan.cli.options reads it
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover
        from click import get_current_context

    ctx = get_current_context(silent=True)
    obj = ctx.obj if ctx is not None else None
    return obj.get("command") if isinstance(obj, dict) else None


def _measure_wrapped(command, gpu_opt, device, warmup, results, name, timeout_s, fmt, progress: Progress) -> int:
    """Run the user's command with memplan's hooks (memplan.measure.wrap); the record appended as measure's. Exit:
    the command's own code when it failed (one line says so), 130 on Ctrl-C, 1 on --timeout-s or no step seen."""
    from memplan.measure.devices import resolve_device
    from memplan.measure.record import append_record, capture_env, check_writable
    from memplan.measure.wrap import describe, measure_command

    if not command:
        raise MemplanError("give the training command after -- (memplan measure --device cpu -- python3 train.py)")
    if warmup < 0:
        raise MemplanError(f"--warmup must be ≥ 0, got {warmup}")
    dev = resolve_device(device)
    info, gpu, warns = _gpu_context(dev, gpu_opt)
    out = Path(results or default_results("measure", dev, gpu.name if gpu else None))
    check_writable(out)
    progress.phase(f"running {' '.join(command)} on {dev} with memplan's hooks")
    rec = measure_command(command, dev, warmup, gpu, _gpu_block(info, gpu), capture_env(info.driver if info else None),
                          name, timeout_s)
    if warns:
        rec["warnings"] = list(dict.fromkeys(warns + rec.get("warnings", [])))
    append_record(out, rec)
    progress.done()
    if fmt is Format.table:
        for line in describe(rec):
            typer.echo(line)
    _emit_record(rec, fmt)
    typer.echo(f"record {rec['record_id'][:12]} -> {out}", err=True)
    w = rec["wrapped"]
    if w["ended"] == "interrupted":
        typer.echo(f"memplan: interrupted: what was measured is in the record ({out})", err=True)
        return 130
    if w["exit_code"]:
        typer.echo(f"memplan: the command exited with code {w['exit_code']}; the steps it finished are in the "
                   f"record ({out})", err=True)
        return w["exit_code"]
    if rec["status"] != "ok":
        typer.echo(f"memplan: the measurement ended {rec['status']}: {rec['error']}", err=True)
        return 1
    return 0
def step_lengths(setup) -> str:
    """The record's run key `lengths` from the setup's --lengths (shared with estimate and trace since issue 13):
    "fixed" when every step has the same shape (fixed lengths, or packed rows), else "varied" (padded batches drawn
    per step from the distribution: memplan.measure.phases.lengths_for)."""
    from memplan.estimate.lengths import shaped

    return "varied" if shaped(setup) and not setup.packing else "fixed"


def _measure_one(spec, gpu_opt, setup, device, steps, warmup, lengths, snapshot, results, memory_cap_gib, name,
                 record_to, fmt, progress: Progress, timeout_s: float | None = None) -> int:
    from memplan.estimate import estimate_spec
    from memplan.estimate.pools import with_roomy
    from memplan.measure import distributed as dm, harness
    from memplan.measure.devices import peak_tflops, resolve_device
    from memplan.measure.record import append_record, capture_env, check_writable, make_record, now

    dev = resolve_device(device)
    cap = int(memory_cap_gib * 2**30) if memory_cap_gib else None
    opts = harness.MeasureOptions(device=dev, steps=steps, warmup=warmup, lengths=lengths, snapshot=snapshot,
                                  memory_cap_bytes=cap, name=name, phase_log=record_to is not None)
    multi = dm.engaged(setup)
    if multi:  # first: an engine that is not installed is named as such
        dm.check_job(setup, dev, params=spec.total_params)
    harness.check_measurable(spec, setup, opts)
    harness.check_environment(setup, opts)
    info, gpu, warns = _gpu_context(dev, gpu_opt)
    estimate = with_roomy(spec, estimate_spec(spec, setup, gpu))  # FSDP2: its roomy reserved level (pools)
    out = Path(record_to or results or default_results("measure", dev, gpu.name if gpu else None))
    check_writable(out)
    if snapshot:
        check_writable(snapshot)
    started = now()
    ranks = None
    if multi:
        launcher = dm.job_launcher(setup, dev)
        progress.phase(f"measuring {spec.name} on {setup.gpus} {dev} rank(s) ({launcher}, "
                       f"{dm.BACKENDS[dev]}): {warmup} warm-up and {steps} timed steps each")
        job = dm.run_job(dm.Job(spec, setup, opts, peak_tflops(gpu, setup, dev), timeout_s or dm.DEFAULT_TIMEOUT_S),
                         launcher)
        measured = None if job.measured is None else {**job.measured, "launcher": job.launcher,
                                                      "backend": dm.BACKENDS[dev]}
        outcome = harness.Outcome(job.status, job.failed_phase, job.error, measured, job.warnings)
        ranks = job.ranks
    else:
        progress.phase(f"measuring {spec.name} on {dev}: {warmup} warm-up and {steps} timed steps, then memory "
                       "steps")
        outcome = harness.measure(spec, setup, opts, peak_tflops=peak_tflops(gpu, setup, dev))
    progress.phase(f"{outcome.status}; writing the record")
    rec = make_record(name=name, model=spec.name, setup=setup.to_dict(), device=dev, steps=steps, warmup=warmup,
                      lengths=lengths, status=outcome.status, failed_phase=outcome.failed_phase, error=outcome.error,
                      estimate=estimate.to_dict(), measured=outcome.measured, gpu=_gpu_block(info, gpu),
                      env=capture_env(info.driver if info else None), started_at=started,
                      warnings=list(dict.fromkeys(warns + outcome.warnings + list(estimate.warnings))),
                      ranks=ranks)
    append_record(out, rec)
    if record_to is not None:
        return 0  # the sweep reads the record; the status is in it
    _emit_record(rec, fmt)
    if fmt is not Format.table:  # the table shows them; keep json / csv on stdout parseable
        for w in rec.get("warnings", []):
            typer.echo(f"warning: {w}", err=True)
    typer.echo(f"record {rec['record_id'][:12]} -> {out}", err=True)
    progress.done()
    if outcome.status == "ok":
        return 0
    typer.echo(f"memplan: the measurement ended {outcome.status}"
               + (f" in {outcome.failed_phase}" if outcome.failed_phase else "")
               + (f": {outcome.error}" if outcome.error else "") + "; the record says so", err=True)
    return 1


def _sweep(path, gpu_opt, device, results, resume, chunk, max_minutes, plan, timeout_s, memory_cap_gib,
           fmt, retry_errors=True) -> int:
    from memplan.io import exclusive_lock
    from memplan.measure import sweep as sw
    from memplan.measure.devices import plan_device, resolve_device
    from memplan.measure.record import check_writable

    suite = sw.load_sweep(path)
    dev = resolve_device(device) if not plan or device is not Device.auto else plan_device()
    info, gpu, warns = _gpu_context(dev, gpu_opt)
    if gpu is None and suite.gpu and dev != "cuda":
        from memplan.spec.values import resolve_gpu

        gpu = resolve_gpu(suite.gpu)  # the GPU the suite was sized for: estimates say fit / did not fit
    for w in warns:
        typer.echo(f"warning: {w}", err=True)
    limit = max_minutes if max_minutes is not None else suite.max_minutes
    if limit <= 0:
        raise MemplanError("--max-minutes must be positive")
    planned = sw.plan(suite, dev, gpu, limit)
    nchunks = max(p.chunk for p in planned)
    if chunk is not None and not 1 <= chunk <= nchunks:
        raise MemplanError(f"--chunk {chunk}: the plan has chunks 1..{nchunks} at ≤ {limit:g} min each")
    selected = [p for p in planned if chunk is None or p.chunk == chunk]
    if plan:
        _print_plan(planned, selected, fmt, limit)
        return 0
    out = Path(results or default_results(suite.name, dev, gpu.name if gpu and dev == "cuda" else None))
    check_writable(out)
    lock = sw.lock_path(out)
    with exclusive_lock(lock) as held:
        if not held:
            raise MemplanError(f"another sweep is writing {out} (it holds {lock}); wait for it to finish, or pass "
                               "--results another file")
        return _run_sweep(suite, planned, selected, out, dev, info, gpu, chunk, nchunks, resume, retry_errors,
                          timeout_s, memory_cap_gib, fmt)


def _run_sweep(suite, planned, selected, out, dev, info, gpu, chunk, nchunks, resume, retry_errors, timeout_s,
               memory_cap_gib, fmt) -> int:
    """Measure the selected configurations (the caller holds the results file's lock)."""
    from memplan import render
    from memplan.measure import reconcile, sweep as sw
    from memplan.measure.record import capture_env, done_ids, load_records, make_record, recorded_statuses

    statuses = recorded_statuses(out)
    if statuses and not resume:
        raise MemplanError(f"{out} already holds {len(statuses)} record(s): pass --resume to skip them, or "
                           "--results another file")
    done = done_ids(statuses, retry_errors)
    todo = [p for p in selected if p.record_id not in done]
    skipped = len(selected) - len(todo)
    from memplan.measure.distributed import rank_capacity

    ranks = rank_capacity(dev)
    todo, too_big = sw.split_by_capacity(todo, ranks)
    for p in too_big:
        typer.echo(f"{p.cfg.name}: skipped: needs {p.setup.gpus} GPUs, this node has {ranks} "
                   "(no record; --resume on a bigger node measures it)", err=True)
    retried = sum(p.record_id in statuses for p in todo)
    env = capture_env(info.driver if info else None)
    cap = memory_cap_gib or suite.memory_cap_gib

    def fallback(p, *, status, failed_phase, error, started_at):
        return make_record(name=p.cfg.name, model=p.spec.name, setup=p.setup.to_dict(), device=dev,
                           steps=p.cfg.steps, warmup=p.cfg.warmup, lengths=p.cfg.lengths, status=status,
                           failed_phase=failed_phase if failed_phase in ("load", "forward", "backward",
                                                                          "optimizer_step") else None,
                           error=error, estimate=p.estimate.to_dict(), gpu=_gpu_block(info, gpu), env=env,
                           started_at=started_at)

    typer.echo(f"{suite.name}: {len(todo)} to measure on {dev}, {skipped} already in {out}" +
               (f" (chunk {chunk}/{nchunks})" if chunk else "") +
               (f"; {retried} error record(s) measured again (--no-retry-errors keeps them)" if retried else ""),
               err=True)
    bar = sw.progress(len(todo), suite.name)
    recs = []
    try:
        with sw.interrupts_as_keyboard_interrupt():
            for p in todo:
                bar.set_postfix_str(p.cfg.name)
                rec = sw.run_one(p, dev, out, cap, timeout_s, fallback)
                recs.append(rec)
                bar.write(_progress_line(rec), file=sys.stderr)
                bar.update(1)
    except sw.SweepInterrupted as exc:
        bar.close()
        typer.echo(f"memplan: interrupted during {exc}: {len(recs)} finished record(s) kept in {out}; rerun with "
                   "--resume to continue", err=True)
        return 130
    except MemplanError as exc:  # a results file that cannot take a record (a full disk): stop, say what is kept
        bar.close()
        raise MemplanError(f"{exc}; {len(recs)} finished record(s) kept in {out}; rerun with --resume once it is "
                           "fixed") from None
    bar.close()
    ids = {p.record_id for p in selected}
    mine = [r for r in load_records(out, warn=lambda m: None) if r.get("record_id") in ids]
    rows = [reconcile.compare(r) for r in mine]
    if fmt is Format.json:
        typer.echo(render.to_json({"results": str(out), "rows": rows, "summary": reconcile.summarize(rows)}))
    elif fmt is Format.csv:
        typer.echo(render.to_csv(rows), nl=False)
    else:
        typer.echo(render.reconcile_table(rows, reconcile.summarize(rows)))
        for line in reconcile.rank_table(mine):  # multi-rank configurations: each rank's figures
            typer.echo(line)
        typer.echo(f"records: {out}", err=True)
    return 0


def _progress_line(rec: dict) -> str:
    from memplan.measure.reconcile import fmt_bytes

    if rec["status"] == "ok":
        m = rec["measured"]
        return (f"{rec['name']}: ok, allocated {fmt_bytes(m['peak']['allocated_bytes'])}, "
                f"{m['tokens_per_s']:,.0f} tokens/s")
    return f"{rec['name']}: {rec['status']} in {rec['failed_phase'] or '?'}: {rec['error']}"


def _print_plan(planned, selected, fmt: Format, limit: float) -> None:
    from memplan import render

    rows = []
    for p in selected:
        e = p.estimate
        rows.append({"chunk": p.chunk, "name": p.cfg.name, "model": p.spec.name, "params": e.total_params,
                     "precision": p.setup.precision.value, "peft": p.setup.peft.value,
                     "checkpointing": p.setup.checkpointing.value, "attention": p.setup.attention.value,
                     "batch": p.setup.batch, "seq": p.setup.seq, "est_allocated_bytes": e.peak.allocated_bytes,
                     "est_device_bytes": e.peak.device_bytes, "fits": e.fits, "expect": p.cfg.expect,
                     "est_minutes": round(p.minutes, 2), "record_id": p.record_id})
    if fmt is Format.json:
        typer.echo(render.to_json(rows))
        return
    if fmt is Format.csv:
        typer.echo(render.to_csv(rows), nl=False)
        return
    for line in render.plan_table(rows):
        typer.echo(line)
    chunks = sorted({p.chunk for p in planned})
    per = {c: sum(p.minutes for p in planned if p.chunk == c) for c in chunks}
    typer.echo(f"{len(planned)} configurations in {len(chunks)} chunks of ≤ {limit:g} min: " +
               ", ".join(f"{c}: {m:.1f}" for c, m in per.items()))
