"""Model and GPU profiles: one TOML file per profile under profiles/, the file name is the key.

A model profile holds a `source` line, `aliases` (the Hugging Face repo id among them), the exact
`expected_params`, and an `[hf_config]` table with the config.json fields the model is built from.
`--model` also takes a path to any local config.json.
"""
from __future__ import annotations

import difflib
import json
import tomllib
from functools import lru_cache
from pathlib import Path

from memplan.errors import MemplanError
from memplan.spec.families import spec_from_config
from memplan.spec.files import read_text
from memplan.spec.gpu import GpuSpec, gpu_from_table
from memplan.spec.model import ModelSpec

_HERE = Path(__file__).resolve().parent
# Largest config.json read: 16 MiB. A Hugging Face config.json is a few KiB (meta-llama/Llama-3.1-405B's is under
# 1 KiB; the largest carry an id2label table or a quantization map of a few hundred KiB); a bigger file is not a
# config, and reading one whole (a disk image, /dev/zero) would only exhaust memory.
MAX_CONFIG_BYTES = 16 * 2**20


def profiles_dir() -> Path:
    """profiles/ beside the package (source checkout) or packaged inside it (wheel)."""
    for cand in (_HERE / "_profiles", _HERE.parent / "profiles"):
        if cand.is_dir():
            return cand
    raise MemplanError("memplan's profiles/ folder is missing from this installation")


def _keys(kind: str) -> list[str]:
    return sorted(p.stem for p in (profiles_dir() / kind).glob("*.toml"))


@lru_cache(maxsize=None)
def _read(kind: str, key: str) -> dict:
    path = profiles_dir() / kind / f"{key}.toml"
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise MemplanError(f"profile {path}: {exc}") from None


@lru_cache(maxsize=None)
def _alias_index(kind: str) -> dict[str, str]:
    idx = {}
    for key in _keys(kind):
        for alias in _read(kind, key).get("aliases", []):
            idx[alias.lower()] = key
    return idx


def _resolve(kind: str, name: str) -> str:
    n = name.strip().lower()
    keys = _keys(kind)
    if n in keys:
        return n
    idx = _alias_index(kind)
    if n in idx:
        return idx[n]
    close = difflib.get_close_matches(n, keys + list(idx), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; see `memplan profiles list`"
    what = "model" if kind == "models" else "GPU"
    raise MemplanError(f"unknown {what} '{name}'{hint}")


def model_keys() -> list[str]:
    return _keys("models")


def gpu_keys() -> list[str]:
    return _keys("gpus")


def model_profile(name: str) -> dict:
    return _read("models", _resolve("models", name))


@lru_cache(maxsize=256)
def load_model(name: str) -> ModelSpec:
    """A model by profile key, alias (e.g. the Hugging Face repo id) or path to a local config.json."""
    if _is_path(name):
        return _model_from_file(Path(name))
    key = _resolve("models", name)
    prof = _read("models", key)
    if "hf_config" not in prof:
        raise MemplanError(f"model profile {key} has no [hf_config] table")
    return spec_from_config(
        prof["hf_config"], key, source=prof.get("source", ""), aliases=tuple(prof.get("aliases", ())),
        expected_params=prof.get("expected_params"),
    )


def _is_path(name: str) -> bool:
    """Whether --model NAME means a file: a *.json name, or a name with a '/' that exists (a folder or a file)."""
    if name.endswith(".json"):
        return True
    try:
        return "/" in name and Path(name).exists()
    except OSError:  # a name the filesystem refuses (too long): a path all the same, and _read_config says why
        return True


def _read_config(path: Path) -> dict:
    """The JSON object in a config.json: a regular file of at most MAX_CONFIG_BYTES, UTF-8, one JSON object.
    Every failure is one MemplanError naming the file (and the line and column of a JSON syntax error)."""
    text = read_text(path, "config", MAX_CONFIG_BYTES)
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MemplanError(f"malformed config {path}: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise MemplanError(f"malformed config {path}: nested too deeply") from None
    if not isinstance(cfg, dict):
        raise MemplanError(f"malformed config {path}: expected a JSON object, got a {type(cfg).__name__}")
    return cfg


def _model_from_file(path: Path) -> ModelSpec:
    try:
        if path.is_dir():
            path = path / "config.json"
    except OSError:
        pass  # _read_config names the failure
    return spec_from_config(_read_config(path), str(path), source=str(path))


@lru_cache(maxsize=64)
def load_gpu(name: str) -> GpuSpec:
    """A GPU by profile key or alias (memplan.spec.gpu.gpu_from_table reads the table)."""
    key = _resolve("gpus", name)
    return gpu_from_table(key, _read("gpus", key), f"GPU profile {key}")


def gpu_for_nvml_name(nvml_name: str) -> GpuSpec | None:
    """The GPU profile whose NVML match strings fit the name NVML reports (longest match wins)."""
    best, best_len = None, 0
    for key in gpu_keys():
        g = load_gpu(key)
        for s in g.nvml_names:
            if s.lower() in nvml_name.lower() and len(s) > best_len:
                best, best_len = g, len(s)
    return best


def find_profile(name: str) -> tuple[str, str, Path]:
    """(kind "models" or "gpus", key, file) of a profile by key or alias, models first; an unknown name fails
    with close matches among the models."""
    for kind in ("models", "gpus"):
        try:
            key = _resolve(kind, name)
        except MemplanError:
            continue
        return kind, key, profiles_dir() / kind / f"{key}.toml"
    _resolve("models", name)  # raises with close matches
    raise AssertionError("unreachable")
