"""`memplan profiles add CONFIG_OR_DIR`: a user model profile from a config.json, checked against transformers.

add_profile() reads the config (a config.json, or a model folder holding one), refuses a model_type memplan has
no family for, builds the spec (memplan.spec.families) and transformers' model of the same config on the meta
device, and writes the profile only when the two agree on every check of memplan.trace.check_family (exact
parameter count, every linear leaf with its path and shape, norms, positions, the final norm, adapter sites).
The file has the shipped profiles' format (source, aliases, expected_params, [hf_config]) and goes to
memplan.profiles.user_profiles_dir()/models/<key>.toml, where memplan reads it after the shipped ones.

[hf_config] keeps the config.json fields that describe the architecture: it leaves out what only says how the
file was written (transformers_version, _name_or_path, dtype / torch_dtype, architectures, auto_map), the
quantization (quantization_config: how weights are stored, not the architecture; `--model DIR` reads it) and
id2label / label2id, and every null (TOML has no null; transformers reads an absent key as the class default,
which is what null means there); the file names each one left out. Only the config is read, never a weight.
"""
from __future__ import annotations

import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from memplan.errors import MemplanError

KEY = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # a profile key: a file name on every filesystem, lower case
# config.json fields that do not describe the architecture (module doc)
NOT_ARCHITECTURE = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures", "auto_map",
                    "quantization_config", "id2label", "label2id")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")  # TOML bare keys (toml.io v1.0.0, "Keys")
FAMILY_DOC = "docs/adding-a-family.md"


@dataclass(frozen=True)
class AddedProfile:
    key: str
    path: Path  # the profile file written
    params: int  # expected_params: transformers' count on the meta device
    model_class: str  # the transformers class it was checked against
    left_out: tuple[str, ...]  # config.json fields not written (NOT_ARCHITECTURE and nulls)


def default_key(source: Path) -> str:
    """The folder's name (a config.json's folder), lower case, other characters as '-'."""
    name = (source if source.is_dir() else source.parent).resolve().name
    key = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")[:64]
    return key or "my-model"


def _drop_nulls(v):
    if isinstance(v, dict):
        return {k: _drop_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_nulls(x) for x in v if x is not None]
    return v


def architecture(cfg: dict) -> tuple[dict, tuple[str, ...]]:
    """(the [hf_config] table, the names of the config.json fields left out) (module doc)."""
    left_out = tuple(k for k, v in cfg.items() if k in NOT_ARCHITECTURE or v is None)
    hf = {k: _drop_nulls(v) for k, v in cfg.items() if k not in left_out}
    return {"model_type": hf.pop("model_type"), **hf}, left_out


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def toml_value(v) -> str:
    """A JSON value as TOML (toml.io v1.0.0): JSON strings are TOML basic strings, objects inline tables."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise MemplanError(f"config value {v} is not a finite number")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise MemplanError(f"config value {str(v)[:40]!r} has no TOML form")


def render(key: str, source: str, aliases: tuple[str, ...], params: int, hf: dict, left_out: tuple[str, ...]) -> str:
    lines = [f"# {key}: written by `memplan profiles add`", f"source = {toml_value(source)}",
             f"aliases = {toml_value(list(aliases))}", f"expected_params = {params}", "", "[hf_config]"]
    if left_out:
        lines.append(f"# left out of config.json (not the architecture, or null: the class default): "
                     f"{', '.join(left_out)}")
    lines += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in hf.items()]
    return "\n".join(lines) + "\n"


def _config_path(source: Path) -> Path:
    try:
        if source.is_dir():
            path = source / "config.json"
            if not path.exists():
                raise MemplanError(f"{source}: config.json not found in the folder (a model folder is what save_pretrained "
                                   f"writes)")
            return path
    except OSError:
        pass  # reading names the failure
    return source


def _check_names(key: str, aliases: tuple[str, ...], force: bool) -> Path:
    """The file the profile goes to; refuses a bad key, a shipped key or alias, an existing file without force."""
    from memplan import profiles

    if not KEY.match(key):
        raise MemplanError(f"--key {key!r}: a profile key is lower-case letters, digits, '.', '_' and '-' "
                           f"(at most 64, starting with a letter or digit)")
    shipped = {p.stem for p in (profiles.profiles_dir() / "models").glob("*.toml")}
    shipped_aliases = {a.lower() for k in shipped for a in profiles.model_profile(k).get("aliases", [])}
    for name in (key, *aliases):
        if name.lower() in shipped or name.lower() in shipped_aliases:
            raise MemplanError(f"{name} is a shipped model profile's name: choose another --key / --alias")
    path = profiles.user_profiles_dir() / "models" / f"{key}.toml"
    if path.exists() and not force:
        raise MemplanError(f"user profile {key} exists ({path}): --force replaces it")
    return path


def add_profile(source, key: str | None = None, aliases=(), force: bool = False) -> AddedProfile:
    """Check the config at `source` (a config.json or a folder holding one) against transformers and write it as
    user profile `key` (default: the folder's name); see the module doc. Needs torch and transformers."""
    from memplan import profiles
    from memplan.spec.families import FAMILIES, spec_from_config
    from memplan.trace.support import require_torch

    src = Path(source)
    cfg_path = _config_path(src)
    cfg = profiles.read_config(cfg_path)
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise MemplanError(f"{cfg_path}: model_type {str(mt)[:40]!r} has no memplan family yet (supported: "
                           f"{', '.join(sorted(FAMILIES))}); adding one: {FAMILY_DOC}")
    key = key or default_key(src)
    aliases = tuple(dict.fromkeys(str(a) for a in aliases))
    path = _check_names(key, aliases, force)
    hf, left_out = architecture(cfg)
    spec = spec_from_config(hf, key)
    require_torch("memplan profiles add")
    import transformers

    from memplan.trace.check_family import build_meta, differences  # imports torch

    try:
        model = build_meta(spec)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a config transformers cannot build
        raise MemplanError(f"{cfg_path}: transformers {transformers.__version__} cannot build this config "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    diffs = differences(spec, model)
    cls = type(model).__name__
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise MemplanError(f"{cfg_path}: memplan's {mt} spec disagrees with transformers' {cls}: "
                           f"{'; '.join(diffs[:3])}{more}; see {FAMILY_DOC}")
    params = sum(p.numel() for p in model.parameters())
    source_line = (f"config.json at {cfg_path.resolve()}; count from transformers {transformers.__version__} "
                   f"{cls} on the meta device (memplan profiles add)")
    text = render(key, source_line, aliases, params, hf, left_out)
    if tomllib.loads(text)["hf_config"] != hf:  # what is written is what was checked
        raise MemplanError(f"{cfg_path}: the config does not survive as TOML; write the profile by hand "
                           f"({FAMILY_DOC})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    profiles.clear_caches()
    return AddedProfile(key, path, params, cls, left_out)


def check_trace(key: str, seq: int = 256):
    """(estimate, trace) Results of a small single-GPU setup of profile `key`: default precision and optimizer,
    full fine-tuning, batch 1, `seq` tokens (at most the model's learned positions)."""
    from memplan.estimate import estimate_spec
    from memplan.profiles import load_model
    from memplan.spec.setup import TrainingSetup, default_seq
    from memplan.trace import trace

    spec = load_model(key)
    setup = TrainingSetup(seq=min(seq, default_seq(spec)))
    return estimate_spec(spec, setup), trace(spec, setup)[0]
