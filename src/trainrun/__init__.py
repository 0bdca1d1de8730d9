"""trainrun: a Hydra-configured, pluggable training runner for GPT-style language models."""

__version__ = "0.1.0"
