"""The estimator's caches change no answer.

2,000 setups drawn with a fixed seed over the setup space's axes (models of every family kind, precision, PEFT,
micro-batch, sequence, ZeRO, GPUs, engine, offload, checkpointing, attention, optimizer, accumulation, loss), each
drawn one with three neighbours one axis away from it, are estimated twice: cold, every cache emptied before each estimate (memplan.estimate.clear_caches), and warm, all in
another order so that each reads what the others left in the caches. The two must be equal to the byte: repr() of
the whole Result (every category of every phase, the levels, model states, warnings) or the same refusal. A cache
keyed on too few setup fields answers one setup with another's numbers, and this shows it.
"""
import random

import pytest

from memplan.errors import MemplanError
from memplan.estimate import clear_caches, estimate_spec
from memplan.profiles import load_model
from memplan.spec.values import make_setup

SEED = 20261203
N = 2000
# one of each kind: llama (RMSNorm, GQA, rotary), mistral (sliding window), gpt2 (learned positions, Conv1D),
# t5 (encoder-decoder), qwen2.5 (tied head, biases), an MoE (qwen1.5-moe), gemma-3 (fp32-weight RMSNorm, mixed
# sliding and full layers), bert (masked LM)
MODELS = ["llama-3.1-8b", "mistral-7b", "gpt2", "t5-3b", "qwen2.5-0.5b", "qwen1.5-moe-a2.7b", "gemma-3-1b",
          "bert-base-uncased"]
CHOICES = {
    "precision": ["fp32", "fp16", "bf16", "bf16-master", "pure-bf16", "fsdp-bf16"],
    "peft": ["full", "lora", "qlora", "dora", "ia3", "prompt", "prefix", "freeze", "bitfit", "adapter"],
    "checkpointing": ["none", "full", "selective"],
    "attention": ["eager", "sdpa", "flash"],
    "optimizer": ["adamw", "adamw-fused", "adamw-forloop", "sgd", "momentum", "adafactor", "adamw-8bit",
                  "paged-adamw"],
    "loss": ["standard", "chunked"],
}


def draw(rng: random.Random) -> tuple[str, dict]:
    """A setup, steered away from the combinations TrainingSetup refuses (some are still drawn, and compared)."""
    name = rng.choice(MODELS)
    kw = {k: rng.choice(v) for k, v in CHOICES.items()}
    kw.update(batch=rng.randint(1, 16), seq=rng.choice([64, 128, 256, 512, 1000, 1024]),
              zero=rng.choice([0, 1, 2, 3]), gpus=rng.choice([1, 2, 8, 64]), grad_accum=rng.choice([1, 1, 4]))
    kw["engine"] = "deepspeed" if rng.random() < 0.15 else "fsdp"
    if kw["engine"] == "deepspeed":
        kw["precision"] = rng.choice(["bf16-master", "fp16-master"])
        kw["offload_optimizer"] = kw["zero"] > 0 and rng.random() < 0.4
    if kw["precision"] == "fsdp-bf16" and (kw["zero"] < 2 or kw["gpus"] == 1):
        kw["precision"] = "bf16"
    if kw["loss"] == "chunked" and (rng.random() < 0.7 or kw["peft"] in ("prompt", "prefix")):
        kw["loss"] = "standard"
    if kw["peft"] == "prefix":
        kw["checkpointing"] = "none"
    if kw["peft"] == "freeze":
        kw["train_layers"] = rng.randint(0, 4)
    if kw["peft"] in ("lora", "dora", "qlora") and rng.random() < 0.5:
        kw["lora_rank"] = rng.choice([4, 16, 64])
    return name, kw


AXES = {**CHOICES, "batch": [1, 2, 3, 8], "seq": [128, 256, 512], "zero": [0, 1, 2, 3], "gpus": [1, 2, 8],
        "grad_accum": [1, 4], "lora_rank": [4, 16], "train_layers": [0, 1, 2]}


def neighbour(rng: random.Random, kw: dict) -> dict:
    """kw with one axis changed: a cache keyed on too few fields answers it with kw's numbers."""
    axis = rng.choice(sorted(AXES))
    return {**kw, axis: rng.choice([v for v in AXES[axis] if v != kw.get(axis)])}


def outcome(model, kw) -> str:
    try:
        return repr(estimate_spec(model, make_setup(**kw)))
    except MemplanError as exc:  # a refused setup must be refused alike
        return f"refused: {exc}"


@pytest.fixture(scope="module")
def drawn():
    rng = random.Random(SEED)
    specs = {m: load_model(m) for m in MODELS}
    out = []
    while len(out) < N:  # a setup and three neighbours, each one axis away from it
        name, kw = draw(rng)
        out += [(specs[name], kw)] + [(specs[name], neighbour(rng, kw)) for _ in range(3)]
    return out


def test_cached_answers_equal_uncached(drawn):
    cold = []
    for model, kw in drawn:
        clear_caches()
        cold.append(outcome(model, kw))
    order = list(range(len(drawn)))
    random.Random(SEED + 1).shuffle(order)
    clear_caches()
    warm = {i: outcome(*drawn[i]) for i in order}
    diffs = [i for i in range(len(drawn)) if warm[i] != cold[i]]
    assert not diffs, f"{len(diffs)} setups differ, first: {drawn[diffs[0]][0].name} {drawn[diffs[0]][1]}"
    # the draw is worth its time only if most of it is estimated, not refused
    assert sum(not c.startswith("refused") for c in cold) > N // 2


def test_clear_caches_empties_them(drawn):
    model, kw = drawn[0]
    outcome(model, kw)
    assert clear_caches() >= 5  # the parameter, activation-rate, context, sharding and per-group caches at least
