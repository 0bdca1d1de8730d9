"""Checkpoint policies, the DCP store and the checkpointer."""

from trainrun.checkpoint.checkpointer import Checkpointer
from trainrun.checkpoint.store import CheckpointStore

__all__ = ["CheckpointStore", "Checkpointer"]
