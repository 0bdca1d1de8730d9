"""SIGKILL at random moments during training and during saves, sync and async, then resume=auto.

Each kill is followed by a resume in the same run directory; a run directory is an "episode"
that ends when a launch finishes on its own, and its final per-step losses must equal the
uninterrupted run's. Per kill we check:

* ``resume=auto`` finds a complete checkpoint whenever ``latest`` named one at the kill, and never
  an older one than ``latest`` named (committed work is never lost);
* the steps redone (last step logged before the kill minus the step resumed from) are at most one
  ``checkpoint.interval`` for sync saves. An async checkpoint is only committed once its background
  write finished (at the latest when the next save starts), so there the bound is two intervals.

The sync and async loops run concurrently (one process each) to use both cores.
"""

from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.faults import (
    INTERVAL,
    MAX_STEPS,
    base_args,
    count_loss_rows,
    last_step,
    latest_step,
    launch,
    log_since,
    log_size,
    losses,
    output,
    resumed_step,
    wait_for_rows,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

KILLS_PER_MODE = 11
"""2 modes x 11 = 22 kills per run of the suite."""
SEED = int(os.environ.get("TRAINRUN_FAULT_SEED", "0"))
"""Change it to draw other kill moments (the fault matrix in docs/checkpointing.md used several)."""
MAX_KILLS_PER_EPISODE = 6


@dataclass
class KillStats:
    mode: str
    kills: int = 0
    kills_during_save: int = 0
    resumes: int = 0
    episodes: int = 0
    max_redone: int = 0
    failures: list[str] = field(default_factory=list)


def _kill_loop(mode: str, seed: int, corpus: Path, root: Path, reference: dict[int, float]) -> KillStats:
    rng = random.Random(seed)
    stats = KillStats(mode)
    bound = INTERVAL if mode == "sync" else 2 * INTERVAL
    extra = [f"checkpoint.interval={INTERVAL}", f"checkpoint.async_save={str(mode == 'async').lower()}"]
    pending: tuple[int, int | None] | None = None  # (last step logged, latest) of the previous kill
    episode_kills = 0
    run_dir = root / f"{mode}-0"
    while True:
        must_finish = stats.kills >= KILLS_PER_MODE or episode_kills >= MAX_KILLS_PER_EPISODE
        rows, offset = count_loss_rows(run_dir), log_size(run_dir)
        proc = launch(base_args(corpus, run_dir, *extra), run_dir)
        started = wait_for_rows(run_dir, rows, proc)
        if pending is not None:  # check how the previous kill was recovered from
            logged, latest = pending
            resumed = resumed_step(log_since(run_dir, offset)) or 0
            stats.resumes += 1
            stats.max_redone = max(stats.max_redone, logged - resumed)
            if latest is not None and resumed < latest:
                stats.failures.append(f"{run_dir}: latest named step {latest}, resumed from {resumed}")
            if logged - resumed > bound:
                stats.failures.append(f"{run_dir}: {logged - resumed} steps redone (bound {bound})")
            pending = None
        if started and not must_finish:
            time.sleep(rng.uniform(0.0, 0.7))
        if proc.poll() is None and not must_finish:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            ckpt = run_dir / "checkpoints"
            stats.kills += 1
            episode_kills += 1
            if ckpt.is_dir() and (any(ckpt.glob(".tmp_step_*")) or (ckpt / ".latest.tmp").exists()):
                stats.kills_during_save += 1
            pending = (last_step(run_dir), latest_step(ckpt))
            continue
        code = proc.wait(timeout=240)
        if code != 0:
            stats.failures.append(f"{run_dir}: exit code {code}:\n{output(proc)[-2000:]}")
            return stats
        got = losses(run_dir)
        stats.episodes += 1
        if got != reference:
            diff = sorted(s for s in reference if got.get(s) != reference[s])
            stats.failures.append(f"{run_dir}: losses differ from the uninterrupted run at steps {diff}")
        if stats.kills >= KILLS_PER_MODE:
            return stats
        episode_kills = 0
        run_dir = root / f"{mode}-{stats.episodes}"


def test_random_sigkill_then_resume_is_exact(tmp_path, corpus_cache, reference_losses):
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_kill_loop, mode, seed, corpus_cache, tmp_path, reference_losses)
                   for mode, seed in (("sync", 1234 + SEED), ("async", 5678 + SEED))]
        results = [f.result() for f in futures]
    for s in results:
        print(f"SIGKILL faults [{s.mode}] seed={SEED}: kills={s.kills} kills_during_save={s.kills_during_save} "
              f"resumes={s.resumes} episodes={s.episodes} max_steps_redone={s.max_redone} "
              f"failures={len(s.failures)}")
    failures = [f for s in results for f in s.failures]
    assert not failures, "\n".join(failures)
    assert sum(s.kills for s in results) >= 20
    # Random moments; ~half landed inside a save in the recorded runs. The deterministic strikes are in
    # test_kill_during_save.py; this asks that the random ones reached saves too.
    assert sum(s.kills_during_save for s in results) >= 1
    assert all(s.episodes >= 1 for s in results)
    assert MAX_STEPS in reference_losses
