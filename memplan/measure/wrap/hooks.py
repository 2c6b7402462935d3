"""The instrumentation that runs inside the user's process (`memplan measure -- COMMAND`), installed at startup
by the injected sitecustomize (memplan.measure.wrap.site) when MEMPLAN_WRAP_DIR is set.

Global hooks only; the user's script is not changed:
  step boundaries  torch.optim.optimizer.register_optimizer_step_pre_hook / _post_hook (every torch optimizer,
                   the outermost call of a nested one: a wrapper's step calling its inner optimizer's counts once)
  forward          torch.nn.modules.module.register_module_forward_pre_hook / forward hook (always_call): the top
                   model is the first module called outside any other module's forward, in training mode, with
                   gradients enabled and trainable parameters; its calls open the forward phase and show the
                   batch shape (input_ids)
  backward         torch.autograd.backward wrapped (Tensor.backward, accelerate's, a GradScaler's scaled loss
                   all go through it): its start opens the backward phase
  failures         sys.excepthook wrapped: the exception that ended the script, and the phase it ended in
Phases as memplan measures them (memplan.categories.Phase): load (start until the first training forward),
forward (with the loss: until backward starts), backward (until the optimizer step), optimizer_step (the step and
what follows it, zero_grad, until the next forward).

Memory per phase (peak, end) through a reader: on CUDA the caching allocator's counters
(memplan.measure.cuda.CudaReader: memory_stats, peaks reset at each boundary) and NVML's device level
(memplan.measure.memory.DeviceLevel); on the CPU memplan's AllocTracker (as --device cpu: memplan.measure.cpu),
pushed as a dispatch mode for the whole run.

What the run shows of its setup is observed raw (class names, dtypes, config dicts, environment variables) and
written with the measurements to MEMPLAN_WRAP_DIR/rank-<RANK>-<pid>.json (after each step at most once a
second, and at exit), so a killed run keeps what it measured. memplan.measure.wrap.detect turns it into a
TrainingSetup in the parent. A process that trained nothing (a launcher) writes no file.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import sys
import time

ENV_DIR = "MEMPLAN_WRAP_DIR"
ENV_DEVICE = "MEMPLAN_WRAP_DEVICE"  # "cpu" or "cuda"
ENV_ROOT = "MEMPLAN_WRAP_ROOT"
WRITE_EVERY_S = 1.0  # the rank file is rewritten after a step at most this often (and always at exit)
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "ACCELERATE_USE_FSDP",
              "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_MIXED_PRECISION",
              "FSDP_SHARDING_STRATEGY", "FSDP_OFFLOAD_PARAMS", "FSDP_VERSION", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
              "ACCELERATE_DYNAMO_BACKEND")
OPT_DEFAULTS = ("lr", "betas", "eps", "weight_decay", "momentum", "foreach", "fused", "amsgrad", "nesterov",
                "scale_parameter", "relative_step", "optim_bits", "is_paged")

_state = None  # the one Watcher of this process


def _dtype(t) -> str:
    return str(t.dtype).replace("torch.", "")


def _json_safe(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return sorted(str(x) for x in v)
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    return str(v)


class CpuMemory:
    """--device cpu: memplan's AllocTracker (as memplan.measure.cpu: 512-byte rounding, the CUDA op hooks) as a
    dispatch mode from startup; a phase's peak is the tracker's own phase peak, taken and forgotten at its end."""

    reason = "--device cpu: no reserved or device level (allocated bytes from memplan's tracker)"

    def __init__(self):
        from memplan.trace import cuda as trace_cuda
        from memplan.trace.tracker import AllocTracker

        self.tracker = AllocTracker(round_to=512, fake=False, op_hooks=trace_cuda.op_hooks())
        self.tracker.__enter__()

    def boundary(self, new_phase) -> dict:
        from memplan.categories import Phase

        t = self.tracker
        old = t.phase
        peak = t.phase_peaks.pop(old, t.total)
        seq = t.phase_peak_seq.pop(old, t.seq)
        t.set_phase(Phase(new_phase) if new_phase else old)
        if not new_phase:  # the run ends: no phase opens
            t.phase_peaks.pop(old, None)
        return {"peak_allocated_bytes": int(peak), "end_allocated_bytes": int(t.total), "seq": seq}

    def tag(self, tensors, kind: str) -> None:
        from memplan.trace import tracker as tr

        tag = {"weights": tr.W, "gradients": tr.G, "optimizer_states": tr.OS}[kind]
        for x in tensors:
            try:
                self.tracker.track(x, tag)
            except Exception:  # a tensor the tracker cannot see (sparse, a subclass): untagged
                pass

    def categories_at(self, seq: int) -> dict:
        return {c.value: int(n) for c, n in self.tracker.categories_at(seq).items()}

    def finish(self, reserved_peak) -> dict:
        return {"device_bytes": None, "device_reason": self.reason, "context_bytes": None}


class CudaMemory:
    """--device cuda: the caching allocator's counters at each boundary (memplan.measure.cuda.CudaReader, which
    resets the peaks so each phase's peak is its own) and NVML's device level sampled there
    (memplan.measure.memory.DeviceLevel: this process's reading, the CUDA context)."""

    def __init__(self):
        import torch

        from memplan.measure.memory import DeviceLevel, Nvml, nvml_index

        self.torch = torch
        self.device = None
        self.reader = None
        self.dl = None
        self._nvml = (DeviceLevel, Nvml, nvml_index)
        self.reason = None

    def _ready(self) -> bool:
        torch = self.torch
        if self.reader is not None:
            return True
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return False
        from memplan.measure.cuda import CudaReader

        DeviceLevel, Nvml, nvml_index = self._nvml
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.reader = CudaReader(torch.cuda, self.device)
        try:
            self.dl = DeviceLevel(Nvml(nvml_index(self.device.index)))
            self.dl.after_context(torch.cuda.memory_reserved(self.device))
            self.reason = self.dl.reason
        except Exception as exc:
            self.dl, self.reason = None, f"NVML: {exc}"
        return True

    def boundary(self, new_phase) -> dict:
        if not self._ready():
            return {"peak_allocated_bytes": 0, "end_allocated_bytes": 0, "peak_reserved_bytes": 0}
        end, peak, peak_res = self.reader.boundary()
        if self.dl is not None:
            try:
                self.dl.sample()
            except Exception:
                pass
        return {"peak_allocated_bytes": peak, "end_allocated_bytes": end, "peak_reserved_bytes": peak_res}

    def tag(self, tensors, kind: str) -> None:
        pass

    def categories_at(self, seq) -> None:
        return None

    def stats(self) -> dict:
        if self.reader is None:
            return {}
        s = self.torch.cuda.memory_stats(self.device)
        return {"alloc_retries": int(s.get("num_alloc_retries", 0)), "num_ooms": int(s.get("num_ooms", 0))}

    def finish(self, reserved_peak) -> dict:
        if self.dl is None or self.reader is None:
            return {"device_bytes": None, "device_reason": self.reason or "CUDA never initialised",
                    "context_bytes": None, **self.stats()}
        try:
            ctx = self.dl.settle(self.torch.cuda.memory_reserved(self.device), "after the steps")
            dev, source = self.dl.peak_bytes(reserved_peak)
        except Exception as exc:
            return {"device_bytes": None, "device_reason": f"NVML: {exc}", "context_bytes": None, **self.stats()}
        return {"device_bytes": dev, "device_source": source, "device_reason": None if dev else self.reason,
                "context_bytes": ctx, "device_level": self.dl.to_dict(), **self.stats()}


class Watcher:
    """The per-process state the hooks feed (one per process; see the module doc)."""

    def __init__(self, job_dir: str, device: str):
        self.job_dir, self.device = job_dir, device
        self.memory = CudaMemory() if device == "cuda" else CpuMemory()
        self.phase = "load"
        self.phase_step = -1  # the optimizer step a phase belongs to (-1: load)
        self.steps_done = 0
        self.depth = 0  # module forwards in progress
        self.opt_depth = 0
        self.bwd_depth = 0
        self.top = None  # id of the top model
        self.training_call = False  # the top model's training forward is running
        self.t0 = time.perf_counter()
        self.t_step = None  # when the current step started (its first forward)
        self.load = None
        self.steps: list[dict] = []  # per optimizer step: time, tokens, forwards, phase peaks
        self.cur = self._new_step()
        self.observed: dict = {"env": {k: os.environ[k] for k in LAUNCH_ENV if k in os.environ},
                               "argv": list(sys.argv), "python": sys.executable}
        self.error = None
        self.finished = False
        self.last_write = 0.0
        self.rank = os.environ.get("RANK", "0")
        self.pid = os.getpid()
        self.path = os.path.join(job_dir, f"rank-{self.rank}-{self.pid}.json")

    @staticmethod
    def _new_step() -> dict:
        return {"time_s": None, "tokens": 0, "forwards": 0, "shapes": [], "phases": {}}

    # ---- phases ------------------------------------------------------------------------------------------------
    def enter(self, phase: str | None) -> None:
        """Close the current phase (its peak and end go to the step it belongs to), open `phase`."""
        try:
            r = self.memory.boundary(phase)
        except Exception as exc:
            self.note(f"memory reading failed at a {phase} boundary: {type(exc).__name__}: {exc}")
            r = None
        if r is not None:
            if self.phase_step < 0:
                self.load = r
            else:
                step = self.cur if self.phase_step == self.steps_done else (self.steps[self.phase_step]
                                                                            if self.phase_step < len(self.steps)
                                                                            else self.cur)
                old = step["phases"].get(self.phase)
                if old is None or r["peak_allocated_bytes"] >= old["peak_allocated_bytes"]:
                    step["phases"][self.phase] = r
                else:
                    old["end_allocated_bytes"] = r["end_allocated_bytes"]
        if phase is not None:
            self.phase = phase
            self.phase_step = self.steps_done

    def note(self, text: str) -> None:
        notes = self.observed.setdefault("notes", [])
        if text not in notes and len(notes) < 20:
            notes.append(text)

    # ---- hooks -------------------------------------------------------------------------------------------------
    def forward_pre(self, module, args):
        self.depth += 1
        if self.depth != 1 or self.bwd_depth:
            return
        import torch

        if self.top is None:
            if not (module.training and torch.is_grad_enabled()):
                return
            if not any(p.requires_grad for p in module.parameters()):
                return
            self.top = id(module)
            self._observe_model(module)
        if id(module) != self.top or not module.training or not torch.is_grad_enabled():
            return
        if self.t_step is None:
            self.t_step = time.perf_counter()
        self.enter("forward")
        self.training_call = True
        self.cur["forwards"] += 1
        if "autocast" not in self.observed:
            self.observed["autocast"] = self._autocast(torch)

    def forward_post(self, module, args, *rest):
        """The batch shape (a global pre-hook sees no keyword arguments; this hook does): input_ids, or the
        first positional argument when it is a 2-D integer tensor. `rest`: (kwargs, output), or (output,) when
        torch calls the hook for a forward that raised (always_call)."""
        kwargs = rest[0] if len(rest) == 2 else {}
        self.depth = max(0, self.depth - 1)
        if self.depth or not self.training_call or id(module) != self.top:
            return
        self.training_call = False
        import torch

        if isinstance(kwargs, dict) and kwargs.get("labels") is not None:
            self.observed["labels_in_forward"] = True  # the model computes its own loss
        ids = kwargs.get("input_ids") if isinstance(kwargs, dict) else None
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() == 2:
            b, s = ids.shape
            self.cur["tokens"] += int(b) * int(s)
            self.cur["shapes"].append([int(b), int(s)])

    def backward(self, fn, *args, **kwargs):
        if self.bwd_depth == 0 and self.top is not None and self.depth == 0:
            self.enter("backward")
        self.bwd_depth += 1
        depth = self.depth
        try:
            return fn(*args, **kwargs)
        finally:
            self.bwd_depth -= 1
            # checkpoint recomputation inside backward may stop a module's forward early (torch.utils.checkpoint's
            # early stop) without its forward hook: the module depth is what it was before backward
            self.depth = depth

    def opt_pre(self, opt, args, kwargs):
        self.opt_depth += 1
        if self.opt_depth != 1:
            return
        self.depth = 0  # no module forward runs around an optimizer step
        if self.device == "cpu":
            self.memory.tag([p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None],
                            "gradients")
        self.enter("optimizer_step")

    def opt_post(self, opt, args, kwargs):
        self.opt_depth = max(0, self.opt_depth - 1)
        if self.opt_depth:
            return
        if "optimizer" not in self.observed:
            self._observe_optimizer(opt)
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        self.cur["time_s"] = now - (self.t_step if self.t_step is not None else now)
        self.steps.append(self.cur)
        self.steps_done += 1
        self.cur = self._new_step()
        self.t_step = None
        if now - self.last_write >= WRITE_EVERY_S:
            self.write()
            self.last_write = time.perf_counter()

    # ---- what the run shows of its setup -------------------------------------------------------------------------
    def _observe_model(self, top) -> None:
        obs = self.observed
        obs["top_class"] = type(top).__module__ + "." + type(top).__qualname__
        params = list(top.parameters())
        dtypes: dict = {}
        for p in params:
            key = ("trainable" if p.requires_grad else "frozen")
            d = dtypes.setdefault(key, {})
            d[_dtype(p)] = d.get(_dtype(p), 0) + p.numel()
        obs["param_dtypes"] = dtypes
        obs["param_devices"] = sorted({str(p.device.type) for p in params})
        self.memory.tag(params, "weights")
        hf = peft = None
        wrappers = []
        for m in top.modules():
            name = type(m).__name__
            if name in ("DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine") or \
                    name.startswith("FSDP"):
                wrappers.append(name)
            if peft is None and isinstance(getattr(m, "peft_config", None), dict):
                peft = m
            cfg = getattr(m, "config", None)
            if hf is None and hasattr(cfg, "to_dict") and getattr(cfg, "model_type", None):
                hf = m
        obs["wrappers"] = sorted(set(wrappers))
        if hf is not None:
            try:
                obs["model_config"] = json.loads(hf.config.to_json_string(use_diff=False))
            except Exception:
                obs["model_config"] = _json_safe(hf.config.to_dict())
            obs["model_class"] = type(hf).__name__
            obs["attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
            try:
                obs["gradient_checkpointing"] = bool(hf.is_gradient_checkpointing)
            except Exception:
                obs["gradient_checkpointing"] = None
            obs["loaded_in_4bit"] = bool(getattr(hf, "is_loaded_in_4bit", False))
            obs["loaded_in_8bit"] = bool(getattr(hf, "is_loaded_in_8bit", False))
            for m in hf.modules():
                fn = getattr(m, "_gradient_checkpointing_func", None)
                if isinstance(fn, functools.partial):
                    obs["checkpoint_kwargs"] = _json_safe(fn.keywords)
                    break
        if peft is not None:
            obs["peft_config"] = {name: _json_safe(c.to_dict() if hasattr(c, "to_dict") else vars(c))
                                  for name, c in peft.peft_config.items()}

    @staticmethod
    def _autocast(torch) -> dict:
        out = {}
        for dev in ("cuda", "cpu"):
            try:
                if torch.is_autocast_enabled(dev):
                    out[dev] = str(torch.get_autocast_dtype(dev)).replace("torch.", "")
            except Exception:
                pass
        return out

    def _observe_optimizer(self, opt) -> None:
        cls = type(opt)
        states: dict = {}
        tensors = []
        for st in opt.state.values():
            for v in st.values():
                if hasattr(v, "dtype") and hasattr(v, "numel") and v.dim() > 0:
                    states[_dtype(v)] = states.get(_dtype(v), 0) + v.numel()
                    tensors.append(v)
        self.memory.tag(tensors, "optimizer_states")
        self.observed["optimizer"] = {
            "class": cls.__module__ + "." + cls.__qualname__,
            "defaults": {k: _json_safe(opt.defaults[k]) for k in OPT_DEFAULTS if k in getattr(opt, "defaults", {})},
            "state_dtypes": states,
            "params": sum(p.numel() for g in opt.param_groups for p in g["params"]),
        }

    def excepthook(self, orig, kind, value, tb):
        try:
            self.error = {"type": kind.__name__, "message": str(value).strip().splitlines()[0][:500]
                          if str(value).strip() else kind.__name__, "phase": self.phase}
        except Exception:
            pass
        orig(kind, value, tb)

    # ---- the rank file -----------------------------------------------------------------------------------------
    def payload(self, final: bool) -> dict:
        return {"rank": int(self.rank) if self.rank.isdigit() else 0, "pid": self.pid, "device": self.device,
                "final": final, "phase": self.phase, "error": self.error, "load": self.load, "steps": self.steps,
                "observed": self.observed, "wall_s": time.perf_counter() - self.t0}

    def write(self, final: bool = False) -> None:
        if not self.steps and self.top is None:
            return  # trained nothing: a launcher, a helper process
        if os.getpid() != self.pid:
            return  # a forked child (a DataLoader worker) holds a copy of this state: the parent's to write
        data = self.payload(final)
        if final:
            data["memory"] = self._finish()
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, default=str)
        os.replace(tmp, self.path)

    def _finish(self) -> dict:
        res = [p.get("peak_reserved_bytes") for s in self.steps for p in s["phases"].values()]
        res = [r for r in res if r is not None]
        out = self.memory.finish(max(res) if res else None)
        if self.device == "cpu" and self.steps:  # categories at the window's allocated peak (steps after the first)
            window = self.steps[1:] or self.steps
            best = max((p for s in window for p in s["phases"].values()), key=lambda p: p["peak_allocated_bytes"],
                       default=None)
            if best is not None and best.get("seq") is not None:
                out["categories"] = self.memory.categories_at(best["seq"])
        return out

    def on_sigterm(self, signum, frame) -> None:
        _sigterm(self, signum, frame)

    def at_exit(self) -> None:
        if self.finished:
            return
        self.finished = True
        try:
            if self.top is not None or self.steps:
                self.enter(None)
            self.write(final=True)
        except Exception as exc:
            sys.stderr.write(f"memplan: warning: measurement not written: {type(exc).__name__}: {exc}\n")


def _sigterm(w: "Watcher", signum, frame) -> None:
    w.at_exit()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def install() -> Watcher | None:
    """Install the hooks for this process (once); None when MEMPLAN_WRAP_DIR is not set."""
    global _state
    job_dir = os.environ.get(ENV_DIR)
    if not job_dir or _state is not None:
        return _state
    import torch
    import torch.autograd
    from torch.nn.modules import module as nn_module
    from torch.optim import optimizer as optim_module

    w = Watcher(job_dir, os.environ.get(ENV_DEVICE, "cpu"))
    nn_module.register_module_forward_pre_hook(w.forward_pre)
    nn_module.register_module_forward_hook(w.forward_post, with_kwargs=True, always_call=True)
    optim_module.register_optimizer_step_pre_hook(w.opt_pre)
    optim_module.register_optimizer_step_post_hook(w.opt_post)
    orig_backward = torch.autograd.backward

    @functools.wraps(orig_backward)
    def backward(*args, **kwargs):
        return w.backward(orig_backward, *args, **kwargs)

    torch.autograd.backward = backward
    orig_hook = sys.excepthook
    sys.excepthook = lambda kind, value, tb: w.excepthook(orig_hook, kind, value, tb)
    atexit.register(w.at_exit)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # a timeout's SIGTERM: write what was measured, then die
        signal.signal(signal.SIGTERM, w.on_sigterm)
    _state = w
    return w
