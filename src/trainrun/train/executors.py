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
import torch.nn.functional as F
from torch import nn

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


class StepExecutor(Protocol):
    """Runs forward, backward and the optimizer update for one global batch."""

    def step(self, micro_batches: Sequence[Batch]) -> StepResult: ...


def autocast_context(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for the configured precision (fp32: no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy, computed in fp32."""
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class EagerExecutor:
    """Gradient accumulation over micro-batches, global-norm clipping, optimizer and LR step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: TrainRunConfig,
                 device: torch.device):
        self.model, self.optimizer, self.scheduler, self.device = model, optimizer, scheduler, device
        self.grad_clip = cfg.optim.grad_clip
        self.autocast = autocast_context(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" else None
        self.loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, micro_batches: Sequence[Batch]) -> StepResult:
        """One optimizer step; each micro-batch's loss is scaled by 1/len so gradients are the batch mean."""
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
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(total / len(micro_batches), grad_norm, lr)


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
        raise ConfigError("train.step_executor", "cuda_graph", "CUDA-graph capture needs run.device=cuda; use eager or compile")
    return CompiledExecutor(model, optimizer, scheduler, cfg, device, mode="reduce-overhead")
