"""One real (not fake) training-step loss of a tiny Llama, with fixed weights and tokens: the reference the
checkpointing-policy and loss tests compare gradients and losses against."""
from __future__ import annotations

from memplan.api import make_setup

# four blocks (every-2 checkpointing wraps two of them), untied head, grouped-query attention
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, tie_word_embeddings=False)


def tiny_loss(config: dict = TINY, **kw):
    """(loss, built model, input ids) of one fp32 step, batch 2 × 32, under the setup fields `kw`."""
    import torch

    from memplan.spec.families import spec_from_config
    from memplan.trace.build import build, materialize
    from memplan.trace.step import TrainLoop
    from memplan.trace.tracker import AllocTracker

    setup = make_setup(precision="fp32", batch=2, seq=32, **kw)
    built = build(spec_from_config(config, "tiny-llama"), setup)
    torch.manual_seed(0)
    materialize(built.model, init_values=True)
    ids = torch.randint(0, config["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
    loop = TrainLoop(built.model, setup, AllocTracker(), built.compute_dtype)
    return loop._loss({"input_ids": ids, "labels": ids}), built, ids
