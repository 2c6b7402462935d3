"""Parameter groups of a model under a setup: base tensors (trainable or frozen, full or NF4) and adapters.

A ParamGroup is `count` tensors of `numel` elements. Sums over the groups give total and trainable counts;
weights.py turns them into bytes. PEFT counts follow peft 0.21 (tests compare with peft on the meta device).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from memplan.errors import MemplanError
from memplan.spec.model import Linear, ModelSpec, Role, Stack, TensorKind
from memplan.spec.setup import PeftMethod, Precision, TrainingSetup


@dataclass(frozen=True)
class ParamGroup:
    name: str
    numel: int  # elements of one tensor
    count: int
    trainable: bool
    adapter: bool = False  # added by PEFT (kept in the model dtype)
    nf4: bool = False  # stored as bitsandbytes NF4 (QLoRA base)
    matmul: bool = False  # a weight used in a matmul (autocast casts it)
    outside: bool = False  # outside the repeated blocks (embeddings, LM head, final norm)
    rows: int = 0  # first dimension of a matrix (Adafactor factors its second moment), 0 for vectors
    kind: TensorKind | None = None  # the spec tensor's kind; None for nn.Linear weights and biases

    @property
    def total(self) -> int:
        return self.numel * self.count


def _matches(lin: Linear, targets: tuple[str, ...]) -> bool:
    """peft's rule: a module matches when its dotted name ends with '.' + target (or equals it)."""
    if "all-linear" in targets:  # peft: every linear but the output layer (get_output_embeddings())
        return not lin.output
    q = "." + lin.qualname
    return any(q.endswith("." + t) for t in targets)


def lora_targets(model: ModelSpec, setup: TrainingSetup) -> tuple[Linear, ...]:
    targets = setup.lora.targets or model.traits.lora_targets  # peft's defaults for the family
    if not targets:
        raise MemplanError(f"no default LoRA targets for {model.name}: pass --lora-targets")
    hit = tuple(l for l in model.linears if _matches(l, targets))
    if not hit:
        raise MemplanError(
            f"--lora-targets {','.join(targets)} match no linear layer of {model.name} "
            f"(its layers: {', '.join(model.linear_names())})")
    return hit


def ia3_targets(model: ModelSpec, setup: TrainingSetup) -> tuple[tuple[Linear, ...], frozenset]:
    """(IA)3's adapted linears and the qualnames of those peft treats as feed-forward (scaled on their input)."""
    targets = setup.lora.targets or model.traits.ia3_targets  # peft's defaults for the family
    ff = model.traits.ia3_feedforward if not setup.lora.targets else ()
    hit = tuple(l for l in model.linears if _matches(l, targets))
    if not hit:
        raise MemplanError(f"(IA)3 targets {','.join(targets) or '(none)'} match no layer of {model.name}")
    return hit, frozenset(l.qualname for l in hit if _matches(l, ff))


def _block_split(count: int, stack: Stack, model: ModelSpec, keep: int) -> tuple[int, int]:
    """(trainable, frozen) split of `count` tensors of `stack` when only the last `keep` blocks train
    (the decoder's last blocks in an encoder-decoder model, whose encoder then stays frozen)."""
    if stack is Stack.OUTSIDE:
        return count, 0
    if stack is Stack.ENCODER and model.encoder_layers:
        return 0, count
    blocks = model.layers
    per_block = count // blocks
    if per_block == 0:  # a first-block-only tensor (T5's relative_attention_bias)
        return (count, 0) if keep >= blocks else (0, count)
    t = min(keep, blocks) * per_block
    return t, count - t


def _base_groups(model: ModelSpec, setup: TrainingSetup) -> list[ParamGroup]:
    peft = setup.peft
    base_frozen = peft not in (PeftMethod.FULL, PeftMethod.FREEZE, PeftMethod.BITFIT)
    out: list[ParamGroup] = []

    def add(name, numel, count, stack, trainable, nf4=False, matmul=False, rows=0, kind=None):
        if peft is PeftMethod.FREEZE and trainable:
            t, f = _block_split(count, stack, model, setup.train_layers)
            if f:
                out.append(ParamGroup(name, numel, f, False, nf4=nf4, matmul=matmul, outside=stack is Stack.OUTSIDE,
                                      rows=rows, kind=kind))
            count = t
        if count:
            out.append(ParamGroup(name, numel, count, trainable, nf4=nf4, matmul=matmul,
                                  outside=stack is Stack.OUTSIDE, rows=rows, kind=kind))

    quant = peft is PeftMethod.QLORA
    for l in model.linears:
        w_train = not base_frozen and peft is not PeftMethod.BITFIT
        b_train = not base_frozen or peft is PeftMethod.BITFIT
        if peft is PeftMethod.FREEZE and l.stack is Stack.OUTSIDE:
            w_train = b_train = _freeze_head(model, l)
        add(f"{l.qualname}.weight", l.weight_numel, l.count, l.stack, w_train,
            nf4=quant and l.role is not Role.HEAD, matmul=True, rows=l.out_features)
        if l.bias:
            add(f"{l.qualname}.bias", l.out_features, l.count, l.stack, b_train)
    norms = {t.name.rsplit(".", 1)[0] for t in model.tensors if t.kind is TensorKind.NORM_WEIGHT}
    for t in model.tensors:
        train = not base_frozen and (peft is not PeftMethod.BITFIT or t.kind is TensorKind.BIAS)
        tied = model.tie_embeddings and t is _tied_embedding(model)
        if peft is PeftMethod.FREEZE and t.stack is Stack.OUTSIDE:
            # the LM head only (`_freeze_head`): for tied models the embedding that is its weight, and its own bias
            # (BERT's cls.predictions.bias, a bias beside no norm weight); norms, the MLM transform and the other
            # embeddings stay frozen
            train = tied or (t.kind is TensorKind.BIAS and not t.input_side
                             and t.name.rsplit(".", 1)[0] not in norms)
        add(t.name, t.numel, t.count, t.stack, train, matmul=tied,
            rows=t.numel // model.hidden if t.kind is TensorKind.EMBEDDING else 0, kind=t.kind)
    return out


def _freeze_head(model: ModelSpec, l) -> bool:
    """Does an nn.Linear outside the blocks train under --peft freeze? Only the LM head (the module transformers'
    get_output_embeddings() returns, which memplan.trace.build unfreezes): the untied head. A tied model's head is
    its embedding, so a HEAD-role linear there is something else (BERT's MLM transform dense), frozen. The final
    norm stays frozen too, as the trace does and as LLaMA-Factory's freeze tuning does by default
    (src/llamafactory/model/adapter.py _setup_freeze_tuning: a module outside the blocks trains only when named in
    freeze_extra_modules, default None)."""
    return l.role is Role.HEAD and not model.tie_embeddings


def _tied_embedding(model: ModelSpec):
    """The token embedding (first EMBEDDING tensor): the LM head's weight when embeddings are tied."""
    return next((t for t in model.tensors if t.kind is TensorKind.EMBEDDING), None)


def _adapter_groups(model: ModelSpec, setup: TrainingSetup) -> list[ParamGroup]:
    peft, r = setup.peft, setup.lora.rank
    out: list[ParamGroup] = []
    if peft in (PeftMethod.LORA, PeftMethod.DORA, PeftMethod.QLORA):
        for l in lora_targets(model, setup):
            out.append(ParamGroup(f"{l.qualname}.lora_A", r * l.in_features, l.count, True, adapter=True, matmul=True,
                                  rows=r))
            out.append(ParamGroup(f"{l.qualname}.lora_B", l.out_features * r, l.count, True, adapter=True, matmul=True,
                                  rows=l.out_features))
            if peft is PeftMethod.DORA:
                out.append(ParamGroup(f"{l.qualname}.lora_magnitude", l.out_features, l.count, True, adapter=True))
    elif peft is PeftMethod.IA3:
        hit, ff = ia3_targets(model, setup)
        for l in hit:
            n = l.in_features if l.qualname in ff else l.out_features
            out.append(ParamGroup(f"{l.qualname}.ia3_l", n, l.count, True, adapter=True))
    elif peft is PeftMethod.PROMPT:
        subs = 2 if model.encoder_layers else 1  # peft: num_transformer_submodules = 2 for seq2seq
        out.append(ParamGroup("prompt_embeddings", setup.num_virtual_tokens * subs * model.hidden, 1, True,
                              adapter=True))
    elif peft is PeftMethod.PREFIX:
        # peft PrefixEncoder: Embedding(num_virtual_tokens, num_layers * 2 * token_dim); token_dim is the
        # key/value width (kv_heads * head_dim) when the config names num_key_value_heads (peft #1901).
        token_dim = model.kv_dim if "num_key_value_heads" in model.hf_config else model.hidden
        layers = model.encoder_layers or model.layers
        out.append(ParamGroup("prefix_embeddings", setup.num_virtual_tokens * layers * 2 * token_dim, 1, True,
                              adapter=True))
    elif peft is PeftMethod.ADAPTER:
        # Houlsby bottleneck adapter after attention and after the MLP of every block:
        # down (h×m + m) and up (m×h + h) = 2hm + m + h parameters each.
        m, h = setup.adapter_size, model.hidden
        out.append(ParamGroup("adapter.down.weight", h * m, 2 * model.blocks, True, adapter=True, matmul=True))
        out.append(ParamGroup("adapter.down.bias", m, 2 * model.blocks, True, adapter=True))
        out.append(ParamGroup("adapter.up.weight", m * h, 2 * model.blocks, True, adapter=True, matmul=True))
        out.append(ParamGroup("adapter.up.bias", h, 2 * model.blocks, True, adapter=True))
    return out


def param_groups(model: ModelSpec, setup: TrainingSetup) -> tuple[ParamGroup, ...]:
    return _groups(model, setup.peft, setup.lora, setup.num_virtual_tokens, setup.adapter_size, setup.train_layers)


@lru_cache(maxsize=4096)
def _groups(model, peft, lora, num_virtual_tokens, adapter_size, train_layers) -> tuple[ParamGroup, ...]:
    setup = TrainingSetup(peft=peft, lora=lora, num_virtual_tokens=num_virtual_tokens, adapter_size=adapter_size,
                          train_layers=train_layers, precision=Precision.BF16)
    return tuple(_base_groups(model, setup) + _adapter_groups(model, setup))


def trainable_params(groups) -> int:
    return sum(g.total for g in groups if g.trainable)


def all_params(groups) -> int:
    """Every parameter the step holds, adapters included: what `total_params` reports in every tier (the trace's
    and the measurement's model.parameters(), peft's print_trainable_parameters "all params")."""
    return sum(g.total for g in groups)
