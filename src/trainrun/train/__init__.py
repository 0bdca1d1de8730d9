"""Training loop, TrainState and step executors."""

from trainrun.train.state import TrainState

__all__ = ["TrainState"]
