"""memplan.cli.coerce converts option values exactly as typer's pydantic adapters do, on every option of every
command, and the estimate command no longer imports pydantic."""
import subprocess
import sys
from enum import Enum

import pytest

typer_coercion = pytest.importorskip("typer._coercion")

from memplan.cli import command  # noqa: E402
from memplan.cli.coerce import LiteCoercion, _MISS  # noqa: E402

# Values a command line or a default gives: plain ones (converted by LiteCoercion) and corner cases (handed to
# the adapter, which accepts or refuses them itself).
TEXTS = ["0", "7", "-3", "123456789012345678", "1.5", "-0.25", "0.1", "3.0", "x", "", " 7", "1_000", "007", "+4",
         "1e3", "inf", "nan", "1.", ".5", "true", "no", "sdpa", "SDPA", "json", "table", "bf16"]


CMD = command()  # built once: every test reads the same tree


def _params():
    cmd = CMD
    out = []
    for name, sub in cmd.commands.items():
        subs = sub.commands.items() if hasattr(sub, "commands") else [(name, sub)]
        for sub_name, leaf in subs:
            out += [(f"{name}:{sub_name}:{p.name}", p) for p in leaf.params if hasattr(p, "type_descriptor")]
    return out


def _values(p):
    ann = p.type_descriptor.annotation
    vals = [None, *TEXTS, 3, 2.5, True, False]
    if isinstance(ann, type) and issubclass(ann, Enum):
        vals += [m.value for m in ann] + list(ann) + [str(m.value).upper() for m in ann]
    if p.multiple or p.nargs == -1:
        vals = [None, (), ("a", "b"), ["x"], ("a", 1), "abc"]
    return vals


def _outcome(rt, value, p, ctx):
    try:
        v = rt.coerce(value, param=p, ctx=ctx)
        return "ok", type(v), repr(v)  # repr: nan equals itself
    except Exception as exc:  # the refusal and its message must be typer's own
        return "err", type(exc), str(exc)


@pytest.mark.parametrize("name,p", _params(), ids=lambda x: x if isinstance(x, str) else "")
def test_lite_coercion_equals_typer(name, p):
    from typer._click import Context

    ctx = Context(CMD)
    full = typer_coercion.build_runtime_param(p.type_descriptor)
    lite = LiteCoercion(p.type_descriptor)
    for value in _values(p):
        assert _outcome(lite, value, p, ctx) == _outcome(full, value, p, ctx), (name, value)


def test_plain_values_skip_the_adapter():
    """The point of the module: the command line's plain values never build a pydantic adapter."""
    p = dict(_params())["estimate:estimate:batch"]
    lite = LiteCoercion(p.type_descriptor)
    assert lite._fast("12", p, None) == 12 and lite._full is None
    assert lite._fast("1_2", p, None) is _MISS


def test_estimate_imports_no_pydantic():
    code = ("import sys; from memplan.cli import main; "
            "main(['estimate', '--model', 'llama-7b', '--adam', '--bf16', '--zero3', '--batch', '2', "
            "'--attention', 'eager', '-f', 'json']); print('pydantic' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1] == "False"
