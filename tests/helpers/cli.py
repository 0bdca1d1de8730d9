"""Run the CLI as a user would, read a run's metrics, execute a notebook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: no network for wandb, small thread count, repo src on the path."""
    env = dict(os.environ)
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "2",
                "PYTHONPATH": os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])})
    env.update(extra)
    return env


def start_ranks(nproc: int, args: list[str], cwd: Path, port: int) -> list[subprocess.Popen]:
    """``nproc`` processes of ``python -m trainrun <args>`` with torchrun's environment variables but no
    torchrun (whose own exit code and SIGTERMs hide each rank's code); stderr piped, stdout dropped."""
    procs = []
    for rank in range(nproc):
        env = cli_env(OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "trainrun", *args], cwd=cwd, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def run_cli(args: list[str], cwd: Path, timeout: float = 300, module: str = "trainrun",
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m trainrun <args>`` in ``cwd``; returns the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or cli_env())


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of ``metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from metrics.jsonl."""
    return {row["step"]: row["loss"] for row in read_metrics(run_dir) if "loss" in row}


def execute_notebook(name: str, monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    """Execute ``notebooks/<name>`` with nbclient (``env`` set, no display); return everything it printed."""
    import nbformat
    from nbclient import NotebookClient

    for key, value in {**env, "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)


TINY = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "data.seq_len=32",
    "train.micro_batch_size=4", "train.global_batch_size=8", "train.progress_bar=false",
    "data.max_documents=400", "eval.iters=2", "eval.sample_tokens=32", "optim.warmup_steps=2",
]
"""Overrides for a model and run small enough for a test to take seconds."""
