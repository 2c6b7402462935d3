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
    "pure-bf16": "pure bf16", "fsdp-bf16": "FSDP2 bf16 compute (fp32 shards, fp32 reduce)",
}




def technique_label(s) -> str:
    """The checkpointing-policy and loss knobs a setup changes from their defaults (docs/memory-techniques.md)."""
    parts = [f"every {s.ckpt_every} blocks" if s.ckpt_every != 1 else "", "reentrant" if s.ckpt_reentrant else "",
             f"loss {s.loss.value}" + (f":{s.loss_chunks}" if s.loss.value == "chunked" else "")
             if s.loss.value != "standard" else "", f"logits-to-keep {s.logits_to_keep}" if s.logits_to_keep else "",
             f"fp8 {s.fp8.value}" if s.fp8.value != "none" else "",
             "activations offloaded" if getattr(s, "offload_activations", False) else ""]
    return "".join(f" · {p}" for p in parts if p)

def engine_label(setup) -> str:
    """What runs the data parallelism of a setup, in the engine's own terms (memplan.spec.setup.Engine)."""
    if setup.gpus == 1 and setup.zero == 0:
        return "one GPU"
    if setup.engine.value == "deepspeed":
        off = [n for n, on in (("optimizer", setup.offload_optimizer), ("parameters", setup.offload_params)) if on]
        return f"DeepSpeed ZeRO-{setup.zero}" + (f", {' + '.join(off)} offloaded" if off else "")
    label = {0: "DDP", 1: "DDP + ZeroRedundancyOptimizer", 2: "FSDP2 reshard_after_forward=False",
             3: "FSDP2 reshard_after_forward=True"}[setup.zero]
    return label + (" + CPUOffloadPolicy" if setup.offload_params else "")


def host_ram_line(cpu_bytes: int, setup) -> str:
    """Offloaded bytes in CPU RAM per GPU and per node (each node holds its own GPUs' shares)."""
    per_node = min(setup.gpus, setup.gpus_per_node)
    return (f"offloaded to CPU RAM: {cpu_bytes / GiB:.2f} GiB per GPU, {cpu_bytes * per_node / GiB:.2f} GiB per node "
            f"({per_node} GPU{'s' if per_node > 1 else ''})")


def paged_line(paged_bytes: int) -> str:
    """bitsandbytes' paged optimizer states: their own line, outside the allocated categories (docs/optimizers.md)."""
    return (f"paged optimizer states (CUDA unified memory): {paged_bytes / GiB:.2f} GiB per GPU, not in the figures "
            f"above: cudaMallocManaged bypasses PyTorch's allocator (torch.cuda.memory_allocated does not count them; "
            f"nvidia-smi does while they are resident); evicted to CPU RAM page by page when the GPU runs short")


def roomy_line(d: dict, gradients_at_peak: int) -> str:
    """FSDP2's reserved level on a roomy GPU (Result.roomy, memplan.estimate.pools.Roomy): its own line, outside the
    peak levels and the fit verdict (--explain says why)."""
    rs, ag = d["reduce_scatter_pool_bytes"], d["all_gather_pool_bytes"]
    held = min(rs, gradients_at_peak)  # sharded gradients alive at the peak: already in peak reserved
    return (f"{d['label']}: {d['bytes'] / GiB:.2f} GiB per GPU = peak reserved + {d['pools_extra_bytes'] / GiB:.2f} "
            f"GiB (FSDP2 all-gather stream {ag / GiB:.2f} GiB, reduce-scatter stream {rs / GiB:.2f} GiB"
            + (f" less the {held / GiB:.2f} GiB of gradients the peak counts" if held else "")
            + "); not in the fit verdict (--explain says why)")


def lengths_lines(d: dict) -> list[str]:
    """A length distribution's lines (Result.lengths, memplan.estimate.lengths)."""
    if d["packing"]:
        head = f"lengths: {d['distribution']}, packed into rows of {d['worst_length']} tokens (no padding)"
    else:
        head = (f"lengths: {d['distribution']}, padded to each batch's longest: worst batch {d['worst_length']} "
                f"tokens (the peak above), expected {d['expected_length']:,.1f}, real {d['real_tokens_per_row']:,.1f} "
                f"per row: {100 * d['padding_waste']:.1f}% of the tokens computed are padding")
    return [head, f"  typical batch ({d['typical_length']} tokens): {d['typical_allocated_bytes'] / GiB:.2f} GiB "
                  f"allocated, {d['typical_device_bytes'] / GiB:.2f} GiB device"]


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
    row.update({"trainable_params": d["trainable_params"], "total_params": d["total_params"],
                "cpu_bytes_per_node": result.model_states.cpu_bytes * min(result.setup.gpus,
                                                                          result.setup.gpus_per_node)})
    if "roomy_reserved" in d:  # FSDP2 only (memplan.estimate.pools.Roomy)
        rr = d["roomy_reserved"]
        row.update({"roomy_reserved_bytes": rr["bytes"], "roomy_all_gather_pool_bytes": rr["all_gather_pool_bytes"],
                    "roomy_reduce_scatter_pool_bytes": rr["reduce_scatter_pool_bytes"]})
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
        f"{r.model} · {PRECISION_LABEL[s.precision.value]} · {s.optimizer.value}"
        + (" stepped in backward" if s.optimizer_in_backward else "") + f" · peft {s.peft.value}"
        + (f" (r={s.lora.rank})" if s.peft.value in ("lora", "dora", "qlora") else "")
        + f" · ZeRO-{s.zero} × {s.gpus} GPU{'s' if s.gpus > 1 else ''} ({engine_label(s)})"
        + f" · micro-batch {s.batch} × seq {s.seq}"
        + (f" · grad-accum {s.grad_accum}" if s.grad_accum > 1 else "")
        + f" · checkpointing {s.checkpointing.value} · attention {s.attention.value}" + technique_label(s),
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
    ] + ([roomy_line(r.roomy, int(r.categories.get(Category.GRADIENTS, 0)))] if r.roomy else []) + [
        "model states (steady state, GiB): " + ", ".join(
            f"{k} {v / GiB:.2f}" for k, v in r.model_states.to_dict().items() if k not in ("cpu_bytes", "paged_bytes")),
        f"parameters: {r.trainable_params:,} trainable of {r.total_params:,}"
        + (f" ({100 * r.trainable_params / r.total_params:.3g}%)" if r.total_params else ""),
    ]
    if r.model_states.cpu_bytes:
        lines.append(host_ram_line(r.model_states.cpu_bytes, s))
    if r.model_states.paged_bytes:
        lines.append(paged_line(r.model_states.paged_bytes))
    if r.lengths:
        lines += lengths_lines(r.lengths)
    if r.gpu is not None:
        verdict = "fits" if r.fits else "does NOT fit"
        lines.append(f"{r.gpu.label} ({r.gpu.memory_bytes / GiB:.1f} GiB): {verdict}, headroom "
                     f"{r.headroom_bytes / GiB:+.2f} GiB at the device level")
    if r.throughput:
        t = r.throughput
        many = t.get("tokens_per_s_total", 0) > t["tokens_per_s"]
        total = f" ({t['tokens_per_s_total']:,.0f} in all)" if many else ""
        comm = f", communication {t['comm_s']:.3f} s" if t.get("comm_s") else ""
        if t.get("comm_s") and (t.get("link") or t.get("host_s")):  # (one GPU: activation offloading's copies)
            comm += (f" over {t['link']}" if t.get("link") else "") + (
                f", {t['host_s']:.3f} s of it offload copies" if t.get("host_s") else "")
        lines.append(f"throughput: {t['tokens_per_s']:,.0f} tokens/s per GPU{total}, step {t['step_s']:.3f} s "
                     f"(compute {t.get('compute_s', t['step_s']):.3f} s{comm}), MFU {100 * t['mfu']:.0f}%; "
                     f"assumed utilization: {t['mfu_source']}")
        if "computed_tokens_per_s" in t:
            lines.append(f"  real tokens only; {t['computed_tokens_per_s']:,.0f} tokens/s computed, "
                         f"{100 * t['padding_waste']:.1f}% of them padding")
    for w in r.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


COLUMN_GAP = "  "  # at least two spaces between columns: one space lets adjacent words read as one


def columns(headers: list[str], rows: list[list], right: set[int] | frozenset = frozenset()) -> list[str]:
    """Aligned text columns: each column as wide as its widest cell (header included), separated by COLUMN_GAP,
    so no value is cut and no two columns run together. `right`: indices of right-aligned (numeric) columns."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for r in cells:
        parts = [r[i].rjust(widths[i]) if i in right else r[i].ljust(widths[i]) for i in range(len(headers))]
        out.append(COLUMN_GAP.join(parts).rstrip())
    return out


def reconcile_table(rows: list[dict], summary: dict) -> str:
    """`memplan reconcile`'s table (rows and summary from memplan.measure.reconcile): full names, widths from
    content."""
    from memplan.measure.reconcile import LEVELS, fmt_bytes, fmt_pct

    headers = ["name", "status"]
    for lv in LEVELS:
        headers += [f"{lv} est", "measured", "err"]
    headers.append("peak phase est/meas")
    body = []
    for r in rows:
        cells = [r["name"] or r["model"] or "?", r["status"] + (f"@{r['failed_phase']}" if r["failed_phase"] else "")]
        for lv in LEVELS:
            cells += [fmt_bytes(r[f"est_{lv}_bytes"]), fmt_bytes(r[f"meas_{lv}_bytes"]), fmt_pct(r[f"err_{lv}_pct"])]
        cells.append(f"{r['est_peak_phase'] or '–'}/{r['meas_peak_phase'] or '–'}"
                     + (f"  ({r['note']})" if r["note"] else ""))
        body.append(cells)
    lines = columns(headers, body, right=set(range(2, 2 + 3 * len(LEVELS))))
    lines.append(f"{summary['records']} records: {summary['ok']} ok, {summary['oom']} did not fit, "
                 f"{summary['error']} failed")
    for lv, st in summary["levels"].items():
        if st["n"]:
            lines.append(f"  {lv:<10} |error| median {st['median_abs_pct']:.2f}%  max {st['max_abs_pct']:.2f}%  "
                         f"mean {st['mean_pct']:+.2f}%  (n={st['n']})")
    if "roomy_reserved" in summary:  # FSDP2: measured reserved vs memplan.estimate.pools' roomy level
        st = summary["roomy_reserved"]
        lines.append(f"  reserved vs reserved on a roomy GPU (side-stream pools) |error| median "
                     f"{st['median_abs_pct']:.2f}%  max {st['max_abs_pct']:.2f}%  mean {st['mean_pct']:+.2f}%  "
                     f"(n={st['n']}, FSDP2 records)")
    for f, groups in summary["by_feature"].items():
        if len(groups) > 1:
            lines.append(f"  allocated by {f}: " + ", ".join(
                f"{k} {g['median_abs_pct']:.1f}%/{g['max_abs_pct']:.1f}% (n={g['n']})" for k, g in groups.items()))
    if "tokens_per_s" in summary:
        st = summary["tokens_per_s"]
        lines.append(f"  tokens/s predicted vs measured: |error| median {st['median_abs_pct']:.1f}%  "
                     f"max {st['max_abs_pct']:.1f}%  (n={st['n']})")
    if "fit_agreement" in summary:
        fa = summary["fit_agreement"]
        lines.append(f"  fit / did-not-fit predicted correctly for {fa['agree']} of {fa['n']}")
    return "\n".join(lines)


def plan_table(rows: list[dict]) -> list[str]:
    """`memplan measure --sweep --plan`'s rows (memplan.cli.measure), with headers."""
    from memplan.measure.reconcile import fmt_bytes

    fits = {True: "fits", False: "no fit", None: ""}
    body = [[r["chunk"], r["name"], r["model"], fmt_bytes(r["est_device_bytes"]), fits[r["fits"]], r["expect"] or "",
             f"{r['est_minutes']:.1f}"] for r in rows]
    return columns(["chunk", "name", "model", "est. device", "estimate", "expect", "minutes"], body,
                   right={0, 3, 6})


SORT_LABEL = {"tokens": "predicted tokens/s per GPU", "batch": "largest micro-batch", "seq": "longest sequence",
              "memory": "least peak memory"}


def fit_table(report, top: int, grouped: bool = True) -> str:
    """`memplan fit`'s table (a memplan.fit.FitReport): ranked rows, grouped by PEFT method unless told not to
    (top N per method, else top N overall; 0 = all), optimizers that tie on one row."""
    from memplan import fit as F
    from memplan.units import GiB

    q, g = report.query, report.gpu
    ranks = {id(r): i for i, r in enumerate(report.rows, 1)}
    groups = F.by_method(report.rows) if grouped else [(None, list(report.rows))]
    lines = [f"{report.model} on {g.label} × {q.base.gpus}, seq {q.seq}, margin {q.margin:.0%} "
             f"(limit {report.limit_bytes / GiB:.1f} of {g.memory_bytes / GiB:.1f} GiB): {report.fitting} of "
             f"{report.searched} choices fit ({report.invalid} impossible combinations skipped); "
             f"{len(report.rows)} rows once optimizers that tie share a row",
             f"ranked by {SORT_LABEL[report.sort.value]} (--sort)"
             + (", grouped by PEFT method, best method first" if grouped else "")]
    many = q.base.gpus > 1
    host = any(r.host_bytes for r in report.rows)
    speed = g.has_flops  # a GPU given by its memory alone: no speed columns (nothing is predicted)
    shaped = q.base.lengths != "fixed" or any(r.setup.packing for r in report.rows)  # --lengths: padded / packed
    headers = (["#", "peft", "precision", "ckpt", "zero"] + (["engine", "offload"] if many else [])
               + (["batches"] if shaped else [])
               + ["max batch", "max seq", "peak GiB"] + (["host GiB/node"] if host else [])
               + (["tokens/s/GPU", "step s", "MFU"] if speed else []) + ["optimizers (tie)"])
    body, starts, hidden = [], [], 0
    for method, rows in groups:
        shown = rows[:top] if top else rows
        hidden += len(rows) - len(shown)
        starts.append((len(body), method, len(rows), len(rows) - len(shown)))
        for r in shown:
            s, t = r.setup, r.throughput
            body.append([ranks[id(r)], s.peft.value, s.precision.value,
                         s.checkpointing.value + (" +offload" if s.offload_activations else ""), s.zero]
                        + ([s.engine.value, F.Offload.of(s).value] if many else [])
                        + (["packed" if s.packing else "padded"] if shaped else [])
                        + [f"{r.max_batch}{'+' if r.batch_at_cap else ''}", f"{r.max_seq}{'+' if r.seq_at_cap else ''}",
                           f"{r.peak_device_bytes / GiB:.2f}"]
                        + ([f"{r.host_bytes_per_node / GiB:.2f}" if r.host_bytes else "–"] if host else [])
                        + ([f"{t['tokens_per_s']:,.0f}", f"{t['step_s']:.3f}", f"{100 * t['mfu']:.0f}%"] if speed
                           else []) + [", ".join(o.value for o in r.optimizers)
                                       + (" (in backward)" if s.optimizer_in_backward else "")
                                       + F.technique_suffix(s)])
    text = columns(headers, body, right={i for i, h in enumerate(headers)
                                         if h in ("#", "zero", "max batch", "max seq", "peak GiB", "host GiB/node",
                                                  "tokens/s/GPU", "step s", "MFU")})
    lines.append(text[0])
    for n, (start, method, count, more) in enumerate(starts):
        end = starts[n + 1][0] if n + 1 < len(starts) else len(body)
        if method is not None:
            lines.append(f"-- {method.value}: {count} row{'s' if count != 1 else ''}"
                         + (f", {more} more not shown" if more else ""))
        lines += text[1 + start:1 + end]
    if hidden:
        lines.append(f"... {hidden} more rows (--top 0 shows all)")
    lines.append(f"max batch at seq {q.seq}; max seq at batch {q.min_batch}; '+' = at the search cap; # = overall "
                 "rank." + (f" host GiB/node = offloaded CPU RAM per GPU × {min(q.base.gpus, q.base.gpus_per_node)} "
                            "GPUs per node." if host else ""))
    if shaped:
        lines.append(f"lengths {q.base.lengths[:60]}: padded rows at their worst batch's memory, packed rows of "
                     "--seq; tokens/s counts real tokens only (padding left out)")
    lines.append(f"Throughput: {F.BATCH_NOTE}; assumed utilization: "
                 f"{report.rows[0].throughput['mfu_source'] if report.rows else ''}" if speed else
                 f"Throughput: not predicted, {g.label} has no FLOPS figure.")
    return "\n".join(lines)
