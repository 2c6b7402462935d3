"""Model and GPU profiles: one TOML file per profile under profiles/, the file name is the key.

A model profile holds a `source` line, `aliases` (the Hugging Face repo id among them), the exact
`expected_params`, and an `[hf_config]` table with the config.json fields the model is built from.
`--model` also takes a path to any local config.json, or to a checkpoint folder (memplan.spec.checkpoint).

User profiles (`memplan profiles add`) live in the same layout under user_profiles_dir(): $MEMPLAN_PROFILES, else
$XDG_CONFIG_HOME/memplan/profiles (~/.config/memplan/profiles). They are read after the shipped ones: a shipped
key or alias always means the shipped profile, a user file of the same key is not listed.
"""
from __future__ import annotations

import difflib
import json
import os
import tomllib
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from memplan.errors import MemplanError
from memplan.spec.checkpoint import check_params, read_checkpoint
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


USER_PROFILES_ENV = "MEMPLAN_PROFILES"  # the user profile folder (holding models/ and gpus/), when set


def user_profiles_dir() -> Path:
    """Where `memplan profiles add` writes and memplan reads user profiles: $MEMPLAN_PROFILES, else
    $XDG_CONFIG_HOME/memplan/profiles, else ~/.config/memplan/profiles (the XDG base directory default)."""
    env = os.environ.get(USER_PROFILES_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "memplan" / "profiles"


def _user_keys(kind: str) -> list[str]:
    try:
        return sorted(p.stem for p in (user_profiles_dir() / kind).glob("*.toml") if p.is_file())
    except OSError:  # an unreadable user folder hides its profiles, never the shipped ones
        return []


def _keys(kind: str) -> list[str]:
    shipped = sorted(p.stem for p in (profiles_dir() / kind).glob("*.toml"))
    return shipped + [k for k in _user_keys(kind) if k not in set(shipped)]


def profile_path(kind: str, key: str) -> Path:
    """The file of profile `key`: the shipped one, else the user's."""
    shipped = profiles_dir() / kind / f"{key}.toml"
    return shipped if shipped.exists() else user_profiles_dir() / kind / f"{key}.toml"


def _read(kind: str, key: str) -> dict:
    return _read_file(profile_path(kind, key))


@lru_cache(maxsize=None)
def _read_file(path: Path) -> dict:
    try:
        return tomllib.loads(read_text(path, "profile"))
    except tomllib.TOMLDecodeError as exc:
        raise MemplanError(f"profile {path}: {exc}") from None


def _alias_index(kind: str) -> dict[str, str]:
    return _alias_index_in(kind, user_profiles_dir(), tuple(_keys(kind)))


@lru_cache(maxsize=None)
def _alias_index_in(kind: str, user_dir: Path, keys: tuple[str, ...]) -> dict[str, str]:
    idx = {}
    for key in keys:  # shipped first: a user alias never takes over a shipped one
        for alias in _read(kind, key).get("aliases", []):
            idx.setdefault(alias.lower(), key)
    return idx


def clear_caches() -> None:
    """Forget every profile read (after `memplan profiles add` wrote one, or $MEMPLAN_PROFILES changed)."""
    for fn in (_read_file, _alias_index_in, load_model, load_gpu):
        fn.cache_clear()


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
    try:
        key = _resolve("models", name)
    except MemplanError:
        if _is_model_folder(name):  # `--model my-model`: a folder in the working directory, no profile of that name
            return _model_from_file(Path(name))
        raise
    prof = _read("models", key)
    if "hf_config" not in prof:
        raise MemplanError(f"model profile {key} has no [hf_config] table")
    return spec_from_config(
        prof["hf_config"], key, source=prof.get("source", ""), aliases=tuple(prof.get("aliases", ())),
        expected_params=prof.get("expected_params"),
    )


def load_model_path(path) -> ModelSpec:
    """A model from a config.json or a checkpoint folder (a Path from the Python API), read afresh."""
    return _model_from_file(Path(path))


def _is_model_folder(name: str) -> bool:
    try:
        return (Path(name) / "config.json").is_file()
    except (OSError, ValueError):
        return False


def _is_path(name: str) -> bool:
    """Whether --model NAME means a file: a *.json name, or a name with a '/' that exists (a folder or a file)."""
    if name.endswith(".json"):
        return True
    try:
        return "/" in name and Path(name).exists()
    except OSError:  # a name the filesystem refuses (too long): a path all the same, and read_config says why
        return True


def read_config(path: Path) -> dict:
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
    """A config.json (the architecture alone) or a checkpoint folder (its config.json, and what its weight files
    and quantization_config say: memplan.spec.checkpoint)."""
    folder = None
    try:
        if path.is_dir():
            folder, path = path, path / "config.json"
            if not path.exists():
                raise MemplanError(f"--model {folder}: config.json not found in the folder (a model folder is what "
                                   f"save_pretrained writes)")
    except OSError:
        pass  # read_config names the failure
    cfg = read_config(path)
    spec = spec_from_config(cfg, str(path), source=str(path))
    if folder is None:
        return spec
    ckpt = read_checkpoint(folder, cfg)
    return replace(spec, checkpoint=replace(ckpt, notes=ckpt.notes + check_params(ckpt, spec)))


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
        return kind, key, profile_path(kind, key)
    _resolve("models", name)  # raises with close matches
    raise AssertionError("unreachable")
