"""Activation offloading as torchtune runs it (--offload-activations), for the trace and the CPU measurement.

`OffloadActivations` below reimplements torchtune 0.6.1's torchtune/training/_activation_offloading.py
(class OffloadActivations, defaults use_pin_memory=True, use_streams=True, max_fwd_stash_size=5,
min_offload_size=1024) decision for decision; torchtune is not a dependency (its module imports torchao, psutil
and torchtune.modules, and calls torch.cuda at construction), so its code cannot run here as it is. What it does:

- pack (forward): every saved tensor gets an id (a counter over all saves). A tensor of
  element_size() * nelement() >= 1024 bytes that is not an nn.Parameter / nn.Buffer instance is copied to a new
  pinned host tensor (torch.empty_like(..., pin_memory=True, device="cpu") + copy_) and the host copy is what
  the step keeps; smaller ones (and parameters) are kept as they are. Views are not parameters: a matmul's
  saved `weight.t()` is copied to the host like any activation. With streams, the device tensor is kept in
  `fwd_stash` until a later save has an id max_fwd_stash_size or more above it (then dropped); the stash is
  emptied by the first backward node that unpacks an offloaded tensor.
- unpack (backward, use_streams=True): a tensor still in the forward stash is used as it is; any other is copied
  back to a new device tensor, kept in `bwd_tensor_stash` until the post-hook of the next autograd node that
  brings tensors back (or, when a view of it was taken, e.g. by a checkpoint's recomputation, released with
  record_stream once unused); what is left is released by a callback at the end of backward.
- torchtune's recipes enter the context around the model's forward only, with a NoOpManager around the output
  projection (get_act_offloading_ctx_manager): the LM head's saves, and the loss computed after the forward,
  stay on the device. Here the head's forward pre-hook pauses offloading until the forward-with-loss returns.
  (torchtune's recipes refuse offloading without activation checkpointing; the context itself runs either way.)

On CUDA (memplan measure --device cuda) the same class runs with pinned host copies on the one compute stream:
torchtune's decisions and holding rules, without its second stream's overlap (its time is the no-overlap bound).
On the CPU streams do not exist: every copy is complete when it returns, so the trace is the no-overlap bound of
the stash (the device tensors the stash keeps are held exactly as the code holds them; CUDA only frees them
later when a copy is still running, and keeps record_stream'd tensors until their stream work completes).
Host copies are tagged HOST (not device memory) at the pinned allocator's size: CUDA's CachingHostAllocator
rounds each pinned block up to a power of two (ATen/core/CachingHostAllocator.h, `PowerOf2Ceil`).
"""
from __future__ import annotations

import contextlib

import torch
from torch.autograd.graph import saved_tensors_hooks

from memplan.trace.tracker import HOST, AllocTracker
from memplan.estimate.offload import MAX_FWD_STASH_SIZE, MIN_OFFLOAD_SIZE, pinned_bytes


class OffloadActivations(saved_tensors_hooks):
    """torchtune 0.6.1's OffloadActivations(use_streams=True) on the CPU (module doc). `tracker` accounts the
    host copies as HOST and what stays or comes back on the device as saved for backward."""

    def __init__(self, tracker: AllocTracker | None, max_fwd_stash_size: int = MAX_FWD_STASH_SIZE,
                 min_offload_size: int = MIN_OFFLOAD_SIZE):
        self.tracker = tracker
        self.min_tensor_size_bytes = min_offload_size
        self.max_fwd_stash_size = max_fwd_stash_size
        self.saved: dict = {}  # torchtune's `tracker`: id -> (tensor, its device if offloaded, else None)
        self.tensor_id = 0
        self.fwd_stash: dict[int, torch.Tensor] = {}
        self.bwd_tensor_stash: dict[int, torch.Tensor] = {}
        self.curr_graph_id = None
        self.curr_autograd_node = None
        self.is_first_forward_call = True
        self.is_first_backward_call = True
        self.paused = False  # torchtune's NoOpManager around the output projection (here: head and loss)
        self.offloaded_bytes = 0  # host bytes of the last forward (pinned sizes)
        super().__init__(self._pack, self._unpack)

    # ---- forward --------------------------------------------------------------------------------------------
    def _pack(self, activation: torch.Tensor):
        if self.paused:  # NoOpManager: the tensor itself, as autograd would keep it
            self._mark_saved(activation)
            return activation
        if self.is_first_forward_call:
            assert not self.saved, "backward pass should have cleared tracker of all tensors"
            self.is_first_forward_call = False
            self.is_first_backward_call = True
            self.offloaded_bytes = 0
        num_bytes = activation.element_size() * activation.nelement()
        self.tensor_id += 1
        tensor_id = self.tensor_id
        if num_bytes >= self.min_tensor_size_bytes and not isinstance(activation, (torch.nn.Parameter,
                                                                                   torch.nn.Buffer)):
            for i in list(self.fwd_stash):  # sync back and dereference the tensors offloaded long enough ago
                if i <= tensor_id - self.max_fwd_stash_size:
                    del self.fwd_stash[i]
                else:
                    break
            pin = activation.device.type == "cuda"  # use_pin_memory=True (a CPU-only build cannot pin)
            with self._host():
                cpu_tensor = torch.empty_like(activation, pin_memory=pin, device="cpu")
                cpu_tensor.copy_(activation)
            if self.tracker is not None:
                self.tracker.resize(cpu_tensor, pinned_bytes(num_bytes))
            self.offloaded_bytes += pinned_bytes(num_bytes)
            self.saved[tensor_id] = (cpu_tensor, activation.device)
            self._mark_saved(activation)  # held by the stash until the copy is known done
            self.fwd_stash[tensor_id] = activation
        else:
            self._mark_saved(activation)
            self.saved[tensor_id] = (activation, None)
        return tensor_id

    # ---- backward -------------------------------------------------------------------------------------------
    def _unpack(self, tensor_id):
        if not isinstance(tensor_id, int):  # saved while paused
            return tensor_id
        if self.is_first_backward_call:
            self.curr_graph_id = torch._C._current_graph_task_id()
            torch.autograd.variable.Variable._execution_engine.queue_callback(self._release_all)
            self.is_first_backward_call = False
            self.is_first_forward_call = True
        tensor, device = self.saved.pop(tensor_id)  # device: where an offloaded tensor came from (None: kept)
        if device is None:
            return tensor
        graph_id = torch._C._current_graph_task_id()
        node = torch._C._current_autograd_node()
        prev_node_ids = []
        if graph_id == self.curr_graph_id and self.curr_autograd_node != node:
            self.curr_autograd_node = node
            prev_node_ids = list(self.bwd_tensor_stash)
        brought_back = tensor_id not in self.fwd_stash
        if not brought_back:
            tensor = self.fwd_stash[tensor_id]
        else:
            tensor = tensor.to(device, copy=True)  # `.to("cuda", non_blocking=True)`: a new device tensor
            self._mark_saved(tensor)
            self.bwd_tensor_stash[tensor_id] = tensor
            storage_refcount = torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)

        def hook(outputs, inputs):
            if brought_back and tensor_id in self.bwd_tensor_stash:
                unpacked = self.bwd_tensor_stash[tensor_id]
                if torch._C._storage_Use_Count(unpacked.untyped_storage()._cdata) > storage_refcount:
                    del self.bwd_tensor_stash[tensor_id]  # record_stream: freed once nothing uses it
            self.fwd_stash.clear()  # in backward now: the forward stash is released
            for i in prev_node_ids:
                self.bwd_tensor_stash.pop(i, None)
            return outputs

        if node is not None:
            node.register_hook(hook)
        return tensor

    def _release_all(self) -> None:
        self.bwd_tensor_stash.clear()

    # ---- accounting -----------------------------------------------------------------------------------------
    def _host(self):
        return self.tracker.scope(HOST) if self.tracker is not None else contextlib.nullcontext()

    def _mark_saved(self, t: torch.Tensor) -> None:
        if self.tracker is not None:
            self.tracker.saved(t)


@contextlib.contextmanager
def offloading(offloader: OffloadActivations | None, head: torch.nn.Module | None):
    """The forward (with its loss) under `offloader`, paused from the LM head's first call to the end (torchtune's
    NoOpManager on model.output; its loss runs outside the context). None: nothing."""
    if offloader is None:
        yield
        return
    offloader.paused = False
    handle = None
    if head is not None:
        handle = head.register_forward_pre_hook(lambda *_: setattr(offloader, "paused", True))
    try:
        with offloader:
            yield
    finally:
        offloader.paused = False
        if handle is not None:
            handle.remove()
