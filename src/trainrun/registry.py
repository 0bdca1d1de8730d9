"""Named component registries: one plain mapping name -> factory per component kind.

A third-party package adds a component without editing trainrun in one of two ways:

* an entry point in the group ``trainrun.plugins`` naming a module (or a callable taking no
  arguments); it is imported/called once, before any lookup, and registers its components with
  ``@DATASETS.register("my_data")`` and friends;
* ``run.plugins=[my_pkg.components]`` in the config: modules imported before the run starts.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Generic, TypeVar

from trainrun.errors import ConfigError, UserError
from trainrun.exit_codes import ExitCode

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=Callable)

ENTRY_POINT_GROUP = "trainrun.plugins"


class UnknownComponentError(UserError, KeyError):
    """Raised when a configured component name is not registered (a configuration error)."""

    kind = "configuration"
    exit_code = ExitCode.CONFIG_ERROR

    def __init__(self, kind: str, name: str, known: list[str], field: str | None = None):
        where = f"{field}={name!r}" if field else repr(name)
        msg = f"unknown {kind} {where}; registered: {', '.join(sorted(known)) or '(none)'}"
        super().__init__(msg)
        self.message = msg

    def __str__(self) -> str:
        return self.message


class Registry(Generic[T]):
    """A mapping from a component name to the factory that builds it."""

    def __init__(self, kind: str, config_field: str | None = None):
        self.kind = kind
        self.config_field = config_field
        self._factories: dict[str, T] = {}
        self._switches: dict[str, str] = {}
        self._checks: dict[str, Callable] = {}
        self._writes: dict[str, Callable] = {}

    def register(self, name: str, factory: T | None = None, *, override: bool = False, switch: str | None = None,
                 check: Callable | None = None, writes: Callable | None = None):
        """Register ``factory`` under ``name``; usable as a decorator when ``factory`` is omitted.

        ``switch`` marks a built-in that its own config field turns on and off (e.g. the console
        sink's ``logging.console``): naming it in the list of extra components is refused, so
        each component has exactly one way to be switched. ``check`` is a cheap test of the
        component's config section (raising ``ConfigError``) that validation runs before anything
        is built, e.g. that a dataset directory is complete, or that a step executor can honour
        the run's settings; what a kind's check receives is set by the caller (a dataset's gets
        ``cfg.data``, a step executor's the whole run config). ``writes`` names the directories
        the component will write, given the same section, as ``(path, option, note)`` triples;
        the start-up checks (:mod:`trainrun.preflight`) probe each before anything is built.
        """

        def _add(fn: T) -> T:
            if name in self._factories and not override and self._factories[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered; pass override=True to replace it")
            self._factories[name] = fn
            if switch is not None:
                self._switches[name] = switch
            if check is not None:
                self._checks[name] = check
            if writes is not None:
                self._writes[name] = writes
            return fn

        return _add(factory) if factory is not None else _add

    def get(self, name: str) -> T:
        """Return the factory registered under ``name``; an unknown name lists the valid ones."""
        load_plugins()
        try:
            return self._factories[name]
        except KeyError:
            raise UnknownComponentError(self.kind, name, list(self._factories), self.config_field) from None

    def get_extra(self, name: str) -> T:
        """Like :meth:`get` for a name listed as an extra component; a built-in with its own switch is refused."""
        factory = self.get(name)
        if name in self._switches:
            raise ConfigError(self.config_field or self.kind, name,
                              f"is built in and switched by {self._switches[name]}; remove it from the list")
        return factory

    def check(self, name: str, section: object) -> None:
        """Run ``name``'s registered config check on its config ``section`` (nothing if it has none)."""
        self.get(name)
        if name in self._checks:
            self._checks[name](section)

    def written_dirs(self, name: str, section: object) -> list[tuple[Path, str, str]]:
        """The directories ``name`` will write for its config ``section``: (path, option setting it, note)."""
        self.get(name)
        return list(self._writes[name](section)) if name in self._writes else []

    def names(self) -> list[str]:
        """Sorted names of all registered components."""
        load_plugins()
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


INITIALIZERS: Registry = Registry("initializer", "parallel.initializer")
MODELS: Registry = Registry("model", "model.name")
OPTIMIZERS: Registry = Registry("optimizer", "optim.name")
LR_SCHEDULES: Registry = Registry("lr schedule", "optim.schedule")
DATASETS: Registry = Registry("dataset", "data.name")
STEP_EXECUTORS: Registry = Registry("step executor", "train.step_executor")
EVALUATORS: Registry = Registry("evaluator", "eval.name")
CHECKPOINT_POLICIES: Registry = Registry("checkpoint policy", "checkpoint.policies")
METRIC_SINKS: Registry = Registry("metric sink", "logging.sinks")

_plugins_loaded = False


def load_plugins() -> None:
    """Import trainrun's built-in components and every ``trainrun.plugins`` entry point (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    importlib.import_module("trainrun.components")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        loaded = ep.load()
        if callable(loaded):
            loaded()
        logger.debug("loaded trainrun plugin %s", ep.name)


def import_plugin_modules(modules: list[str]) -> None:
    """Import user modules named in ``run.plugins`` so their ``register`` calls run."""
    load_plugins()
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError("run.plugins", module,
                              f"it cannot be imported ({err}); install it or fix the name") from err
