"""`memplan serve`: the inference estimate of one deployment (memplan.serve): memory per GPU, vLLM's paged
cache, roofline speed; --solve (or no --concurrency) searches for the largest concurrency or context that fits."""
from __future__ import annotations

from dataclasses import replace
from enum import Enum
from typing import Annotated, Optional

import typer

from memplan.cli.options import Format, FormatOpt
from memplan.errors import MemplanError
from memplan.serve.setup import DEFAULT_GROUP_SIZE, VLLM_BLOCK_SIZE, VLLM_GPU_MEMORY_UTILIZATION, HfCache, KvDtype, \
    ServeEngine, Solve, WeightFormat
from memplan.serve.weights import PACKINGS
from memplan.units import GiB


class MeasureDevice(str, Enum):
    """Where --measure runs (memplan.measure.devices.resolve_device)."""

    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


def serve_table(r) -> str:
    """The human-readable page of a ServeResult."""
    s = r.setup
    gpus = f"tp {s.tp}" if s.tp > 1 else "1 GPU"
    lines = [f"{r.model} · weights {s.weights.value}" + (f" (group {s.group_size})" if s.weights.grouped else "")
             + f" · KV {s.kv_dtype_name} · {gpus} · engine {s.engine.value}"
             + (f" ({s.hf_cache.value} cache)" if s.engine is ServeEngine.HF else "")
             + f" · {s.concurrency} × (prompt {s.prompt_len} + gen {s.gen_len}), context {s.max_seq}",
             f"[{r.tier}] per GPU ({r.phase}):", f"  {'category':<18}{'GiB':>8}"]
    for k, v in r.categories.items():
        lines.append(f"  {k:<18}{v / GiB:8.2f}")
    lines += [f"  {'peak allocated':<18}{r.allocated_bytes / GiB:8.2f}",
              f"  {'peak device':<18}{r.device_bytes / GiB:8.2f}",
              f"weights: {r.weights.packed / GiB:.2f} GiB stored + {r.weights.scales / GiB:.3f} GiB scales/zeros + "
              f"{r.weights.unquantized / GiB:.2f} GiB unquantized (embeddings, norms, head)",
              f"packing ({s.weights.value}): {PACKINGS[s.weights].line()}",
              f"KV cache: {r.kv_bytes_per_token:,} B per token per GPU"]
    p = r.paged
    if p is not None:
        lines += [f"vLLM: {p.available_bytes / GiB:.2f} GiB for the cache = {s.gpu_memory_utilization:g} × "
                  f"{r.gpu.memory_bytes / GiB:.1f} GiB − weights, profiled activation peak and non-torch memory",
                  f"  {p.num_blocks:,} blocks of {p.block_size} tokens ({p.page_size_bytes:,} B per block per layer); "
                  f"{p.blocks_per_request:,} blocks per {s.max_seq}-token request",
                  f"  max concurrency {p.max_concurrency:.2f} at {s.max_seq} tokens (vLLM's figure); "
                  f"{p.concurrency_at_seq:,} sequences of {p.tokens_per_seq} tokens (max_num_seqs {p.max_num_seqs})",
                  f"  waste per sequence: paged {p.paged_waste_tokens} token slots (< one block) vs a contiguous "
                  f"cache sized to {s.max_seq}: {p.static_waste_tokens} slots "
                  f"({p.static_waste_tokens * r.kv_bytes_per_token / GiB:.3f} GiB)"]
    if r.gpu is not None:
        verdict = "fits" if r.fits else "does NOT fit"
        lines.append(f"{r.gpu.label} ({r.gpu.memory_bytes / GiB:.1f} GiB): {verdict}, headroom "
                     f"{r.headroom_bytes / GiB:+.2f} GiB at the device level")
    t = r.throughput
    if t is not None:
        lines.append(f"speed (roofline upper bound, {t.compute_dtype} {t.peak_tflops:g} TFLOPS, "
                     f"{t.bandwidth_gbs:g} GB/s): time to first token {t.ttft_s:.3f} s ({t.prefill_bound} bound); "
                     f"decode {t.tokens_per_s_per_seq:,.1f} tokens/s per sequence, {t.tokens_per_s_total:,.0f} in all "
                     f"({t.decode_bound} bound)")
    lines += [f"note: {n}" for n in r.notes] + [f"warning: {w}" for w in r.warnings]
    return "\n".join(lines)


def serve_row(r) -> dict:
    """One flat CSV row."""
    d = r.to_dict()
    row = {"model": d["model"], "tier": d["tier"], **d["setup"], "kv_bytes_per_token": d["kv_bytes_per_token"]}
    row.update({f"{k}_bytes": v for k, v in d["categories"].items()})
    row.update({f"peak_{k}": v for k, v in d["peak"].items()})
    row.update({f"weights_{k}": v for k, v in d["weights"].items()})
    if "gpu" in d:
        row.update(gpu=d["gpu"]["name"], gpu_memory_bytes=d["gpu"]["memory_bytes"], fits=d["fits"],
                   headroom_bytes=d["headroom_bytes"])
    row.update({f"vllm_{k}": v for k, v in d.get("vllm", {}).items()})
    row.update(d.get("throughput", {}))
    return row


def serve(
    model: Annotated[list[str], typer.Option("--model", "-m", help="Model profile key or alias, or a config.json "
                                              "path. Repeat it for an ensemble of different models (their logits "
                                              "averaged; docs/distillation.md).")],
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="GPU profile: fit, vLLM's blocks and speed.")] = None,
    tp: Annotated[Optional[int], typer.Option("--tp", help="Tensor-parallel GPUs: weights and KV heads split "
                                              "across them. [default: 1]")] = None,
    gpus: Annotated[Optional[int], typer.Option("--gpus", help="Same as --tp.")] = None,
    weights: Annotated[WeightFormat, typer.Option("--weights", help=(
        "How the weights are stored: int8 / nf4 bitsandbytes, fp8 vLLM, gptq-int4 / awq-int4 GPTQ / AutoAWQ "
        "checkpoints, torchao-* torchao 0.18 configs (the output names the packing modelled)."))] = WeightFormat.BF16,
    group_size: Annotated[int, typer.Option("--group-size", help="gptq-int4 / awq-int4 / torchao-int4 / "
                                                 "torchao-intx4 quantization group.")]
    = DEFAULT_GROUP_SIZE,
    double_quant: Annotated[bool, typer.Option("--double-quant", help="nf4: double-quantize the absmax.")] = False,
    kv_dtype: Annotated[KvDtype, typer.Option("--kv-dtype", help="KV cache dtype (auto: the compute dtype).")]
    = KvDtype.AUTO,
    max_seq: Annotated[Optional[int], typer.Option("--max-seq", help="Context per sequence (vLLM max_model_len, "
                                                   "the StaticCache length). [default: prompt + gen]")] = None,
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", "-c", help="Sequences at once. Left out: "
                                                       "the largest that fits (without --gpu: 1).")] = None,
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Prompt tokens per sequence.")] = 1024,
    gen_len: Annotated[int, typer.Option("--gen-len", help="Generated tokens per sequence.")] = 256,
    engine: Annotated[ServeEngine, typer.Option("--engine", help="hf (transformers generate) | vllm (paged).")]
    = ServeEngine.HF,
    hf_cache: Annotated[HfCache, typer.Option("--cache", help="--engine hf: static (StaticCache sized to --max-seq) "
                                              "| dynamic (DynamicCache).")] = HfCache.STATIC,
    solve: Annotated[Optional[Solve], typer.Option("--solve", help="concurrency | context: search for the largest "
                                                   "that fits (context: the prompt grows, --gen-len kept).")] = None,
    gpu_memory_utilization: Annotated[float, typer.Option("--gpu-memory-utilization", help="vLLM's fraction of "
                                                          "the card.")] = VLLM_GPU_MEMORY_UTILIZATION,
    block_size: Annotated[int, typer.Option("--block-size", help="vLLM tokens per KV block.")] = VLLM_BLOCK_SIZE,
    max_num_batched_tokens: Annotated[Optional[int], typer.Option(
        "--max-num-batched-tokens", help="vLLM chunked-prefill budget. [default: vLLM's for the GPU]")] = None,
    max_num_seqs: Annotated[Optional[int], typer.Option(
        "--max-num-seqs", help="vLLM's cap on running sequences. [default: vLLM's for the GPU]")] = None,
    trace: Annotated[bool, typer.Option("--trace", help="Also run the real transformers generate() on fake "
                                        "tensors (memplan.trace.serve; --engine hf, --tp 1, fp32/bf16/fp16) and "
                                        "print its peak beside the estimate's.")] = False,
    measure: Annotated[bool, typer.Option("--measure", help="Run the same generate() on the device with random "
                                          "weights (memplan.measure.serve): peak memory per phase and level, time "
                                          "to first token, decode tokens/s; appends a serving record (kind serve) "
                                          "to --results.")] = False,
    device: Annotated[MeasureDevice, typer.Option("--device", help="--measure: cuda, cpu (CI: real CPU tensors "
                                                  "under memplan's tracker) or auto (cuda when available).")]
    = MeasureDevice.auto,
    warmup: Annotated[int, typer.Option("--warmup", help="--measure: untimed generations first.")] = 1,
    results: Annotated[Optional[str], typer.Option("--results", help="--measure: JSON Lines file the record is "
                                                   "appended to (default reports/measurements/<gpu>/serve.jsonl "
                                                   "on a GPU, reports/serve-cpu.jsonl on the CPU).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="--measure: label stored in the record.")] = None,
    ensemble: Annotated[int, typer.Option("--ensemble", help="K copies of each --model resident at once, their "
                                          "logits averaged (--engine hf).")] = 1,
    fmt: FormatOpt = Format.table,
):
    """Estimate inference memory per GPU: weights, KV cache, activations; vLLM's KV blocks; speed bounds.

    Example: memplan serve --model llama-3.1-8b --gpu l4 --weights awq-int4 --kv-dtype fp8 --engine vllm --max-seq 8192
    """
    from memplan import render
    from memplan.serve import ServeSetup, estimate_serve
    from memplan.spec.values import resolve_gpu, resolve_model

    if not measure and (device is not MeasureDevice.auto or warmup != 1 or results is not None or name is not None):
        raise MemplanError("--device, --warmup, --results and --name apply to --measure")
    if tp is not None and gpus is not None and tp != gpus:
        raise MemplanError(f"conflicting tensor-parallel options: --tp {tp} and --gpus {gpus}")
    if solve is None:
        solve = Solve.NONE if concurrency is not None else Solve.CONCURRENCY
    if solve is Solve.CONCURRENCY and concurrency is not None:
        raise MemplanError("--solve concurrency searches for the concurrency: leave out --concurrency")
    if not isinstance(ensemble, int) or not 1 <= ensemble <= 64:
        raise MemplanError(f"--ensemble must be in [1, 64], got {ensemble}")
    specs = [resolve_model(m) for m in model] * ensemble
    spec = specs[0]
    card = resolve_gpu(gpu)
    if card is None and concurrency is None and solve is Solve.CONCURRENCY:
        solve = Solve.NONE  # no card to fit in: one sequence (the help says so)
    setup = ServeSetup(weights=weights, group_size=group_size, double_quant=double_quant, kv_dtype=kv_dtype,
                       tp=tp or gpus or 1, engine=engine, hf_cache=hf_cache, prompt_len=prompt_len, gen_len=gen_len,
                       max_seq=max_seq, concurrency=1 if concurrency is None else concurrency, solve=solve,
                       gpu_memory_utilization=gpu_memory_utilization, block_size=block_size,
                       max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)
    from memplan.estimate.overhead import default_overhead

    overhead, calibrated = default_overhead()  # the calibrated file's (`memplan calibrate --write`) when there is one
    if len(specs) > 1:
        if measure:
            raise MemplanError("--measure runs one model; an ensemble is estimated (and traced with --trace)")
        return _emit_ensemble(specs, setup, card, fmt, trace)
    result = estimate_serve(spec, setup, card, overhead)
    if calibrated:
        result = replace(result, notes=tuple(result.notes) + (calibrated,))
    if measure:
        if trace:
            raise MemplanError("--trace and --measure: pick one (each runs generate() once)")
        return _measure(spec, result.setup, card, overhead, device, warmup, results, name, fmt)
    traced = None
    if trace:
        from memplan.trace.serve import check_traceable, trace_serve

        check_traceable(spec, result.setup)
        traced = trace_serve(spec, result.setup)
    if fmt is Format.json:
        d = result.to_dict()
        if traced is not None:
            d["trace"] = traced.to_dict()
        typer.echo(render.to_json(d))
    elif fmt is Format.csv:
        row = serve_row(result)
        if traced is not None:
            row.update(trace_peak_allocated=traced.peak_allocated, trace_weights=traced.weights,
                       trace_kv_cache=traced.kv_cache)
        typer.echo(render.to_csv([row]), nl=False)
    else:
        typer.echo(serve_table(result))
        if traced is not None:
            err = 100 * (result.allocated_bytes / traced.peak_allocated - 1)
            typer.echo(f"[trace] generate() on fake tensors: peak allocated {traced.peak_allocated / GiB:.3f} GiB "
                       f"(estimate {result.allocated_bytes / GiB:.3f} GiB, {err:+.2f}%), weights "
                       f"{traced.weights / GiB:.3f} GiB, cache at the end {traced.kv_cache / GiB:.3f} GiB")
    if fmt is not Format.table:
        for w in result.warnings:
            typer.echo(f"warning: {w}", err=True)


def _measure(spec, setup, card, overhead, device, warmup, results, name, fmt) -> int:
    """--measure: one served batch on the device, its record appended; exit 1 when it did not fit or failed."""
    from pathlib import Path

    from memplan import render
    from memplan.cli.measure import default_results
    from memplan.measure import reconcile
    from memplan.measure.devices import resolve_device
    from memplan.measure.record import append_record, check_writable
    from memplan.measure.serve import check_measurable, measure_record

    if warmup < 0:
        raise MemplanError(f"--warmup must be ≥ 0, got {warmup}")
    check_measurable(spec, setup)
    dev = resolve_device(device.value)
    out = Path(results or default_results("serve", dev, card.name if card and dev == "cuda" else None))
    check_writable(out)
    rec = measure_record(spec, setup, dev, warmup=warmup, gpu=card, overhead=overhead, name=name)
    append_record(out, rec)
    row = reconcile.compare(rec, estimate="recorded")
    if fmt is Format.json:
        typer.echo(render.to_json(rec))
    elif fmt is Format.csv:
        typer.echo(render.to_csv([row]), nl=False)
    else:
        typer.echo("\n".join(reconcile.serve_lines([row])))
    typer.echo(f"record {rec['record_id'][:12]} -> {out}", err=True)
    if rec["status"] == "ok":
        return 0
    typer.echo(f"memplan: the measurement ended {rec['status']} in {rec['failed_phase']}: {rec['error']}; the "
               "record says so", err=True)
    return 1
def _emit_ensemble(specs, setup, card, fmt, trace: bool = False) -> None:
    """An ensemble's page (memplan.serve.ensemble); --trace: memplan.trace.ensemble beside it."""
    from memplan import render
    from memplan.serve.ensemble import estimate_ensemble

    r = estimate_ensemble(specs, setup, card)
    traced = None
    if trace:
        from memplan.trace.ensemble import trace_ensemble

        traced = trace_ensemble(specs, r.setup)
    if fmt is Format.json:
        d = r.to_dict()
        if traced is not None:
            d["trace"] = traced.to_dict()
        typer.echo(render.to_json(d))
    elif fmt is Format.csv:
        d = r.to_dict()
        row = {"models": ",".join(d["models"]), "ensemble": d["ensemble"], **d["setup"]}
        row.update({f"{k}_bytes": v for k, v in d["categories"].items()})
        row.update({f"peak_{k}": v for k, v in d["peak"].items()})
        if "gpu" in d:
            row.update(gpu=d["gpu"]["name"], fits=d["fits"], headroom_bytes=d["headroom_bytes"])
        typer.echo(render.to_csv([row]), nl=False)
    else:
        s = r.setup
        lines = [f"ensemble of {len(r.models)}: {', '.join(r.models)} · weights {s.weights.value} · KV "
                 f"{s.kv_dtype_name} · engine hf ({s.hf_cache.value} cache) · {s.concurrency} × (prompt "
                 f"{s.prompt_len} + gen {s.gen_len}), context {s.max_seq}",
                 f"[{r.tier}] per GPU ({r.phase}), every member resident, logits averaged:",
                 f"  {'category':<18}{'GiB':>8}"]
        lines += [f"  {k:<18}{v / GiB:8.2f}" for k, v in r.categories.items()]
        lines += [f"  {'peak allocated':<18}{r.allocated_bytes / GiB:8.2f}",
                  f"  {'peak device':<18}{r.device_bytes / GiB:8.2f}"]
        for m in r.members:
            lines.append(f"  member {m.model}: weights {m.categories['weights'] / GiB:.2f} GiB, KV "
                         f"{m.kv_bytes_per_token:,} B per token")
        if r.gpu is not None:
            lines.append(f"{r.gpu.label} ({r.gpu.memory_bytes / GiB:.1f} GiB): "
                         f"{'fits' if r.fits else 'does NOT fit'}, headroom {r.headroom_bytes / GiB:+.2f} GiB at the "
                         f"device level")
        lines += [f"note: {n}" for n in r.notes] + [f"warning: {w}" for w in r.warnings]
        if traced is not None:
            err = 100 * (r.allocated_bytes / traced.peak_allocated - 1)
            lines.append(f"[trace] the members' forwards and the average on fake tensors: peak allocated "
                         f"{traced.peak_allocated / GiB:.3f} GiB (estimate {r.allocated_bytes / GiB:.3f} GiB, "
                         f"{err:+.2f}%), caches at the end {traced.kv_cache / GiB:.3f} GiB")
        typer.echo("\n".join(lines))
    if fmt is not Format.table:
        for w in r.warnings:
            typer.echo(f"warning: {w}", err=True)
