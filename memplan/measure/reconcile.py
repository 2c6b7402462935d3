"""Estimate against measurement, per record: each memory level, each phase's allocated peak, each category (where
the measuring tier attributes bytes: the CPU tracker), absolute and relative error; a summary (median and max
|error| per level, and by feature); the rows behind `memplan reconcile`. Pure Python (no torch).

error = estimate − measured (bytes); error % = 100 · (estimate − measured) / measured: positive means memplan
over-estimates. By default the estimate is recomputed with the current estimator (`estimate="current"`), so
old records keep testing new code; `estimate="recorded"` uses the estimate stored in the record when it was made.
"""
from __future__ import annotations

import statistics

from memplan.categories import ALLOCATED_CATEGORIES, Phase
from memplan.errors import MemplanError

LEVELS = ("allocated", "reserved", "device")
FEATURES = ("precision", "peft", "checkpointing", "attention", "optimizer")


def current_estimate(rec: dict) -> dict:
    """The current estimator's Result.to_dict() for a record's model, setup and GPU profile; under FSDP2 with the
    reserved level on a roomy GPU (`roomy_reserved`, memplan.estimate.pools), what a measured reserved peak is
    compared with too."""
    from memplan.estimate import estimate_spec, pools
    from memplan.spec.values import resolve_gpu, setup_from_dict

    gpu = (rec.get("gpu") or {}).get("profile")
    model = record_model(rec)
    return pools.with_roomy(model, estimate_spec(model, setup_from_dict(rec["setup"]),
                                                 resolve_gpu(gpu) if gpu else None)).to_dict()


def record_model(rec: dict):
    """The record's model: from the config it carries (`memplan measure -- COMMAND` stores the run's own,
    memplan.measure.wrap), else by its name (a profile key, alias or config path)."""
    from memplan.spec.families import spec_from_config
    from memplan.spec.values import resolve_model

    if isinstance(rec.get("model_config"), dict):
        return spec_from_config(rec["model_config"], rec["model"])
    if rec.get("source") == "wrapped":
        raise MemplanError((rec.get("wrapped") or {}).get("estimate_note") or "the wrapped run showed no model config")
    return resolve_model(rec["model"])


def _err(est, meas):
    if est is None or meas is None:
        return None, None
    return est - meas, (100.0 * (est - meas) / meas if meas else None)


def _less(measured, held: int):
    return None if measured is None else measured - held


def compare(rec: dict, estimate: str = "current") -> dict:
    """One flat row: setup features, status, and estimate / measured / error per level, phase and category (a
    serving record: compare_serve)."""
    if rec.get("kind") == "serve":
        return compare_serve(rec, estimate)
    s = rec.get("setup") or {}
    row = {"name": rec.get("name"), "model": rec.get("model"), "record_id": rec.get("record_id"),
           "device": rec.get("device"), "gpu": (rec.get("gpu") or {}).get("profile"), "status": rec.get("status"),
           "failed_phase": rec.get("failed_phase"), **{f: s.get(f) for f in FEATURES},
           "batch": s.get("batch"), "seq": s.get("seq"), "note": None}
    try:
        est = current_estimate(rec) if estimate == "current" else rec.get("estimate")
    except MemplanError as exc:
        est, row["note"] = None, f"estimate failed: {exc}"
    if est is None and row["note"] is None:
        row["note"] = "no estimate in the record"
    m = rec.get("measured") or {}
    mp = m.get("peak") or {}
    ep = (est or {}).get("peak") or {}
    # The cuBLAS / cuBLASLt workspaces torch keeps in the caching allocator sit inside the measured allocated
    # peaks; the estimate and the trace count the step's own tensors there and the workspace at the reserved level
    # (memplan.estimate.overhead), so the allocated level and the phase peaks compare without it.
    blas = m.get("blas_workspace_bytes") or 0
    row["meas_blas_workspace_bytes"] = m.get("blas_workspace_bytes")
    for lv in LEVELS:
        e, x = ep.get(f"{lv}_bytes"), _less(mp.get(f"{lv}_bytes"), blas if lv == "allocated" else 0)
        row[f"est_{lv}_bytes"], row[f"meas_{lv}_bytes"] = e, x
        row[f"err_{lv}_bytes"], row[f"err_{lv}_pct"] = _err(e, x)
    row["est_peak_phase"], row["meas_peak_phase"] = ep.get("phase"), mp.get("phase")
    roomy = (est or {}).get("roomy_reserved")
    if roomy:  # FSDP2: the side-stream pools stay reserved on a roomy GPU (memplan.estimate.pools)
        row["est_roomy_reserved_bytes"] = roomy["bytes"]
        row["err_roomy_reserved_bytes"], row["err_roomy_reserved_pct"] = _err(roomy["bytes"],
                                                                              row["meas_reserved_bytes"])
    phases = m.get("phases") or {}
    for p in Phase:
        e = ((est or {}).get("phase_peaks") or {}).get(p.value)
        x = _less((phases.get(p.value) or {}).get("peak_allocated_bytes"), blas)
        row[f"est_{p.value}_bytes"], row[f"meas_{p.value}_bytes"] = e, x
        row[f"err_{p.value}_pct"] = _err(e, x)[1]
    cats = m.get("categories")
    if cats:
        for c in ALLOCATED_CATEGORIES:
            e = ((est or {}).get("categories") or {}).get(c.value)
            row[f"est_{c.value}_bytes"], row[f"meas_{c.value}_bytes"] = e, cats.get(c.value)
            row[f"err_{c.value}_bytes"] = _err(e, cats.get(c.value))[0]
    if est is not None and "fits" in est:
        row["est_fits"] = est["fits"]
        row["fit_agrees"] = None if row["status"] == "error" else (est["fits"] == (row["status"] == "ok"))
    row.update(rank_summary(rec))
    row["tokens_per_s"] = m.get("tokens_per_s")
    row["mfu"] = m.get("mfu")
    # predicted speed (memplan.estimate.throughput) for records measured on a profiled GPU; none for CPU records
    from memplan.measure.utilization import throughput_comparison

    tc = throughput_comparison([rec])
    pred = tc[0]["predicted_tokens_per_s"] if tc else None
    row["pred_tokens_per_s"], row["err_tokens_per_s_pct"] = pred, _err(pred, row["tokens_per_s"])[1]
    return row


# ---- serving records (kind "serve", memplan.measure.serve) -------------------------------------------------------
SERVE_QUANTITIES = ("weights", "kv_cache", "activations", "ttft", "decode")
CPU_SPEED = "cpu: perf_counter on the CPU, no GPU roofline to compare with"


def current_serve_estimate(rec: dict) -> dict:
    """The current serve estimate's ServeResult.to_dict() for a serving record's model, setup and GPU profile."""
    from dataclasses import fields

    from memplan.serve import ServeSetup, estimate_serve
    from memplan.spec.values import resolve_gpu, resolve_model

    gpu = (rec.get("gpu") or {}).get("profile")
    names = {f.name for f in fields(ServeSetup)}
    setup = ServeSetup(**{k: v for k, v in (rec.get("setup") or {}).items() if k in names})
    return estimate_serve(resolve_model(rec["model"]), setup, resolve_gpu(gpu) if gpu else None).to_dict()


def compare_serve(rec: dict, estimate: str = "current") -> dict:
    """One flat row of a serving record: the levels (as compare), then weights (the parameters' bytes), the KV
    cache (at the peak where the CPU tracker tagged it, else the cache at the end), activations and temporaries
    (CPU: the peak less weights, KV cache and inputs), time to first token and decode tokens/s per sequence
    against the roofline of the record's GPU (none for a CPU record: `speed` says so)."""
    s = rec.get("setup") or {}
    row = {"name": rec.get("name"), "model": rec.get("model"), "record_id": rec.get("record_id"), "kind": "serve",
           "device": rec.get("device"), "gpu": (rec.get("gpu") or {}).get("profile"), "status": rec.get("status"),
           "failed_phase": rec.get("failed_phase"), **{f: None for f in FEATURES},
           **{k: s.get(k) for k in ("weights", "kv_dtype", "hf_cache", "concurrency", "prompt_len", "gen_len",
                                    "max_seq")}, "note": None}
    try:
        est = current_serve_estimate(rec) if estimate == "current" else rec.get("estimate")
    except (MemplanError, TypeError) as exc:
        est, row["note"] = None, f"estimate failed: {exc}"
    if est is None and row["note"] is None:
        row["note"] = "no estimate in the record"
    est = est or {}
    m = rec.get("measured") or {}
    mp, ep = m.get("peak") or {}, est.get("peak") or {}
    for lv in LEVELS:
        e, x = ep.get(f"{lv}_bytes"), mp.get(f"{lv}_bytes")
        row[f"est_{lv}_bytes"], row[f"meas_{lv}_bytes"] = e, x
        row[f"err_{lv}_bytes"], row[f"err_{lv}_pct"] = _err(e, x)
    row["est_peak_phase"], row["meas_peak_phase"] = ep.get("phase"), mp.get("phase")
    for p in ("prefill", "decode"):
        row[f"meas_{p}_bytes"] = ((m.get("phases") or {}).get(p) or {}).get("peak_allocated_bytes")
    ec, mc = est.get("categories") or {}, m.get("categories") or {}
    kv = mc.get("kv_cache") if mc.get("kv_cache") is not None else m.get("kv_cache_bytes")
    act = None if ec.get("activations") is None else ec["activations"] + (ec.get("temporaries") or 0)
    for q, e, x in (("weights", (est.get("weights") or {}).get("total"), m.get("weights_bytes")),
                    ("kv_cache", ec.get("kv_cache"), kv),
                    ("activations", act, mc.get("activations"))):
        row[f"est_{q}_bytes"], row[f"meas_{q}_bytes"] = e, x
        row[f"err_{q}_bytes"], row[f"err_{q}_pct"] = _err(e, x)
    thr = est.get("throughput") or {}
    cpu = rec.get("device") == "cpu"
    row["speed"] = CPU_SPEED if cpu else (f"roofline of {row['gpu']}" if thr else "no GPU profile: no roofline")
    pred_ttft = None if cpu else thr.get("ttft_s")
    pred_dec = None if cpu else thr.get("tokens_per_s_per_seq")
    row.update(meas_ttft_s=m.get("ttft_s"), pred_ttft_s=pred_ttft, err_ttft_pct=_err(pred_ttft, m.get("ttft_s"))[1],
               meas_decode_tokens_per_s_per_seq=m.get("decode_tokens_per_s_per_seq"),
               pred_decode_tokens_per_s_per_seq=pred_dec,
               err_decode_pct=_err(pred_dec, m.get("decode_tokens_per_s_per_seq"))[1],
               meas_decode_tokens_per_s=m.get("decode_tokens_per_s"), tokens_per_s=None, mfu=None)
    return row


def serve_lines(rows: list[dict]) -> list[str]:
    """Text lines for the serving rows: memory per quantity (estimate, measured, error), then speed."""
    lines = []
    for r in rows:
        if r.get("kind") != "serve":
            continue
        lines.append(f"{r['name'] or r['model']} [serve {r['device']}] {r['status']}"
                     + (f" in {r['failed_phase']}" if r.get("failed_phase") else "")
                     + f" · {r['weights']} · {r['hf_cache']} cache · {r['concurrency']} × (prompt {r['prompt_len']}"
                     f" + gen {r['gen_len']})" + (f"  ({r['note']})" if r.get("note") else ""))
        lines.append(f"  {'':<14}{'estimate':>14}{'measured':>14}{'error':>9}")
        for q in ("allocated", "reserved", "device", "weights", "kv_cache", "activations"):
            if r.get(f"est_{q}_bytes") is None and r.get(f"meas_{q}_bytes") is None:
                continue
            lines.append(f"  {q:<14}{fmt_bytes(r.get(f'est_{q}_bytes')):>14}{fmt_bytes(r.get(f'meas_{q}_bytes')):>14}"
                         f"{fmt_pct(r.get(f'err_{q}_pct')):>9}")
        if r.get("meas_ttft_s") is not None:
            pt, pd = r.get("pred_ttft_s"), r.get("pred_decode_tokens_per_s_per_seq")
            lines.append(f"  time to first token {r['meas_ttft_s']:.4f} s"
                         + (f" (roofline {pt:.4f} s)" if pt is not None else "")
                         + f"; decode {r['meas_decode_tokens_per_s_per_seq'] or 0:,.1f} tokens/s per sequence"
                         + (f" (roofline {pd:,.1f})" if pd is not None else "")
                         + f", {r['meas_decode_tokens_per_s'] or 0:,.1f} in all — {r['speed']}")
    return lines


def rank_summary(rec: dict) -> dict:
    """A multi-rank record's per-rank figures in one row (the levels above are the max over ranks, what the
    estimate's worst rank is held to): the number of ranks, the worst rank (largest allocated peak), the least
    rank's allocated peak and the spread between them, the job's tokens/s. Empty for one device's record."""
    ranks = [e for e in rec.get("ranks") or [] if (e.get("measured") or {}).get("peak")]
    if not rec.get("ranks"):
        return {}
    peaks = [e["measured"]["peak"].get("allocated_bytes") for e in ranks]
    peaks = [p for p in peaks if p is not None]
    hi, lo = (max(peaks), min(peaks)) if peaks else (None, None)
    m = rec.get("measured") or {}
    return {"ranks": len(rec["ranks"]), "worst_rank": m.get("worst_rank"), "meas_min_rank_allocated_bytes": lo,
            "rank_spread_pct": 100.0 * (hi - lo) / hi if hi else None,
            "tokens_per_s_total": m.get("tokens_per_s_total")}


def rank_rows(rec: dict, est_row: dict | None = None) -> list[dict]:
    """One row per rank of a multi-rank record: status, allocated peak and its phase, each phase's allocated
    peak, tokens/s (empty for one device's record). With the record's compare() row, each rank's error against the
    estimate (of the worst rank, what every rank is held to) at the allocated and reserved levels, and under FSDP2
    against the roomy reserved level (err_roomy_reserved_pct)."""
    out = []
    for e in rec.get("ranks") or []:
        m = e.get("measured") or {}
        pk = m.get("peak") or {}
        row = {"name": rec.get("name"), "model": rec.get("model"), "record_id": rec.get("record_id"),
               "rank": e.get("rank"), "status": e.get("status"), "failed_phase": e.get("failed_phase"),
               "meas_allocated_bytes": pk.get("allocated_bytes"), "meas_reserved_bytes": pk.get("reserved_bytes"),
               "meas_device_bytes": pk.get("device_bytes"), "meas_peak_phase": pk.get("phase")}
        for p in Phase:
            row[f"meas_{p.value}_bytes"] = ((m.get("phases") or {}).get(p.value) or {}).get("peak_allocated_bytes")
        row["tokens_per_s"] = m.get("tokens_per_s")
        row["worst"] = e.get("rank") == (rec.get("measured") or {}).get("worst_rank")
        out.append(row)
    top_blas = (rec.get("measured") or {}).get("blas_workspace_bytes")
    for r, e in zip(out, rec.get("ranks") or []) if est_row is not None else ():
        # the cuBLAS workspace inside a CUDA rank's allocated peak is compared without it, as in compare()
        blas = (e.get("measured") or {}).get("blas_workspace_bytes", top_blas) or 0
        for lv in ("allocated", "reserved"):
            r[f"est_{lv}_bytes"] = est_row.get(f"est_{lv}_bytes")
            meas = _less(r[f"meas_{lv}_bytes"], blas if lv == "allocated" else 0)
            r[f"err_{lv}_pct"] = _err(r[f"est_{lv}_bytes"], meas)[1]
        if "est_roomy_reserved_bytes" in est_row:
            r["est_roomy_reserved_bytes"] = est_row["est_roomy_reserved_bytes"]
            r["err_roomy_reserved_pct"] = _err(r["est_roomy_reserved_bytes"], r["meas_reserved_bytes"])[1]
    return out


LEFT = ("rank", "status")  # rank_table's left-aligned columns


def _rank_columns(errs: bool, reserved: bool, roomy: bool) -> list[tuple]:
    """rank_table's columns (header, width, cell of a rank_rows row): the errors with the compare() rows, the
    reserved level where ranks measured one (CUDA), the roomy reserved level's error under FSDP2."""
    tps = (lambda r: "–" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}")
    cols = [("rank", 6, lambda r: r["rank"]), ("status", 8, lambda r: r["status"]),
            ("allocated", 12, lambda r: fmt_bytes(r["meas_allocated_bytes"])),
            *([("err", 8, lambda r: fmt_pct(r["err_allocated_pct"]))] if errs else []),
            ("forward", 12, lambda r: fmt_bytes(r["meas_forward_bytes"])),
            ("backward", 12, lambda r: fmt_bytes(r["meas_backward_bytes"])),
            ("optimizer", 12, lambda r: fmt_bytes(r["meas_optimizer_step_bytes"]))]
    if reserved:
        cols.append(("reserved", 12, lambda r: fmt_bytes(r["meas_reserved_bytes"])))
        cols += [("err", 8, lambda r: fmt_pct(r["err_reserved_pct"]))] if errs else []
    cols += [("vs roomy", 10, lambda r: fmt_pct(r.get("err_roomy_reserved_pct")))] if roomy else []
    return cols + [("tokens/s", 11, tps)]


def rank_table(recs: list[dict], rows: list[dict] | None = None) -> list[str]:
    """Text lines: every multi-rank record's ranks (allocated peak per rank and phase, the worst rank marked). With
    the records' compare() rows (same order), each rank's allocated error, and where ranks measured a reserved level
    (CUDA), each rank's reserved peak and, under FSDP2, its error against the roomy reserved level."""
    lines = []
    for k, rec in enumerate(recs):
        est = rows[k] if rows is not None else None
        rrows = rank_rows(rec, est)
        if not rrows:
            continue
        head = f"{rec.get('name') or rec.get('model')}: {len(rrows)} rank(s) (figures above: the max over ranks)"
        if est is not None and "est_roomy_reserved_bytes" in est and est["meas_reserved_bytes"] is not None:
            head += (f"; reserved on a roomy GPU (side-stream pools): estimate "
                     f"{fmt_bytes(est['est_roomy_reserved_bytes'])}, worst rank "
                     f"{fmt_bytes(est['meas_reserved_bytes'])} ({fmt_pct(est['err_roomy_reserved_pct'])})")
        lines.append(head)
        reserved = any(r["meas_reserved_bytes"] is not None for r in rrows)
        cols = _rank_columns(est is not None, reserved,
                             reserved and any("err_roomy_reserved_pct" in r for r in rrows))
        lines.append("  " + "".join(f"{h:{'<' if h in LEFT else '>'}{w}}" for h, w, _ in cols))
        for r in rrows:
            lines.append("  " + "".join(f"{cell(r):{'<' if h in LEFT else '>'}{w}}" for h, w, cell in cols)
                         + ("  worst" if r["worst"] else ""))
    return lines


def _stats(vals: list[float]) -> dict:
    a = [abs(v) for v in vals]
    return {"n": len(vals), "median_abs_pct": statistics.median(a) if a else None, "max_abs_pct": max(a) if a else None,
            "mean_pct": statistics.fmean(vals) if vals else None}


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    out = {"records": len(rows), "ok": len(ok), "oom": sum(r["status"] == "oom" for r in rows),
           "error": sum(r["status"] == "error" for r in rows), "levels": {}, "by_feature": {}}
    for lv in LEVELS:
        out["levels"][lv] = _stats([r[f"err_{lv}_pct"] for r in ok if r.get(f"err_{lv}_pct") is not None])
    serve = [r for r in ok if r.get("kind") == "serve"]
    if serve:  # serving records: each quantity's |error| (speed only against a GPU's roofline, never a CPU's)
        out["serve"] = {q: _stats([r[f"err_{q}_pct"] for r in serve if r.get(f"err_{q}_pct") is not None])
                        for q in SERVE_QUANTITIES}
    ok = [r for r in ok if r.get("kind") != "serve"]
    for f in FEATURES:
        groups: dict = {}
        for r in ok:
            if r.get("err_allocated_pct") is not None:
                groups.setdefault(str(r.get(f)), []).append(r["err_allocated_pct"])
        out["by_feature"][f] = {k: _stats(v) for k, v in sorted(groups.items())}
    roomy = [r["err_roomy_reserved_pct"] for r in ok if r.get("err_roomy_reserved_pct") is not None]
    if roomy:  # FSDP2 records' measured reserved against the roomy reserved level (memplan.estimate.pools)
        out["roomy_reserved"] = _stats(roomy)
    speed = [r["err_tokens_per_s_pct"] for r in ok if r.get("err_tokens_per_s_pct") is not None]
    if speed:
        out["tokens_per_s"] = _stats(speed)
    fits = [r for r in rows if r.get("fit_agrees") is not None]
    if fits:
        out["fit_agreement"] = {"n": len(fits), "agree": sum(bool(r["fit_agrees"]) for r in fits)}
    return out


def worst(rows: list[dict], level: str = "allocated") -> dict | None:
    """The ok record with the largest |error %| at `level`."""
    cand = [r for r in rows if r["status"] == "ok" and r.get(f"err_{level}_pct") is not None]
    return max(cand, key=lambda r: abs(r[f"err_{level}_pct"]), default=None)


def fmt_bytes(n) -> str:
    if n is None:
        return "–"
    return f"{n / 2**20:.1f} MiB" if abs(n) < 2**30 else f"{n / 2**30:.2f} GiB"


def fmt_pct(x) -> str:
    return "–" if x is None else f"{x:+.1f}%"
