"""The benchmark scripts still run and end with their JSON line (tiny sizes; the figures are not checked).

Benchmarks are run by hand, so nothing else would notice one breaking as the code under it changes.
Speed itself is never asserted here: see docs/benchmarks.md for measured figures. Not run here:
``exit_save.py``, whose point is a fixed 124M-parameter model (about 1.6 GB written per save); it
shares its model and optimizer set-up with ``checkpoint_save.py``, which is run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers.cli import REPO, cli_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY_MODEL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2"]


def _run(script: str, *args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=cli_env())


@pytest.mark.parametrize(("script", "args"), [
    ("overhead.py", ["--steps", "1", "--rounds", "1", "--warmup", "1", *TINY_MODEL, "data.seq_len=32"]),
    ("executors.py", ["--steps", "1", "--rounds", "1", "--warmup", "1", *TINY_MODEL, "data.seq_len=32",
                      "train.micro_batch_size=2", "train.global_batch_size=2"]),
    ("model_vs_reference.py", ["--steps", "1", "--rounds", "1"]),
    ("checkpoint_save.py", ["--repeats", "1", "--batch", "1", *TINY_MODEL, "model.vocab_size=256"]),
])
def test_benchmark_runs_and_prints_its_json_line(script, args, tmp_path):
    done = _run(script, *args, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["benchmark"] == script.removesuffix(".py")


def test_gpu_benchmark_says_so_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: benchmarks/gpu_check.sh measures it")
    done = _run("gpu.py", tmp_path=tmp_path)
    assert done.returncode == 0 and "no CUDA device" in done.stdout + done.stderr
