"""trainrun: a Hydra-configured, pluggable training runner for GPT-style language models."""

from trainrun.launch.point import register_resolvers

__version__ = "0.1.0"

# Resolvers must exist wherever a trainrun config is resolved, including submitit jobs that only
# unpickle the task function (which imports this package) before Hydra resolves the job's directory.
register_resolvers()
