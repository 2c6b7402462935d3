"""`memplan fit`: search the setup space for what fits a GPU, ranked by predicted tokens/s (memplan.fit)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from memplan.cli.options import Format, FormatOpt
from memplan.errors import MemplanError

NOTHING_FITS_EXIT = 1  # a valid query with an empty answer (like grep's no match); bad input stays 2


def _space(precision, optimizer, peft, checkpointing, zero, max_zero, gpu):
    from memplan import fit as F
    from memplan.spec.values import parse_choices

    zeros = (0, 1, 2, 3)
    if zero is not None:
        try:
            zeros = tuple(dict.fromkeys(int(z) for z in zero.split(",") if z.strip()))
        except ValueError:
            raise MemplanError(f"--zero {zero}: a comma-separated list of stages 0-3") from None
    if max_zero is not None:
        zeros = tuple(z for z in zeros if z <= max_zero)
    return F.Space(
        precisions=parse_choices("precision", precision) if precision else F.default_precisions(gpu),
        optimizers=parse_choices("optimizer", optimizer) if optimizer else F.DEFAULT_OPTIMIZERS,
        pefts=parse_choices("peft", peft) if peft else F.DEFAULT_PEFTS,
        checkpointing=parse_choices("checkpointing", checkpointing) if checkpointing else F.DEFAULT_CHECKPOINTING,
        zeros=zeros)


def _fit_table(report, top: int) -> str:
    from memplan.units import GiB

    q, g = report.query, report.gpu
    rows = report.rows[:top] if top else report.rows
    lines = [f"{report.model} on {g.label} × {q.base.gpus}, seq {q.seq}, margin {q.margin:.0%} "
             f"(limit {report.limit_bytes / GiB:.1f} of {g.memory_bytes / GiB:.1f} GiB): {len(report.rows)} of "
             f"{report.searched} choices fit ({report.invalid} impossible combinations skipped)",
             f"{'#':>3}  {'precision':<12}{'optimizer':<12}{'peft':<9}{'ckpt':<10}{'zero':>4}  {'max batch':>9}"
             f"  {'max seq':>8}  {'peak GiB':>8}  {'tokens/s/GPU':>12}  {'step s':>7}  {'MFU':>4}"]
    for i, r in enumerate(rows, 1):
        s, t = r.setup, r.throughput
        lines.append(f"{i:>3}  {s.precision.value:<12}{s.optimizer.value:<12}{s.peft.value:<9}"
                     f"{s.checkpointing.value:<10}{s.zero:>4}  {r.max_batch:>8}{'+' if r.batch_at_cap else ' '}"
                     f"  {r.max_seq:>7}{'+' if r.seq_at_cap else ' '}  {r.peak_device_bytes / GiB:>8.2f}"
                     f"  {t['tokens_per_s']:>12,.0f}  {t['step_s']:>7.3f}  {100 * t['mfu']:>3.0f}%")
    if top and len(report.rows) > top:
        lines.append(f"... {len(report.rows) - top} more (--top 0 shows all)")
    lines.append(f"max batch at seq {q.seq}; max seq at batch {q.min_batch}; '+' = at the search cap. "
                 f"Throughput: {rows[0].throughput['mfu_source'] if rows else ''}")
    return "\n".join(lines)


def fit(model: Annotated[str, typer.Option("--model", "-m", help="Model profile key or alias, or a config.json.")],
        gpu: Annotated[str, typer.Option("--gpu", help="GPU profile to fit (memplan profiles list gpus).")],
        gpus: Annotated[int, typer.Option("--gpus", help="Number of GPUs (data parallel).")] = 1,
        seq: Annotated[Optional[int], typer.Option(
            "--seq", "-s", help="Sequence length for the micro-batch search [default: 2048, or the model's "
            "positions when fewer].")] = None,
        min_batch: Annotated[int, typer.Option("--min-batch", help="Smallest micro-batch a setup must "
                                                                   "fit.")] = 1,
        max_batch: Annotated[int, typer.Option("--max-batch", help="Micro-batch search cap.")] = 1024,
        max_seq: Annotated[int, typer.Option("--max-seq", help="Sequence search cap (also capped at the "
                                                               "model's positions).")] = 131072,
        margin: Annotated[float, typer.Option("--margin", help="Fraction of GPU memory kept free.")] = 0.05,
        precision: Annotated[Optional[str], typer.Option(
            "--precision", help="Comma-separated precisions [default: fp32,bf16,bf16-master,pure-bf16; on GPUs "
            "without bf16 (T4, V100): fp32,fp16,fp16-master].")] = None,
        optimizer: Annotated[Optional[str], typer.Option(
            "--optimizer", help="Comma-separated optimizers [default: adamw,adamw-fused,adamw-8bit,adafactor,"
            "sgd].")] = None,
        peft: Annotated[Optional[str], typer.Option(
            "--peft", help="Comma-separated PEFT methods [default: all but freeze].")] = None,
        checkpointing: Annotated[Optional[str], typer.Option(
            "--checkpointing", help="Comma-separated: none,full,selective [default: all].")] = None,
        zero: Annotated[Optional[str], typer.Option(
            "--zero", help="Comma-separated ZeRO stages [default: 0,1,2,3; only 0 on one GPU].")] = None,
        max_zero: Annotated[Optional[int], typer.Option("--max-zero", help="Highest ZeRO stage allowed.")] = None,
        lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA/DoRA/QLoRA rank.")] = 8,
        lora_targets: Annotated[Optional[str], typer.Option(
            "--lora-targets", help="Comma-separated LoRA target modules [default: peft's].")] = None,
        train_layers: Annotated[int, typer.Option("--train-layers", help="--peft freeze: last blocks that "
                                                                         "train.")] = 0,
        attention: Annotated[str, typer.Option("--attention", help="eager | sdpa | flash.")] = "sdpa",
        grad_accum: Annotated[int, typer.Option("--grad-accum", help="Gradient-accumulation steps.")] = 1,
        top: Annotated[Optional[int], typer.Option(
            "--top", help="Show the N fastest [default: 20 in a table, all in json/csv; 0 = all].")] = None,
        fmt: FormatOpt = Format.table):
    """Search the setup space for what fits a GPU: the largest micro-batch and sequence length per choice
    (precision × optimizer × PEFT × checkpointing × ZeRO), ranked by predicted tokens/s per GPU.

    Fits = peak device memory ≤ (1 − margin) × GPU memory by `memplan estimate`. Exit codes: 0 with results,
    1 when nothing fits, 2 on bad input.

    Example: memplan fit --model llama-3.1-8b --gpu a100-40gb --peft lora,qlora --seq 4096
    """
    from memplan import fit as F, render
    from memplan.spec.values import make_setup, resolve_gpu, resolve_model

    spec = resolve_model(model)
    g = resolve_gpu(gpu)
    space = _space(precision, optimizer, peft, checkpointing, zero, max_zero, g)
    if not space.zeros:
        raise MemplanError("--zero / --max-zero leave no ZeRO stage to search")
    base = make_setup(gpus=gpus, lora_rank=lora_rank, lora_targets=lora_targets, train_layers=train_layers,
                      attention=attention, grad_accum=grad_accum, zero=0)
    from memplan.estimate import gpu_checks

    gpu_checks(base, g)  # --attention flash on a GPU without FlashAttention-2: one line, not "nothing fits"
    if seq is None:
        seq = min(2048, F.seq_cap(spec, F.Query(base=base, seq=1, max_seq=max_seq)))
    if top is not None and top < 0:
        raise MemplanError("--top must be ≥ 0")
    report = F.fit(spec, g, F.Query(base=base, seq=seq, min_batch=min_batch, max_batch=max_batch, max_seq=max_seq,
                                    margin=margin), space)
    if not report.rows:
        typer.echo(f"memplan: nothing fits: none of the {report.searched} choices fits {spec.name} on {g.label} "
                   f"× {gpus} at micro-batch {min_batch} × seq {seq} with a {margin:.0%} margin; try a shorter "
                   f"--seq, more --gpus, --peft qlora, or a larger GPU", err=True)
        raise typer.Exit(NOTHING_FITS_EXIT)
    if fmt is Format.table:
        typer.echo(_fit_table(report, 20 if top is None else top))
        return
    rows = [{"rank": i, **r.to_dict()} for i, r in enumerate(report.rows[:top] if top else report.rows, 1)]
    if fmt is Format.csv:
        typer.echo(render.to_csv(rows), nl=False)
    else:
        q = report.query
        typer.echo(render.to_json({"model": report.model, "gpu": g.name, "gpus": gpus, "seq": q.seq,
                                   "min_batch": q.min_batch, "margin": q.margin, "limit_bytes": report.limit_bytes,
                                   "searched": report.searched, "invalid": report.invalid,
                                   "fitting": len(report.rows), "estimates": report.estimates, "rows": rows}))
