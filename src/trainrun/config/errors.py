"""The one error type for mistakes a user can fix in the config or the inputs."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad setting: names the field, the bad value and the fix, in one line."""

    def __init__(self, field: str, value: object, fix: str):
        self.field, self.value, self.fix = field, value, fix
        super().__init__(f"{field}={value!r}: {fix}")
