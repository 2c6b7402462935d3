"""The published figures of tests/data/published.toml (value, unit, source and quote per figure), for the tests.

    from published import PUBLISHED
    PUBLISHED["zero_paper"]["p_os_gb"]   # 31.4, ZeRO (arXiv:1910.02054) Figure 1

docs/published.md is the same content for people.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

PATH = Path(__file__).resolve().parent / "data" / "published.toml"
PUBLISHED: dict = tomllib.loads(PATH.read_text(encoding="utf-8"))
