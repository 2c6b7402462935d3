"""GPU profiles: every profiles/gpus/*.toml loads, holds dense peaks, and NVML names map to the right card."""
from __future__ import annotations

import tomllib

import pytest

from memplan.errors import MemplanError
from memplan.profiles import gpu_for_nvml_name, gpu_keys, load_gpu, profiles_dir
from published import PUBLISHED

REQUIRED = {
    "h100-sxm", "h100-pcie", "h200", "a100-40gb", "a100-80gb", "a10g", "l4", "l40s", "t4",
    "v100-16gb", "v100-32gb", "rtx-3090", "rtx-4090",
    "rtx-a6000", "l40", "rtx-4080", "rtx-5090", "b200", "mi300x",  # issue 12
}
MIB = 2**20


def test_required_profiles_exist():
    assert REQUIRED <= set(gpu_keys())


@pytest.mark.parametrize("key", gpu_keys())
def test_profile_loads(key):
    g = load_gpu(key)
    assert g.name == key
    assert g.label and g.source, "each profile names its product and its source"
    assert g.memory_bytes > 0 and g.memory_bytes % MIB == 0, "NVML reports whole MiB"
    assert g.nvml_names, "gpu_for_nvml_name needs at least one match string"
    assert g.bandwidth_gbs > 0 and g.interconnect_gbs > 0
    assert "fp32" in g.tflops
    assert all(v > 0 for v in g.tflops.values()), "omit a dtype the card lacks; never set it to 0"


@pytest.mark.parametrize("key", gpu_keys())
def test_dense_peaks_are_ordered(key):
    t = load_gpu(key).tflops
    if "bf16" in t and "fp8" in t:
        assert t["bf16"] <= t["fp8"]
    for half in ("bf16", "fp16"):
        if half in t:
            assert t[half] >= t["fp32"], "tensor-core peaks exceed plain fp32"
    if "bf16" in t and "fp16" in t:
        assert t["bf16"] == t["fp16"], "every listed card runs bf16 and fp16 matmuls at one rate"


@pytest.mark.parametrize("key", ["t4", "v100-16gb", "v100-32gb"])
def test_pre_ampere_cards_have_no_bf16(key):
    g = load_gpu(key)
    assert "bf16" not in g.tflops and "tf32" not in g.tflops
    assert g.peak_tflops("bf16") == g.tflops["fp32"]  # falls back to plain fp32


def test_h100_sxm_dense_bf16_matches_published():
    # tests/data/published.toml [gpu_dense_peaks]: H100 SXM bf16 989 TFLOPS dense (1979 is with 2:4 sparsity); ±1
    fig = PUBLISHED["gpu_dense_peaks"]
    assert load_gpu("h100-sxm").peak_tflops("bf16") == pytest.approx(fig["h100_sxm_bf16"],
                                                                   abs=fig["h100_sxm_bf16_tolerance"])


@pytest.mark.parametrize("key", ["a100-40gb", "a100-80gb", "a100-pcie-80gb"])
def test_a100_dense_bf16_matches_published(key):
    # tests/data/published.toml [gpu_dense_peaks]: A100 bf16 312 TFLOPS
    assert load_gpu(key).peak_tflops("bf16") == PUBLISHED["gpu_dense_peaks"]["a100_bf16"]


@pytest.mark.parametrize(
    ("nvml_name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100 80GB PCIe", "a100-pcie-80gb"),
        ("NVIDIA A10G", "a10g"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", "l40s"),
        ("Tesla T4", "t4"),
        ("Tesla V100-SXM2-16GB", "v100-16gb"),
        ("Tesla V100-PCIE-16GB", "v100-16gb"),
        ("Tesla V100-SXM2-32GB", "v100-32gb"),
        ("Tesla V100-PCIE-32GB", "v100-32gb"),
        ("NVIDIA GeForce RTX 3090", "rtx-3090"),
        ("GeForce RTX 3090", "rtx-3090"),  # drivers before R470 leave out "NVIDIA"
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("NVIDIA RTX A6000", "rtx-a6000"),
        ("NVIDIA L40", "l40"),
        ("NVIDIA GeForce RTX 4080", "rtx-4080"),
        ("NVIDIA GeForce RTX 5090", "rtx-5090"),
        ("NVIDIA B200", "b200"),
        ("AMD Instinct MI300X", "mi300x"),  # torch.cuda.get_device_name() on ROCm (no NVML)
    ],
)
def test_nvml_name_maps_to_profile(nvml_name, key):
    g = gpu_for_nvml_name(nvml_name)
    assert g is not None and g.name == key


@pytest.mark.parametrize("nvml_name", ["NVIDIA Quadro Foo", "NVIDIA A10", "Tesla P100-PCIE-16GB", ""])
def test_unknown_nvml_name_maps_to_none(nvml_name):
    assert gpu_for_nvml_name(nvml_name) is None


def test_nvml_match_strings_are_unambiguous():
    owner: dict[str, str] = {}
    for key in gpu_keys():
        for s in load_gpu(key).nvml_names:
            assert s.lower() not in owner, f"{s!r} in both {owner.get(s.lower())} and {key}"
            owner[s.lower()] = key


def test_aliases_are_unique_and_resolve():
    keys = set(gpu_keys())
    seen: dict[str, str] = {}
    for key in sorted(keys):
        raw = tomllib.loads((profiles_dir() / "gpus" / f"{key}.toml").read_text())
        for alias in raw.get("aliases", []):
            a = alias.lower()
            assert a not in keys and a not in seen, f"alias {alias!r} of {key} is taken"
            seen[a] = key
            assert load_gpu(alias).name == key


def test_aliases_resolve_examples():
    assert load_gpu("h100").name == "h100-sxm"
    assert load_gpu("RTX4090").name == "rtx-4090"


def test_unknown_gpu_suggests_close_names():
    with pytest.raises(MemplanError) as exc:
        load_gpu("h10")
    msg = str(exc.value)
    assert "unknown GPU 'h10'" in msg
    assert "did you mean" in msg and "h100" in msg
