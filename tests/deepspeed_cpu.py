"""Run DeepSpeed ZeRO for real on the CPU (gloo, DS_ACCELERATOR=cpu, world size 2) under memplan's AllocTracker and
write what each configuration holds: `python tests/deepspeed_cpu.py OUT.json CONFIGS.json`.

`python tests/deepspeed_cpu.py --trace OUT.json SETUPS.json` runs memplan's own DeepSpeed trace
(memplan.trace.runner.trace_run -> memplan.trace.deepspeed) on the real two-rank gloo group instead of the fake one:
SETUPS.json is {name: make_setup keyword arguments}; each rank r writes OUT.json.r{r} with its phase peaks, its
categories at the peak and its model states, raw bytes (round_to=1). tests/test_deepspeed_trace.py compares them
with the fake-process-group trace of the same rank.

CONFIGS.json: {name: {"stage": k, "zero": {zero_optimization keys}}}. For each, rank 0 writes the live bytes after
deepspeed.initialize ("load") and, over MEASURED_STEPS steps after the first (DeepSpeed records its stage-3 module
trace in the first), the least live bytes at a step's start and at the forward's end and the least phase peaks (each
step's own under "steps"). Used by
tests/test_deepspeed.py when deepspeed is importable (DeepSpeed 0.19.8 builds no ops: DS_BUILD_OPS=0).
"""
from __future__ import annotations

import gc
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

# a 2-block Llama, 98,624 parameters (tests/test_deepspeed.py builds the same config with memplan)
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
SEQ = 16
# Steps measured after the first (DeepSpeed records its stage-3 module trace in the first); each reading is the
# least over them. Why: DeepSpeed hands gloo temporaries (stage_1_and_2.py allreduce_bucket: the flattened bucket,
# passed to dist.all_reduce / dist.reduce), and gloo's worker thread holds the finished work, so those inputs, until
# it retakes its queue lock (ProcessGroupGloo::runLoop resets workInProgress_ after AsyncWork::execute). Under load a
# descheduled worker keeps one alive past the step's own free: two fresh-clone CI runs (2026-12-03) read a backward
# peak 16,512 B and 16,384 + 16,512 B above every local run, the sizes of two of S2b's flattened buckets. The
# steps are identical, so a race must hit the same reading in all three to show.
MEASURED_STEPS = 3


def run_one(stage: int, zero: dict) -> dict:
    import deepspeed
    import transformers

    from memplan.categories import Phase
    from memplan.trace.tracker import AllocTracker

    class Tracker(AllocTracker):  # DeepSpeed's meta-device shape bookkeeping allocates nothing
        def _see(self, t, tag, op):
            return None if t.device.type == "meta" else super()._see(t, tag, op)

    cfg = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": stage, **zero}}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TINY))
    ids = torch.randint(0, TINY["vocab_size"], (1, SEQ))
    steps = []
    with Tracker(round_to=1) as t:  # storages freed by the garbage collector are collected before each reading
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
        gc.collect()
        load = t.total
        for _ in range(1 + MEASURED_STEPS):
            gc.collect()
            t.start_window()
            step = {"start": t.total}
            t.set_phase(Phase.FORWARD)
            loss = engine(input_ids=ids, labels=ids).loss
            gc.collect()
            step["forward_end"] = t.total
            t.set_phase(Phase.BACKWARD)
            engine.backward(loss)
            t.set_phase(Phase.OPTIMIZER_STEP)
            engine.step()
            step["peaks"] = {k.value: v for k, v in t.phase_peaks.items()}
            steps.append(step)
        del engine, loss
    return {"load": load, **least(steps[1:]), "steps": steps[1:]}


def least(steps: list[dict]) -> dict:
    """Each reading's least value over identical steps: what a step itself holds, without a collective's input that
    gloo's worker thread happened to keep alive (see MEASURED_STEPS)."""
    return {"start": min(s["start"] for s in steps), "forward_end": min(s["forward_end"] for s in steps),
            "peaks": {k: min(s["peaks"][k] for s in steps) for k in steps[0]["peaks"]}}


def worker(rank: int, world: int, port: int, configs: dict, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    import logging

    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")
    rows = {name: run_one(c["stage"], c.get("zero", {})) for name, c in configs.items()}
    if rank == 0:
        with open(path, "w") as f:
            json.dump(rows, f)


def summary(result) -> dict:
    """What the comparison reads of a trace's Result (raw bytes)."""
    return {"phase_peaks": {k.value: v for k, v in result.phase_peaks.items()},
            "categories": {k.value: v for k, v in result.categories.items()},
            "model_states": [result.model_states.weights, result.model_states.master_weights,
                             result.model_states.gradients, result.model_states.optimizer_states],
            "peak": result.peak.allocated_bytes, "rank": result.rank}


def trace_worker(rank: int, world: int, port: int, setups: dict, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    import torch.distributed as dist

    from memplan.api import make_setup
    from memplan.spec.families import spec_from_config
    from memplan.trace.runner import trace_run

    dist.init_process_group("gloo", rank=rank, world_size=world)
    spec = spec_from_config(TINY, "tiny-llama")
    rows = {name: summary(trace_run(spec, make_setup(**kw), fake=False, round_to=1).result)
            for name, kw in setups.items()}
    with open(f"{path}.r{rank}", "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    trace = sys.argv[1] == "--trace"
    out_path, configs_path = sys.argv[1 + trace], sys.argv[2 + trace]
    with open(configs_path) as f:
        configs = json.load(f)
    port = 29000 + os.getpid() % 2000
    with open(f"{out_path}.port", "w") as f:  # the rendezvous port: the tests check no comm file of it is left
        f.write(str(port))
    try:
        mp.spawn(trace_worker if trace else worker, args=(2, port, configs, out_path), nprocs=2, join=True)
    finally:  # both ranks have ended: DeepSpeed's CPU comm files of this port (memplan.measure.deepspeed_support)
        from memplan.measure.deepspeed_support import remove_shm

        remove_shm(port)
