"""Optimizer construction and learning-rate schedules.

Importing this package registers ``adamw`` in ``OPTIMIZERS`` and the schedules ``constant``,
``cosine``, ``linear``, ``wsd`` and ``wsd_sqrt`` in ``LR_SCHEDULES``.
"""

from trainrun.optim.optimizer import build_adamw, param_group_summary, param_groups
from trainrun.optim.schedules import (
    SchedulerGroup,
    build_lr_scheduler,
    constant_schedule,
    cosine_schedule,
    linear_schedule,
    rewind_schedule,
    schedule_state,
    scheduled_lr,
    wsd_schedule,
    wsd_sqrt_schedule,
)

__all__ = [
    "SchedulerGroup",
    "build_adamw",
    "build_lr_scheduler",
    "constant_schedule",
    "cosine_schedule",
    "linear_schedule",
    "param_group_summary",
    "param_groups",
    "rewind_schedule",
    "schedule_state",
    "scheduled_lr",
    "wsd_schedule",
    "wsd_sqrt_schedule",
]
