"""`memplan profiles list|show`: the model and GPU profiles."""
from __future__ import annotations

from typing import Annotated

import typer

from memplan.cli.options import Format, FormatOpt
from memplan.errors import MemplanError

app = typer.Typer(no_args_is_help=True, help="List and show model and GPU profiles.")


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
