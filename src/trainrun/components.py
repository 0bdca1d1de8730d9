"""Imports trainrun's built-in components so that they register themselves in the registries."""

import trainrun.checkpoint.policy  # noqa: F401
import trainrun.data.datasets  # noqa: F401
import trainrun.distributed.initializers  # noqa: F401
import trainrun.eval.evaluator  # noqa: F401
import trainrun.model.gpt  # noqa: F401
import trainrun.observe.sinks  # noqa: F401
import trainrun.optim.optimizer  # noqa: F401
import trainrun.optim.schedules  # noqa: F401
import trainrun.train.executors  # noqa: F401
