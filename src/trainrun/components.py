"""Imports trainrun's built-in components so that they register themselves in the registries."""

import trainrun.checkpoint.policy
import trainrun.data.datasets
import trainrun.distributed.initializers
import trainrun.eval.evaluator
import trainrun.model.gpt
import trainrun.observe.sinks
import trainrun.optim.optimizer
import trainrun.optim.schedules
import trainrun.train.executors  # noqa: F401 - imported for its registrations (see the docstring)
