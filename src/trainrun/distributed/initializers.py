"""Environment initializers: single process, torchrun (env://) and Slurm, chosen by parallel.initializer."""

from __future__ import annotations

import logging
import os
import platform
import random
import shutil
import socket
import subprocess
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from trainrun.config.schema import TrainRunConfig
from trainrun.config.validate import resolve_device_type
from trainrun.distributed.env import DistEnv
from trainrun.errors import ConfigError, RunEnvironmentError
from trainrun.registry import INITIALIZERS

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch with the run seed, the same on every rank: model init must be identical
    on every rank (replicated weights start equal); per-rank randomness derives from it explicitly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _device(cfg: TrainRunConfig, local_rank: int) -> torch.device:
    if resolve_device_type(cfg) == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _configure_determinism(cfg: TrainRunConfig) -> None:
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _layout(cfg: TrainRunConfig) -> str:
    p = cfg.parallel
    return f"pp={p.pp} dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} tp={p.tp}"


@INITIALIZERS.register("single")
def init_single(cfg: TrainRunConfig) -> DistEnv:
    """One process, no process group."""
    _configure_determinism(cfg)
    seed_everything(cfg.run.seed)
    return DistEnv(0, 0, 1, _device(cfg, 0), None, "single", _layout(cfg))


def _init_process_group(cfg: TrainRunConfig, rank: int, local_rank: int, world_size: int, name: str) -> DistEnv:
    _configure_determinism(cfg)
    device = _device(cfg, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, init_method="env://", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=cfg.parallel.collective_timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    seed_everything(cfg.run.seed)
    # Host-side agreements (exit flags, save wishes) go over gloo with CPU tensors: on NCCL they would
    # wait for the GPU queue every step.
    host_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    hosts: list[str] = [""] * world_size
    dist.all_gather_object(hosts, socket.gethostname(), group=host_group)
    return DistEnv(rank, local_rank, world_size, device, backend, name, _layout(cfg), host_group=host_group,
                   hosts=hosts)


def _require_env(names: tuple[str, ...], initializer: str) -> dict[str, str]:
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise ConfigError(
            "parallel.initializer", initializer,
            f"environment variables {', '.join(missing)} are not set; launch with "
            + ("torchrun" if initializer == "torchrun" else "srun/sbatch") + " or use parallel.initializer=single",
        )
    return {n: os.environ[n] for n in names}


@INITIALIZERS.register("torchrun")
def init_torchrun(cfg: TrainRunConfig) -> DistEnv:
    """Rendezvous through env:// with the variables torchrun sets."""
    env = _require_env(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"), "torchrun")
    return _init_process_group(cfg, int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), "torchrun")


def slurm_hostnames(nodelist: str) -> list[str]:
    """The hosts of a Slurm node list such as ``node[003-005,7],gpu1``, expanded by Slurm itself
    (``scontrol show hostnames``), in allocation order."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise RunEnvironmentError("scontrol", "PATH", "parallel.initializer=slurm reads the job's node list with "
                                  "`scontrol show hostnames`; put Slurm's client tools on PATH in the job")
    proc = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
    hosts = proc.stdout.split()
    if proc.returncode != 0 or not hosts:
        raise RunEnvironmentError(f"SLURM_JOB_NODELIST={nodelist}", "scontrol show hostnames",
                                  f"Slurm could not expand it ({proc.stderr.strip() or 'no hosts'}); run inside "
                                  "a Slurm allocation, or use parallel.initializer=torchrun")
    return hosts


@INITIALIZERS.register("slurm")
def init_slurm(cfg: TrainRunConfig) -> DistEnv:
    """Ranks from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; the rendezvous host is the job's first node.

    Slurm puts task 0 on the first node of the allocation, and task 0 hosts the rendezvous store
    (env://), so MASTER_ADDR is that node's name as the cluster resolves it; a MASTER_ADDR the job
    already set wins.
    """
    env = _require_env(("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST"), "slurm")
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = slurm_hostnames(env["SLURM_JOB_NODELIST"])[0]
    # A port derived from the job id keeps two jobs sharing a node from colliding.
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    return _init_process_group(
        cfg, int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"]), int(env["SLURM_NTASKS"]), "slurm"
    )


@INITIALIZERS.register("auto")
def init_auto(cfg: TrainRunConfig) -> DistEnv:
    """torchrun when its variables are set, Slurm inside a multi-task Slurm step, else single."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return init_torchrun(cfg)
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return init_slurm(cfg)
    return init_single(cfg)


def describe(env: DistEnv) -> str:
    """One line for the log: world, device and versions; with several processes, the ranks on each host."""
    line = (
        f"initializer={env.initializer} world_size={env.world_size} mesh=[{env.layout}] rank={env.rank} "
        f"device={env.device} backend={env.backend or 'none'} host={socket.gethostname()} "
        f"torch={torch.__version__} python={platform.python_version()}"
    )
    if env.world_size > 1 and env.hosts:
        line += " hosts: " + rank_hosts(env.hosts)
    return line


def rank_hosts(hosts: list[str]) -> str:
    """``n1 (ranks 0-1), n2 (ranks 2-3)``: each host with the ranks on it, in rank order."""
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(host, []).append(rank)

    def ranks(numbers: list[int]) -> str:
        contiguous = numbers == list(range(numbers[0], numbers[-1] + 1))
        if len(numbers) == 1:
            return f"rank {numbers[0]}"
        return f"ranks {numbers[0]}-{numbers[-1]}" if contiguous else "ranks " + ",".join(map(str, numbers))

    return ", ".join(f"{host} ({ranks(numbers)})" for host, numbers in by_host.items())
