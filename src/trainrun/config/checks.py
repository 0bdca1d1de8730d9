"""Small checks the config dataclasses share; each raises a ``ConfigError`` naming the field and the fix."""

from __future__ import annotations

from enum import Enum

from trainrun.config.choices import enum_fields
from trainrun.errors import ConfigError


def positive(field: str, value: int | float, allow_zero: bool = False) -> None:
    """``value`` > 0 (or >= 0 with ``allow_zero``)."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(field, value, "must be " + ("non-negative" if allow_zero else "positive"))


def optional_positive(field: str, value: int | float | None) -> None:
    """``value`` is null or > 0."""
    if value is not None:
        positive(field, value)


def in_range(field: str, value: float, low: float, high: float, *,
             low_open: bool = False, high_open: bool = False) -> None:
    """``value`` lies in the interval [low, high] (open at either end on request)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(field, value, f"must be in {interval}")


def coerce_choices(obj: object, group: str) -> None:
    """Turn plain strings in Enum-typed fields of dataclass ``obj`` into members (configs built in Python).

    Configs composed by Hydra arrive with members already; a config built as ``ModelConfig(norm="x")``
    gets the same one-line error that composition gives.
    """
    for name, enum_type in enum_fields(type(obj)).items():
        value = getattr(obj, name)
        if isinstance(value, list):
            setattr(obj, name, [_member(enum_type, f"{group}.{name}", v) for v in value])
        else:
            setattr(obj, name, _member(enum_type, f"{group}.{name}", value))


def _member(enum_type: type[Enum], field: str, value: object) -> Enum:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type[str(value)]
    except KeyError:
        allowed = ", ".join(m.name for m in enum_type)
        raise ConfigError(field, value, f"use one of {allowed}") from None

