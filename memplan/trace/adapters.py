"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751) hooked into a transformers model.

peft has no Houlsby adapter, so memplan adds its own: after the attention sub-layer and after the MLP of every
block, h -> h + up(relu(down(h))) with down: hidden -> adapter_size and up: adapter_size -> hidden, both with
bias, in the model's parameter dtype. The adapter modules become children of the block (so they are
parameters of the model, trained, and counted), and a forward hook on the attention / MLP module applies them
to its output (the first element when the module returns a tuple). Everything else is frozen. Which sub-modules
are the attention and the MLP is the family's FamilyTraits.adapter_sites.
"""
from __future__ import annotations

import torch.nn as nn

from memplan.errors import MemplanError


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, size: int, dtype):
        super().__init__()
        self.down = nn.Linear(hidden, size, dtype=dtype)
        self.up = nn.Linear(size, hidden, dtype=dtype)
        self.act = nn.ReLU()

    def forward(self, h):
        return h + self.up(self.act(self.down(h)))


def submodule(block: nn.Module, path: str) -> nn.Module | None:
    """The sub-module at dotted `path` inside `block` (a negative index counts from the end of a ModuleList)."""
    mod = block
    for part in path.split("."):
        if isinstance(mod, nn.ModuleList) and part.lstrip("-").isdigit():
            idx = int(part)
            mod = mod[idx] if -len(mod) <= idx < len(mod) else None
        else:
            mod = getattr(mod, part, None)
        if not isinstance(mod, nn.Module):
            return None
    return mod


def _apply(adapter: Bottleneck):
    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (adapter(output[0]),) + output[1:]
        return adapter(output)
    return hook


def add_adapters(blocks: list[nn.Module], hidden: int, size: int, dtype, sites: tuple[str, str]) -> None:
    """Add two adapters per block (built on whatever device is current: the meta device while tracing), after
    the attention and MLP sub-modules at `sites` (FamilyTraits.adapter_sites)."""
    for i, block in enumerate(blocks):
        attn, mlp = (submodule(block, p) for p in sites)
        if attn is None or mlp is None:
            raise MemplanError(f"--peft adapter is not traceable for {type(block).__name__}: no attention / MLP "
                               f"sub-module {' / '.join(sites)} in block {i}")
        for tag, sub in (("attn", attn), ("mlp", mlp)):
            ad = Bottleneck(hidden, size, dtype)
            block.add_module(f"memplan_adapter_{tag}", ad)
            sub.register_forward_hook(_apply(ad))
