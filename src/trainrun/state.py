"""TrainState: the loop's progress counters, saved with every checkpoint.

Top-level so that the training loop and the checkpoint package both import it without
``checkpoint/`` depending on ``train/``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    """Where training stands; restored on resume so that counters and logs continue."""

    step: int = 0
    """Optimizer steps completed."""
    consumed_samples: int = 0
    """Samples (seq_len windows) consumed over all data-parallel ranks."""
    consumed_tokens: int = 0
    """Training tokens consumed over all ranks."""
    best_val_loss: float | None = None
    """Lowest validation loss seen so far."""
    last_val_loss: float | None = None
    """Validation loss of the latest evaluation."""
    best_checkpoint_step: int | None = None
    """Step of the persistent checkpoint saved at the best validation loss (never pruned)."""
    skipped_steps: int = 0
    """Steps skipped because their loss or gradient norm was not finite (total)."""
    train_time_s: float = 0.0
    """Wall time spent in training steps over all runs (not counting restarts)."""

    def state_dict(self) -> dict:
        """JSON-serialisable copy."""
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()`` output."""
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)
