"""Rendering a Result (or rows) as table, JSON or CSV. No pandas: csv/json from the standard library."""
from __future__ import annotations

import csv
import io
import json

from memplan.categories import Category
from memplan.estimate.result import Result
from memplan.units import GiB

PRECISION_LABEL = {
    "fp32": "fp32", "fp16": "fp16 autocast (fp32 params)", "bf16": "bf16 autocast (fp32 params)",
    "fp16-master": "fp16 weights + fp32 master", "bf16-master": "bf16 weights + fp32 master",
    "pure-bf16": "pure bf16",
}


def flat(result: Result) -> dict:
    """One flat row: setup fields, categories, peaks (for CSV and sweeps)."""
    d = result.to_dict()
    row = {"model": d["model"], "tier": d["tier"]}
    for k, v in d["setup"].items():
        row[k] = v
    lora = row.pop("lora")
    row.update({"lora_rank": lora["rank"], "lora_alpha": lora["alpha"], "lora_targets": ",".join(lora["targets"]),
                "double_quant": lora["double_quant"]})
    row.update({f"{k}_bytes": v for k, v in d["categories"].items()})
    row.update({f"state_{k}": v for k, v in d["model_states"].items()})
    row.update({f"peak_{k}": v for k, v in d["peak"].items()})
    row.update({"trainable_params": d["trainable_params"], "total_params": d["total_params"]})
    if "gpu" in d:
        row.update({"gpu": d["gpu"]["name"], "gpu_memory_bytes": d["gpu"]["memory_bytes"], "fits": d["fits"],
                    "headroom_bytes": d["headroom_bytes"]})
    for k, v in (d.get("throughput") or {}).items():
        row[k] = v
    return row


def to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def to_json(obj) -> str:
    return json.dumps(obj, indent=2)


def _g(n: int) -> str:
    return f"{n / GiB:8.2f}"


def table(r: Result) -> str:
    s = r.setup
    p = r.peak
    lines = [
        f"{r.model} · {PRECISION_LABEL[s.precision.value]} · {s.optimizer.value} · peft {s.peft.value}"
        + (f" (r={s.lora.rank})" if s.peft.value in ("lora", "dora", "qlora") else "")
        + f" · ZeRO-{s.zero} × {s.gpus} GPU{'s' if s.gpus > 1 else ''}"
        + f" · micro-batch {s.batch} × seq {s.seq}"
        + (f" · grad-accum {s.grad_accum}" if s.grad_accum > 1 else "")
        + f" · checkpointing {s.checkpointing.value} · attention {s.attention.value}",
        f"[{r.tier}] per GPU at the peak ({p.phase.value}):",
        f"  {'category':<18}{'GiB':>8}  {'share':>6}",
    ]
    total = p.device_bytes or 1
    for c in Category:
        b = int(r.categories.get(c, 0))
        lines.append(f"  {c.value:<18}{_g(b)}  {100 * b / total:5.1f}%")
    lines += [
        f"  {'peak allocated':<18}{_g(p.allocated_bytes)}",
        f"  {'peak reserved':<18}{_g(p.reserved_bytes)}",
        f"  {'peak device':<18}{_g(p.device_bytes)}",
        "model states (steady state, GiB): " + ", ".join(
            f"{k} {v / GiB:.2f}" for k, v in r.model_states.to_dict().items() if k != "cpu_bytes")
        + (f"; offloaded to CPU RAM {r.model_states.cpu_bytes / GiB:.2f}" if r.model_states.cpu_bytes else ""),
        f"parameters: {r.trainable_params:,} trainable of {r.total_params:,}"
        + (f" ({100 * r.trainable_params / r.total_params:.3g}%)" if r.total_params else ""),
    ]
    if r.gpu is not None:
        verdict = "fits" if r.fits else "does NOT fit"
        lines.append(f"{r.gpu.label} ({r.gpu.memory_bytes / GiB:.1f} GiB): {verdict}, headroom "
                     f"{r.headroom_bytes / GiB:+.2f} GiB at the device level")
    if r.throughput:
        t = r.throughput
        many = t.get("tokens_per_s_total", 0) > t["tokens_per_s"]
        total = f" ({t['tokens_per_s_total']:,.0f} in all)" if many else ""
        comm = f", communication {t['comm_s']:.3f} s" if t.get("comm_s") else ""
        lines.append(f"throughput: {t['tokens_per_s']:,.0f} tokens/s per GPU{total}, step {t['step_s']:.3f} s "
                     f"(compute {t.get('compute_s', t['step_s']):.3f} s{comm}), MFU {100 * t['mfu']:.0f}%; "
                     f"assumed utilization: {t['mfu_source']}")
    for w in r.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
