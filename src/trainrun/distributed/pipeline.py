"""Pipeline parallelism with ``torch.distributed.pipelining``: split the GPT into stages, build the schedule.

A stage is a copy of the full model with the blocks it does not own deleted (and the embedding /
final norm / output on the first / last stage only), like torchtitan's manual split. Blocks live
in a ModuleDict keyed by their global index, so every stage keeps the full model's parameter names
and a DCP checkpoint reshards between pipeline layouts and plain ones.

Stage placement is "loop" style: stage ``s`` runs on pipeline rank ``s % pp``; with
``pp_stages_per_rank`` = v > 1 each rank holds v virtual stages (Interleaved1F1B).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    _PipelineSchedule,
)

from trainrun.config.choices import PipelineSchedule
from trainrun.config.schema import ParallelConfig

SCHEDULES: dict[PipelineSchedule, type[_PipelineSchedule]] = {
    PipelineSchedule["GPipe"]: ScheduleGPipe,
    PipelineSchedule["1F1B"]: Schedule1F1B,
    PipelineSchedule["Interleaved1F1B"]: ScheduleInterleaved1F1B,
}


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """Global stage indices held by ``pp_rank`` (loop style)."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def split_stage(model: nn.Module, stage: int, num_stages: int) -> nn.Module:
    """A deep copy of ``model`` keeping only stage ``stage``'s contiguous blocks (full-model FQNs)."""
    part = copy.deepcopy(model)
    names = list(part.layers.keys())
    per_stage = len(names) // num_stages
    keep = set(names[stage * per_stage:(stage + 1) * per_stage])
    for name in names:
        if name not in keep:
            del part.layers[name]
    if stage > 0:
        part.tok_embeddings = None
        part.pos_embeddings = None
    if stage < num_stages - 1:
        part.norm = None
        part.output = None
    return part


def pipeline_loss(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of one micro-batch, in fp32 (the last stage's loss_fn)."""
    return F.cross_entropy(pred.float().flatten(0, 1), targets.flatten())


@dataclass
class Pipeline:
    """This rank's stages and the schedule that drives them."""

    parts: list[nn.Module]
    stage_ids: list[int]
    num_stages: int
    schedule: _PipelineSchedule
    group: dist.ProcessGroup
    pp_rank: int
    pp: int

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.num_stages - 1 in self.stage_ids


def build_pipeline(parts: list[nn.Module], ids: list[int], cfg: ParallelConfig, pp_rank: int,
                   group: dist.ProcessGroup, device: torch.device) -> Pipeline:
    """Wrap this rank's (already parallelised) stage modules in PipelineStages and a schedule."""
    num_stages = cfg.pp * cfg.pp_stages_per_rank
    stages = [PipelineStage(part, sid, num_stages, device, group=group) for part, sid in zip(parts, ids, strict=True)]
    cls = SCHEDULES[cfg.pp_schedule]
    n_mb = cfg.pipeline_microbatches()
    schedule = cls(stages if cfg.interleaved else stages[0], n_microbatches=n_mb, loss_fn=pipeline_loss)
    return Pipeline(parts, ids, num_stages, schedule, group, pp_rank, cfg.pp)


@torch.no_grad()
def pipeline_eval_loss(pipe: Pipeline, inputs: torch.Tensor, targets: torch.Tensor, hidden_shape: tuple[int, ...],
                       device: torch.device) -> torch.Tensor:
    """Forward one batch through the stages in order (point-to-point), return its loss on every pp rank.

    Evaluation does not go through the schedule: its batch need not match the training
    micro-batch shapes the stages were set up with. Hidden states travel in fp32.
    """
    by_id = dict(zip(pipe.stage_ids, pipe.parts, strict=True))
    x: torch.Tensor | None = None
    loss = torch.zeros((), device=device)
    for s in range(pipe.num_stages):
        if s % pipe.pp != pipe.pp_rank:
            continue
        if s == 0:
            x = inputs
        elif (s - 1) % pipe.pp != pipe.pp_rank:  # previous stage on another rank
            x = torch.empty(hidden_shape, dtype=torch.float32, device=device)
            dist.recv(x, group=pipe.group, group_src=(s - 1) % pipe.pp)
        x = by_id[s](x)
        if s == pipe.num_stages - 1:
            loss = pipeline_loss(x, targets)
        elif (s + 1) % pipe.pp != pipe.pp_rank:
            dist.send(x.float().contiguous(), group=pipe.group, group_dst=(s + 1) % pipe.pp)
    dist.all_reduce(loss, group=pipe.group)  # only the last stage's rank contributed a non-zero loss
    return loss
