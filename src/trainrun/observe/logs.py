"""Logging setup for trainrun's loggers: rank filtering, rank prefix, run-directory log file."""

from __future__ import annotations

import logging
from pathlib import Path

from trainrun.observe.progress import log_write

ROOT_LOGGER = "trainrun"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"

_warned: set[tuple[str, str]] = set()


class TqdmAwareHandler(logging.Handler):
    """Console handler that writes through ``tqdm.write`` while a progress bar is live."""

    def emit(self, record: logging.LogRecord) -> None:
        """Format ``record`` and write it to stderr without breaking a tqdm bar."""
        try:
            log_write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never crash training; handleError reports it
            self.handleError(record)


class _OurHandler:
    """Marker mixin so repeated ``setup_logging`` calls replace only handlers we installed."""


class _ConsoleHandler(TqdmAwareHandler, _OurHandler):
    pass


class _FileHandler(logging.FileHandler, _OurHandler):
    pass


def setup_logging(level: str, rank: int = 0, all_ranks: bool = False, log_file: Path | None = None) -> logging.Logger:
    """Configure the ``trainrun`` logger hierarchy and return it.

    By default only rank 0 logs below ERROR: N ranks printing the same line is noise, but an
    error on any rank still has to surface. With ``all_ranks`` every rank logs with a
    ``[rank N]`` prefix. ``log_file`` (e.g. ``<run_dir>/train.log``) is appended to, so a resumed
    run keeps its history; only rank 0 writes it unless ``all_ranks``. Calling it again
    replaces the handlers of the previous call.
    """
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, _OurHandler):
            logger.removeHandler(handler)
            handler.close()

    fmt = _FORMAT if not all_ranks else _FORMAT.replace("%(levelname)s", f"[rank {rank}] %(levelname)s")
    formatter = logging.Formatter(fmt, datefmt=_DATEFMT)
    speaks = rank == 0 or all_ranks
    logger.setLevel(_parse_level(level) if speaks else logging.ERROR)

    console = _ConsoleHandler()
    console.setFormatter(formatter)
    logger.addHandler(console)
    if log_file is not None and speaks:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = _FileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    # Hydra installs root handlers of its own; propagating would print every line twice.
    logger.propagate = False
    return logger


def _parse_level(level: str) -> int:
    levels = logging.getLevelNamesMapping()
    try:
        return levels[level.upper()]
    except KeyError:
        raise ValueError(f"logging.level={level!r} is not a log level; use one of {', '.join(levels)}") from None


def warn_once(logger: logging.Logger, msg: str) -> None:
    """Log ``msg`` as a warning the first time it is seen for ``logger``; ignore repeats."""
    key = (logger.name, msg)
    if key in _warned:
        return
    _warned.add(key)
    logger.warning(msg)
