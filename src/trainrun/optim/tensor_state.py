"""Optimizer state held in device tensors, for compiled and graph-captured optimizer steps.

The checkpointer relies on these conventions: a learning rate held in a tensor is saved as its
float, and a resumed optimizer keeps its own implementation flags (``checkpoint.checkpointer``).
"""

from __future__ import annotations

import torch


def lr_as_tensor(optimizer: torch.optim.Optimizer, device: torch.device | str = "cpu") -> None:
    """Hold each param group's learning rate in a 0-dim tensor that the LR schedule fills in place.

    A compiled optimizer step guards on a float LR's value, so a schedule that changes it every step
    recompiles every step until dynamo's recompile limit, then runs eagerly; a tensor LR is a graph
    input instead. Captured CUDA graphs need it too (a float would be frozen at capture). AdamW's
    foreach path refuses a tensor LR unless capturable, so an uncapturable foreach group switches to
    the single-tensor path, which the compiler fuses as well as foreach.
    """
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        if group.get("foreach") and not group.get("capturable"):
            group["foreach"] = False


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Learning rates as device tensors and step counters on the device, so a captured step reads
    the values the schedule writes between replays instead of constants frozen at capture."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state and state["step"].device != device:
                state["step"] = state["step"].to(device, dtype=torch.float32)
    lr_as_tensor(optimizer, device)  # after capturable: a capturable group keeps its foreach path
