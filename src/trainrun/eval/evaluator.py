"""Evaluators: validation (and, once at the end, test) loss per source and their weighted mean.

Each source's evaluation set is a fixed list of samples (:class:`~trainrun.data.loader.EvalSet`), the
same for every micro-batch size and layout: a sweep over either, the best-checkpoint choice and an
Optuna objective compare losses on the same data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from trainrun.config.schema import TrainRunConfig
from trainrun.data import DataSources, EvalSet, SplitView, eval_sample_count
from trainrun.distributed.env import DistEnv
from trainrun.distributed.parallel_dims import ParallelDims
from trainrun.model.loss import autocast_context, lm_loss
from trainrun.registry import EVALUATORS

logger = logging.getLogger(__name__)


class Evaluator(Protocol):
    """Computes evaluation metrics for the current model (``val_loss`` is the objective of sweeps and best
    checkpoints). An evaluator may also offer ``evaluate_test() -> dict``, which the loop runs once after a
    finished run."""

    def evaluate(self) -> dict[str, float]: ...


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ValLossEvaluator:
    """Mean next-token loss per source over fixed evaluation sets, and their weighted mean.

    Batches are sharded by data-parallel rank (TP/PP peers read the same ones). With pipeline
    parallelism, ``forward_loss`` runs a batch through the stages and returns its loss on every rank.
    """

    def __init__(self, cfg: TrainRunConfig, model: nn.Module | list[nn.Module], data: DataSources, env: DistEnv,
                 dp_rank: int | None = None, forward_loss: LossFn | None = None):
        self.model_parts = model if isinstance(model, list) else [model]
        self.env = env
        self.micro_batch_size = cfg.train.micro_batch_size
        self.dp_size = cfg.parallel.data_parallel_size
        if dp_rank is None:  # the mesh order decides which ranks are data-parallel peers
            dp_rank = ParallelDims.from_config(cfg.parallel, env.world_size, env.rank).dp_rank
        self.dp_rank = dp_rank
        self.forward_loss: LossFn = forward_loss or (lambda x, y: lm_loss(self.model_parts[0], x, y))
        self.autocast = autocast_context(cfg.train.precision, env.device)

        def sets(views: list[SplitView]) -> list[EvalSet]:
            seq_len = cfg.data.seq_len
            return [EvalSet(v, seq_len, eval_sample_count(cfg.eval.samples, cfg.eval.iters,
                                                          cfg.train.global_batch_size,
                                                          v.num_samples(seq_len))) for v in views]

        self.val_sets = sets(data.valid)
        self.test_sets = sets(data.test) if cfg.eval.test else []
        for role, eval_sets in (("validation", self.val_sets), ("test", self.test_sets)):
            if eval_sets:
                logger.info("%s covers %d tokens per evaluation: %s", role, sum(s.num_tokens for s in eval_sets),
                            ", ".join(f"{s.view.source} {s.num_samples} samples of {s.stream.num_samples}"
                                      for s in eval_sets))

    def evaluate(self) -> dict[str, float]:
        """``val_loss`` (nats/token; the sources' weighted mean), ``val_ppl`` and, with several sources,
        ``val_loss/<source>``; the model is left in train mode."""
        return self._evaluate(self.val_sets, "val")

    def evaluate_test(self) -> dict[str, float]:
        """The same over the test sets (``test_loss``, ``test_ppl``, ``test_loss/<source>``); {} without any."""
        return self._evaluate(self.test_sets, "test") if self.test_sets else {}

    @torch.no_grad()
    def _evaluate(self, eval_sets: list[EvalSet], prefix: str) -> dict[str, float]:
        if not eval_sets:
            return {}
        for part in self.model_parts:
            part.eval()
        # Per source: sum of batch-mean losses weighted by batch size, and the sample count. Reduced as one
        # vector: a rank with a shorter share (or none) still contributes the right weight.
        sums = torch.zeros(2 * len(eval_sets), dtype=torch.float64, device=self.env.device)
        for i, eval_set in enumerate(eval_sets):
            for inputs, targets in eval_set.rank_batches(self.micro_batch_size, self.dp_rank, self.dp_size):
                with self.autocast():
                    loss = self.forward_loss(inputs.to(self.env.device), targets.to(self.env.device))
                sums[2 * i] += loss.double() * inputs.shape[0]
                sums[2 * i + 1] += inputs.shape[0]
        for part in self.model_parts:
            part.train()
        reduced = self.env.all_reduce_mean(sums).tolist()
        losses = [reduced[2 * i] / max(reduced[2 * i + 1], 1e-30) for i in range(len(eval_sets))]
        weights = [s.view.weight for s in eval_sets]
        total = sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights)
        result = {f"{prefix}_loss": total, f"{prefix}_ppl": math.exp(min(total, 50.0))}
        if len(eval_sets) > 1:
            result.update({f"{prefix}_loss/{s.view.source}": x for s, x in zip(eval_sets, losses, strict=True)})
        return result


@EVALUATORS.register("val_loss")
def build_val_loss(cfg: TrainRunConfig, model: nn.Module | list[nn.Module], data: DataSources, env: DistEnv,
                   dp_rank: int | None = None, forward_loss: LossFn | None = None) -> Evaluator:
    """Validation loss and perplexity per source and their weighted mean; test loss once at the end."""
    return ValLossEvaluator(cfg, model, data, env, dp_rank, forward_loss)
