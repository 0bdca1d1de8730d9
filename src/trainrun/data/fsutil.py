"""Crash- and race-safe directory publishing: build under a temporary name, then rename."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; it is deleted if the block raises.

    The caller publishes it with :func:`publish_dir`. Being on the same file system as ``final``
    makes that rename atomic.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    finally:
        # After a successful publish the temporary name no longer exists.
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, final: Path, replace: bool = False) -> bool:
    """Atomically rename ``tmp`` to ``final``; returns False if ``final`` already existed.

    Without ``replace`` an existing non-empty ``final`` wins (another process finished first) and
    ``tmp`` is left for the caller's cleanup. With ``replace`` the old directory is swapped out
    and deleted, so readers see either the old or the new one, never a mix.
    """
    try:
        os.rename(tmp, final)  # succeeds onto a missing or empty directory
        return True
    except OSError:
        if not final.exists():
            raise
    if not replace:
        logger.debug("%s appeared while building; using it", final)
        return False
    # A fresh empty name (a directory may be renamed onto an empty one): a trash left by a killed
    # earlier swap is never reused, so the rename below cannot fail on it.
    trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.rename(final, trash)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(trash, final)  # put the old output back: a failed replace leaves what was there
        raise
    shutil.rmtree(trash, ignore_errors=True)
    return True
