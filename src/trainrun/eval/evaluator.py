"""Evaluators: validation loss and perplexity over a fixed set of validation batches."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from trainrun.config.schema import TrainRunConfig
from trainrun.data import TokenDataset, build_val_stream, val_batches
from trainrun.distributed.env import DistEnv
from trainrun.registry import EVALUATORS
from trainrun.train.executors import autocast_context, lm_loss


class Evaluator(Protocol):
    """Computes evaluation metrics for the current model."""

    def evaluate(self) -> dict[str, float]: ...


class ValLossEvaluator:
    """Mean next-token loss over ``eval.iters`` validation batches, identical at every call."""

    def __init__(self, cfg: TrainRunConfig, model: nn.Module, dataset: TokenDataset, env: DistEnv):
        self.model, self.env = model, env
        self.stream = build_val_stream(dataset, cfg.data.seq_len)
        self.micro_batch_size, self.iters = cfg.train.micro_batch_size, cfg.eval.iters
        self.dp_size = cfg.parallel.dp_replicate * cfg.parallel.dp_shard
        self.autocast = autocast_context(cfg.train.precision, env.device)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Return ``val_loss`` (nats/token) and ``val_ppl``; the model is left in train mode."""
        self.model.eval()
        total = torch.zeros((), device=self.env.device)
        batches = val_batches(self.stream, self.micro_batch_size, self.iters,
                              dp_rank=self.env.rank % self.dp_size, dp_size=self.dp_size)
        count = 0
        for inputs, targets in batches:
            with self.autocast():
                total += lm_loss(self.model, inputs.to(self.env.device), targets.to(self.env.device))
            count += 1
        self.model.train()
        loss = self.env.all_reduce_mean(total / max(count, 1)).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


@EVALUATORS.register("val_loss")
def build_val_loss(cfg: TrainRunConfig, model: nn.Module, dataset: TokenDataset, env: DistEnv) -> Evaluator:
    """Validation loss and perplexity on the dataset's val split."""
    return ValLossEvaluator(cfg, model, dataset, env)
