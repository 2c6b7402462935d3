"""What `memplan measure --engine deepspeed` runs on each device, and the launcher's inputs (memplan.measure.deepspeed
runs it). Pure: imports no torch (the CLI's checks before any work, exit 2)."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from memplan.spec.setup import Engine, Precision, TrainingSetup
from memplan.trace.support import unsupported

CONFIG_FILE = "ds_config.json"  # in the job's folder: the config the launcher is given and the engine runs
# what DeepSpeed runs on CUDA and not on the CPU (memplan.trace.support.deepspeed_unsupported): stage 0 (the trace
# sends it to --engine fsdp), offload (DeepSpeedCPUAdam is a compiled op, DS_BUILD_OPS=0 here), fp16 (DeepSpeed's
# CPU accelerator: "Type fp16 is not supported on your device.")
CUDA_ONLY = "--zero 0, --precision fp16-master and --offload-* run on --device cuda only"
# accelerate launch --mixed_precision for each DeepSpeed precision (the same as the config's bf16 / fp16 blocks;
# accelerate's DeepSpeedPlugin reads the config file's, memplan's worker uses the config itself)
LAUNCH_PRECISION = {Precision.BF16_MASTER: "bf16", Precision.FP16_MASTER: "fp16", Precision.FP32: "no"}


def is_deepspeed(setup: TrainingSetup) -> bool:
    """A multi-rank setup on DeepSpeed's engine (memplan.measure.deepspeed) rather than memplan's torch engines."""
    return setup.engine is Engine.DEEPSPEED and (setup.gpus > 1 or setup.zero > 0)


def cpu_equivalent(setup: TrainingSetup) -> TrainingSetup:
    """The setup with what only CUDA runs (CUDA_ONLY) replaced by what the CPU runs, for the remaining checks."""
    return replace(setup, zero=max(setup.zero, 1), offload_params=False, offload_optimizer=False,
                   precision=Precision.BF16_MASTER if setup.precision is Precision.FP16_MASTER else setup.precision)


def refusal(setup: TrainingSetup, device: str) -> str | None:
    """Why an --engine deepspeed setup cannot be measured on `device`, or None. The CPU refuses what the trace does;
    CUDA runs CUDA_ONLY too, but offload only with AdamW (DeepSpeed builds DeepSpeedCPUAdam from the config's
    optimizer: memplan.trace.deepspeed.OFFLOAD_OPTIMIZER)."""
    if device == "cpu":
        what = unsupported(setup, engines=True)
        if what and (setup.zero == 0 or setup.offload_params or setup.offload_optimizer
                     or setup.precision is Precision.FP16_MASTER):
            return f"{what}; {CUDA_ONLY}"
        return what
    if (setup.offload_params or setup.offload_optimizer) and not setup.optimizer.value.startswith("adamw"):
        return (f"--engine deepspeed with offload and --optimizer {setup.optimizer.value}: ZeRO-Offload steps "
                "DeepSpeedCPUAdam (--optimizer adamw)")
    return unsupported(cpu_equivalent(setup), engines=True)


# DeepSpeed's CPU comm op (deepspeed/ops/csrc/cpu/comm/shm.cpp shm_initialize, called by comm/torch.py's backend at
# init_distributed) makes each rank create /dev/shm/deepspeed_allreduce_buffer_{getuid()}_{MASTER_ADDR}_{MASTER_PORT}_
# {rank} (shared_create: shm_open(O_CREAT), sizeof(allreduce_workspace), 67 MB), which the other ranks open too; its
# shared_close (munmap + shm_unlink) is never called, so every CPU job leaves one file per rank behind.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_files(port: int, addr: str = "127.0.0.1", folder: Path = SHM_DIR) -> list[Path]:
    """The comm op's files of the job that met at addr:port (this user's, any rank)."""
    head = f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_"
    return sorted(f for f in folder.glob(head + "*") if f.name[len(head):].isdigit())


def remove_shm(port: int, addr: str = "127.0.0.1", folder: Path = SHM_DIR) -> int:
    """Unlink the comm op's files of the job at addr:port; call it only once that job has ENDED (while it runs, its
    ranks open each other's). Returns how many were removed."""
    n = 0
    for f in shm_files(port, addr, folder):
        try:
            f.unlink()
            n += 1
        except OSError:  # gone already, or not ours to remove
            pass
    return n
