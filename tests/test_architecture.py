"""The tiers' import rules (tools/check_imports.py): no cycles, arrows down only, torch only in trace/ and
measure/, no private names across modules — on the tree, and on small packages that break each rule."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_imports", ROOT / "tools" / "check_imports.py")
check_imports = sys.modules.setdefault("check_imports", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(check_imports)


def test_the_tree_keeps_the_import_rules():
    assert check_imports.violations() == []


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / "memplan" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d in [tmp_path / "memplan", *(p for p in (tmp_path / "memplan").rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    # a cycle through a function-level import
    ({"estimate/a.py": "from memplan.estimate import b\n",
      "estimate/b.py": "def f():\n    import memplan.estimate.a\n"}, "import cycle among: memplan.estimate.a"),
    # the estimator reading measurement records: an arrow up
    ({"estimate/a.py": "def f():\n    from memplan.measure.record import iter_records\n", "measure/record.py": ""},
     "imports memplan.measure.record (measure), a higher tier"),
    ({"report/a.py": "import torch\n"}, "imports torch (only trace/ and measure/ may)"),
    ({"measure/a.py": "from memplan.cli.options import _P\n", "cli/options.py": ""},
     "reaches the private name memplan.cli.options._P"),
    ({"cli/a.py": "from memplan import profiles\nprofiles._resolve('x')\n", "profiles.py": ""},
     "reaches the private name memplan.profiles._resolve"),
])
def test_each_rule_catches_its_break(tmp_path, files, expected, monkeypatch):
    monkeypatch.setattr(check_imports, "KNOWN_PRIVATE", frozenset())
    found = check_imports.violations(_package(tmp_path, files))
    assert any(expected in v for v in found), found


def test_the_command_passes_on_the_tree():
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "check_imports.py")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
