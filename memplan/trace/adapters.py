"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751) hooked into a transformers model.

peft has no Houlsby adapter, so memplan adds its own: after the attention sub-layer and after the MLP of every
block, h -> h + up(relu(down(h))) with down: hidden -> adapter_size and up: adapter_size -> hidden, both with
bias, in the model's parameter dtype. The adapter modules become children of the block (so they are
parameters of the model, trained, and counted), and a forward hook on the attention / MLP module applies them
to its output (the first element when the module returns a tuple). Everything else is frozen.
"""
from __future__ import annotations

import torch.nn as nn

from memplan.errors import MemplanError

_ATTN = ("self_attn", "attn", "attention", "self_attention", "SelfAttention")
_MLP = ("mlp", "feed_forward", "ffn", "output", "DenseReluDense", "fc2")  # OPT: fc1 -> act -> fc2 inline


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, size: int, dtype):
        super().__init__()
        self.down = nn.Linear(hidden, size, dtype=dtype)
        self.up = nn.Linear(size, hidden, dtype=dtype)
        self.act = nn.ReLU()

    def forward(self, h):
        return h + self.up(self.act(self.down(h)))


def _find(block: nn.Module, names) -> nn.Module | None:
    for n in names:
        sub = getattr(block, n, None)
        if isinstance(sub, nn.Module):
            return sub
    return None


def _apply(adapter: Bottleneck):
    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (adapter(output[0]),) + output[1:]
        return adapter(output)
    return hook


def add_adapters(blocks: list[nn.Module], hidden: int, size: int, dtype) -> None:
    """Add two adapters per block (built on whatever device is current: the meta device while tracing)."""
    for i, block in enumerate(blocks):
        attn, mlp = _find(block, _ATTN), _find(block, _MLP)
        layers = getattr(block, "layer", None)
        if (attn is None or mlp is None) and isinstance(layers, nn.ModuleList) and len(layers) >= 2:
            attn, mlp = layers[0], layers[-1]  # T5: [self-attention, (cross-attention,) feed-forward]
        if attn is None or mlp is None:
            raise MemplanError(f"--peft adapter is not traceable for {type(block).__name__}: no attention / MLP "
                               f"sub-module found in block {i}")
        for tag, sub in (("attn", attn), ("mlp", mlp)):
            ad = Bottleneck(hidden, size, dtype)
            block.add_module(f"memplan_adapter_{tag}", ad)
            sub.register_forward_hook(_apply(ad))
