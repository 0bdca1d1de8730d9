"""The CLI as a user types it: configuration errors, --cfg job, dry run, training, resume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tests.helpers.cli import TINY, read_metrics, run_cli, train_losses
from tests.helpers.wandb_records import history_rows, read_finished_wandb_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["model.n_heads=5"], "model.n_heads=5"),
    (["train.global_batch_size=20"], "train.global_batch_size=20"),
    (["data.seq_len=512"], "data.seq_len=512"),
    (["train.step_executor=warp"], "registered: compile, cuda_graph, eager"),
    (["data=indexed", "data.path=/no/such/dir"], "data.path='/no/such/dir'"),
    (["train.max_stepz=3"], "max_stepz"),
    (["train.max_steps=many"], "max_steps"),
    (["parallel.tp=2"], "world size is 1"),
])
def test_config_error_exits_2_with_one_clear_message(overrides, expected, tmp_path):
    proc = run_cli([*overrides, f"hydra.run.dir={tmp_path}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cfg_job_prints_composed_config(tmp_path):
    proc = run_cli(["+experiment=gpt_125m", "optim.lr=3e-4", "train.max_steps=50", "--cfg", "job"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "d_model: 768" in proc.stdout and "lr: 0.0003" in proc.stdout and "max_steps: 50" in proc.stdout


def test_dry_run_gpt_1b_reports_without_allocating(tmp_path):
    proc = run_cli(["+experiment=gpt_1b", "run.dry_run=true", f"hydra.run.dir={tmp_path}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "train.log").read_text()
    assert "parameters           1,3" in log  # 1.3B
    assert "FLOPs per token" in log and "memory per device" in log and "tokens per step      524,288" in log
    assert not (tmp_path / "checkpoints").exists()


def test_train_eval_checkpoint_sample(tmp_path, corpus_cache):
    args = [*TINY, f"data.path={corpus_cache}", "train.max_steps=40", "train.log_interval=5", "eval.interval=20",
            "checkpoint.interval=20", "optim.warmup_steps=5", "checkpoint.exit_grace_s=1e-6",
            f"hydra.run.dir={tmp_path}"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Every save is slower than a 1 µs grace period: warned about once, not at every save.
    assert (tmp_path / "train.log").read_text().count("more than checkpoint.exit_grace_s=1e-06s") == 1
    rows = read_metrics(tmp_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    assert {"lr", "grad_norm", "tokens_per_s", "mfu"} <= set(train[0])
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, "loss should fall on the bundled corpus"
    assert [r["step"] for r in evals] == [20, 40]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_40"
    assert (tmp_path / "checkpoints" / "step_40" / ".metadata").is_file()
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert "--- sample ---" in proc.stdout and f"run directory: {tmp_path}" in proc.stdout


@pytest.mark.parametrize("executor", [
    [],
    # the LR lives in a tensor in the optimizer's param groups: it must save and load like the float
    pytest.param(["train.step_executor=compile", "train.compile.scope=none", "train.compile.optimizer=true"],
                 marks=pytest.mark.slow, id="compiled-optimizer"),
])
def test_resume_is_bit_exact(tmp_path, corpus_cache, executor):
    common = [*TINY, f"data.path={corpus_cache}", "train.max_steps=40", "train.log_interval=1", "eval.interval=0",
              "checkpoint.interval=0", "eval.sample_tokens=0", "optim.warmup_steps=5", *executor]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli([*common, f"hydra.run.dir={straight}"], cwd=tmp_path).returncode == 0
    first = run_cli([*common, "train.exit_interval=20", f"hydra.run.dir={split}"], cwd=tmp_path)
    assert first.returncode == 3, first.stderr  # stopped early, saved, "resume me"
    assert (split / "checkpoints" / "latest").read_text().strip() == "step_20"
    second = run_cli([*common, f"hydra.run.dir={split}"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in (split / "train.log").read_text()
    expected, got = train_losses(straight), train_losses(split)
    assert sorted(got) == list(range(1, 41))
    assert got == expected  # bit for bit: JSON floats round-trip exactly


def test_wandb_offline_run_writes_files(tmp_path, corpus_cache):
    args = [*TINY, f"data.path={corpus_cache}", "train.max_steps=4", "train.log_interval=2",
            "logging.wandb.enabled=true", "logging.wandb.mode=offline", "checkpoint.interval=0",
            "eval.sample_tokens=0", f"hydra.run.dir={tmp_path}"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("*.wandb"))
    assert records and records[0].stat().st_size > 0
    logged = [row for row in history_rows(read_finished_wandb_file(records[0])) if "loss" in row]
    expected = [row for row in read_metrics(tmp_path) if "loss" in row]
    assert [(r["_step"], r["loss"]) for r in logged] == [(r["step"], r["loss"]) for r in expected]


def test_prepare_then_train_on_indexed(tmp_path):
    docs = tmp_path / "docs.jsonl"
    src = "".join(Path(m.__file__).read_text() for m in (json, argparse))
    docs.write_text("\n".join(json.dumps({"text": src[i:i + 4000]}) for i in range(0, len(src) - 4000, 4000)))
    prep = run_cli([str(docs), "--output", str(tmp_path / "ds"), "--tokenizer", "bpe", "--vocab-size", "400",
                    "--val-fraction", "0.2"],
                   cwd=tmp_path, module="trainrun.data.prepare")
    assert prep.returncode == 0, prep.stderr
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, "data=indexed", f"data.path={tmp_path / 'ds'}", "train.max_steps=4",
                    "train.log_interval=2", "checkpoint.interval=0", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_metrics(run_dir)[0]["loss"] < 7.0  # ~ln(400) at init


def test_multirun_sweep_runs_each_job(tmp_path, corpus_cache):
    args = ["-m", *TINY, f"data.path={corpus_cache}", "train.max_steps=2", "train.log_interval=1",
            "checkpoint.interval=0", "eval.sample_tokens=0", "optim.warmup_steps=1", "optim.lr=1e-3,3e-3",
            f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    points = sorted((tmp_path / "sweep").glob("p*/metrics.jsonl"))  # one directory per point, named by its hash
    assert len(points) == 2
    lrs = sorted(read_metrics(p.parent)[0]["lr"] for p in points)
    assert lrs == pytest.approx([1e-3 / 2, 3e-3 / 2])  # warmup step 0 of 1: (0+1)/(1+1) of peak


def test_resume_refuses_changed_data_unless_allowed(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    common = [*TINY, "eval.sample_tokens=0", f"data.path={corpus_cache}", f"hydra.run.dir={run_dir}"]
    assert run_cli([*common, "train.max_steps=4", "checkpoint.interval=2"], cwd=tmp_path).returncode == 0
    other_data = [*common, "data.max_documents=300", "train.max_steps=6"]  # another corpus, another checksum
    refused = run_cli(other_data, cwd=tmp_path)
    assert refused.returncode == 2
    assert "the data changed since" in refused.stderr and "checkpoint.allow_data_change=true" in refused.stderr
    allowed = run_cli([*other_data, "checkpoint.allow_data_change=true"], cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "continuing its data position on the new data" in (run_dir / "train.log").read_text()
    weights_only = run_cli([*other_data, "train.max_steps=8", "checkpoint.load_optimizer=false"], cwd=tmp_path)
    assert weights_only.returncode == 0, weights_only.stderr[-3000:]  # fine-tuning on new data is the point
