"""Fixtures of the fault-injection tests (their helpers: tests/helpers/faults.py)."""

from __future__ import annotations

import pytest

from tests.helpers.faults import MAX_STEPS, base_args, losses, run_to_end


@pytest.fixture(scope="session")
def reference_losses(corpus_cache, tmp_path_factory) -> dict[int, float]:
    """Losses of an uninterrupted single-process run (no checkpoints)."""
    run_dir = tmp_path_factory.mktemp("reference")
    code = run_to_end(base_args(corpus_cache, run_dir, "checkpoint.interval=0", "checkpoint.save_final=false"), run_dir)
    assert code == 0, (run_dir / "proc-0.out").read_text()[-3000:]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    return got
