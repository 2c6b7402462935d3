"""One self-contained HTML page: plotly.js embedded (no external URL, works from file:// and offline), the
charts, and a sortable table (plain JavaScript) of every number.

Escaping: user text in HTML goes through html.escape; JSON inside <script> has <, >, & and the JS line
separators as \\u escapes, so no "</script>" or "<!--" can close or confuse the script element.
The page records window errors, unhandled promise rejections and console.error calls in #memplan-errors and
sets data-rendered on <body> once every chart is drawn: the browser test reads both from the DOM.
"""
from __future__ import annotations

import html
import json

from memplan.units import GiB

_JS_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em;margin-bottom:4px} h2{font-size:1.15em;margin-top:28px}
.meta,.note{color:#555;font-size:.9em} .chart{width:100%;min-height:400px;border:1px solid #eee;margin:8px 0}
table{border-collapse:collapse;font-size:.8em;display:block;overflow-x:auto;white-space:nowrap}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right} td.t,th{text-align:left}
th{background:#f4f4f4;cursor:pointer;position:sticky;top:0} th.asc::after{content:" \\25B2"}
th.desc::after{content:" \\25BC"} tr:nth-child(even){background:#fafafa}
#memplan-errors{color:#b00;white-space:pre-wrap}
"""

# Before anything else runs: collect errors into the page, where a headless browser's --dump-dom shows them.
ERROR_HOOK = """
window.__memplanErrors = [];
function __memplanRecord(msg) {
  window.__memplanErrors.push(String(msg));
  var el = document.getElementById("memplan-errors");
  if (el) { el.textContent = window.__memplanErrors.join("\\n"); }
}
window.addEventListener("error", function (e) { __memplanRecord("error: " + (e.message || e)); });
window.addEventListener("unhandledrejection", function (e) { __memplanRecord("unhandled rejection: " + e.reason); });
(function () {
  var original = console.error;
  console.error = function () {
    __memplanRecord("console.error: " + Array.prototype.join.call(arguments, " "));
    return original.apply(console, arguments);
  };
})();
"""

RENDER = """
(function () {
  var figs = JSON.parse(document.getElementById("memplan-figures").textContent);
  var ids = Object.keys(figs);
  Promise.all(ids.map(function (id) {
    return Plotly.newPlot(id, figs[id].data, figs[id].layout, {responsive: true, displaylogo: false});
  })).then(function () {
    document.body.setAttribute("data-rendered", String(ids.length));
  }, function (e) { __memplanRecord("plot failed: " + e); });
  if (window.__memplanErrors.length) { __memplanRecord("(errors before load)"); }
})();
"""

SORT = """
(function () {
  var table = document.getElementById("memplan-table");
  var heads = table.tHead.rows[0].cells;
  function key(td) { return td.getAttribute("data-v"); }
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var desc = th.classList.contains("asc");
      Array.prototype.forEach.call(heads, function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(desc ? "desc" : "asc");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var numeric = rows.every(function (r) { var v = key(r.cells[col]); return v === "" || !isNaN(Number(v)); });
      rows.sort(function (a, b) {
        var x = key(a.cells[col]), y = key(b.cells[col]);
        if (x === "" || y === "") { return x === y ? 0 : (x === "" ? 1 : -1); }  // blanks last
        var c = numeric ? Number(x) - Number(y) : x.localeCompare(y);
        return desc ? -c : c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  // a link to a sorted view: page.html#sort=est_device (ascending) or #sort=est_device-desc
  var m = /^#sort=(.+?)(-desc)?$/.exec(decodeURIComponent(location.hash));
  Array.prototype.forEach.call(heads, function (th) {
    if (m && th.getAttribute("data-key") === m[1]) { th.click(); if (m[2]) { th.click(); } }
  });
})();
"""


def script_json(obj) -> str:
    """JSON safe inside a <script> element."""
    text = obj if isinstance(obj, str) else json.dumps(obj)
    for ch, rep in _JS_ESCAPES.items():
        text = text.replace(ch, rep)
    return text


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def _cell(key: str, v) -> tuple[str, str]:
    """(display text, sort value) of one table cell."""
    if v is None:
        return "", ""
    if isinstance(v, bool):
        return ("yes" if v else "no"), str(int(v))
    if isinstance(v, (int, float)):
        if key.endswith("_pct"):
            return f"{v:+.1f}%", repr(v)
        if key.endswith("_mfu"):
            return f"{100 * v:.1f}%", repr(v)
        if key.endswith("tokens_per_s"):
            return f"{v:,.0f}", repr(v)
        if "tokens_per_s" in key:  # serving: decode tokens/s per sequence
            return f"{v:,.1f}", repr(v)
        if key.endswith("_step_s"):
            return f"{v:.3f}", repr(v)
        if key.endswith("_ttft_s"):  # serving: time to first token
            return f"{v:.4f}", repr(v)
        if key.startswith("vllm_"):  # serving: vLLM's blocks and concurrency (counts, not bytes)
            return (f"{v:,}" if isinstance(v, int) else f"{v:,.2f}"), repr(v)
        if key.startswith(("est_", "meas_")) or key == "headroom":
            return f"{v / GiB:.2f}", repr(v)
        return f"{v:,}" if isinstance(v, int) else f"{v:.4g}", repr(v)
    return str(v), str(v)


def header(key: str) -> str:
    """Column headings name the unit: byte columns are shown in GiB (the sort uses exact bytes)."""
    if (key.startswith(("est_", "meas_")) and not key.endswith(("_phase", "tokens_per_s", "_mfu", "_step_s",
                                                                 "_ttft_s", "tokens_per_s_per_seq"))) \
            or key == "headroom":
        return f"{key} (GiB)"
    return key


def table(rows: list[dict], table_id: str = "memplan-table") -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f'<th data-key="{esc(k)}">{esc(header(k))}</th>' for k in keys)
    body = []
    for r in rows:
        cells = []
        for k in keys:
            text, sort = _cell(k, r.get(k))
            cls = "" if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) else ' class="t"'
            cells.append(f'<td{cls} data-v="{esc(sort)}">{esc(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="{esc(table_id)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def page(title: str, figures: dict, rows: list[dict], notes: list[str], meta: str, ranks: list[dict] = ()) -> str:
    """The whole page. figures: {div id: (heading, plotly figure JSON string, or None: the note says why)}; ranks:
    one row per rank of the multi-GPU records (memplan.report.frames.rank_table_rows), a table of their own."""
    from plotly.offline import get_plotlyjs

    plotly_js = get_plotlyjs()
    if "</script" in plotly_js.lower():  # cannot happen with a released bundle; checked, not assumed
        plotly_js = plotly_js.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    charts = "".join(f'<h2>{esc(h)}</h2>' + (f'<div class="chart" id="{esc(i)}"></div>' if j is not None
                                             else f'<p class="note empty" id="{esc(i)}">{esc(why)}</p>')
                     for i, (h, j, why) in figures.items())
    figs = "{" + ",".join(f"{json.dumps(i)}:{j}" for i, (_, j, _w) in figures.items() if j is not None) + "}"
    note_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>",
        f"<style>{CSS}</style><script>{ERROR_HOOK}</script><script>{plotly_js}</script></head><body>",
        f"<h1>{esc(title)}</h1><p class=\"meta\">{esc(meta)}</p>",
        f"<ul class=\"note\">{note_html}</ul>" if notes else "",
        '<pre id="memplan-errors"></pre>', charts,
        "<h2>Every number</h2><p class=\"note\">Click a heading to sort (or open page.html#sort=COLUMN, "
        "#sort=COLUMN-desc). Bytes are shown in GiB (2<sup>30</sup> B); "
        "err_* = (estimate − measured) / measured.</p>", table(rows),
        ("<h2>Per rank (multi-GPU records)</h2><p class=\"note\">Each rank's measured peaks; err_* against the "
         "estimate, which is the worst rank's (every rank is held to it); err_roomy_reserved_pct against the "
         "reserved level on a roomy GPU (FSDP2's side-stream pools).</p>" + table(list(ranks), "memplan-ranks"))
        if ranks else "",
        f'<script type="application/json" id="memplan-figures">{script_json(figs)}</script>',
        f"<script>{RENDER}</script><script>{SORT}</script></body></html>\n",
    ])
