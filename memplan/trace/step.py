"""One training iteration as a setup runs it: forward (with the loss), backward, optimizer step, zero_grad.

Precision:
  fp32                 fp32 parameters, no autocast.
  fp16 / bf16          torch.autocast(device_type="cpu", dtype=half) around the forward (the loss included),
                       over fp32 parameters; fp16 adds loss scaling (see `Scaler`).
  fp16-/bf16-master    parameters and gradients in half precision; the optimizer owns fp32 master copies of the
                       trainable parameters (created once, beside the model). At the step each half gradient is
                       copied to an fp32 gradient on its master and freed, the optimizer steps the masters, the
                       masters are copied back into the half parameters in place, and zero_grad frees the fp32
                       gradients. (DeepSpeed's stage-0 FP16_Optimizer and Megatron keep the same states; their
                       flat buffers differ only in allocator layout.)
  pure-bf16            bf16 parameters, the optimizer steps them directly (states in bf16).
Optimizers (one parameter group over all trainable parameters, foreach where CUDA would default to it):
  adamw AdamW(foreach=True) · adamw-fused AdamW(fused=True) (torch has a CPU fused kernel; like CUDA's it keeps
  no step temporaries) · adamw-forloop AdamW(foreach=False) · sgd SGD(foreach=True) · momentum
  SGD(momentum=0.9, foreach=True) · adafactor torch.optim.Adafactor(foreach=True) · adamw-8bit / paged-adamw /
  paged-adamw-8bit bitsandbytes' AdamW8bit / PagedAdamW / PagedAdamW8bit, lion-32bit / lion-8bit / paged-lion /
  paged-lion-8bit its Lion32bit / Lion8bit / PagedLion32bit / PagedLion8bit (`bnb_optimizer`) · lion / lion-foreach
  lion-pytorch's Lion / foreach Lion, adam-mini Adam-mini with the named parameters (`EXTERNAL`) · --optimizer-impl
  variants (sgd-fused, momentum-forloop, adafactor-forloop, ...) with their implementation forced (`OPTIMIZERS`).
--optimizer-in-backward: torchtune's optimizer_in_bwd, one optimizer per trainable tensor stepped by a
  post-accumulate-grad hook inside backward (`InBackward`).
The optimizer `step` counters of non-fused optimizers live on the host (torch keeps them on the CPU unless
capturable / fused) and are not counted; fused ones live on the device and are.
"""
from __future__ import annotations

import contextlib

import torch

from memplan.categories import Phase
from memplan.estimate.optimizer import PAGED_MIN_NUMEL  # bitsandbytes get_state_buffer's paging threshold
from memplan.spec.setup import Optimizer, TrainingSetup
from memplan.trace.tracker import G, HOST, MW, OS, AllocTracker
from memplan.units import round_block


class Scaler:
    """torch.amp.GradScaler's device tensors and ops (scale, growth tracker, inv_scale, found_inf), minus its
    host sync (`found_inf.item()`: the step always runs)."""

    def __init__(self, init_scale: float = 2.0**16):
        self.init_scale = init_scale
        self._scale = None
        self._growth = None

    def scale(self, loss):
        if self._scale is None:
            self._scale = torch.full((), self.init_scale, dtype=torch.float32)
            self._growth = torch.full((), 0, dtype=torch.int32)
        return loss * self._scale

    def unscale_(self, params):
        self._inv = self._scale.double().reciprocal().float()
        self._found = torch.full((), 0.0, dtype=torch.float32)
        grads = [p.grad for p in params if p.grad is not None]
        by_dtype: dict = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, self._found, self._inv)

    def update(self):
        torch._amp_update_scale_(self._scale, self._growth, self._found, 2.0, 0.5, 2000)
        self._inv = self._found = None


OPTIMIZERS = {  # what each --optimizer constructs (class, keyword arguments)
    Optimizer.ADAMW: (torch.optim.AdamW, dict(lr=1e-4, foreach=True)),
    Optimizer.ADAMW_FUSED: (torch.optim.AdamW, dict(lr=1e-4, fused=True)),
    Optimizer.ADAMW_FORLOOP: (torch.optim.AdamW, dict(lr=1e-4, foreach=False)),
    Optimizer.SGD: (torch.optim.SGD, dict(lr=1e-3, foreach=True)),
    Optimizer.MOMENTUM: (torch.optim.SGD, dict(lr=1e-3, momentum=0.9, foreach=True)),
    Optimizer.ADAFACTOR: (torch.optim.Adafactor, dict(lr=1e-2, foreach=True)),
    # --optimizer-impl (memplan.spec.setup.IMPLEMENTATIONS): each implementation forced, as CUDA would run it
    # (on CPU tensors torch defaults to the for-loop; fused SGD has a CPU kernel in torch 2.13, like AdamW's)
    Optimizer.SGD_FUSED: (torch.optim.SGD, dict(lr=1e-3, fused=True)),
    Optimizer.SGD_FORLOOP: (torch.optim.SGD, dict(lr=1e-3, foreach=False)),
    Optimizer.MOMENTUM_FUSED: (torch.optim.SGD, dict(lr=1e-3, momentum=0.9, fused=True)),
    Optimizer.MOMENTUM_FORLOOP: (torch.optim.SGD, dict(lr=1e-3, momentum=0.9, foreach=False)),
    Optimizer.ADAFACTOR_FORLOOP: (torch.optim.Adafactor, dict(lr=1e-2, foreach=False)),
}
# Optimizers of other packages (optional extra `optim`): module, class, keyword arguments. Adam-mini also takes the
# named parameters and the model's dim / n_heads / n_kv_heads, as its README passes them (`adam_mini_kwargs`).
EXTERNAL = {
    Optimizer.LION: ("lion_pytorch", "Lion", dict(lr=1e-4)),  # lion-pytorch 0.2.5: use_triton=False, a loop
    Optimizer.LION_FOREACH: ("lion_pytorch.foreach", "Lion", dict(lr=1e-4)),
    Optimizer.ADAM_MINI: ("adam_mini", "Adam_mini", dict(lr=1e-4, verbose=False)),
}
EXTERNAL_PINS = {"lion_pytorch": "lion-pytorch==0.2.5", "adam_mini": "adam-mini==1.1.1"}


def external_optimizer(kind: Optimizer) -> tuple[type, dict]:
    """The class of an optimizer from another package and its keyword arguments; one line if it is not installed."""
    import importlib

    from memplan.errors import MemplanError

    module, name, kw = EXTERNAL[kind]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MemplanError(f"--optimizer {kind.value} runs {top}'s optimizer: pip install --no-deps "
                           f"{EXTERNAL_PINS[top]} (or memplan[optim])") from None
    return getattr(mod, name), dict(kw)


def adam_mini_kwargs(model) -> dict:
    """Adam-mini's model config (its README: dim, n_heads, n_kv_heads) read from a transformers model's config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    return dict(dim=cfg.hidden_size, n_heads=heads, n_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads)


def make_optimizer(kind: Optimizer, params: list, setup: TrainingSetup | None = None, names: list | None = None,
                   model=None) -> torch.optim.Optimizer:
    """The optimizer over `params`; under ZeRO-1 partitioned by ZeroRedundancyOptimizer (its default
    parameters_as_bucket_view=False), the local optimizer the same class with the same arguments. Adam-mini gets
    `names` (the model's parameter names of `params`) and the model's head config."""
    if kind is Optimizer.ADAM_MINI:
        cls, kw = external_optimizer(kind)
        return cls(list(zip(names, params)), **kw, **adam_mini_kwargs(model))
    if kind in EXTERNAL:
        cls, kw = external_optimizer(kind)
    elif kind.bitsandbytes:
        cls, kw = bnb_optimizer(kind)
    elif kind not in OPTIMIZERS:
        raise ValueError(kind)
    else:
        cls, kw = OPTIMIZERS[kind]
    if setup is not None and setup.zero == 1 and setup.gpus > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kw)
    return cls(params, **kw)


# bitsandbytes' optimizers (bitsandbytes/optim/adamw.py), constructed with their defaults: blockwise 8-bit states
# (blocksize 256) for tensors of min_8bit_size = 4096 elements or more, fp32 states below; paged states for tensors
# of 1e5 elements or more on CUDA (Optimizer8bit.get_state_buffer: cudaMallocManaged unified memory; on the CPU it
# falls back to ordinary tensors). Their update kernels are torch custom ops (bitsandbytes/_ops.py
# optimizer_update_32bit / optimizer_update_8bit_blockwise) with fake-tensor kernels, so the step runs for real under
# FakeTensorMode, in place, with no temporaries, as the CUDA kernels do.
BNB_CLASSES = {Optimizer.ADAMW_8BIT: "AdamW8bit", Optimizer.PAGED_ADAMW: "PagedAdamW",
               Optimizer.PAGED_ADAMW_8BIT: "PagedAdamW8bit", Optimizer.LION_32BIT: "Lion32bit",
               Optimizer.LION_8BIT: "Lion8bit", Optimizer.PAGED_LION: "PagedLion32bit",
               Optimizer.PAGED_LION_8BIT: "PagedLion8bit"}


def bnb_optimizer(kind: Optimizer) -> tuple[type, dict]:
    """The bitsandbytes class of `kind` and its keyword arguments; one line if bitsandbytes cannot run it."""
    import logging

    from memplan.errors import MemplanError

    log = logging.getLogger("bitsandbytes")  # it logs a missing optional CPU kernel package at import
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise MemplanError(f"--optimizer {kind.value} runs bitsandbytes' optimizer: pip install --no-deps "
                           "bitsandbytes==0.50.2") from None
    finally:
        log.setLevel(level)
    if not hasattr(torch.ops.bitsandbytes, "optimizer_update_8bit_blockwise"):
        raise MemplanError(f"bitsandbytes {getattr(bnb, '__version__', '?')} has no torch custom ops for its "
                           f"optimizers (fake-tensor tracing needs them): install bitsandbytes 0.50.2")
    return getattr(bnb.optim, BNB_CLASSES[kind]), dict(lr=1e-4)


def paged_state(kind: Optimizer, name: str, param: torch.Tensor) -> bool:
    """A state tensor bitsandbytes allocates in CUDA unified memory (outside PyTorch's caching allocator)."""
    return kind.paged and name in ("state1", "state2") and param.numel() >= PAGED_MIN_NUMEL


class InBackward:
    """torchtune 0.6.1's optimizer_in_bwd (torchtune/training/memory.py register_optim_in_bwd_hooks; recipes/
    full_finetune_single_device.py _setup_optimizer): one optimizer per trainable tensor, whose post-accumulate-grad
    hook calls `step()` then `zero_grad()`, so each gradient is freed as soon as it has been applied. Master-weight
    precisions copy the half gradient to the fp32 master's, free the half one, step the master and copy it back (as
    TrainLoop._step does for all of them at once)."""

    def __init__(self, loop: "TrainLoop"):
        self.loop = loop
        owned = loop.masters if loop.master else loop.shards
        self.optims = {p: make_optimizer(loop.setup.optimizer, [o], names=[n], model=loop.model)
                       for p, o, n in zip(loop.params, owned, loop.names)}
        self.owner = dict(zip(loop.params, owned))

    @property
    def state(self) -> dict:
        return {k: v for o in self.optims.values() for k, v in o.state.items()}

    def hook(self, p) -> None:
        opt, m = self.optims[p], self.owner[p]
        if m is not p:  # master weights
            m.grad = p.grad.float()
            self.loop.tracker.track(m.grad, G)
            p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if m is not p:
            with torch.no_grad():
                p.copy_(m)

    def handles(self) -> list:
        """The hooks, registered after TrainLoop's gradient tagging hook (hooks run in registration order)."""
        return [p.register_post_accumulate_grad_hook(self.hook) for p in self.optims]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optims.values():
            o.zero_grad(set_to_none=set_to_none)


class TrainLoop:
    """Owns the optimizer (and master weights); `iteration(batch)` runs one step with phases marked."""

    def __init__(self, model, setup: TrainingSetup, tracker: AllocTracker, compute_dtype):
        self.model, self.setup, self.tracker = model, setup, tracker
        self.compute_dtype = compute_dtype
        named = {p: n for n, p in model.named_parameters()}  # (named_parameters lists a tied tensor once)
        self.params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
        self.names = [named[p] for p in self.params]
        # FSDP2's parameters are DTensors: the optimizer steps their local shards, the same local ops DTensor's
        # foreach dispatch would run, without its sharding propagation (minutes on a 70B model)
        self.shards = [getattr(p, "_local_tensor", p) for p in self.params]
        self.local = any(s is not p for s, p in zip(self.shards, self.params))
        self.master = setup.precision.master_weights
        # FSDP2 CPU offload: gradients, masters and the optimizer step (states, temporaries) live on the host
        self.host = setup.offload_params and setup.zero == 3
        grad_tag = HOST if self.host else G
        if self.master:
            with torch.no_grad():
                self.masters = [torch.nn.Parameter(p.detach().float()) for p in self.shards]
            for p, m in zip(self.params, self.masters):
                if p.dtype is not torch.float32:  # .float() of an fp32 tensor is the tensor itself: no copy
                    tracker.track(m, HOST if self.host else MW)
        self.in_backward = setup.optimizer_in_backward
        if self.in_backward:
            self.optimizer = InBackward(self)
        else:
            self.optimizer = make_optimizer(setup.optimizer, self.masters if self.master else self.shards, setup,
                                            names=self.names, model=model)
        self.scaler = Scaler() if setup.precision.grad_scaler else None
        self._hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.track(p.grad, grad_tag))
                       for p in self.params]
        if self.in_backward:
            self._hooks += self.optimizer.handles()
        self.offloader = None  # --offload-activations: torchtune's OffloadActivations (memplan.trace.offload)
        if setup.offload_activations:
            from memplan.trace.offload import OffloadActivations

            self.offloader = OffloadActivations(tracker)
        self.paged_bytes = 0  # bitsandbytes' paged states: CUDA unified memory, outside the allocator (tag_states)
        self.grads_seq = 0  # event at which the last optimizer step began (all gradients alive)
        self.teacher = None  # --teacher: the frozen teacher the session attaches (memplan.trace.distill)

    def _autocast(self):
        if self.setup.precision.autocast:
            return torch.autocast(device_type="cpu", dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def iteration(self, batch: dict) -> None:
        t, n = self.tracker, self.setup.grad_accum
        for i in range(n):
            t.set_phase(Phase.FORWARD)
            with self._autocast(), self._offloading():
                loss = self._loss(batch)
            if n > 1:
                loss = loss / n
            t.set_phase(Phase.BACKWARD)
            t.set_mark("loss.backward")  # until the gradient reaches the LM head's output
            if self.scaler is not None:
                loss = self.scaler.scale(loss)
            with self._sync(last=i == n - 1):
                loss.backward()
            del loss
        t.set_phase(Phase.OPTIMIZER_STEP)
        self.grads_seq = t.seq
        with t.scope(HOST) if self.host else contextlib.nullcontext():
            self._step()

    def _offloading(self):
        """--offload-activations: the forward under OffloadActivations, the LM head and the loss left on the device."""
        from memplan.trace.offload import offloading

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        head = base.get_output_embeddings() if self.offloader is not None else None
        return offloading(self.offloader, head)

    def _loss(self, batch: dict):
        """The micro-batch's loss: the model's own (its output, the logits, dropped here as Trainer does), or the
        setup's chunked / last-K loss (memplan.trace.policies)."""
        from memplan.trace.policies import step_loss, uses_head_loss

        if self.teacher is not None:  # --teacher: memplan.trace.distill
            from memplan.trace.distill import distill_loss

            return distill_loss(self.model, self.teacher, batch, self.setup, self.tracker.set_mark)
        if not uses_head_loss(self.setup):
            return self.model(**batch).loss
        from memplan.trace.distributed import unwrapped

        inner = unwrapped(self.model)  # DDP's module (FSDP2 shards in place)
        base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        return step_loss(self.model, base, batch, self.setup)

    def _sync(self, last: bool):
        """Gradient accumulation under a data-parallel engine: memplan.trace.distributed.sync_context."""
        if self.setup.gpus == 1 and self.setup.zero == 0:
            return contextlib.nullcontext()
        from memplan.trace.distributed import sync_context

        return sync_context(self.model, self.setup, last)

    def _step(self) -> None:
        if self.in_backward:  # every tensor was stepped by its hook during backward
            return
        if self.master:
            for p, m in zip(self.params, self.masters):
                if p.grad is not None:
                    m.grad = getattr(p.grad, "_local_tensor", p.grad).float()
                    self.tracker.track(m.grad, HOST if self.host else G)
                    p.grad = None
        elif self.local:
            for p, s in zip(self.params, self.shards):
                s.grad = None if p.grad is None else p.grad._local_tensor
        owned = self.masters if self.master else self.shards
        if self.scaler is not None:
            self.scaler.unscale_(owned)
        self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        if self.master:
            with torch.no_grad():
                for p, m in zip(self.shards, self.masters):
                    p.copy_(m)
        self.optimizer.zero_grad(set_to_none=True)
        if self.local:
            for p in self.params:
                p.grad = None

    def tag_states(self) -> None:
        """After the first step: optimizer state is `optimizer_states`; non-fused step counters are host-side.
        bitsandbytes' paged states are outside the device allocator (tagged HOST: the tracker's one tag it does not
        count on the device) and summed in `paged_bytes`."""
        fused = self.setup.optimizer is Optimizer.ADAMW_FUSED
        local = getattr(self.optimizer, "optim", self.optimizer)  # ZeroRedundancyOptimizer: this rank's
        paged = {}
        for p, state in local.state.items():
            for k, v in state.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if not self.host and paged_state(self.setup.optimizer, k, p):
                    self.tracker.track(v, HOST)
                    paged[id(v.untyped_storage())] = round_block(v.untyped_storage().nbytes())
                    continue
                self.tracker.track(v, HOST if (k == "step" and not fused) or self.host else OS)
        self.paged_bytes = sum(paged.values())

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
