"""Evaluators: validation loss and perplexity over a fixed set of validation batches."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from trainrun.config.schema import TrainRunConfig
from trainrun.data import TokenDataset, build_val_stream, val_batches
from trainrun.distributed.env import DistEnv
from trainrun.distributed.parallel_dims import ParallelDims
from trainrun.model.loss import autocast_context, lm_loss
from trainrun.registry import EVALUATORS


class Evaluator(Protocol):
    """Computes evaluation metrics for the current model."""

    def evaluate(self) -> dict[str, float]: ...


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ValLossEvaluator:
    """Mean next-token loss over ``eval.iters`` validation batches, identical at every call.

    Batches are sharded by data-parallel rank (TP/PP peers read the same ones). With pipeline
    parallelism, ``forward_loss`` runs a batch through the stages and returns its loss on every rank.
    """

    def __init__(self, cfg: TrainRunConfig, model: nn.Module | list[nn.Module], dataset: TokenDataset, env: DistEnv,
                 dp_rank: int | None = None, forward_loss: LossFn | None = None):
        self.model_parts = model if isinstance(model, list) else [model]
        self.env = env
        self.stream = build_val_stream(dataset, cfg.data.seq_len)
        self.micro_batch_size, self.iters = cfg.train.micro_batch_size, cfg.eval.iters
        self.dp_size = cfg.parallel.data_parallel_size
        if dp_rank is None:  # the mesh order decides which ranks are data-parallel peers
            dp_rank = ParallelDims.from_config(cfg.parallel, env.world_size, env.rank).dp_rank
        self.dp_rank = dp_rank
        self.forward_loss: LossFn = forward_loss or (lambda x, y: lm_loss(self.model_parts[0], x, y))
        self.autocast = autocast_context(cfg.train.precision, env.device)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Return ``val_loss`` (nats/token) and ``val_ppl``; the model is left in train mode."""
        for part in self.model_parts:
            part.eval()
        total = torch.zeros((), device=self.env.device)
        batches = val_batches(self.stream, self.micro_batch_size, self.iters,
                              dp_rank=self.dp_rank, dp_size=self.dp_size)
        count = 0
        for inputs, targets in batches:
            with self.autocast():
                total += self.forward_loss(inputs.to(self.env.device), targets.to(self.env.device))
            count += 1
        for part in self.model_parts:
            part.train()
        loss = self.env.all_reduce_mean(total / max(count, 1)).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


@EVALUATORS.register("val_loss")
def build_val_loss(cfg: TrainRunConfig, model: nn.Module | list[nn.Module], dataset: TokenDataset, env: DistEnv,
                   dp_rank: int | None = None, forward_loss: LossFn | None = None) -> Evaluator:
    """Validation loss and perplexity on the dataset's val split."""
    return ValLossEvaluator(cfg, model, dataset, env, dp_rank, forward_loss)
