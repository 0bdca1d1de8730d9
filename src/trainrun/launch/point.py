"""A sweep point's stable identity: a short hash of its own overrides.

``hydra.sweep.subdir`` is ``${trainrun_point_id:${hydra.job.override_dirname}}``, so a point keeps
its run (and checkpoint) directory when the same sweep is launched again, whatever the order or
number of the other points, and a requeued Slurm job finds the directory it left.
"""

from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

RESOLVER = "trainrun_point_id"


def point_id(override_dirname: str) -> str:
    """``p`` + 10 hex digits of the SHA-256 of the point's overrides, order-insensitive.

    Hydra's ``override_dirname`` sorts the overrides, so ``a=1,b=2`` and ``b=2,a=1`` agree; an
    empty string (a single run) has its own id.
    """
    return "p" + hashlib.sha256(override_dirname.encode("utf-8")).hexdigest()[:10]


def register_resolvers() -> None:
    """Register ``${trainrun_point_id:...}`` with OmegaConf (idempotent).

    Called when ``trainrun`` is imported, because a submitit job resolves its sweep subdir before
    any trainrun entry point runs (it only unpickles the task function, which imports trainrun).
    """
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, point_id)
