"""Injected by `memplan measure -- COMMAND` (memplan.measure.wrap): this folder is put first on the command's
PYTHONPATH, so every Python process the command starts (the script, torchrun's or accelerate's workers) imports
this module at startup (the `site` module's sitecustomize step).

It does nothing unless MEMPLAN_WRAP_DIR is set: then it imports memplan from MEMPLAN_WRAP_ROOT (the memplan that
launched the command; the entry is taken off sys.path again, so the user's own imports are unchanged) and
installs the hooks of memplan.measure.wrap.hooks. An instrumentation failure is one stderr line; the script runs
on. Last, the sitecustomize that this one hides (the next one on sys.path) is executed, so a site's own keeps
working.
"""
import importlib.machinery
import importlib.util
import os
import sys


def _install() -> None:
    root = os.environ.get("MEMPLAN_WRAP_ROOT")
    added = bool(root) and root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        from memplan.measure.wrap import hooks

        hooks.install()
    except Exception as exc:  # never break the user's script
        sys.stderr.write(f"memplan: warning: measurement hooks not installed: {type(exc).__name__}: {exc}\n")
    finally:
        if added:
            try:
                sys.path.remove(root)
            except ValueError:
                pass


def _chain() -> None:
    """Run the next sitecustomize on sys.path (the one this module shadows), if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)


if os.environ.get("MEMPLAN_WRAP_DIR"):
    _install()
try:
    _chain()
except Exception as _exc:  # as site.py does for a failing sitecustomize: report, continue
    sys.stderr.write(f"Error in sitecustomize; set PYTHONVERBOSE for traceback:\n{type(_exc).__name__}: {_exc}\n")
