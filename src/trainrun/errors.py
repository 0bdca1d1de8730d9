"""The errors a user can cause, one class per kind, each with its exit code and its one line on stderr.

``python -m trainrun`` prints any :class:`UserError` as ``trainrun: <kind> error: <message>`` (no
traceback) and exits with the kind's code (:mod:`trainrun.exit_codes` owns the codes):

========================  =============  ==========================================================
kind                      exit code      raised for
========================  =============  ==========================================================
:class:`ConfigError`      2              a setting (field, value, fix): a bad value, a path that
                                         points nowhere, a checkpoint that does not fit the model
:class:`RunEnvironmentError` 2           something outside the config: an unwritable or locked
                                         directory, missing credentials, the network
:class:`DataError`        2              a dataset whose files are missing, corrupt or inconsistent
:class:`CheckpointError`  1              a checkpoint that could not be written or read back
========================  =============  ==========================================================

A checkpoint error exits 1 like a crash: the run did not get what it asked for, and a launcher
must not requeue it as a stopped-early run (3) nor read it as a typo in the config (2).

This module imports nothing of trainrun's but the exit codes, so every layer, the config layer
included, may raise these.
"""

from __future__ import annotations

from typing import ClassVar

from trainrun.exit_codes import ExitCode


class UserError(Exception):
    """An error a user can fix; the CLI prints :meth:`line` and exits with :attr:`exit_code`."""

    kind: ClassVar[str] = "user"
    """The word in ``trainrun: <kind> error:``."""
    exit_code: ClassVar[ExitCode] = ExitCode.CONFIG_ERROR
    """The process exit code this kind ends a run with."""

    def line(self) -> str:
        """The one line the CLI prints on stderr: ``trainrun: <kind> error: <message>``."""
        return f"trainrun: {self.kind} error: {' '.join(str(self).splitlines())}"


class _FieldError(UserError, ValueError):
    """An error about what one option names: ``<field>=<value>: <fix>``."""

    def __init__(self, field: str, value: object, fix: str):
        self.field, self.value, self.fix = field, value, fix
        super().__init__(f"{field}={value!r}: {fix}")


class ConfigError(_FieldError):
    """A bad setting: names the field, the bad value and the fix, in one line."""

    kind = "configuration"
    exit_code = ExitCode.CONFIG_ERROR


class RunEnvironmentError(UserError, RuntimeError):
    """Something outside the config that a user can fix (a directory, credentials, the network), in one line."""

    kind = "environment"
    exit_code = ExitCode.CONFIG_ERROR

    def __init__(self, what: str, where: str, fix: str):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(f"{what}: {where}; {fix}")


class DataError(_FieldError):
    """A dataset that is missing files, corrupt or inconsistent: the option naming it, its path, the problem and fix."""

    kind = "data"
    exit_code = ExitCode.CONFIG_ERROR


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or is not usable."""

    kind = "checkpoint"
    exit_code = ExitCode.FAILED


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint whose tensors do not fit the state being loaded (another model shape, another
    optimizer): a configuration problem, never a reason to fall back to an older checkpoint."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of ``err``'s message (library errors often span several)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
