"""The report's charts as plotly figures (plotly imported only here, only when a report is built).

Every piece of user text (setup names, file names, marks) reaches plotly HTML-escaped: plotly renders a subset
of HTML tags in labels and converts entities back to the literal characters, so an escaped name shows as
typed and cannot inject markup.
"""
from __future__ import annotations

import html

from memplan.categories import Category
from memplan.report.frames import MEASURED_PHASES
from memplan.units import GiB

# One colour per category, the same in every chart (plotly's default qualitative palette, in category order).
COLORS = {"weights": "#636EFA", "master_weights": "#AB63FA", "gradients": "#EF553B", "optimizer_states": "#FFA15A",
          "activations": "#00CC96", "temporaries": "#19D3F3", "overhead": "#B6B6B6"}
BANDS = (0.05, 0.15)  # estimate-vs-measured error bands: ±5% and ±15% of the measured value
MAX_TIMELINE_POINTS = 2000  # a trace timeline has one row per allocation; keep the page light


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def _gib(b):
    return None if b is None else b / GiB


def _layout(fig, title: str, **kw):
    fig.update_layout(title=dict(text=esc(title)), template="plotly_white", margin=dict(l=60, r=30, t=60, b=60),
                      legend=dict(orientation="h", y=-0.25), **kw)
    return fig


def _note(fig, text: str):
    """A chart with nothing to draw says so instead of vanishing."""
    fig.add_annotation(text=esc(text), xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                       font=dict(size=14, color="#666"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def memory_bars(rows: list[dict], gpus: list) -> "go.Figure":
    """Stacked per-category bars per setup: the estimate, and the measurement beside it where one exists,
    against horizontal lines at each chosen GPU's memory."""
    import plotly.graph_objects as go

    fig = go.Figure()
    names = [esc(r["name"]) for r in rows]
    for c in Category:
        fig.add_bar(x=[names, ["estimate"] * len(rows)], y=[_gib(r[f"est_{c.value}"]) for r in rows],
                    name=c.value, legendgroup=c.value, marker_color=COLORS[c.value],
                    hovertemplate="%{x}<br>" + c.value + ": %{y:.2f} GiB<extra></extra>")
    measured = [r for r in rows if r["meas_allocated"] is not None]
    by_cat = [r for r in measured if r["meas_weights"] is not None]
    if by_cat:  # the measuring tier attributed bytes to categories (the CPU tracker does)
        for c in Category:
            fig.add_bar(x=[[esc(r["name"]) for r in by_cat], ["measured"] * len(by_cat)],
                        y=[_gib(r[f"meas_{c.value}"]) for r in by_cat], name=c.value, legendgroup=c.value,
                        showlegend=False, marker=dict(color=COLORS[c.value], pattern=dict(shape="/")),
                        hovertemplate="%{x}<br>measured " + c.value + ": %{y:.2f} GiB<extra></extra>")
    plain = [r for r in measured if r["meas_weights"] is None]
    if plain:  # peaks only (CUDA): allocated, and the rest up to the device level where NVML gave it
        x = [[esc(r["name"]) for r in plain], ["measured"] * len(plain)]
        fig.add_bar(x=x, y=[_gib(r["meas_allocated"]) for r in plain], name="measured allocated",
                    marker=dict(color="#444", pattern=dict(shape="/")),
                    hovertemplate="%{x}<br>measured allocated: %{y:.2f} GiB<extra></extra>")
        fig.add_bar(x=x, y=[_gib((r["meas_device"] or r["meas_allocated"]) - r["meas_allocated"]) for r in plain],
                    name="measured device − allocated", marker=dict(color="#999", pattern=dict(shape="/")),
                    hovertemplate="%{x}<br>device − allocated: %{y:.2f} GiB<extra></extra>")
    for i, g in enumerate(gpus):
        y = g.memory_bytes / GiB
        fig.add_hline(y=y, line=dict(color="#d62728", dash="dash", width=1.5),
                      annotation_text=esc(f"{g.label}: {y:.1f} GiB"),
                      annotation_position="top left" if i % 2 == 0 else "top right")  # close lines: alternate
    return _layout(fig, "Peak memory per GPU by category (estimate, and measured where recorded)",
                   barmode="stack", yaxis_title="GiB", height=560)


def _band(fig, lo_hi, top: float, color: str, label: str):
    e = lo_hi
    xs = [0.0, top]
    # |estimate − measured| ≤ e·measured  ⇔  measured ∈ [estimate/(1+e), estimate/(1−e)]
    fig.add_scatter(x=xs, y=[x / (1 + e) for x in xs], mode="lines", line=dict(width=0), showlegend=False,
                    hoverinfo="skip")
    fig.add_scatter(x=xs, y=[x / (1 - e) for x in xs], mode="lines", line=dict(width=0), fill="tonexty",
                    fillcolor=color, name=label, hoverinfo="skip")


def estimate_vs_measured(rows: list[dict]) -> "go.Figure":
    """Estimated vs measured peak per record (allocated level, and device where measured), with ±5% / ±15%
    bands around equality."""
    import plotly.graph_objects as go

    fig = go.Figure()
    pts = [r for r in rows if r["meas_allocated"] is not None and r["est_allocated"] is not None]
    if not pts:
        return _layout(_note(fig, "No measured records: pass RESULTS.jsonl files written by `memplan measure`."),
                       "Estimate vs measured peak", height=420)
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
                text=[esc(r["name"]) for r in subset],
                customdata=[r[f"err_{level}_pct"] for r in subset],
                hovertemplate="%{text}<br>estimate %{x:.2f} GiB<br>measured %{y:.2f} GiB<br>"
                              "error %{customdata:+.1f}%<extra></extra>")
    return _layout(fig, "Estimate vs measured peak (GiB)", xaxis_title="estimated GiB", yaxis_title="measured GiB",
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
                   yaxis_title="GiB (allocated)", height=460)


def timeline_from_phases(row: dict, estimate: dict, measured: dict | None) -> "go.Figure":
    """Peak per phase of one setup: measured (peak and end of each phase) where a record has phases, and the
    estimate's phase peaks (allocated level)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    est = (estimate or {}).get("phase_peaks") or {}
    fig.add_bar(x=list(MEASURED_PHASES), y=[_gib(est.get(p)) for p in MEASURED_PHASES], name="estimated peak",
                marker_color="#636EFA", hovertemplate="%{x}: %{y:.2f} GiB<extra>estimate</extra>")
    phases = (measured or {}).get("phases") or {}
    if phases:
        fig.add_bar(x=list(MEASURED_PHASES), y=[_gib((phases.get(p) or {}).get("peak_allocated_bytes"))
                                                for p in MEASURED_PHASES],
                    name="measured peak", marker_color="#EF553B",
                    hovertemplate="%{x}: %{y:.2f} GiB<extra>measured peak</extra>")
        fig.add_scatter(x=list(MEASURED_PHASES), y=[_gib((phases.get(p) or {}).get("end_allocated_bytes"))
                                                    for p in MEASURED_PHASES],
                        name="measured at phase end", mode="lines+markers", line=dict(color="#444"),
                        hovertemplate="%{x}: %{y:.2f} GiB<extra>end of phase</extra>")
    what = "measured and estimated" if phases else "estimated"
    return _layout(fig, f"Peak memory by phase ({what}): {row['name']}", barmode="group",
                   yaxis_title="GiB (allocated)", height=440)


def throughput(rows: list[dict]) -> "go.Figure":
    """Tokens/s per GPU and MFU per setup: predicted by memplan's throughput model, measured where recorded."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pts = [r for r in rows if r["pred_tokens_per_s"] is not None or r["meas_tokens_per_s"] is not None]
    if not pts:
        return _layout(_note(go.Figure(), "No throughput: give --gpu to predict it, or records with a measured "
                                          "tokens/s."), "Throughput per setup", height=420)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("tokens/s per GPU", "MFU"), horizontal_spacing=0.08)
    names = [esc(r["name"]) for r in pts]
    for col, key, fmt in ((1, "tokens_per_s", ",.0f"), (2, "mfu", ".1%")):
        for kind, color in (("pred", "#636EFA"), ("meas", "#EF553B")):
            ys = [r[f"{kind}_{key}"] for r in pts]
            if any(y is not None for y in ys):
                fig.add_bar(x=names, y=ys, name="predicted" if kind == "pred" else "measured", marker_color=color,
                            legendgroup=kind, showlegend=col == 1, row=1, col=col,
                            hovertemplate="%{x}: %{y:" + fmt + "}<extra></extra>")
    fig.update_yaxes(tickformat=".0%", row=1, col=2)
    return _layout(fig, "Throughput per setup (predicted for the setup's GPU; measured where recorded)",
                   barmode="group", height=480)
