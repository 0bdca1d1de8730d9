"""Resuming a blend through the CLI (issue 18 §5): what a changed blend, split or source does to the resume.

One run of a 70/30 blend saves at step 4 of 8 and exits 3. Resuming it with another weight is refused
(exit 2, one line naming ``data.allow_blend_change``); with ``data.allow_blend_change=true`` it continues,
each source counting on from its saved count and drawn at the new weights. The data checksum covers the
split and every source: resuming with another ``data.split``, or with one source's files prepared anew,
is refused naming ``checkpoint.allow_data_change``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.cli import cli_env, read_metrics, run_cli
from trainrun.checkpoint.layout import read_meta
from trainrun.data.blend import BlendPhase
from trainrun.data.corpus import build_stdlib_corpus

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS, SAVED, GLOBAL_BATCH = 8, 4, 8
ARGS = [
    "model.n_layers=2", "model.d_model=32", "model.n_heads=4", "data.seq_len=16", "train.micro_batch_size=4",
    f"train.global_batch_size={GLOBAL_BATCH}", "data.max_documents=50", f"train.max_steps={STEPS}",
    "train.log_interval=1", "train.progress_bar=false", "eval.interval=0", "eval.iters=1", "eval.sample_tokens=0",
    "checkpoint.interval=0", "optim.warmup_steps=1", 'data.split="80,10,10"',
    "data.blend=[{name: lib, weight: 0.7, dataset: stdlib, subset: library}, "
    "{name: tst, weight: 0.3, dataset: stdlib, subset: tests}]",
]
"""A tiny model on the 70/30 blend of the bundled corpus's library and tests subsets, 8 steps of 8 samples."""


DATA_CHANGED = "the data changed since"


def cli(run_dir: Path, args: list[str]):
    """``python -m trainrun <args>`` in one process (one thread) writing to ``run_dir``."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, timeout=120,
                   env=cli_env(OMP_NUM_THREADS="1"))


def assert_refused(proc, field: str, says: str) -> None:
    """Exit 2, no traceback, and exactly one line of stderr naming ``field``, which ``says`` why."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    naming = [line for line in proc.stderr.splitlines() if field in line]
    assert len(naming) == 1, proc.stderr[-3000:]
    assert says in naming[0], naming[0]


def sample_rows(run_dir: Path) -> list[tuple[int, int, int]]:
    """``(step, samples/lib, samples/tst)`` of every training row of metrics.jsonl, in order."""
    return [(row["step"], row["samples/lib"], row["samples/tst"]) for row in read_metrics(run_dir) if "loss" in row]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The corpus cache of this module's runs (built by the first)."""
    return tmp_path_factory.mktemp("blend_cli_corpus")


@pytest.fixture
def stopped_run(tmp_path, corpus) -> Path:
    """A run of the 70/30 blend that saved at step 4 and exited 3 ("resume me")."""
    run_dir = tmp_path / "run"
    proc = cli(run_dir, [*ARGS, f"data.path={corpus}", f"train.exit_interval={SAVED}"])
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{SAVED}"
    return run_dir


def test_blend_change_is_refused_then_continues_each_source_where_it_stopped(stopped_run, corpus):
    args = [*ARGS, f"data.path={corpus}", "data.blend.0.weight=0.1"]  # 70/30 -> 25/75
    refused = cli(stopped_run, args)
    assert_refused(refused, "data.allow_blend_change",
                   "trained on the blend [lib 0.7, tst 0.3] but this run asks for [lib 0.25, tst 0.75]")
    assert f"from sample {SAVED * GLOBAL_BATCH}" in refused.stderr
    assert "step_" + str(SAVED + 1) not in (stopped_run / "checkpoints" / "latest").read_text()

    proc = cli(stopped_run, [*args, "data.allow_blend_change=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    at = SAVED * GLOBAL_BATCH
    assert f"blend changed at sample {at}" in (stopped_run / "train.log").read_text()

    rows = sample_rows(stopped_run)
    assert [step for step, _, _ in rows] == list(range(1, STEPS + 1))
    old = BlendPhase(("lib", "tst"), (0.7, 0.3))
    new = old.continued(("lib", "tst"), (0.1, 0.3), at)
    for step, lib, tst in rows:  # before: the old blend's counts; after: the saved counts plus the new blend's
        assert [lib, tst] == (old if step <= SAVED else new).counts_at(step * GLOBAL_BATCH), f"step {step}"
    for (_, lib0, tst0), (_, lib1, tst1) in zip(rows, rows[1:], strict=False):
        assert lib1 >= lib0 and tst1 >= tst0 and lib1 + tst1 == lib0 + tst0 + GLOBAL_BATCH  # no source restarts
    _, lib_saved, tst_saved = rows[SAVED - 1]
    _, lib_end, tst_end = rows[-1]
    drawn = (STEPS - SAVED) * GLOBAL_BATCH
    assert abs((lib_end - lib_saved) - 0.25 * drawn) <= 1 and abs((tst_end - tst_saved) - 0.75 * drawn) <= 1

    data = read_meta(stopped_run / "checkpoints" / f"step_{STEPS}")["data"]
    assert data["blend"] == [old.state_dict(), {"names": ["lib", "tst"], "weights": [0.1, 0.3], "start": at,
                                                "base": [lib_saved, tst_saved]}]
    assert data["consumed_by_source"] == {"lib": lib_end, "tst": tst_end}


def test_changed_split_or_source_data_is_refused(stopped_run, corpus, tmp_path):
    """The data checksum covers the split and each source: either change is a data change, not a blend change."""
    assert_refused(cli(stopped_run, [*ARGS, f"data.path={corpus}", 'data.split="70,20,10"']),
                   "checkpoint.allow_data_change", DATA_CHANGED)

    # The tests source prepared anew (40 of its files instead of 50) where the run looks for it: same name and
    # directory, other contents, so only its checksum tells.
    tests_dir = next(corpus.glob("stdlib-*-tests-*"))
    moved = tmp_path / "other_cache"
    rebuilt = build_stdlib_corpus(moved, max_documents=40, subset="tests")
    shutil.move(rebuilt, moved / tests_dir.name)
    args = [*ARGS, f"data.path={corpus}", f"+data.blend.1.path={moved}"]  # `+`: the entry has no path key
    assert_refused(cli(stopped_run, args), "checkpoint.allow_data_change", DATA_CHANGED)
    # Allowing a blend change allows other weights or sources, not other data under a source's name.
    assert_refused(cli(stopped_run, [*args, "data.allow_blend_change=true"]), "checkpoint.allow_data_change",
                   DATA_CHANGED)

    # The same files under another directory are the same data: the resume goes on.
    shutil.rmtree(moved / tests_dir.name)
    shutil.copytree(tests_dir, moved / tests_dir.name)
    proc = cli(stopped_run, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"step_{SAVED} (step {SAVED})" in (stopped_run / "train.log").read_text()


def test_changed_split_is_refused_even_when_blend_changes_are_allowed(stopped_run, corpus):
    proc = cli(stopped_run, [*ARGS, f"data.path={corpus}", 'data.split="70,20,10"', "data.allow_blend_change=true"])
    assert_refused(proc, "checkpoint.allow_data_change", DATA_CHANGED)
