"""`memplan fit`: search the setup space for what fits a GPU, ranked by predicted tokens/s (memplan.fit)."""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from memplan.cli.gate import EXIT_DOES_NOT_FIT
from memplan.cli.options import Format, FormatOpt, with_config
from memplan.configfile.overlay import FIT_PARAMS
from memplan.errors import MemplanError

# a valid query with an empty answer: the exit code of estimate --require-fit's "does not fit" (memplan.cli.gate);
# 1 is a failed run, 2 bad input
NOTHING_FITS_EXIT = EXIT_DOES_NOT_FIT
SPEED_KEYS = ("tokens_per_s", "tokens_per_s_total", "step_s", "mfu")  # FitRow.to_dict's predicted-speed fields


class SortBy(str, Enum):
    """--sort: what ranks first (memplan.fit.SortKey)."""

    tokens = "tokens"
    batch = "batch"
    seq = "seq"
    memory = "memory"


class GroupBy(str, Enum):
    """--group: the table's rows by PEFT method, or one ranking."""

    method = "method"
    none = "none"


def nothing_fits_hints(space, seq: int, gpus: int) -> list[str]:
    """What to try when nothing fits, leaving out what the search already covered."""
    from memplan.spec.setup import Checkpointing, PeftMethod

    hints = []
    if seq > 128:
        hints.append("a shorter --seq")
    hints.append("more --gpus")
    if PeftMethod.QLORA not in space.pefts:
        hints.append("--peft qlora")
    if Checkpointing.FULL not in space.checkpointing:
        hints.append("--checkpointing full")
    hints.append("a larger GPU")
    return hints


def fit_notes(gpu, space, lora_rank: int, lora_targets, train_layers: int) -> list[str]:
    """Warnings about the query: bf16 precisions asked for on a GPU without bf16 tensor cores (the default space
    has none there; asked for by name they are searched, and said), and flags no searched method reads."""
    from memplan.estimate.ignored import LORA_FAMILY
    from memplan.spec.setup import LoraConfig, PeftMethod, TrainingSetup

    notes = []
    emulated = [p.value for p in space.precisions if "bf16" in p.value] if not gpu.bf16 else []
    if emulated:
        notes.append(f"--precision {','.join(emulated)} on the {gpu.label} (compute capability "
                     f"{gpu.capability_label}): no bf16 tensor cores, torch emulates bf16 slowly; fp16 and "
                     f"fp16-master are what run there")
    lora = any(p in LORA_FAMILY for p in space.pefts)
    for flag, given, used, where in (
            ("--lora-rank", lora_rank != LoraConfig.rank, lora, "lora, dora or qlora"),
            ("--lora-targets", lora_targets is not None, lora or PeftMethod.IA3 in space.pefts,
             "lora, dora, qlora or ia3"),
            ("--train-layers", train_layers != TrainingSetup.train_layers, PeftMethod.FREEZE in space.pefts,
             "freeze")):
        if given and not used:
            notes.append(f"{flag} is ignored: no --peft {where} is searched")
    return notes


def _offloads(text):
    from memplan.fit import Offload
    from memplan.spec.values import split_list

    items = split_list(text)
    bad = [t for t in items if t not in {o.value for o in Offload}]
    if bad or not items:
        raise MemplanError(f"--offload {text}: a comma-separated list of {', '.join(o.value for o in Offload)}")
    return tuple(dict.fromkeys(Offload(t) for t in items))


def _losses(text):
    """--loss standard,chunked:4,liger-fused: each spelled as estimate's --loss (make_setup checks it)."""
    from memplan.fit import LossChoice
    from memplan.spec.values import make_setup, split_list

    items = split_list(text)
    if not items:
        raise MemplanError(f"--loss {text}: a comma-separated list of standard, chunked[:N], liger-fused")
    made = [make_setup(loss=t) for t in items]
    return tuple(dict.fromkeys(LossChoice(m.loss, m.loss_chunks) for m in made))


def _everys(text):
    try:
        ks = tuple(dict.fromkeys(int(k) for k in text.split(",") if k.strip()))
    except ValueError:
        raise MemplanError(f"--ckpt-every {text}: a comma-separated list of block counts K ≥ 1") from None
    if not ks or min(ks) < 1:
        raise MemplanError(f"--ckpt-every {text}: a comma-separated list of block counts K ≥ 1")
    return ks


def _impls(optimizers, text):
    """--optimizer-impl foreach,fused,for-loop folded into the searched optimizers (memplan.fit.with_impls)."""
    from memplan.fit import with_impls
    from memplan.spec.setup import OptimizerImpl
    from memplan.spec.values import split_list

    items = [t.lower() for t in split_list(text)]
    known = {i.value for i in OptimizerImpl}
    if not items or any(t not in known for t in items):
        raise MemplanError(f"--optimizer-impl {text}: a comma-separated list of {', '.join(sorted(known))}")
    return with_impls(optimizers, tuple(dict.fromkeys(OptimizerImpl(t) for t in items)))


def _space(precision, optimizer, peft, checkpointing, zero, max_zero, gpu, gpus=1, engine=None, offload=None,
           in_backward=False, fp8=None, packings=(False,), offload_activations=False, loss=None, ckpt_every=None,
           optimizer_impl=None):
    """The searched space, and the notes about it (optimizers an --optimizer-impl leaves out)."""
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
    optimizers, notes = parse_choices("optimizer", optimizer) if optimizer else F.DEFAULT_OPTIMIZERS, ()
    if optimizer_impl:
        optimizers, notes = _impls(optimizers, optimizer_impl)
    return F.Space(
        precisions=parse_choices("precision", precision) if precision else F.default_precisions(gpu, gpus),
        optimizers=optimizers,
        pefts=parse_choices("peft", peft) if peft else F.DEFAULT_PEFTS,
        checkpointing=parse_choices("checkpointing", checkpointing) if checkpointing else F.DEFAULT_CHECKPOINTING,
        zeros=zeros,
        engines=parse_choices("engine", engine) if engine else F.Space.engines,
        offloads=_offloads(offload) if offload else F.Space.offloads,
        in_backward=(False, True) if in_backward else F.Space.in_backward,
        fp8s=tuple(dict.fromkeys((F.Fp8Recipe.NONE, *parse_choices("fp8", fp8)))) if fp8 else F.Space.fp8s,
        packings=packings,
        offload_activations=(False, True) if offload_activations else F.Space.offload_activations,
        losses=_losses(loss) if loss and "," in loss else F.Space.losses,  # one loss: the base's (below)
        ckpt_everys=_everys(ckpt_every) if ckpt_every else F.Space.ckpt_everys), notes


@with_config(FIT_PARAMS)
def fit(model: Annotated[str, typer.Option("--model", "-m", help="Model profile key or alias, or a config.json.")],
        gpu: Annotated[str, typer.Option(
            "--gpu", help="GPU profile to fit (memplan profiles list gpus), a memory size (48GiB, 80GB, 24G: memory "
            "only, ranked by micro-batch) or a FILE.toml in the profiles' schema.")],
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
            "--checkpointing", help="Comma-separated: none,full,selective,op-selective [default: all].")] = None,
        zero: Annotated[Optional[str], typer.Option(
            "--zero", help="Comma-separated ZeRO stages [default: 0,1,2,3; only 0 on one GPU].")] = None,
        max_zero: Annotated[Optional[int], typer.Option("--max-zero", help="Highest ZeRO stage allowed.")] = None,
        engine: Annotated[Optional[str], typer.Option(
            "--engine", help="Comma-separated engines: fsdp (DDP / ZeroRedundancyOptimizer / FSDP2), deepspeed "
            "[default: both; with --gpus > 1].")] = None,
        offload: Annotated[Optional[str], typer.Option(
            "--offload", help="Comma-separated: none, optimizer (DeepSpeed ZeRO-Offload), all (FSDP2 "
            "CPUOffloadPolicy; DeepSpeed optimizer + parameters) [default: all three; with --gpus > 1].")] = None,
        gpus_per_node: Annotated[int, typer.Option(
            "--gpus-per-node", help="GPUs per node: traffic between nodes uses the inter-node link; host RAM is "
            "reported per node.")] = 8,
        lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA/DoRA/QLoRA rank.")] = 8,
        lora_targets: Annotated[Optional[str], typer.Option(
            "--lora-targets", help="Comma-separated LoRA target modules [default: peft's].")] = None,
        train_layers: Annotated[int, typer.Option("--train-layers", help="--peft freeze: last blocks that "
                                                                         "train.")] = 0,
        attention: Annotated[str, typer.Option("--attention", help="eager | sdpa | flash.")] = "sdpa",
        loss: Annotated[Optional[str], typer.Option(
            "--loss", help="Comma-separated losses searched: standard, chunked[:N] (torchtune), liger-fused "
            "(docs/memory-techniques.md) [default: standard].")] = None,
        ckpt_every: Annotated[Optional[str], typer.Option(
            "--ckpt-every", help="Comma-separated K: full / op-selective choices wrap every K-th block, each K "
            "searched [default: 1].")] = None,
        reentrant: Annotated[bool, typer.Option(
            "--reentrant/--no-reentrant", help="torch.utils.checkpoint use_reentrant for full checkpointing (same "
            "estimate as non-reentrant, so not searched; op-selective needs non-reentrant).")] = False,
        logits_to_keep: Annotated[int, typer.Option(
            "--logits-to-keep", help="Logits and loss of the last K positions only (transformers logits_to_keep, "
            "TRL GRPO); every choice; 0 = all.")] = 0,
        optimizer_impl: Annotated[Optional[str], typer.Option(
            "--optimizer-impl", help="Comma-separated foreach, fused, for-loop: each searched optimizer run by "
            "each it has (bitsandbytes' as they are) [default: as --optimizer names them].")] = None,
        grad_accum: Annotated[int, typer.Option("--grad-accum", help="Gradient-accumulation steps.")] = 1,
        lengths: Annotated[str, typer.Option("--lengths", help="Sequence lengths: fixed | varied | uniform:A-B | "
                                             "FILE (memplan estimate --help): padded batches at their worst "
                                             "batch's memory; packing searched too.")] = "fixed",
        packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing", help="Only packed rows / only "
                                                        "padded batches [default: both with --lengths].")] = None,
        pad_multiple: Annotated[int, typer.Option("--pad-to-multiple-of", help="Padded batches: round up to a "
                                                  "multiple of N.")] = 1,
        teacher: Annotated[Optional[str], typer.Option(
            "--teacher", help="Knowledge distillation: a frozen teacher beside every choice (docs/"
            "distillation.md).")] = None,
        teacher_weights: Annotated[str, typer.Option("--teacher-weights", help="--teacher: auto | fp32 | bf16 | "
                                                     "fp16 | nf4 | int8.")] = "auto",
        distill_alpha: Annotated[float, typer.Option("--distill-alpha", help="--teacher: KL weight.")] = 0.5,
        temperature: Annotated[float, typer.Option("--temperature", help="--teacher: softmax temperature.")] = 1.0,
        in_backward: Annotated[bool, typer.Option(
            "--optimizer-in-backward", help="Also search torchtune's optimizer-in-backward (each gradient stepped "
            "and freed inside backward; one GPU, --grad-accum 1).")] = False,
        fp8: Annotated[Optional[str], typer.Option(
            "--fp8", help="Also search these torchao float8 recipes (comma-separated: tensorwise, rowwise, "
            "rowwise-with-gw-hp) beside none; bf16 full-training choices only; refused on GPUs without fp8 "
            "(compute capability < 8.9).")] = None,
        offload_activations: Annotated[bool, typer.Option(
            "--offload-activations", help="Also search torchtune's activation offloading (saved activations in "
            "pinned host RAM; one GPU or FSDP2 ZeRO-2 / 3).")] = False,
        top: Annotated[Optional[int], typer.Option(
            "--top", help="Show the first N rows (per PEFT method in a grouped table) [default: 5 per method in a "
            "table, all in json/csv; 0 = all].")] = None,
        sort: Annotated[SortBy, typer.Option("--sort", help="Rank by predicted tokens/s, largest micro-batch, "
                                             "longest sequence or least memory first.")] = SortBy.tokens,
        group: Annotated[GroupBy, typer.Option("--group", help="Table: group rows by PEFT method, or one "
                                               "ranking.")] = GroupBy.method,
        fmt: FormatOpt = Format.table):
    """Search the setup space for what fits a GPU: the largest micro-batch and sequence length per choice
    (precision × optimizer × PEFT × checkpointing × ZeRO, and with --gpus > 1 engine × offload), ranked by
    predicted tokens/s per GPU; offloading rows report the host RAM each node needs.

    Fits = peak device memory ≤ (1 − margin) × GPU memory by `memplan estimate`. Exit codes: 0 with results,
    3 when nothing fits, 2 on bad input. On a GPU without bf16 (T4, V100) or FlashAttention-2 (before Ampere)
    nothing bf16 or flash is searched unless asked for, and asking says it is emulated or refuses.

    Example: memplan fit --model llama-3.1-8b --gpu a100-40gb --peft lora,qlora --seq 4096
    """
    from memplan import fit as F, render
    from memplan.spec.values import make_setup, resolve_gpu, resolve_model

    spec = resolve_model(model)
    g = resolve_gpu(gpu)
    from memplan.spec.lengths import canonical

    lengths = canonical(lengths)
    packings = (packing,) if packing is not None else (False, True) if lengths != "fixed" else (False,)
    space, impl_notes = _space(precision, optimizer, peft, checkpointing, zero, max_zero, g, gpus, engine, offload,
                               in_backward, fp8, packings, offload_activations, loss, ckpt_every, optimizer_impl)
    if not space.zeros:
        raise MemplanError("--zero / --max-zero leave no ZeRO stage to search")
    base = make_setup(gpus=gpus, gpus_per_node=gpus_per_node, lora_rank=lora_rank, lora_targets=lora_targets,
                      train_layers=train_layers, attention=attention, grad_accum=grad_accum, zero=0,
                      loss=loss if loss and "," not in loss else None,
                      lengths=lengths, pad_multiple=pad_multiple,
                      teacher=teacher, teacher_weights=teacher_weights, distill_alpha=distill_alpha,
                      temperature=temperature, logits_to_keep=logits_to_keep,
                      # --reentrant rides on the base; fit.py keeps it for the block-wrapping choices only
                      **({"checkpointing": "full", "ckpt_reentrant": True} if reentrant else {}))
    from memplan.estimate import gpu_checks

    gpu_checks(base, g)  # --attention flash on a GPU without FlashAttention-2: one line, not "nothing fits"
    notes = fit_notes(g, space, lora_rank, lora_targets, train_layers) + list(impl_notes)  # said after the search
    from memplan.estimate.overhead import default_overhead

    notes += [n for n in default_overhead()[1:] if n]  # the calibrated overhead the search used, when there is one
    if not g.has_flops and sort is SortBy.tokens:
        notes.append(f"{g.label} has no FLOPS figure: no speed is predicted, rows ranked by micro-batch "
                     f"(--sort batch)")
        sort = SortBy.batch
    if seq is None:
        seq = min(2048, F.seq_cap(spec, F.Query(base=base, seq=1, max_seq=max_seq)))
    if top is not None and top < 0:
        raise MemplanError("--top must be ≥ 0")
    report = F.fit(spec, g, F.Query(base=base, seq=seq, min_batch=min_batch, max_batch=max_batch, max_seq=max_seq,
                                    margin=margin), space, F.SortKey(sort.value))
    for note in notes:
        typer.echo(f"warning: {note}", err=True)
    if not report.rows:
        hints = nothing_fits_hints(space, seq, gpus)
        typer.echo(f"memplan: nothing fits: none of the {report.searched} choices fits {spec.name} on {g.label} "
                   f"× {gpus} at micro-batch {min_batch} × seq {seq} with a {margin:.0%} margin; try "
                   f"{', '.join(hints[:-1])} or {hints[-1]}", err=True)
        raise typer.Exit(NOTHING_FITS_EXIT)
    if fmt is Format.table:
        typer.echo(render.fit_table(report, 5 if top is None else top, grouped=group is GroupBy.method))
        return
    rows = [{"rank": i, **r.to_dict()} for i, r in enumerate(report.rows[:top] if top else report.rows, 1)]
    if not g.has_flops:  # nothing predicted: null, not 0 tokens/s and an infinite step
        rows = [{**r, **dict.fromkeys(SPEED_KEYS)} for r in rows]
    if fmt is Format.csv:
        rows = [{**r, "optimizers": ",".join(r["optimizers"])} for r in rows]
        typer.echo(render.to_csv(rows), nl=False)
    else:
        q = report.query
        typer.echo(render.to_json({"model": report.model, "gpu": g.name, "gpus": gpus,
                                   "gpus_per_node": gpus_per_node, "seq": q.seq,
                                   "min_batch": q.min_batch, "margin": q.margin, "limit_bytes": report.limit_bytes,
                                   "searched": report.searched, "invalid": report.invalid,
                                   "fitting": report.fitting, "estimates": report.estimates, "sort": sort.value,
                                   "note": F.BATCH_NOTE, "rows": rows}))
