"""Step executors: run one optimizer step over the micro-batches of a global batch.

``eager`` runs the model as written; ``compile`` wraps forward+loss in ``torch.compile``;
``cuda_graph`` uses ``torch.compile(mode="reduce-overhead")``, which captures the compiled
forward/backward into CUDA graphs (CUDA only).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from trainrun.config.choices import Precision
from trainrun.config.errors import ConfigError
from trainrun.config.schema import TrainRunConfig
from trainrun.registry import STEP_EXECUTORS

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepResult:
    """Outcome of one optimizer step; tensors stay on device so the loop decides when to sync."""

    loss: torch.Tensor
    """Mean loss over the global batch (this rank's share until the loop reduces it)."""
    grad_norm: torch.Tensor
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate used by this step."""
    skipped: bool = False
    """The loss or gradient norm was not finite: the optimizer did not step."""


class StepExecutor(Protocol):
    """Runs forward, backward and the optimizer update for one global batch."""

    def step(self, micro_batches: Sequence[Batch], before_update: Callable[[], None] | None = None) -> StepResult:
        """Run one step; call ``before_update`` (if given) right before parameters change."""
        ...


def autocast_context(precision: Precision, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for the configured precision (fp32: no autocast)."""
    dtype = Precision(precision).autocast_dtype
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy, computed in fp32."""
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def global_grad_norm(parameters: Sequence[torch.Tensor], pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """L2 norm of all gradients of the whole model, however it is sharded (a plain fp32 scalar).

    DTensor gradients (FSDP / TP) are grouped by mesh and placements, each group's norm is made
    whole with ``full_tensor()`` (a sum of squares over the shards), and with pipeline parallelism
    the squared norms of the stages are summed over ``pp_group``. Every rank returns the same value.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            g = p.grad
            key = (id(g.device_mesh), tuple(g.placements)) if isinstance(g, DTensor) else g.device
            groups.setdefault(key, []).append(g)
    total_sq = torch.zeros((), dtype=torch.float32, device=_first_device(parameters))
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq += norm.float().to(total_sq.device) ** 2
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    return total_sq.sqrt()


def _first_device(parameters: Sequence[torch.Tensor]) -> torch.device:
    for p in parameters:
        return p.device
    return torch.device("cpu")


def clip_grad_norm_global(parameters: Sequence[torch.Tensor], max_norm: float,
                          pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm`` (inf: measure only); return the norm."""
    parameters = list(parameters)
    total = global_grad_norm(parameters, pp_group)
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
    return total


def finite_on_all_ranks(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """True when the loss and the gradient norm are finite on every rank of the job.

    The loss is rank-local (each data-parallel rank has its own micro-batches): one rank with an
    inf loss must make every replica skip the step, or the replicas diverge. One MAX all-reduce of
    a one-element flag over the world group; it is also this step's one host sync.
    """
    bad = (~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm.detach()))).float().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


class EagerExecutor:
    """Gradient accumulation over micro-batches, global-norm clipping, optimizer and LR step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: TrainRunConfig,
                 device: torch.device):
        self.model, self.optimizer, self.scheduler, self.device = model, optimizer, scheduler, device
        self.grad_clip = cfg.optim.grad_clip
        self.autocast = autocast_context(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.precision is Precision.fp16 else None
        self.loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, micro_batches: Sequence[Batch], before_update: Callable[[], None] | None = None) -> StepResult:
        """One optimizer step; each micro-batch's loss is scaled by 1/len so gradients are the batch mean.

        A non-finite loss or gradient norm skips the update (and the LR step), like Megatron's
        skipped iterations; the caller counts them.
        """
        self.model.train()
        total = torch.zeros((), device=self.device)
        for inputs, targets in micro_batches:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with self.autocast():
                loss = self.loss_fn(self.model, inputs, targets)
            self._backward(loss / len(micro_batches))
            total += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm_global(list(self.model.parameters()), max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        mean_loss = total / len(micro_batches)
        # One host sync per step: the price of never applying a NaN update.
        finite = finite_on_all_ranks(mean_loss, grad_norm)
        if before_update is not None:
            before_update()
        if finite:
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
        elif self.scaler:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(mean_loss, grad_norm, lr, skipped=not finite)


class PipelineExecutor:
    """One optimizer step through a pipeline schedule (``trainrun.distributed.pipeline``).

    The micro-batches the loop hands over are this data-parallel rank's share of the global batch;
    they are concatenated and the schedule re-splits them into ``parallel.pp_microbatches`` (its
    gradients are the mean over them, like gradient accumulation). The loss exists on the last
    stage only and is summed over the pp group, so every rank reports this dp rank's mean loss.
    """

    def __init__(self, pipeline, optimizers: list[torch.optim.Optimizer], scheduler, cfg: TrainRunConfig,
                 device: torch.device):
        self.pipe, self.optimizers, self.scheduler, self.device = pipeline, optimizers, scheduler, device
        self.grad_clip = cfg.optim.grad_clip
        self.autocast = autocast_context(cfg.train.precision, device)

    def step(self, micro_batches: Sequence[Batch], before_update: Callable[[], None] | None = None) -> StepResult:
        """Forward/backward of all micro-batches by the schedule, global-norm clip, optimizer and LR step."""
        for part in self.pipe.parts:
            part.train()
        inputs = torch.cat([b[0] for b in micro_batches]).to(self.device)  # (B_local, T)
        targets = torch.cat([b[1] for b in micro_batches]).to(self.device)  # (B_local, T)
        losses: list[torch.Tensor] = []
        last = self.pipe.has_last
        with self.autocast():
            args = (inputs,) if self.pipe.has_first else ()
            self.pipe.schedule.step(*args, target=targets if last else None, losses=losses if last else None)
        loss = torch.stack([x.detach().float() for x in losses]).mean() if last else torch.zeros((), device=self.device)
        dist.all_reduce(loss, group=self.pipe.group)  # the last stage's loss, on every stage
        params = [p for part in self.pipe.parts for p in part.parameters()]
        grad_norm = clip_grad_norm_global(params, self.grad_clip if self.grad_clip > 0 else math.inf, self.pipe.group)
        lr = self.optimizers[0].param_groups[0]["lr"]
        finite = finite_on_all_ranks(loss, grad_norm)
        if before_update is not None:
            before_update()
        if finite:
            for optimizer in self.optimizers:
                optimizer.step()
            self.scheduler.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, lr, skipped=not finite)


class SchedulerGroup:
    """Several LR schedulers (one per model part's optimizer) stepped and checkpointed as one."""

    def __init__(self, schedulers: list):
        self.schedulers = schedulers

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def state_dict(self) -> dict:
        """The schedulers advance in lockstep, so the first one's state stands for all."""
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        for s in self.schedulers:
            s.load_state_dict(state)

    def get_last_lr(self) -> list[float]:
        return self.schedulers[0].get_last_lr()


class CompiledExecutor(EagerExecutor):
    """Eager executor whose forward+loss is compiled once by ``torch.compile``."""

    def __init__(self, *args, mode: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = torch.compile(lm_loss, mode=mode)


@STEP_EXECUTORS.register("eager")
def build_eager(model, optimizer, scheduler, cfg: TrainRunConfig, device: torch.device) -> StepExecutor:
    """Plain PyTorch eager execution."""
    return EagerExecutor(model, optimizer, scheduler, cfg, device)


@STEP_EXECUTORS.register("compile")
def build_compiled(model, optimizer, scheduler, cfg: TrainRunConfig, device: torch.device) -> StepExecutor:
    """torch.compile of forward and loss (backward through AOTAutograd)."""
    return CompiledExecutor(model, optimizer, scheduler, cfg, device)


@STEP_EXECUTORS.register("cuda_graph")
def build_cuda_graph(model, optimizer, scheduler, cfg: TrainRunConfig, device: torch.device) -> StepExecutor:
    """torch.compile with CUDA-graph capture (mode reduce-overhead); needs a CUDA device."""
    if device.type != "cuda":
        raise ConfigError("train.step_executor", "cuda_graph",
                          "CUDA-graph capture needs run.device=cuda; use eager or compile")
    return CompiledExecutor(model, optimizer, scheduler, cfg, device, mode="reduce-overhead")
