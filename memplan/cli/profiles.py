"""`memplan profiles list|show|add`: the model and GPU profiles (add: memplan.trace.add_profile)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from memplan.cli.options import Format, FormatOpt
from memplan.errors import MemplanError

app = typer.Typer(no_args_is_help=True, help="List, show and add model and GPU profiles.")


@app.command("list")
def profiles_list(kind: Annotated[str, typer.Argument(help="models | gpus | all")] = "all",
                  fmt: FormatOpt = Format.table):
    """List model and GPU profiles."""
    from memplan import profiles, render

    if kind not in ("models", "gpus", "all"):
        raise MemplanError(f"unknown profile kind '{kind}' (models, gpus or all)")
    rows = []
    if kind in ("models", "all"):
        for k in profiles.model_keys():
            m = profiles.load_model(k)
            rows.append({"kind": "model", "name": k, "type": m.model_type, "params": m.total_params,
                         "aliases": ", ".join(m.aliases)})
    if kind in ("gpus", "all"):
        for k in profiles.gpu_keys():
            g = profiles.load_gpu(k)
            rows.append({"kind": "gpu", "name": k, "type": g.label, "params": g.memory_bytes,
                         "aliases": ", ".join(g.aliases)})
    if fmt is Format.json:
        typer.echo(render.to_json(rows))
    elif fmt is Format.csv:
        typer.echo(render.to_csv(rows), nl=False)
    else:
        for r in rows:
            size = f"{r['params'] / 1e9:7.2f} B params" if r["kind"] == "model" else f"{r['params'] / 2**30:7.1f} GiB"
            typer.echo(f"{r['kind']:<6}{r['name']:<22}{r['type']:<28}{size}   {r['aliases']}")


@app.command("show")
def profiles_show(name: Annotated[str, typer.Argument(help="Model or GPU profile key or alias.")]):
    """Show one profile's file (source, aliases, numbers)."""
    from memplan import profiles

    kind, key, path = profiles.find_profile(name)
    typer.echo(path.read_text().rstrip())
    if kind == "models":
        m = profiles.load_model(key)
        typer.echo(f"# memplan counts {m.total_params:,} parameters; largest tensor {m.largest_tensor:,}")


@app.command("add")
def profiles_add(
    source: Annotated[str, typer.Argument(help="A config.json, or a model folder holding one (save_pretrained's).")],
    key: Annotated[Optional[str], typer.Option("--key", help="Profile key [default: the folder's name].")] = None,
    alias: Annotated[Optional[list[str]], typer.Option(
        "--alias", help="Another name for --model (repeatable), e.g. the Hub repo id.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a user profile of the same key.")] = False,
    check_trace: Annotated[bool, typer.Option(
        "--check-trace", help="Then trace one small step (batch 1, seq 256) and print the estimate's error.")] = False,
):
    """Add a user model profile from a config.json, checked against transformers on the meta device.

    Needs the torch extra. Writes to $MEMPLAN_PROFILES/models, else ~/.config/memplan/profiles/models.
    Example: memplan profiles add ./my-model --key my-llama
    """
    from memplan.trace.add_profile import add_profile

    added = add_profile(source, key=key, aliases=alias or (), force=force)
    typer.echo(f"wrote {added.path}: {added.key}, {added.params:,} parameters; memplan's spec equals transformers' "
               f"{added.model_class} (count, every linear, norms, positions)")
    typer.echo(f"use it: memplan estimate --model {added.key}")
    if check_trace:
        from memplan.trace.add_profile import check_trace as run_check

        est, tr = run_check(added.key)
        e, t = est.peak.allocated_bytes, tr.peak.allocated_bytes
        typer.echo(f"trace check ({est.setup.precision.value}, {est.setup.optimizer.value}, batch 1, seq "
                   f"{est.setup.seq}): estimate {e / 2**20:,.1f} MiB, trace {t / 2**20:,.1f} MiB allocated at the "
                   f"peak, error {(e - t) / t:+.1%}")
