"""The one training loop, used by every phase: full precision (FP), bit-width search, QAT.

The loop owns the things every phase shares: AdamW with the warm-up/stable/decay schedule,
gradient clipping, bf16 autocast on GPU, periodic evaluation, checkpoints, resume, logging
and DistributedDataParallel. What differs between phases comes in through ``TrainHooks``:
the bit-width search adds a loss term and steps its own parameters, CAGE adds its error
feedback around the optimizer step. The QAT switch happens at ``schedule.qat_start`` by
swapping layers for quantized ones (``coqat.quant.quantize_model``), which keeps every
parameter object, so the optimizer state carries over.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from coqat.bitconfig import BitConfig
from coqat.config import TrainSettings
from coqat.errors import CoqatError
from coqat.kernels import use_kernels
from coqat.optim.schedules import Schedule
from coqat.quant import quantize_model
from coqat.rundir import RunDir
from coqat.training.distributed import DistEnv, weights_digest
from coqat.training.hooks import StepContext, TrainHooks
from coqat.workloads.base import Workload, batch_items, to_device


def build_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices/kernels only (not on norms, biases or scalars)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel for the whole update on CUDA (the foreach default launches several).
    fused = bool(decay + no_decay) and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2),
                             fused=fused or None)


def compile_enabled(settings: TrainSettings, device: torch.device) -> bool:
    """Whether ``settings.compile`` asks for ``torch.compile`` on ``device`` ("auto": on
    CUDA only; on the CPU it did not pay, see reports/kernels.md)."""
    return device.type == "cuda" if settings.compile == "auto" else bool(settings.compile)


def compile_step(net: nn.Module, settings: TrainSettings, device: torch.device,
                 graphs: bool = True) -> nn.Module:
    """The module the training steps call: ``torch.compile``d per ``settings.compile``
    (``compile_enabled``).

    Compiled, the forward and backward of a step are one graph each (the quantized layers'
    kernels are custom ops, so nothing breaks it); switching phases swaps modules, which
    recompiles once. Evaluation and the hooks run the module itself, eagerly. On one GPU the
    graphs are also captured as CUDA graphs: the QAT step calls its Triton kernels through
    Python, and without capture it was host-bound (lm-30m on an H200: 64.8 ms a step
    against 23.9 ms replayed). DDP's gradient hooks do not fit a captured graph, nor does a
    hook that runs the model between steps (``graphs=False``, ``TrainHooks.cuda_graphs``).
    """
    if not compile_enabled(settings, device):
        return net
    graphs = (graphs and device.type == "cuda"
              and not isinstance(net, nn.parallel.DistributedDataParallel))
    return torch.compile(net, mode="reduce-overhead" if graphs else None)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(*, model: nn.Module, workload: Workload, settings: TrainSettings, schedule: Schedule,
          bitconfig: BitConfig | None, device: torch.device, run: RunDir | None = None,
          hooks: Sequence[TrainHooks] = (), resume: bool = False, progress: bool = True,
          quant_form: str = "half", label: str = "train",
          dist_env: DistEnv | None = None, stop_at: int | None = None) -> dict[str, Any]:
    """Run ``schedule.total_steps`` optimizer steps and return the final metrics.

    With ``resume`` the run continues from ``run``'s last checkpoint (same batches, same
    schedule, torch's RNG states as saved). ``stop_at``: end after that many steps instead,
    the schedules unchanged; the metrics are then the model's at that step, and the
    checkpoint there is what a branch (``coqat.training.branch``) starts from. Only rank 0
    writes to ``run``.
    """
    env = dist_env or DistEnv.from_env()
    writer = run if env.is_main else None
    model.to(device)
    optimizer = build_optimizer(model, settings)
    state = run.load_checkpoint() if (resume and run is not None) else None
    start = int(state["step"]) if state is not None else 0
    end = schedule.total_steps if stop_at is None else min(stop_at, schedule.total_steps)
    # Quantize before loading a checkpoint: quantized layers keep the float layers'
    # parameter names, so the same state_dict loads either way.
    quantized = False
    if schedule.phase(start) == "qat" and bitconfig is not None:
        _enter_qat(model, bitconfig, quant_form, quantize_model, settings.kernels)
        quantized = True
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for h in hooks:
            if h.name in state.get("hooks", {}):
                h.load_state_dict(state["hooks"][h.name])
        if writer is not None:
            writer.truncate_metrics_after(start)
        _set_rng_state(state.get("rng"))

    env.init(device)
    net: nn.Module = model
    if env.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    net = compile_step(net, settings, device, graphs=all(h.cuda_graphs for h in hooks))

    ctx = StepContext(step=start, lr=settings.lr, phase=schedule.phase(start), model=model,
                      optimizer=optimizer, schedule=schedule, settings=settings,
                      workload=workload, device=device, dist=env)
    for h in hooks:
        h.on_start(ctx)

    bar = _Progress(label, end, start, enabled=progress and env.is_main)
    last_eval: dict[str, Any] = {}
    completed = start
    try:
        with bar, _GracefulStop() as stop:
            t_last, items = time.perf_counter(), 0
            for step in range(start, end):
                phase = schedule.phase(step)
                if phase == "qat" and not quantized and bitconfig is not None:
                    _enter_qat(model, bitconfig, quant_form, quantize_model, settings.kernels)
                    quantized = True
                    ctx.phase = phase
                    for h in hooks:
                        h.on_qat_start(ctx)
                lr = schedule.lr(step, settings.lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                ctx.step, ctx.lr, ctx.phase = step, lr, phase

                net.train()
                batch = to_device(workload.get_batch(
                    "train", step, settings.batch_size, env.rank, env.world_size), device)
                with autocast(device):
                    loss = workload.loss(net, batch)
                    total = loss
                    for h in hooks:
                        extra = h.extra_loss(ctx)
                        if extra is not None:
                            total = total + extra
                if not torch.isfinite(total):
                    raise CoqatError(
                        f"loss became {total.item()} at step {step}; lower the learning rate"
                        " (--lr) or raise the bit widths")
                total.backward()
                if settings.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                for h in hooks:
                    h.before_optimizer_step(ctx)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ctx.loss = float(loss.detach())
                for h in hooks:
                    h.after_optimizer_step(ctx)
                completed = step + 1

                items += batch_items(batch) * env.world_size
                done = step + 1
                if done % settings.log_every == 0 or done == end:
                    now = time.perf_counter()
                    rate = items / max(now - t_last, 1e-9)
                    t_last, items = now, 0
                    rec = {"kind": "train", "step": done, "phase": phase, "lr": lr,
                           "loss": env.mean(ctx.loss, device), "items_per_s": rate}
                    for h in hooks:
                        rec.update(h.log_fields(ctx))
                    if writer is not None:
                        writer.log(rec)
                    bar.update(done, loss=rec["loss"], lr=lr, rate=rate, phase=phase)
                else:
                    bar.update(done)
                if done % settings.eval_every == 0 and done < end:
                    last_eval = _evaluate(model, workload, settings, device, env,
                                          max_batches=settings.eval_batches)
                    if writer is not None:
                        writer.log({"kind": "eval", "step": done, "phase": phase, **last_eval})
                    bar.note(workload.metric, last_eval.get(workload.metric))
                if writer is not None and done % settings.checkpoint_every == 0 \
                        and done < end:
                    writer.save_checkpoint(_state(model, optimizer, done, hooks))
                if stop.requested and done < end:
                    raise KeyboardInterrupt
            # the reported metric; the bar shows it, not the last periodic evaluation
            final = _evaluate(model, workload, settings, device, env,
                              max_batches=settings.final_eval_batches or None)
            bar.note(f"final {workload.metric}", final.get(workload.metric))
    except KeyboardInterrupt:
        # Ctrl-C lands here at a step boundary (see _GracefulStop); a KeyboardInterrupt
        # raised mid-step saves the last completed step.
        if writer is not None and completed > start:
            writer.save_checkpoint(_state(model, optimizer, completed, hooks))
            raise CoqatError(f"interrupted after step {completed}; resume with"
                             f" coqat train --resume {run.path}") from None
        raise

    digests = env.all_gather_object(weights_digest(model)) if env.enabled else None
    if digests is not None and len(set(digests)) != 1:
        raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
    if writer is not None:
        writer.log({"kind": "eval", "step": end, "phase": ctx.phase, "final": True,
                    **({"stopped": True} if end < schedule.total_steps else {}), **final})
        writer.save_checkpoint(_state(model, optimizer, end, hooks))
        writer.save_weights(model.state_dict())
    if digests is not None:
        final["ddp_world_size"] = env.world_size
        final["ddp_weights_sha256"] = digests[0]
    return final


def _enter_qat(model: nn.Module, bitconfig: BitConfig | None, form: str, quantize_model,
               kernels: str = "auto") -> None:
    if bitconfig is not None:
        quantize_model(model, bitconfig, form=form)
        use_kernels(model, kernels)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
           hooks: Iterable[TrainHooks]) -> dict[str, Any]:
    return {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "hooks": {h.name: h.state_dict() for h in hooks}, "rng": _rng_state()}


def _rng_state() -> dict[str, Any]:
    """torch's CPU and CUDA generator states. Batches do not draw from them (they are a
    function of the step), but a hook or a user model may; a resumed or branched run then
    draws what the uninterrupted run would have."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng: dict[str, Any] | None) -> None:
    if not rng:                      # checkpoints written before the states were saved
        return
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() \
            and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _evaluate(model: nn.Module, workload: Workload, settings: TrainSettings,
              device: torch.device, env: DistEnv, max_batches: int | None) -> dict[str, Any]:
    """Rank 0 evaluates; the result is broadcast so every rank returns the same numbers."""
    result = None
    if env.is_main:
        with autocast(device):
            result = workload.evaluate(model, max_batches=max_batches,
                                       batch_size=settings.eval_batch_size)
    return env.broadcast_object(result)


class _GracefulStop:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second Ctrl-C: stop now."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        signal.signal(signal.SIGINT, self._old or signal.default_int_handler)

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class _Progress:
    """Rich progress bar with loss, LR, throughput and ETA; silent when disabled."""

    def __init__(self, label: str, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.total = total
        self.start = start
        self.fields = {"loss": "", "lr": "", "rate": "", "note": ""}
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._p = Progress(
                # user text (the space's name) is shown literally: no markup anywhere
                TextColumn("{task.description}", style="bold", markup=False),
                BarColumn(bar_width=24), MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}", markup=False),
                TextColumn("{task.fields[rate]}", markup=False),
                TextColumn("{task.fields[note]}", markup=False),
                TimeElapsedColumn(), TextColumn("eta", markup=False), TimeRemainingColumn(),
                transient=False)
            self._task = self._p.add_task(label, total=total, completed=start, **self.fields)

    def __enter__(self):
        if self.enabled:
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._p.__exit__(*exc)

    def update(self, done: int, loss: float | None = None, lr: float | None = None,
               rate: float | None = None, phase: str | None = None) -> None:
        if not self.enabled:
            return
        if loss is not None:
            self.fields["loss"] = f"loss {loss:.4f}" + (f" [{phase}]" if phase else "")
        if rate is not None:
            self.fields["rate"] = f"{_si(rate)}/s"
        self._p.update(self._task, completed=done, **self.fields)

    def note(self, name: str, value: Any) -> None:
        if self.enabled and value is not None:
            self.fields["note"] = f"{name} {value:.4f}"
            self._p.update(self._task, **self.fields)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"
