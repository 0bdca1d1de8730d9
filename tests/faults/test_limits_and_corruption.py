"""exit_interval / exit_duration_min stop and save; damaged newest checkpoints and a missing ``latest`` fall back.

One run directory, one chain of launches (each launch costs seconds of imports):

1. ``train.exit_interval=8``: stops after step 8, saves it, exits 3.
2. step_8's data file truncated; ``train.exit_duration_min`` tiny: resume reports step_8 as
   truncated, falls back to step_6, stops at the first step boundary (7), saves, exits 3.
3. step_7 bit-flipped and ``latest`` deleted: resume reports both, falls back to step_6 and
   finishes with the uninterrupted run's losses.
4. A changed model shape on resume is refused (exit 2) before anything is loaded.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.faults import (
    base_args,
    fault_env,
    latest_step,
    launch,
    log_since,
    log_size,
    losses,
    metric_rows,
    output,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _run(args, run_dir):
    offset = log_size(run_dir)
    proc = launch(args, run_dir)
    code = proc.wait(timeout=240)
    return code, log_since(run_dir, offset), output(proc)


def _data_file(step_dir):
    return next(p for p in sorted(step_dir.iterdir()) if p.suffix == ".distcp")


def test_exit_limits_and_damaged_checkpoints(tmp_path, corpus_cache, reference_losses):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    args = base_args(corpus_cache, run_dir, "checkpoint.interval=2")

    code, log, out = _run([*args, "train.exit_interval=8"], run_dir)
    assert code == 3, out[-3000:]
    assert "stopping at step 8 (exit_interval)" in log and latest_step(ckpt) == 8
    blocked = [row["time_ckpt_blocked_ms"] for row in metric_rows(run_dir) if "time_ckpt_blocked_ms" in row]
    assert len(blocked) >= 3 and all(ms > 0 for ms in blocked)  # the time each save blocked the loop

    data = _data_file(ckpt / "step_8")
    data.write_bytes(data.read_bytes()[:-64])
    code, log, out = _run([*args, "train.exit_duration_min=0.0001"], run_dir)
    assert code == 3, out[-3000:]
    assert f"skipping checkpoint {ckpt / 'step_8'}" in log and "truncated" in log
    assert "resumed from" in log and "(step 6" in log
    assert "stopping at step 7 (exit_duration)" in log and latest_step(ckpt) == 7

    data = _data_file(ckpt / "step_7")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    data.write_bytes(bytes(raw))
    (ckpt / "latest").unlink()
    code, log, out = _run(args, run_dir)
    assert code == 0, out[-3000:]
    assert "latest is missing; scanning" in log
    assert f"skipping checkpoint {ckpt / 'step_7'}" in log and "sha256" in log
    assert "(step 6" in log
    assert losses(run_dir) == reference_losses

    refused = subprocess.run([sys.executable, "-m", "trainrun", *args, "model.n_layers=3"], cwd=run_dir,
                             capture_output=True, text=True, timeout=240, env=fault_env(), check=False)
    assert refused.returncode == 2, refused.stderr
    assert "model.n_layers" in refused.stderr and "has model.n_layers=2" in refused.stderr
