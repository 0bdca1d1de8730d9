"""NaN injection (debug.inject_nan_at_steps) and a full disk during a save.

Both launch pairs run concurrently (one process per core).
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers.faults import base_args, launch, losses, metric_rows, output

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _run(args, run_dir):
    proc = launch(args, run_dir)
    return proc.wait(timeout=240), output(proc)


def test_nan_steps_skipped_counted_and_persistent_nan_exits_4(tmp_path, corpus_cache, reference_losses):
    once, persistent = tmp_path / "once", tmp_path / "persistent"
    with ThreadPoolExecutor(2) as pool:
        f_once = pool.submit(_run, base_args(corpus_cache, once, "checkpoint.interval=2",
                                             "debug.inject_nan_at_steps=[5]"), once)
        f_persistent = pool.submit(_run, base_args(corpus_cache, persistent, "checkpoint.interval=2",
                                                   "debug.inject_nan_at_steps=[3,4,5,6,7,8]",
                                                   "train.max_skipped_steps=3"), persistent)
        (code_once, out_once), (code_persistent, out_persistent) = f_once.result(), f_persistent.result()

    # One poisoned step: skipped (optimizer and LR schedule not stepped), counted, training goes on.
    assert code_once == 0, out_once[-3000:]
    rows = {row["step"]: row for row in metric_rows(once) if "loss" in row}
    assert rows[5]["loss"] is None  # NaN is written as null
    assert [rows[s]["skipped_steps"] for s in (4, 5, 6, 20)] == [0, 1, 1, 1]
    assert all(rows[s]["loss"] == reference_losses[s] for s in range(1, 5))
    assert all(rows[s]["loss"] is not None for s in range(6, 21))
    assert rows[6]["lr"] == rows[5]["lr"]  # the skipped step did not advance the schedule
    log = (once / "train.log").read_text()
    assert "step 5 skipped" in log and "not saving at step 4" not in log

    # Persistent NaN: three in a row (steps 3, 4, 5) exit 4; nothing is saved after step 2.
    assert code_persistent == 4, out_persistent[-3000:]
    assert _entries(persistent / "checkpoints") == ["latest", "step_2"]
    last = [row for row in metric_rows(persistent) if "loss" in row][-1]
    assert last["step"] == 5 and last["skipped_steps"] == 3
    assert "3 consecutive steps had a non-finite loss" in (persistent / "train.log").read_text()


def _entries(ckpt_dir) -> list[str]:
    """What a checkpoint directory holds, the run's lock file aside."""
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name != ".trainrun.lock")


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          check=False)
    return done.returncode == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_full_disk_during_save_keeps_previous_checkpoint(tmp_path, corpus_cache, reference_losses, mode):
    """A 2 MiB tmpfs holds one checkpoint of the tiny model (about 1.5 MB) but not two."""
    mnt = tmp_path / "small_disk"
    if not _mount_tmpfs(mnt, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run_dir = tmp_path / "run"
        ckpt = mnt / "checkpoints"
        code, out = _run(base_args(corpus_cache, run_dir, "checkpoint.interval=2", f"checkpoint.dir={ckpt}",
                                   "checkpoint.max_failed_saves=0",
                                   f"checkpoint.async_save={str(mode == 'async').lower()}"), run_dir)
        log = (run_dir / "train.log").read_text()
        # Periodic saves that fail are reported and training continues; the final save must land, so it fails the run.
        # Which write meets the full disk decides the words: ENOSPC from a plain write, or torch's zip writer's
        # "unexpected pos" (a short write inside torch.save); either way the free space is named.
        assert "No space left on device" in log or "MiB free on" in log, out[-3000:]
        assert "training continues (previous checkpoints intact; " in log
        assert code == 1 and "trainrun: checkpoint error" in out
        assert _entries(ckpt) == ["latest", "step_2"]  # no temp dirs left behind
        assert all(s in losses(run_dir) for s in range(1, 21))  # it trained to the end
        # The previous checkpoint is intact and loadable: resume from it elsewhere and finish exactly.
        resumed = tmp_path / "resumed"
        code, out = _run(base_args(corpus_cache, resumed, "checkpoint.interval=0",
                                   f"checkpoint.resume={ckpt / 'step_2'}"),
                         resumed)
        assert code == 0, out[-3000:]
        assert "resumed from" in (resumed / "train.log").read_text()
        assert losses(resumed) == {s: v for s, v in reference_losses.items() if s > 2}
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
