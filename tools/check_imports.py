"""The import rules of memplan's tiers, checked on the source (AST; module-level and function-level imports count).

    python3 tools/check_imports.py        # prints every violation, exit 1 if any

1. No import cycle between memplan's modules.
2. Arrows point down only: a module imports modules of its own tier or lower ones (TIERS, lowest first):
   vocab → spec → estimate → trace → measure → report → cli.
3. Only trace/ and measure/ import torch and its libraries (HEAVY); only report/ imports pandas and plotly (PLOTS;
   and Result.to_frame).
4. No module reaches another module's private names: `from memplan.x import _name`, or `mod._name` on an
   imported memplan module (dunders such as __version__ are public).

A package's __init__ counts as its own module (memplan.trace is memplan/trace/__init__.py); importing a submodule
is an edge to that submodule, not to its parent packages (which Python also runs, but which depend on nothing
by that).
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "memplan"

# Lowest first. A module belongs to the tier of its longest matching prefix.
TIERS = (
    ("vocab", ("memplan.units", "memplan.errors", "memplan.categories", "memplan.version", "memplan.io")),
    ("spec", ("memplan.spec", "memplan.profiles", "memplan.configfile")),  # configfile: --config files to setup fields
    ("estimate", ("memplan.estimate", "memplan.serve")),
    ("trace", ("memplan.trace",)),
    ("measure", ("memplan.measure",)),
    # what joins the tiers below: the report, the fit search (estimate + measured utilization), the
    # estimate-vs-trace calibration grid, the text renderer, and the Python API facade
    ("report", ("memplan.report", "memplan.render", "memplan.fit", "memplan.calibrate", "memplan.api")),
    # the commands and the package facade (`memplan.estimate(...)` is wired in memplan/__init__.py)
    ("cli", ("memplan.cli", "memplan.__main__", "memplan")),
)
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
HEAVY_TIERS = ("trace", "measure")
PLOTS = ("pandas", "plotly")
PLOT_TIERS = ("report",)
# Result.to_frame(), the README's one-liner for notebook users, imports pandas when called
PLOT_MODULES = ("memplan.estimate.result",)

# Exceptions to the private-name rule (none today); a listed entry that no longer occurs is itself reported.
KNOWN_PRIVATE: frozenset = frozenset()


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a memplan module, or a top-level third-party package name
    line: int


def modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package."""
    out = {}
    for p in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(name: str, mods: dict) -> str | None:
    """The memplan module a dotted name refers to (the longest existing prefix)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def scan(mod: str, path: Path, mods: dict) -> tuple[list[Import], list[tuple[str, int]]]:
    """(imports, private names reached: (dotted name, line)) of one module."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    imports, private = [], []
    bound: dict[str, str] = {}  # local name -> memplan module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top != PACKAGE:
                    imports.append(Import(mod, top, node.lineno))
                    continue
                target = _resolve(a.name, mods)
                imports.append(Import(mod, target, node.lineno))
                if a.asname:
                    bound[a.asname] = target
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package
                pkg = mod if is_pkg else mod.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            if base.split(".")[0] != PACKAGE:
                imports.append(Import(mod, base.split(".")[0], node.lineno))
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                if full in mods:  # a submodule
                    imports.append(Import(mod, full, node.lineno))
                    bound[a.asname or a.name] = full
                else:
                    imports.append(Import(mod, _resolve(base, mods), node.lineno))
                    if _private(a.name):
                        private.append((full, node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and _private(node.attr) and bound[node.value.id] != mod):
            private.append((f"{bound[node.value.id]}.{node.attr}", node.lineno))
    return [i for i in imports if i.target != mod], private


def tier_of(mod: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(TIERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise KeyError(f"{mod} is in no tier: add it to TIERS in tools/check_imports.py")
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def violations(root: Path = ROOT) -> list[str]:
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    problems, seen_known = [], set()
    for mod, path in mods.items():
        rel = path.relative_to(root)
        imports, private = scan(mod, path, mods)
        t = tier_of(mod)
        for imp in imports:
            if imp.target in mods:
                graph[mod].add(imp.target)
                if tier_of(imp.target) > t:
                    problems.append(f"{rel}:{imp.line}: {mod} ({TIERS[t][0]}) imports {imp.target} "
                                    f"({TIERS[tier_of(imp.target)][0]}), a higher tier")
            elif imp.target in HEAVY and TIERS[t][0] not in HEAVY_TIERS:
                problems.append(f"{rel}:{imp.line}: {mod} imports {imp.target} (only trace/ and measure/ may)")
            elif imp.target in PLOTS and TIERS[t][0] not in PLOT_TIERS and mod not in PLOT_MODULES:
                problems.append(f"{rel}:{imp.line}: {mod} imports {imp.target} (only report/ may)")
        for name, line in private:
            if (mod, name) in KNOWN_PRIVATE:
                seen_known.add((mod, name))
                continue
            problems.append(f"{rel}:{line}: {mod} reaches the private name {name}")
    for comp in cycles(graph):
        problems.append("import cycle among: " + ", ".join(comp))
    for mod, name in sorted(KNOWN_PRIVATE - seen_known):
        problems.append(f"KNOWN_PRIVATE lists {mod} -> {name}, which no longer occurs: remove it")
    return list(dict.fromkeys(problems))


def main() -> int:
    problems = violations()
    for p in problems:
        print(p)
    n = len(modules())
    print(f"{n} modules: {'no violations' if not problems else f'{len(problems)} violation(s)'}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
