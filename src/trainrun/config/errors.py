"""Kept so ``from trainrun.config.errors import ConfigError`` still works.

The error kinds live in :mod:`trainrun.errors`.
"""

from __future__ import annotations

from trainrun.errors import ConfigError

__all__ = ["ConfigError"]
