"""Decisions that lead into collectives are made collectively (real gloo process groups, 2 ranks).

Each test gives the ranks different local views on purpose (a clock that says "save", a loss that
is inf on one rank only, a checkpoint listing that differs) and checks that every rank acts on the
same answer, which is what keeps them from deadlocking in a save or diverging in a skipped step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainrun.checkpoint.exit_controller import ExitController
from trainrun.checkpoint.layout import CheckpointDir
from trainrun.checkpoint.policy import SaveContext, SaveKind, build_policy
from trainrun.config.schema import CheckpointConfig, TrainRunConfig
from trainrun.distributed.env import DistEnv
from trainrun.distributed.grad_norm import finite_flag_on_all_ranks
from trainrun.state import TrainState
from trainrun.train.save_and_exit import KIND_OF_PRIORITY, SAVE_PRIORITY

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

WORLD = 2


def _env(rank: int, init_file: Path) -> DistEnv:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    return DistEnv(rank, rank, WORLD, torch.device("cpu"), "gloo", "test")


def _launch(worker, tmp_path: Path, *args) -> list[dict]:
    """Run ``worker(rank, tmp_path, *args)`` on 2 spawned ranks; return what each wrote to rank<N>.json."""
    mp.spawn(worker, args=(tmp_path, *args), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _write(tmp_path: Path, rank: int, result: dict) -> None:
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(result))


# ---- skipped steps ---------------------------------------------------------------------------------


def _skip_worker(rank: int, tmp_path: Path) -> None:
    env = _env(rank, tmp_path / "init")
    try:
        norm = torch.tensor(1.5)
        inf_on_rank1 = torch.tensor(math.inf if rank == 1 else 2.0)
        nan_norm_on_rank0 = torch.tensor(math.nan if rank == 0 else 1.5)
        _write(tmp_path, rank, {
            "all_finite": bool(finite_flag_on_all_ranks(torch.tensor(2.0), norm)),
            "loss_inf_on_rank1": bool(finite_flag_on_all_ranks(inf_on_rank1, norm)),
            "norm_nan_on_rank0": bool(finite_flag_on_all_ranks(torch.tensor(2.0), nan_norm_on_rank0)),
        })
    finally:
        env.close()


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    results = _launch(_skip_worker, tmp_path)
    assert results[0] == results[1] == {"all_finite": True, "loss_inf_on_rank1": False, "norm_nan_on_rank0": False}


# ---- save policies and exit flags --------------------------------------------------------------------


def _policy_worker(rank: int, tmp_path: Path) -> None:
    env = _env(rank, tmp_path / "init")
    try:
        cfg = TrainRunConfig(checkpoint=CheckpointConfig(interval=0, time_interval_min=5.0, save_final=False,
                                                         non_persistent_interval=3))
        policy = build_policy(cfg.checkpoint)
        controller = ExitController(cfg, env, start_step=0)
        answers = {}
        # Rank 0's clock says 6 minutes since the last save, rank 1's says 4: only rank 0 wants to save.
        minutes = 6.0 if rank == 0 else 4.0
        wish = policy.decide(SaveContext(TrainState(step=7), False, False, minutes))
        reason, agreed = controller.agree(7, SAVE_PRIORITY[wish])
        answers["time_policy"] = [reason, getattr(KIND_OF_PRIORITY[agreed], "value", None),
                                  getattr(wish, "value", None)]
        # Step 9: non-persistent everywhere, persistent (time) on rank 1 only: persistent wins everywhere.
        wish = policy.decide(SaveContext(TrainState(step=9), False, False, 6.0 if rank == 1 else 0.0))
        reason, agreed = controller.agree(9, SAVE_PRIORITY[wish])
        answers["mixed"] = [reason, KIND_OF_PRIORITY[agreed].value]
        # A signal seen by rank 1 only stops both.
        if rank == 1:
            controller.received = __import__("signal").SIGTERM
        answers["signal"] = list(controller.agree(10, 0))
        _write(tmp_path, rank, answers)
    finally:
        env.close()


def test_ranks_whose_clocks_differ_save_together(tmp_path):
    results = _launch(_policy_worker, tmp_path)
    assert results[0]["time_policy"][:2] == results[1]["time_policy"][:2] == [None, SaveKind.PERSISTENT.value]
    assert [r["time_policy"][2] for r in results] == ["persistent", None]  # the local views did differ
    assert results[0]["mixed"] == results[1]["mixed"] == [None, "persistent"]
    assert results[0]["signal"] == results[1]["signal"] == ["signal", 0]


# ---- which checkpoint to resume from -------------------------------------------------------------------


def _resume_worker(rank: int, tmp_path: Path) -> None:
    from tests.unit.test_checkpoint import _checkpointer

    env = _env(rank, tmp_path / "init")
    try:
        ckpt = _checkpointer(tmp_path)
        ckpt.share, ckpt.is_rank0, ckpt.all_true = env.broadcast_object, env.is_rank0, env.all_true
        verified_by_this_rank = []
        original = CheckpointDir.verified

        def counting_verified(directory):
            for path in original(directory):
                verified_by_this_rank.append(path.name)
                yield path

        CheckpointDir.verified = counting_verified
        if rank == 1:
            # This rank's listing is behind (node-local caching, a commit that landed in between):
            # left to itself it would pick step_2.
            CheckpointDir.verified = lambda directory: iter([directory.step_dir(2)])
        path = ckpt.resume()
        _write(tmp_path, rank, {"path": str(path), "step": ckpt.state.step,
                                "verified": verified_by_this_rank,
                                "weight": ckpt.model_parts[0][0].weight.sum().item()})
    finally:
        env.close()


def test_every_rank_resumes_the_checkpoint_rank0_verified(tmp_path):
    from tests.unit.test_checkpoint import _checkpointer, _train_steps

    writer = _checkpointer(tmp_path)
    for _ in range(2):
        _train_steps(writer, 2)
        writer.save()
    results = _launch(_resume_worker, tmp_path)
    assert results[0]["path"] == results[1]["path"] == str(tmp_path / "ckpt" / "step_4")
    assert results[0]["step"] == results[1]["step"] == 4
    assert results[0]["weight"] == results[1]["weight"]
    assert results[0]["verified"] == ["step_4"]  # rank 0 verified the newest only
    assert results[1]["verified"] == []  # and rank 1 hashed nothing
