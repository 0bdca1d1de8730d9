"""The output rule end to end: a run trained by the CLI survives ``trainrun-export --force`` aimed at it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import TINY, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_trained_run_survives_export_and_prepare_aimed_at_it(tmp_path, corpus_cache):
    pytest.importorskip("safetensors")
    run = tmp_path / "runs" / "r1"
    proc = run_cli([*TINY, f"data.path={corpus_cache}", "train.max_steps=2", "checkpoint.interval=2",
                    "eval.sample_tokens=0", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (run / "checkpoints" / "step_2" / "trainrun.json").is_file()
    (tmp_path / "runs" / "notes.txt").write_text("beside the run")
    before = files_of(tmp_path / "runs")
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(4):
        (texts / f"{i}.txt").write_text(f"text {i}\n" * 10)
    attempts = [("trainrun.hf.export", [str(run), "--output", str(out), "--force"])
                for out in (run, run.parent, run / "checkpoints", run / "hf")]
    attempts.append(("trainrun.data.prepare", [str(texts), "--output", str(run), "--force"]))
    for module, args in attempts:
        refused = run_cli(args, cwd=tmp_path, module=module, timeout=120)
        assert refused.returncode == 2, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "--output" in refused.stderr
    assert files_of(tmp_path / "runs") == before
    exported = run_cli([str(run), "--output", str(tmp_path / "hf")], cwd=tmp_path, module="trainrun.hf.export",
                       timeout=120)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / ".trainrun-export.json").is_file()
    report = run_cli([str(run)], cwd=tmp_path, module="trainrun.launch.report", timeout=120)
    assert report.returncode == 0, report.stderr
    assert "r1" in report.stdout and (run / "report.csv").is_file()
