"""The report's charts as plotly figures (plotly imported only here, only when a report is built).

Every piece of user text (setup names, file names, marks) reaches plotly HTML-escaped (&, <, >): plotly renders a
subset of HTML tags in labels and converts those entities back to the literal characters, so an escaped name
shows as typed and cannot inject markup. Quotes stay as typed: plotly does not decode `&quot;` (it would show
literally) and a quote cannot open a tag.

Reading at a glance: memory bars carry their total and a verdict per GPU (✓ under the margin line, ≈ only into
the margin, ✗ over the GPU's memory); setup labels carry the PEFT method and batch × seq; every memory axis names
its level (allocated, reserved, device); a chart with nothing to draw is left out (the page says why) instead of
an empty panel; predicted throughput carries the caveats of what the model leaves out.
"""
from __future__ import annotations

import html

from memplan.categories import Category
from memplan.fit import DEFAULT_MARGIN
from memplan.report.frames import MEASURED_PHASES, throughput_caveats
from memplan.units import GiB

# One colour per category, the same in every chart (plotly's default qualitative palette, in category order).
COLORS = {"weights": "#636EFA", "master_weights": "#AB63FA", "gradients": "#EF553B", "optimizer_states": "#FFA15A",
          "activations": "#00CC96", "temporaries": "#19D3F3", "overhead": "#B6B6B6"}
BANDS = (0.05, 0.15)  # estimate-vs-measured error bands: ±5% and ±15% of the measured value
MAX_TIMELINE_POINTS = 2000  # a trace timeline has one row per allocation; keep the page light


VERDICT = {"fits": "✓", "margin": "≈", "no": "✗"}  # under the margin line; between it and the GPU line; over it
VERDICT_LEGEND = "✓ fits under the margin line · ≈ only into the margin · ✗ does not fit"


def esc(text) -> str:
    return html.escape(str(text), quote=False)


def setup_label(r: dict) -> str:
    """The setup's name, then its method and micro-batch × sequence length (what a bar is of)."""
    what = " · ".join(str(x) for x in (r.get("peft"), r.get("precision")) if x)
    size = f"{r['batch']}×{r['seq']}" if r.get("batch") and r.get("seq") else ""
    extra = " · ".join(x for x in (what, size) if x)
    return esc(r["name"]) + (f"<br>{esc(extra)}" if extra else "")


def verdict(total_bytes: int, gpu, margin: float = DEFAULT_MARGIN) -> str:
    """fits (≤ the margin line), margin (≤ the GPU's memory only) or no."""
    if total_bytes <= gpu.memory_bytes * (1 - margin):
        return "fits"
    return "margin" if total_bytes <= gpu.memory_bytes else "no"


def _gib(b):
    return None if b is None else b / GiB


def _layout(fig, title: str, **kw):
    fig.update_layout(title=dict(text=esc(title)), template="plotly_white", margin=dict(l=60, r=30, t=60, b=60),
                      legend=dict(orientation="h", yref="container", y=0, yanchor="bottom"), **kw)
    fig.update_xaxes(automargin=True)  # long setup labels push the plot up instead of being cut
    fig.update_yaxes(automargin=True)
    return fig


def memory_bars(rows: list[dict], gpus: list, margin: float = DEFAULT_MARGIN) -> "go.Figure":
    """Stacked per-category bars per setup: the estimate (device level: the categories include the overhead up
    to it), and the measurement beside it where one exists, each labelled with its total and a verdict per GPU,
    against lines at each chosen GPU's memory and at its margin."""
    import plotly.graph_objects as go

    fig = go.Figure()
    names = [setup_label(r) for r in rows]
    est_kind = "estimate (device)"
    for c in Category:
        fig.add_bar(x=[names, [est_kind] * len(rows)], y=[_gib(r[f"est_{c.value}"]) for r in rows],
                    name=c.value, legendgroup=c.value, marker_color=COLORS[c.value],
                    hovertemplate="%{x}<br>" + c.value + ": %{y:.2f} GiB<extra></extra>")
    totals = [(n, est_kind, r["est_device"], r) for n, r in zip(names, rows) if r["est_device"] is not None]
    measured = [r for r in rows if r["meas_allocated"] is not None]
    by_cat = [r for r in measured if r["meas_weights"] is not None]
    if by_cat:  # the measuring tier attributed bytes to categories (the CPU tracker does): allocated level
        kind = "measured (allocated)"
        for c in Category:
            fig.add_bar(x=[[setup_label(r) for r in by_cat], [kind] * len(by_cat)],
                        y=[_gib(r[f"meas_{c.value}"]) for r in by_cat], name=c.value, legendgroup=c.value,
                        showlegend=False, marker=dict(color=COLORS[c.value], pattern=dict(shape="/")),
                        hovertemplate="%{x}<br>measured " + c.value + ": %{y:.2f} GiB<extra></extra>")
        totals += [(setup_label(r), kind, sum(r[f"meas_{c.value}"] or 0 for c in Category), r) for r in by_cat]
    # peaks only (CUDA): allocated, and the rest up to the device level where NVML gave it
    totals += _device_bars(fig, [r for r in measured if r["meas_weights"] is None], setup_label)
    _totals(fig, totals, gpus, margin)
    for i, g in enumerate(gpus):
        y = g.memory_bytes / GiB
        side = "top left" if i % 2 == 0 else "top right"  # close lines: alternate
        fig.add_hline(y=y, line=dict(color="#d62728", dash="dash", width=1.5),
                      annotation_text=esc(f"{g.label}: {y:.1f} GiB"), annotation_position=side)
        fig.add_hline(y=y * (1 - margin), line=dict(color="#d62728", dash="dot", width=1),
                      annotation_text=esc(f"− {margin:.0%} margin"), annotation_font=dict(size=10, color="#a33"),
                      annotation_position=side.replace("top", "bottom"))
    top = max([_gib(t[2]) for t in totals] + [g.memory_bytes / GiB for g in gpus] + [0.0])
    return _layout(fig, "Peak memory per GPU by category (estimate, and measured where recorded)",
                   barmode="stack", yaxis_title="peak GiB per GPU (level: under each bar)",
                   yaxis_range=[0, 1.18 * top] if top else None, height=600)  # room above for the labels


def _device_bars(fig, plain: list[dict], label) -> list[tuple]:
    """Measured rows without categories: the allocated level and the rest up to the device level (where NVML gave
    it), hatched; returns their totals (label, kind, bytes, row) for _totals."""
    if not plain:
        return []
    kind = "measured (device)"
    x = [[label(r) for r in plain], [kind] * len(plain)]
    fig.add_bar(x=x, y=[_gib(r["meas_allocated"]) for r in plain], name="measured allocated",
                marker=dict(color="#444", pattern=dict(shape="/")),
                hovertemplate="%{x}<br>measured allocated: %{y:.2f} GiB<extra></extra>")
    fig.add_bar(x=x, y=[_gib((r["meas_device"] or r["meas_allocated"]) - r["meas_allocated"]) for r in plain],
                name="measured device − allocated", marker=dict(color="#999", pattern=dict(shape="/")),
                hovertemplate="%{x}<br>device − allocated: %{y:.2f} GiB<extra></extra>")
    return [(label(r), kind, r["meas_device"] or r["meas_allocated"], r) for r in plain]


def _totals(fig, totals: list[tuple], gpus, margin) -> None:
    """Each bar's total and verdict as text above it."""
    if totals:
        fig.add_scatter(x=[[t[0] for t in totals], [t[1] for t in totals]], y=[_gib(t[2]) for t in totals],
                        mode="text", text=[_total_text(t[2], t[3], gpus, margin) for t in totals],
                        textposition="top center", textfont=dict(size=11), name="total · " + VERDICT_LEGEND,
                        hoverinfo="skip", cliponaxis=False)


def _total_text(total: int, row: dict, gpus: list, margin: float) -> str:
    """`12.3 GiB` and a verdict per GPU line (against the row's own GPU when no line is drawn)."""
    lines = [f"{total / GiB:.1f} GiB"]
    if gpus:
        lines += [f"{VERDICT[verdict(total, g, margin)]} {esc(g.name)}" for g in gpus]
    elif row.get("fits") is not None and row.get("gpu"):
        lines.append(f"{'✓' if row['fits'] else '✗'} {esc(row['gpu'])}")
    return "<br>".join(lines)


def _band(fig, lo_hi, top: float, color: str, label: str):
    e = lo_hi
    xs = [0.0, top]
    # |estimate − measured| ≤ e·measured  ⇔  measured ∈ [estimate/(1+e), estimate/(1−e)]
    fig.add_scatter(x=xs, y=[x / (1 + e) for x in xs], mode="lines", line=dict(width=0), showlegend=False,
                    hoverinfo="skip")
    fig.add_scatter(x=xs, y=[x / (1 - e) for x in xs], mode="lines", line=dict(width=0), fill="tonexty",
                    fillcolor=color, name=label, hoverinfo="skip")


NO_RECORDS = "No measured records: pass RESULTS.jsonl files written by `memplan measure`."
NO_THROUGHPUT = "No throughput: give --gpu to predict it, or records with a measured tokens/s."


def estimate_vs_measured(rows: list[dict]):
    """Estimated vs measured peak per record (allocated level, and device where measured), with ±5% / ±15%
    bands around equality; None when no record has a measurement (the page says so instead of a panel)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    pts = [r for r in rows if r["meas_allocated"] is not None and r["est_allocated"] is not None]
    if not pts:
        return None
    dev = [r for r in pts if r["meas_device"] is not None and r["est_device"] is not None]
    top = 1.1 * max(max(_gib(r["est_allocated"]), _gib(r["meas_allocated"])) for r in pts)
    if dev:
        top = max(top, 1.1 * max(max(_gib(r["est_device"]), _gib(r["meas_device"])) for r in dev))
    _band(fig, BANDS[1], top, "rgba(99,110,250,0.10)", f"±{BANDS[1]:.0%}")
    _band(fig, BANDS[0], top, "rgba(99,110,250,0.22)", f"±{BANDS[0]:.0%}")
    fig.add_scatter(x=[0, top], y=[0, top], mode="lines", line=dict(color="#888", dash="dot"), name="equal")
    for level, subset in (("allocated", pts), ("device", dev)):
        if subset:
            fig.add_scatter(
                x=[_gib(r[f"est_{level}"]) for r in subset], y=[_gib(r[f"meas_{level}"]) for r in subset],
                mode="markers", name=f"{level} level", marker=dict(size=9, symbol="circle" if level == "allocated"
                                                                    else "diamond"),
                text=[setup_label(r) for r in subset],
                customdata=[r[f"err_{level}_pct"] for r in subset],
                hovertemplate="%{text}<br>estimate %{x:.2f} GiB<br>measured %{y:.2f} GiB<br>"
                              "error %{customdata:+.1f}%<extra></extra>")
    return _layout(fig, "Estimate vs measured peak (GiB)",
                   xaxis_title="estimated peak GiB (● allocated level, ◆ device level)",
                   yaxis_title="measured peak GiB (same level)",
                   height=480, xaxis=dict(range=[0, top]), yaxis=dict(range=[0, top]))


def _thin(rows: list[dict], limit: int) -> list[dict]:
    """At most `limit` rows: the highest-total row of each of `limit` equal bins (peaks survive)."""
    if len(rows) <= limit:
        return rows
    size = -(-len(rows) // limit)
    return [max(rows[i:i + size], key=lambda r: r["total"]) for i in range(0, len(rows), size)]


def timeline_from_trace(rows: list[dict], label: str) -> "go.Figure":
    """Live bytes by category over a traced step (`memplan trace --timeline`), stacked, with phase changes."""
    import plotly.graph_objects as go

    fig = go.Figure()
    pts = _thin(rows, MAX_TIMELINE_POINTS)
    x = [r["event"] for r in pts]
    hover = [esc(f"{r['phase']} {r['mark']}") for r in pts]
    for c in Category:
        if c is Category.OVERHEAD:
            continue  # a trace has no overhead
        fig.add_scatter(x=x, y=[r[c.value] / GiB for r in pts], name=c.value, stackgroup="one", mode="lines",
                        line=dict(width=0.5, color=COLORS[c.value]), text=hover,
                        hovertemplate="event %{x} · %{text}<br>" + c.value + " %{y:.2f} GiB<extra></extra>")
    peak = max(rows, key=lambda r: r["total"])
    where = f"peak {peak['total'] / GiB:.2f} GiB at {peak['phase']} {peak['mark']}".rstrip()
    fig.add_scatter(x=[peak["event"]], y=[peak["total"] / GiB], mode="markers", name="peak",
                    marker=dict(symbol="x", size=10, color="#d62728"), hovertemplate=esc(where) + "<extra></extra>")
    prev = None
    for r in rows:
        if r["phase"] != prev:
            fig.add_vline(x=r["event"], line=dict(color="#aaa", dash="dot", width=1),
                          annotation_text=esc(r["phase"]), annotation_position="top right")
            prev = r["phase"]
    return _layout(fig, f"Live memory over the step: {label} ({where})", xaxis_title="allocation event",
                   yaxis_title="live GiB (allocated level)", height=460)


def _phase_traces(row: dict, estimate: dict | None, measured: dict | None) -> list[dict]:
    """Peak per phase of one setup: the estimate's phase peaks, and measured peak and end of each phase where a
    record has phases (allocated level)."""
    import plotly.graph_objects as go

    est = (estimate or {}).get("phase_peaks") or {}
    out = [go.Bar(x=list(MEASURED_PHASES), y=[_gib(est.get(p)) for p in MEASURED_PHASES], name="estimated peak",
                  marker_color="#636EFA", texttemplate="%{y:.2f}", textposition="outside",
                  hovertemplate="%{x}: %{y:.2f} GiB<extra>estimate</extra>")]
    phases = (measured or {}).get("phases") or {}
    if phases:
        out.append(go.Bar(x=list(MEASURED_PHASES), y=[_gib((phases.get(p) or {}).get("peak_allocated_bytes"))
                                                      for p in MEASURED_PHASES],
                          name="measured peak", marker_color="#EF553B", texttemplate="%{y:.2f}",
                          textposition="outside", hovertemplate="%{x}: %{y:.2f} GiB<extra>measured peak</extra>"))
        out.append(go.Scatter(x=list(MEASURED_PHASES), y=[_gib((phases.get(p) or {}).get("end_allocated_bytes"))
                                                          for p in MEASURED_PHASES],
                              name="measured at phase end", mode="lines+markers", line=dict(color="#444"),
                              hovertemplate="%{x}: %{y:.2f} GiB<extra>end of phase</extra>"))
    return out


def _phase_title(row: dict, measured: dict | None) -> str:
    what = "measured and estimated" if (measured or {}).get("phases") else "estimated"
    return esc(f"Peak memory by phase ({what}): ") + setup_label(row).replace("<br>", " · ")


def timeline_per_setup(rows: list[dict], entries: list, first: int = 0) -> "go.Figure":
    """Peak memory by phase for every setup, one shown at a time: a drop-down (plotly updatemenus, drawn by the
    embedded plotly.js, offline) picks the setup; `first` is shown on load."""
    import plotly.graph_objects as go

    fig = go.Figure()
    spans, titles = [], []
    for r, e in zip(rows, entries):
        traces = _phase_traces(r, e.estimate, e.measured)
        start = len(fig.data)
        for t in traces:
            fig.add_trace(t)
        spans.append((start, len(fig.data)))
        titles.append(_phase_title(r, e.measured))
    n = len(fig.data)
    for k, (a, b) in enumerate(spans):
        for i in range(a, b):
            fig.data[i].visible = k == first
    buttons = [dict(label=esc(r["name"]), method="update",
                    args=[{"visible": [a <= i < b for i in range(n)]}, {"title.text": titles[k]}])
               for k, ((a, b), r) in enumerate(zip(spans, rows))]
    fig.update_layout(updatemenus=[dict(buttons=buttons, active=first, direction="down", x=1.0, xanchor="right",
                                        y=1.18, yanchor="top", showactive=True)])
    fig = _layout(fig, "", barmode="group", yaxis_title="peak GiB (allocated level)", height=460)
    fig.update_layout(title=dict(text=titles[first]), margin=dict(t=90))
    return fig


def timeline_from_phases(row: dict, estimate: dict, measured: dict | None) -> "go.Figure":
    """Peak per phase of one setup (see _phase_traces)."""
    import plotly.graph_objects as go

    fig = go.Figure(_phase_traces(row, estimate, measured))
    fig = _layout(fig, "", barmode="group", yaxis_title="peak GiB (allocated level)", height=440)
    fig.update_layout(title=dict(text=_phase_title(row, measured)))
    return fig


def throughput(rows: list[dict]):
    """Tokens/s per GPU and MFU per setup: predicted by memplan's throughput model (labelled, and marked * where
    the model leaves out something the setup does), measured where recorded; None when there is nothing."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pts = [r for r in rows if r["pred_tokens_per_s"] is not None or r["meas_tokens_per_s"] is not None]
    if not pts:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=("tokens/s per GPU", "MFU"), horizontal_spacing=0.08)
    names = [setup_label(r) for r in pts]
    caveats = [throughput_caveats(r) for r in pts]
    for col, key, fmt in ((1, "tokens_per_s", ",.0f"), (2, "mfu", ".1%")):
        for kind, color in (("pred", "#636EFA"), ("meas", "#EF553B")):
            ys = [r[f"{kind}_{key}"] for r in pts]
            if any(y is not None for y in ys):
                star = [("*" if kind == "pred" and c else "") for c in caveats]
                text = [None if y is None else format(y, fmt) + s for y, s in zip(ys, star)]
                note = ["<br>" + "<br>".join(c) if kind == "pred" and c else "" for c in caveats]
                fig.add_bar(x=names, y=ys, name="predicted" if kind == "pred" else "measured", marker_color=color,
                            legendgroup=kind, showlegend=col == 1, row=1, col=col, text=text,
                            textposition="outside", customdata=note, cliponaxis=False,
                            hovertemplate="%{x}: %{y:" + fmt + "}%{customdata}<extra></extra>")
    fig.update_yaxes(tickformat=".0%", row=1, col=2)
    fig.update_yaxes(title_text="tokens/s per GPU", row=1, col=1)
    fig.update_yaxes(title_text="model FLOPs utilization", row=1, col=2)
    flagged = sorted({c for cs in caveats for c in cs})
    fig = _layout(fig, "Throughput per setup (predicted for the setup's GPU; measured where recorded)",
                  barmode="group", height=540)
    if flagged:  # under the title, above the numbers it qualifies
        fig.update_layout(title=dict(text=esc("Throughput per setup (predicted for the setup's GPU; measured where "
                                              "recorded)") + "<br><span style='font-size:12px;color:#a33'>* "
                                     + esc("; ".join(flagged)) + "</span>"), margin=dict(t=100))
    return fig


# ---- serving (memplan.serve estimates, `memplan serve --measure` records) ------------------------------------------
KV_COLOR = "#FF6692"  # the KV cache: the next colour of plotly's default qualitative palette after COLORS'
SERVE_COLORS = {"weights": COLORS["weights"], "kv_cache": KV_COLOR, "activations": COLORS["activations"],
                "temporaries": COLORS["temporaries"], "overhead": COLORS["overhead"]}
NO_SERVE_CAPACITY = "No vLLM setup: KV blocks and maximum concurrency are vLLM's (a --setups table with " \
                    "kind = \"serve\" and engine = \"vllm\")."
NO_SERVE_SPEED = "No serving speed: give --gpu for the roofline, or serving records with a measured speed."


def serve_label(r: dict) -> str:
    """A serving setup's name, then its weights, engine and concurrency × (prompt + generation)."""
    what = " · ".join(str(x) for x in (r.get("serve_weights"), r.get("serve_engine")) if x)
    size = (f"{r['serve_concurrency']}×({r['serve_prompt_len']}+{r['serve_gen_len']})"
            if r.get("serve_concurrency") else "")
    extra = " · ".join(x for x in (what, size) if x)
    return esc(r["name"]) + (f"<br>{esc(extra)}" if extra else "")


def serve_memory(rows: list[dict], gpus: list, margin: float = DEFAULT_MARGIN) -> "go.Figure":
    """Memory per GPU of each serving setup by category (weights, KV cache, activations, temporaries, overhead:
    the estimate at the device level), the measurement beside it where recorded (by category where the CPU
    tracker attributed bytes, else its allocated and device levels), against each GPU's line and margin (and,
    without --gpu, the card each setup was estimated for)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    names = [serve_label(r) for r in rows]
    kind = "estimate (device)"
    for c, color in SERVE_COLORS.items():
        fig.add_bar(x=[names, [kind] * len(rows)], y=[_gib(r.get(f"est_{c}")) for r in rows], name=c,
                    legendgroup=c, marker_color=color, hovertemplate="%{x}<br>" + c + ": %{y:.2f} GiB<extra></extra>")
    totals = [(n, kind, r["est_device"], r) for n, r in zip(names, rows) if r.get("est_device") is not None]
    by_cat = [r for r in rows if r.get("meas_allocated") is not None and r.get("meas_activations") is not None]
    if by_cat:
        mk = "measured (allocated)"
        for c in ("weights", "kv_cache", "activations"):
            fig.add_bar(x=[[serve_label(r) for r in by_cat], [mk] * len(by_cat)],
                        y=[_gib(r[f"meas_{c}"]) for r in by_cat], name=c, legendgroup=c, showlegend=False,
                        marker=dict(color=SERVE_COLORS[c], pattern=dict(shape="/")),
                        hovertemplate="%{x}<br>measured " + c + ": %{y:.2f} GiB<extra></extra>")
        totals += [(serve_label(r), mk, r["meas_allocated"], r) for r in by_cat]
    totals += _device_bars(fig, [r for r in rows if r.get("meas_allocated") is not None
                                 and r.get("meas_activations") is None], serve_label)
    _totals(fig, totals, gpus, margin)
    lines = [(g.label, g.memory_bytes) for g in gpus]
    if not gpus:  # the cards the setups were estimated for
        lines = sorted({(r["gpu"], r["gpu_memory"]) for r in rows if r.get("gpu") and r.get("gpu_memory")})
    for i, (label, mem) in enumerate(lines):
        y = mem / GiB
        side = "top left" if i % 2 == 0 else "top right"
        fig.add_hline(y=y, line=dict(color="#d62728", dash="dash", width=1.5),
                      annotation_text=esc(f"{label}: {y:.1f} GiB"), annotation_position=side)
        fig.add_hline(y=y * (1 - margin), line=dict(color="#d62728", dash="dot", width=1),
                      annotation_text=esc(f"− {margin:.0%} margin"), annotation_font=dict(size=10, color="#a33"),
                      annotation_position=side.replace("top", "bottom"))
    top = max([_gib(t[2]) for t in totals] + [m / GiB for _, m in lines] + [0.0])
    return _layout(fig, "Serving: memory per GPU by category (estimate, and measured where recorded)",
                   barmode="stack", yaxis_title="peak GiB per GPU (level: under each bar)",
                   yaxis_range=[0, 1.18 * top] if top else None, height=600)


def serve_capacity(rows: list[dict]):
    """vLLM's paged cache per serving setup: KV blocks (of block_size tokens) and the maximum concurrency at
    --max-seq (vLLM's logged figure) and at prompt + generation; None when no setup is a vLLM one."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pts = [r for r in rows if r.get("vllm_num_blocks") is not None]
    if not pts:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=("KV blocks", "maximum concurrent sequences"),
                        horizontal_spacing=0.08)
    names = [serve_label(r) for r in pts]
    fig.add_bar(x=names, y=[r["vllm_num_blocks"] for r in pts], name="KV blocks", marker_color=KV_COLOR,
                text=[f"{r['vllm_num_blocks']:,} × {r['vllm_block_size']}" for r in pts], textposition="outside",
                cliponaxis=False, row=1, col=1, hovertemplate="%{x}: %{y:,} blocks<extra></extra>")
    fig.add_bar(x=names, y=[r["vllm_max_concurrency"] for r in pts], name="at --max-seq (vLLM's figure)",
                marker_color="#636EFA", text=[f"{r['vllm_max_concurrency']:.2f}" for r in pts],
                textposition="outside", cliponaxis=False, row=1, col=2,
                hovertemplate="%{x}: %{y:.2f} at max-seq<extra></extra>")
    fig.add_bar(x=names, y=[r["vllm_concurrency_at_seq"] for r in pts], name="at prompt + generation",
                marker_color="#00CC96", text=[r["vllm_concurrency_at_seq"] for r in pts], textposition="outside",
                cliponaxis=False, row=1, col=2, hovertemplate="%{x}: %{y} at prompt + gen<extra></extra>")
    return _layout(fig, "Serving: vLLM's KV blocks and maximum concurrency", barmode="group", height=500)


def serve_speed(rows: list[dict]):
    """Time to first token and decode tokens/s per sequence: the roofline bound for the setup's GPU (an upper
    bound on speed) and measured where recorded, a CPU measurement labelled as such; None when there is none."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pts = [r for r in rows if r.get("pred_ttft_s") is not None or r.get("meas_ttft_s") is not None]
    if not pts:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=("time to first token (s)", "decode tokens/s per sequence"),
                        horizontal_spacing=0.08)
    names = [serve_label(r) for r in pts]
    for col, key, fmt in ((1, "ttft_s", ".4f"), (2, "decode_tokens_per_s_per_seq", ",.1f")):
        for kind, color, label in (("pred", "#636EFA", "roofline (GPU profile)"), ("meas", "#EF553B", "measured")):
            ys = [r.get(f"{kind}_{key}") for r in pts]
            if not any(y is not None for y in ys):
                continue
            where = [("" if kind == "pred" or r.get("speed_clock") is None else f" · {r['speed_clock']}")
                     for r in pts]
            text = [None if y is None else format(y, fmt) + ("*" if "CPU" in w else "") for y, w in zip(ys, where)]
            fig.add_bar(x=names, y=ys, name=label, marker_color=color, legendgroup=kind, showlegend=col == 1,
                        row=1, col=col, text=text, textposition="outside", customdata=[esc(w) for w in where],
                        cliponaxis=False, hovertemplate="%{x}: %{y:" + fmt + "}%{customdata}<extra></extra>")
    title = "Serving speed (roofline for the setup's GPU; measured where recorded)"
    if any("CPU" in (r.get("speed_clock") or "") for r in pts):
        title = esc(title) + "<br><span style='font-size:12px;color:#a33'>* " + \
            esc("measured on the CPU: not comparable with a GPU's roofline") + "</span>"
    fig = _layout(fig, "", barmode="group", height=520)
    fig.update_layout(title=dict(text=title if "<br>" in title else esc(title)), margin=dict(t=100))
    return fig
