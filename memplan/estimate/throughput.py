"""Predicted step time, tokens/sec and MFU of a setup on a GPU, and the utilization they assume.

step time = max(compute, communication) per optimizer step, per GPU:
- compute = hardware FLOPs of the step / (the GPU profile's dense peak for the compute dtype × utilization),
  where utilization is the fraction of peak the executed FLOPs achieve (recomputation included: without
  checkpointing it *is* the MFU);
- communication = the step's collectives (memplan.estimate.flops.communication_per_step: the bytes each one
  really moves, per engine) over the network bandwidth (network_gbs), plus the offload copies over the GPU's host
  link (the profile's host_link_gbs, PCIe; the busier direction, the link being full duplex). The copies and
  the collectives on the same data depend on each other (a shard is fetched before it is gathered), so the
  two times add.
- network_gbs: inside one node, the profile's per-GPU interconnect (NVLink or PCIe). Across nodes (gpus >
  gpus_per_node) a ring leaves each node once, so the bytes one rank sends also leave each node once, spread
  over the node's network adapters: min(interconnect, GPUs per node × the profile's per-GPU inter-node
  bandwidth). On a DGX A100 (8 × 200 Gb/s HDR) that is 200 GB/s; nccl-tests on nodes of 8 A100s with 4 HDR
  adapters expect and measure ≈ 100 GB/s bus bandwidth, 4 × 25 GB/s (NVIDIA/nccl-tests issue 119). A profile
  without an inter-node figure keeps the intra-node one, and the output says so.
- Overlap.FULL (default) assumes communication hides under compute, as DDP's bucketed all-reduce during backward
  and FSDP / ZeRO-3's prefetched gathers are built to do; Overlap.NONE adds the two (a pessimistic bound).

Pure: the utilization is an input (a Utilization: value and where it comes from). The estimator never reads
measurement files; memplan.measure.utilization finds the utilization of committed real-GPU records, and the
callers (memplan.api, memplan.fit, the CLI, the report) choose which one to pass (DEFAULT when none is found).

Not modelled: the CPU optimizer step of offload, NCCL's tree and NVLS algorithms (rings only), QLoRA's
dequantization cost, small-batch inefficiency (utilization does not depend on the micro-batch), pipeline or
tensor parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from memplan.estimate import fp8
from memplan.estimate.flops import communication_per_step, compute_dtype, flops_per_token
from memplan.spec.gpu import GpuSpec
from memplan.spec.model import ModelSpec
from memplan.spec.setup import TrainingSetup

# Observed MFU of dense bf16 training of 7-8B models on H100 (docs/published.md, [observed_mfu]): 33–39% for
# Llama-3.1-8B under FSDP on 8×H100 (torchtitan benchmarks), 46% for a 7B (IBM fms-fsdp). 40% is the round
# middle of that range; it is also the figure commonly quoted as typical for well-tuned bf16 training.
DEFAULT_UTILIZATION = 0.40
DEFAULT_SOURCE = "default 40% (observed 33-46% MFU for 7-8B bf16 on H100, docs/published.md)"


class Overlap(str, Enum):
    """How communication combines with compute in the step time."""

    FULL = "full"  # step = max(compute, communication): DDP buckets / ZeRO prefetch hide the collectives
    NONE = "none"  # step = compute + communication: nothing overlaps (an upper bound on step time)


@dataclass(frozen=True)
class Utilization:
    """The fraction of the dense peak the executed FLOPs achieve, and where that figure comes from."""

    value: float
    source: str  # where the value comes from, shown beside it


DEFAULT = Utilization(DEFAULT_UTILIZATION, DEFAULT_SOURCE)


@dataclass(frozen=True)
class Throughput:
    """Predicted speed of one setup on one GPU type; per GPU unless named total."""

    step_s: float  # one optimizer step (grad_accum micro-batches)
    compute_s: float
    comm_s: float
    comm_bytes: float
    tokens_per_step: int  # per GPU
    flops_per_token: float  # hardware (recomputation included)
    model_flops_per_token: float
    peak_tflops: float
    utilization: float
    utilization_source: str
    gpus: int
    overlap: Overlap
    network_gbs: float = 0.0  # the bandwidth the collectives ran at (see network_gbs)
    link: str = ""  # which link that is, in words
    host_s: float = 0.0  # offload copies over the host link (part of comm_s)
    host_bytes: float = 0.0  # the busier direction's bytes

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s if self.step_s > 0 else 0.0

    @property
    def mfu(self) -> float:
        """Model FLOPs utilization: model FLOPs per second over the dense peak (PaLM's definition)."""
        peak = self.peak_tflops * 1e12
        return self.tokens_per_s * self.model_flops_per_token / peak if peak > 0 else 0.0

    def to_dict(self) -> dict:
        """The `throughput` mapping of a Result (memplan.render prints it)."""
        return {"tokens_per_s": self.tokens_per_s, "tokens_per_s_total": self.tokens_per_s * self.gpus,
                "step_s": self.step_s, "compute_s": self.compute_s, "comm_s": self.comm_s,
                "comm_bytes": self.comm_bytes, "tokens_per_step": self.tokens_per_step,
                "flops_per_token": self.flops_per_token, "model_flops_per_token": self.model_flops_per_token,
                "peak_tflops": self.peak_tflops, "mfu": self.mfu, "utilization": self.utilization,
                "mfu_source": self.utilization_source, "overlap": self.overlap.value,
                "network_gbs": self.network_gbs, "link": self.link, "host_s": self.host_s,
                "host_bytes": self.host_bytes}


def network_gbs(gpu: GpuSpec, setup: TrainingSetup) -> tuple[float, str]:
    """(GB/s one rank's ring traffic moves at, the link in words): see the module docstring."""
    intra = gpu.interconnect_gbs
    if setup.gpus <= setup.gpus_per_node:
        return intra, f"{intra:g} GB/s per GPU inside the node"
    nodes = setup.nodes
    if gpu.inter_node_gbs <= 0:
        return intra, (f"{nodes} nodes, but {gpu.name} names no inter-node bandwidth: the intra-node "
                       f"{intra:g} GB/s is used, too fast")
    per_node = setup.gpus_per_node * gpu.inter_node_gbs
    return min(intra, per_node), (f"{nodes} nodes: min({intra:g} GB/s in the node, {setup.gpus_per_node} × "
                                  f"{gpu.inter_node_gbs:g} GB/s between nodes)")


def _seconds(nbytes: float, gbs: float) -> float:
    if nbytes == 0:
        return 0.0
    return nbytes / (gbs * 1e9) if gbs > 0 else float("inf")


def predict(model: ModelSpec, setup: TrainingSetup, gpu: GpuSpec, util: Utilization,
            overlap: Overlap = Overlap.FULL) -> Throughput:
    """Predicted step time and tokens/sec per GPU at utilization `util` (see the module docstring)."""
    fl = flops_per_token(model, setup)
    tokens = setup.tokens * setup.grad_accum
    peak = gpu.peak_tflops(compute_dtype(setup.precision))
    if fl.hardware > 0:  # --fp8: the converted linears' matmuls at the fp8 peak (memplan.estimate.fp8)
        peak = fp8.effective_peak(peak, float(gpu.tflops.get("fp8", 0.0)),
                                  fp8.fp8_flops_per_token(model, setup) / fl.hardware)
    compute_s = tokens * fl.hardware / (peak * 1e12 * util.value) if peak > 0 and util.value > 0 else float("inf")
    c = communication_per_step(model, setup)
    bw, link = network_gbs(gpu, setup)
    host = max(c.to_gpu_bytes, c.to_host_bytes)
    host_s = _seconds(host, gpu.host_link_gbs or gpu.interconnect_gbs)  # no host-link figure: PCIe cards' own
    comm_s = _seconds(c.total, bw) + host_s
    step = max(compute_s, comm_s) if overlap is Overlap.FULL else compute_s + comm_s
    return Throughput(step_s=step, compute_s=compute_s, comm_s=comm_s, comm_bytes=c.total, tokens_per_step=tokens,
                      flops_per_token=fl.hardware, model_flops_per_token=fl.model, peak_tflops=peak,
                      utilization=util.value, utilization_source=util.source, gpus=setup.gpus, overlap=overlap,
                      network_gbs=bw, link=link if setup.gpus > 1 else "", host_s=host_s, host_bytes=host)


def with_throughput(result, model: ModelSpec, util: Utilization):
    """The Result with its `throughput` mapping (at utilization `util`) attached when it was estimated against a
    GPU."""
    if result.gpu is None:
        return result
    if not result.gpu.has_flops:  # a GPU given by its memory alone (--gpu 48GiB): no speed is invented
        return replace(result, warnings=result.warnings + (NO_FLOPS_NOTE.format(label=result.gpu.label),))
    return replace(result, throughput=shaped_throughput(model, result.setup, result.gpu, util))


def shaped_throughput(model: ModelSpec, setup: TrainingSetup, gpu: GpuSpec, util: Utilization,
                      overlap: Overlap = Overlap.FULL) -> dict:
    """Throughput.to_dict(); over a length distribution (memplan.estimate.lengths) the step is the expected padded
    batch's, tokens_per_s counts real tokens only and computed_tokens_per_s the padded ones (MFU is of the latter:
    the GPU does that work)."""
    from memplan.estimate import lengths

    if not lengths.shaped(setup):
        return predict(model, setup, gpu, util, overlap).to_dict()
    st = lengths.stats(setup)
    d = predict(model, lengths.at_length(setup, st.typical_length), gpu, util, overlap).to_dict()
    real = (1 - st.waste) * st.expected_length / st.typical_length  # real tokens per computed (rounded) token
    return {**d, "computed_tokens_per_s": d["tokens_per_s"], "tokens_per_s": d["tokens_per_s"] * real,
            "tokens_per_s_total": d["tokens_per_s_total"] * real, "padding_waste": st.waste}


NO_FLOPS_NOTE = ("{label}: no FLOPS figure, so no throughput is predicted (a --gpu FILE.toml with a [tflops] table "
                 "gives one)")
