"""Step executors: run one optimizer step over the micro-batches of a global batch.

Every executor ends its step with the same :class:`UpdateTail` (global-norm clipping, the
world-wide finite check, optimizer and LR step, zero grad) and differs only in how it runs
forward and backward:

* ``eager``: the model as written, one micro-batch after the other (gradient accumulation);
* ``compile``: ``torch.compile`` of each transformer block in place (``train.compile.scope=blocks``,
  torchtitan's style) or of forward+loss as one graph (``model``), optionally of the optimizer
  step (``train.compile.optimizer``);
* ``cuda_graph``: the whole step, forward and backward of every micro-batch, clipping, the finite
  check and the fused optimizer step, captured once as a CUDA graph and replayed (one GPU;
  ``train.cuda_graph``);
* ``pipeline``: a ``torch.distributed.pipelining`` schedule, the one executor for ``parallel.pp>1``.

Each executor's registry ``check`` refuses at start-up, in one line, what it cannot honour: a
device, a layout, a precision, or a setting of another executor's ``train.<section>`` (which it
would otherwise ignore). Nothing is silently run another way.

**No host sync per step** where the optimizer allows it: a fused AdamW takes the finite check as
a device tensor (``found_inf``) and skips the update on the device (its step counters too), so the
executor never waits for the GPU; the loop reads the skip flags at log intervals. Other
optimizers (foreach, for_loop) and fp16's loss scaler need the verdict on the host, one sync per step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from trainrun.config.choices import ActivationCheckpointing, CompileScope, OptimizerImpl, Precision
from trainrun.config.schema import TrainRunConfig
from trainrun.config.validate import resolve_device_type
from trainrun.distributed.grad_norm import clip_grad_norm_global, finite_flag_on_all_ranks
from trainrun.errors import ConfigError
from trainrun.model.loss import autocast_context, lm_loss
from trainrun.optim.schedules import scheduled_lr
from trainrun.optim.tensor_state import lr_as_tensor, make_capturable
from trainrun.registry import STEP_EXECUTORS

logger = logging.getLogger(__name__)

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
    finite: torch.Tensor
    """Device bool: loss and gradient norm were finite on every rank (the update was applied)."""
    skipped: bool | None = None
    """Known on the host: the update was skipped (True) or applied (False); None when the executor did
    not wait for the device (read ``finite`` later)."""


class StepExecutor(Protocol):
    """Runs forward, backward and the optimizer update for one global batch: what the loop needs of one."""

    scheduler: object
    """The LR schedule it steps (the loop rewinds it by steps found skipped on the device)."""

    def step(self, micro_batches: Sequence[Batch], before_update: Callable[[], None] | None = None) -> StepResult:
        """Run one step; call ``before_update`` (if given) right before parameters change."""
        ...

    def close(self) -> None:
        """Release what the executor holds (a CUDA graph's memory pool); called once when the loop ends."""
        ...


def skips_on_device(optimizers: Iterable[torch.optim.Optimizer]) -> bool:
    """Every optimizer applies a ``found_inf`` tensor itself (fused Adam/AdamW): no host verdict needed."""
    return all(getattr(opt, "_step_supports_amp_scaling", False) for opt in optimizers)


class UpdateTail:
    """The end of every step: clip, agree on finiteness, step optimizers and the LR schedule, zero grads.

    With optimizers that skip on the device (fused AdamW) nothing here waits for the GPU: the update
    and the optimizer's step counters are masked by ``found_inf``, the schedule steps every time and
    the loop rewinds it by the skipped steps it learns about at log intervals
    (:func:`trainrun.optim.rewind_schedule`). Otherwise the verdict is read on the host (one sync)
    and a skipped step steps neither the optimizer nor the schedule.
    """

    def __init__(self, parameters: Iterable[torch.Tensor], optimizers: list[torch.optim.Optimizer], scheduler,
                 grad_clip: float, pp_group: dist.ProcessGroup | None = None,
                 scaler: torch.amp.GradScaler | None = None, compile_optimizer: bool = False):
        self.parameters = list(parameters)
        self.optimizers, self.scheduler, self.pp_group, self.scaler = optimizers, scheduler, pp_group, scaler
        self.max_norm = grad_clip if grad_clip > 0 else math.inf
        self.on_device = scaler is None and skips_on_device(optimizers)
        self._step_optimizers = self._masked_step if self.on_device else self._plain_step
        if compile_optimizer:
            for opt in optimizers:
                lr_as_tensor(opt)
            self._step_optimizers = torch.compile(self._step_optimizers)

    def _masked_step(self, found_inf: torch.Tensor) -> None:
        for opt in self.optimizers:
            opt.found_inf = found_inf  # read by fused Adam(W).step, as GradScaler passes it
            try:
                opt.step()
            finally:
                del opt.found_inf

    def _plain_step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def clip_and_check(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale (fp16), clip to the global norm, and agree on finiteness: (grad norm, finite flag)."""
        if self.scaler is not None:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
        grad_norm = clip_grad_norm_global(self.parameters, self.max_norm, self.pp_group)
        return grad_norm, finite_flag_on_all_ranks(loss, grad_norm)

    def __call__(self, loss: torch.Tensor, before_update: Callable[[], None] | None = None) -> StepResult:
        """Finish the step whose gradients are accumulated; ``loss`` is this rank's mean loss."""
        grad_norm, finite = self.clip_and_check(loss)
        lr = scheduled_lr(self.scheduler)
        if before_update is not None:
            before_update()
        skipped: bool | None = None
        if self.on_device:
            self._step_optimizers((~finite).float())
            self.scheduler.step()
        else:
            skipped = not bool(finite)  # the one host sync of this path
            if not skipped:
                if self.scaler is not None:
                    for opt in self.optimizers:
                        self.scaler.step(opt)
                else:
                    self._step_optimizers()
                self.scheduler.step()
            if self.scaler is not None:
                self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, lr, finite, skipped)


class EagerExecutor:
    """Gradient accumulation over micro-batches in eager mode, then the shared update tail.

    ``compile_optimizer``: compile the update's optimizer step (the compile executor's
    ``train.compile.optimizer``; eager itself never compiles).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: TrainRunConfig,
                 device: torch.device, compile_optimizer: bool = False):
        self.model, self.optimizer, self.scheduler, self.device = model, optimizer, scheduler, device
        self.autocast = autocast_context(cfg.train.precision, device)
        scaler = torch.amp.GradScaler("cuda") if cfg.train.precision is Precision.fp16 else None
        self.loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss
        self.update = UpdateTail(model.parameters(), [optimizer], scheduler, cfg.optim.grad_clip, scaler=scaler,
                                 compile_optimizer=compile_optimizer)

    def forward_backward(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        """Accumulate the gradients of the batch mean; return the mean loss (detached, on device)."""
        total = torch.zeros((), device=self.device)
        scale = self.update.scaler
        for inputs, targets in micro_batches:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with self.autocast():
                loss = self.loss_fn(self.model, inputs, targets)
            scaled = loss / len(micro_batches)
            (scale.scale(scaled) if scale is not None else scaled).backward()
            total += loss.detach()
        return total / len(micro_batches)

    def step(self, micro_batches: Sequence[Batch], before_update: Callable[[], None] | None = None) -> StepResult:
        """One optimizer step; a non-finite loss or gradient norm (on any rank) skips the update."""
        self.model.train()
        return self.update(self.forward_backward(micro_batches), before_update)

    def close(self) -> None:
        """Nothing to release."""


def transformer_blocks(model: nn.Module, field: str = "train.compile.scope") -> list[nn.Module]:
    """The model's transformer blocks (``model.layers``, also under a DDP wrapper's ``module``); ``field``: the
    setting that asked for them, named if the model has none."""
    inner = getattr(model, "module", model)
    blocks = getattr(inner, "layers", None)
    if blocks is None:
        raise ConfigError(field, "blocks" if field.endswith("scope") else True,
                          f"{type(inner).__name__} has no .layers to compile one by one; change {field}")
    return list(blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks)


def compile_blocks(model: nn.Module, field: str = "train.compile.scope") -> None:
    """Compile each block in place (``nn.Module.compile``): parameter names, and so checkpoints, stay as they are."""
    for block in transformer_blocks(model, field):
        block.compile()


class CompiledExecutor(EagerExecutor):
    """The eager step with ``torch.compile`` (``train.compile``): per block (default), forward+loss as one graph,
    or none of the model; and the optimizer step if ``train.compile.optimizer``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: TrainRunConfig,
                 device: torch.device):
        settings = cfg.train.compile
        super().__init__(model, optimizer, scheduler, cfg, device, compile_optimizer=settings.optimizer)
        if settings.scope is CompileScope.blocks:
            compile_blocks(self.model)
        elif settings.scope is CompileScope.model:
            self.loss_fn = torch.compile(lm_loss)


class CUDAGraphExecutor(EagerExecutor):
    """The whole step as one CUDA graph: no kernel launch and no host sync per step.

    ``train.cuda_graph.warmup_steps`` eager steps run on a side stream (they train; cuBLAS, autograd
    and the optimizer state are set up), then one step is captured with static input buffers:
    forward and backward of every micro-batch, global-norm clipping, the finite check, and the fused,
    capturable AdamW step masked by ``found_inf`` with its learning rate in a device tensor that the
    schedule updates between replays. Every later step copies its batch into the static buffers and
    replays. Parameters and optimizer state are the same tensors throughout, so evaluation,
    checkpoint saves and the schedule work unchanged; a resume happens before the executor exists.
    What cannot be captured is refused at start-up (:func:`check_cuda_graph`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: TrainRunConfig,
                 device: torch.device):
        # The settings were checked at start-up; the optimizer object is known only now (a plugin's, say).
        if not skips_on_device([optimizer]):
            raise ConfigError("optim.name", cfg.optim.name, "cuda_graph needs an optimizer that skips a "
                              "non-finite step on the device: the fused AdamW (optim.implementation=auto or fused)")
        make_capturable(optimizer, device)
        super().__init__(model, optimizer, scheduler, cfg, device)
        if cfg.train.cuda_graph.compile_blocks:
            compile_blocks(model, "train.cuda_graph.compile_blocks")
        self.warmup_left = cfg.train.cuda_graph.warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static: dict[str, torch.Tensor] = {}

    def step(self, micro_batches: Sequence[Batch], before_update: Callable[[], None] | None = None) -> StepResult:
        """A warm-up step on a side stream, the capture, or a replay."""
        self.model.train()
        if self.graph is None and self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                result = self.update(self.forward_backward(micro_batches), before_update)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return result
        inputs = torch.stack([b[0] for b in micro_batches]).to(self.device, non_blocking=True)
        targets = torch.stack([b[1] for b in micro_batches]).to(self.device, non_blocking=True)
        if self.graph is None:
            self._capture(inputs, targets)
        self._static["inputs"].copy_(inputs, non_blocking=True)
        self._static["targets"].copy_(targets, non_blocking=True)
        lr = scheduled_lr(self.scheduler)
        if before_update is not None:
            before_update()  # an async save must finish copying parameters before the replay changes them
        self.graph.replay()
        self.scheduler.step()  # fills the device LR tensor the next replay reads
        s = self._static
        return StepResult(s["loss"].clone(), s["grad_norm"].clone(), lr, s["finite"].clone(), None)

    def _capture(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        static = {"inputs": inputs.clone(), "targets": targets.clone()}
        # Gradients must be allocated inside the graph's pool: the first backward of every replay
        # then writes them afresh and the later micro-batches accumulate, with no zeroing needed.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            micro = list(zip(static["inputs"].unbind(0), static["targets"].unbind(0), strict=True))
            loss = self.forward_backward(micro)
            grad_norm, finite = self.update.clip_and_check(loss)
            self.update._masked_step((~finite).float())
        static.update(loss=loss, grad_norm=grad_norm, finite=finite)
        self.graph, self._static = graph, static
        logger.info("captured the training step as a CUDA graph (%d micro-batches)", len(micro))

    def close(self) -> None:
        """Release the graph and its private memory pool."""
        self.graph, self._static = None, {}
        torch.cuda.empty_cache()


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
        self.autocast = autocast_context(cfg.train.precision, device)
        params = [p for part in pipeline.parts for p in part.parameters()]
        self.update = UpdateTail(params, optimizers, scheduler, cfg.optim.grad_clip, pp_group=pipeline.group)

    def step(self, micro_batches: Sequence[Batch], before_update: Callable[[], None] | None = None) -> StepResult:
        """Forward/backward of all micro-batches by the schedule, then the shared update tail."""
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
        return self.update(loss, before_update)

    def close(self) -> None:
        """Nothing to release."""


# --- start-up checks: what each executor honours, the rest refused in one line ------------------------

EXECUTOR_SETTINGS = {"compile": "compile", "cuda_graph": "cuda_graph"}
"""Each ``train.<section>`` of executor settings -> the one built-in executor that reads it."""


def refuse_unread_settings(cfg: TrainRunConfig, reads: tuple[str, ...] = ()) -> None:
    """Every ``train.<section>`` of executor settings but ``reads`` keeps its defaults: a setting the chosen
    executor would ignore is refused, never silently dropped."""
    executor = cfg.train.step_executor
    for section, reader in EXECUTOR_SETTINGS.items():
        if section in reads:
            continue
        settings, defaults = getattr(cfg.train, section), type(getattr(cfg.train, section))()
        for f in dataclasses.fields(settings):
            value = getattr(settings, f.name)
            if value != getattr(defaults, f.name):
                shown = value.value if isinstance(value, Enum) else value
                raise ConfigError(f"train.{section}.{f.name}", shown,
                                  f"only train.step_executor={reader} reads it, this run uses {executor}; "
                                  f"remove it or use train.step_executor={reader}")


def refuse_pipeline_parallel(cfg: TrainRunConfig) -> None:
    """An executor that runs the whole model in each process refuses ``parallel.pp>1`` (no silent swap)."""
    if cfg.parallel.pp > 1:
        raise ConfigError("train.step_executor", cfg.train.step_executor,
                          f"runs the whole model in each process, but parallel.pp={cfg.parallel.pp} splits it into "
                          "stages; use train.step_executor=pipeline")


def check_eager(cfg: TrainRunConfig) -> None:
    """eager: one stage per process, and no other executor's settings."""
    refuse_pipeline_parallel(cfg)
    refuse_unread_settings(cfg)


def check_compile(cfg: TrainRunConfig) -> None:
    """compile: one stage per process; reads ``train.compile``."""
    refuse_pipeline_parallel(cfg)
    refuse_unread_settings(cfg, ("compile",))


def check_cuda_graph(cfg: TrainRunConfig) -> None:
    """cuda_graph: what the whole-step CUDA graph cannot capture is refused, never silently run another way."""
    refuse_pipeline_parallel(cfg)
    refuse_unread_settings(cfg, ("cuda_graph",))
    if resolve_device_type(cfg) != "cuda":
        raise ConfigError("train.step_executor", "cuda_graph",
                          "CUDA-graph capture needs a CUDA device; use eager or compile")
    why = None
    if cfg.parallel.world_size != 1:  # check_world_size ran before: the degrees match the launcher's world
        why = ("one process only: collectives of DDP, FSDP and tensor parallelism are not captured by trainrun; "
               "use compile for multi-GPU runs")
    elif cfg.train.precision is Precision.fp16:
        why = "fp16's dynamic loss scaler adjusts its scale on the host every step; use bf16"
    elif cfg.optim.implementation not in (OptimizerImpl.auto, OptimizerImpl.fused):
        why = (f"optim.implementation={cfg.optim.implementation} cannot skip a non-finite step inside the graph; "
               "use auto or fused (the fused AdamW applies found_inf on the device)")
    elif cfg.debug.inject_nan_at_steps:
        why = "debug.inject_nan_at_steps decides on the host per step, which a captured graph cannot; use eager"
    elif cfg.parallel.activation_checkpointing is not ActivationCheckpointing.none:
        why = ("activation checkpointing's recomputation is not captured by trainrun; "
               "use parallel.activation_checkpointing=none")
    if why:
        raise ConfigError("train.step_executor", "cuda_graph", why)


def check_pipeline(cfg: TrainRunConfig) -> None:
    """pipeline: needs stages to run (``parallel.pp>1``); no loss scaler, no other executor's settings."""
    if cfg.parallel.pp == 1:
        raise ConfigError("train.step_executor", "pipeline",
                          "runs pipeline stages and parallel.pp=1 makes none; set parallel.pp>1 or use eager")
    refuse_unread_settings(cfg)
    if cfg.train.precision is Precision.fp16:
        raise ConfigError("train.precision", "fp16",
                          "the pipeline executor has no loss scaler; use bf16 or fp32 with parallel.pp>1")


@STEP_EXECUTORS.register("eager", check=check_eager)
def build_eager(model, optimizer, scheduler, cfg: TrainRunConfig, device: torch.device) -> StepExecutor:
    """Plain PyTorch eager execution."""
    return EagerExecutor(model, optimizer, scheduler, cfg, device)


@STEP_EXECUTORS.register("compile", check=check_compile)
def build_compiled(model, optimizer, scheduler, cfg: TrainRunConfig, device: torch.device) -> StepExecutor:
    """torch.compile per transformer block, of forward+loss, or of neither, and optionally the optimizer step."""
    return CompiledExecutor(model, optimizer, scheduler, cfg, device)


@STEP_EXECUTORS.register("cuda_graph", check=check_cuda_graph)
def build_cuda_graph(model, optimizer, scheduler, cfg: TrainRunConfig, device: torch.device) -> StepExecutor:
    """The whole training step captured as one CUDA graph (one CUDA device)."""
    return CUDAGraphExecutor(model, optimizer, scheduler, cfg, device)


@STEP_EXECUTORS.register("pipeline", check=check_pipeline)
def build_pipeline(pipeline, optimizers, scheduler, cfg: TrainRunConfig, device: torch.device) -> StepExecutor:
    """A pipeline schedule over this rank's stages (``parallel.pp>1``): it gets the ``Pipeline`` and one
    optimizer per stage where the other executors get the model and its optimizer."""
    return PipelineExecutor(pipeline, optimizers, scheduler, cfg, device)
