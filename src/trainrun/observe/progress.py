"""Progress bar and a bar-aware writer, so log lines never tear a live tqdm bar."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

# Bars currently on screen; log_write only needs tqdm.write while at least one is live.
_active_bars: set[int] = set()


class NullProgressBar:
    """Stand-in for a tqdm bar when the bar is disabled or stderr is not a terminal."""

    n: int = 0

    def update(self, n: int = 1) -> None:
        """Advance the (invisible) bar by ``n``."""
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Ignore the postfix."""

    def close(self) -> None:
        """Nothing to close."""


class _TrackedBar(tqdm):
    """A tqdm bar that registers itself as active so writers route through ``tqdm.write``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _active_bars.add(id(self))

    def close(self) -> None:
        """Close the bar and unregister it."""
        _active_bars.discard(id(self))
        super().close()


def progress_bar(total: int, initial: int = 0, enabled: bool = True) -> tqdm | NullProgressBar:
    """Return a training-step bar on a terminal, else a no-op object with the same methods.

    A bar in a non-TTY (a Slurm log, a CI job) only produces carriage-return garbage, so it
    is suppressed there even when ``enabled``.
    """
    if not enabled or not _stderr_is_tty():
        bar = NullProgressBar()
        bar.n = initial
        return bar
    return _TrackedBar(total=total, initial=initial, file=sys.stderr, dynamic_ncols=True, unit="step", leave=True)


def bar_active() -> bool:
    """Whether a progress bar is currently drawn."""
    return bool(_active_bars)


def log_write(msg: str) -> None:
    """Write one line to stderr, above the progress bar when one is active."""
    if bar_active():
        tqdm.write(msg, file=sys.stderr)
    else:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False
