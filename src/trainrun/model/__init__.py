"""GPT model, its meta-device materialisation, sampling and analytic accounting.

Importing this package registers the ``gpt`` model builder in ``trainrun.registry.MODELS``.
"""

from trainrun.model.accounting import (
    MemoryEstimate,
    count_parameters,
    estimate_training_memory,
    flops_per_token,
)
from trainrun.model.generate import generate
from trainrun.model.gpt import GPT, build_gpt
from trainrun.model.init import allocate, materialize

__all__ = [
    "GPT",
    "MemoryEstimate",
    "allocate",
    "build_gpt",
    "count_parameters",
    "estimate_training_memory",
    "flops_per_token",
    "generate",
    "materialize",
]
