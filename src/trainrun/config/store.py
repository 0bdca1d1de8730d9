"""Registers the dataclass schemas in Hydra's ConfigStore (called explicitly, not on import)."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra.core.config_store import ConfigStore

from trainrun.config import schema
from trainrun.errors import ConfigError

GROUP_SCHEMAS: dict[str, type] = {
    "run": schema.RunConfig,
    "model": schema.ModelConfig,
    "optim": schema.OptimConfig,
    "data": schema.DataConfig,
    "train": schema.TrainConfig,
    "eval": schema.EvalConfig,
    "parallel": schema.ParallelConfig,
    "checkpoint": schema.CheckpointConfig,
    "logging": schema.LoggingConfig,
    "paths": schema.PathsConfig,
    "debug": schema.DebugConfig,
}
"""Section name -> its schema, in the order of ``TrainRunConfig``."""

SCHEMA_BACKED_GROUPS = ("model", "optim", "data", "train", "parallel", "checkpoint", "logging", "paths")
"""Config groups whose YAML files extend ``/base_<group>@_here_``. run and eval have no files (schema
defaults and overrides suffice); debug's presets are ``_global_`` and set fields of several sections."""

SLOT_GROUPS = ("experiment", "hparams_search", "debug")
"""Groups filled from the command line into a null slot of the defaults list; ``+group=x`` means ``group=x``."""

OPTIONAL_GROUPS = ("local",)
"""Groups that config.yaml lists as ``optional``: Hydra skips a missing option of theirs without a word."""


def register_configs() -> None:
    """Store ``base_config`` and the ``base_<group>`` schemas, as Hydra's structured-config tutorial 5.2 does.

    The group schemas sit at the root of the ConfigStore, not inside their groups, and group files
    extend them with ``/base_<group>@_here_``: inside a group they would be options a user can pick,
    and Hydra's --help and shell completion would offer ``model=base_model``.
    """
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=schema.TrainRunConfig)
    for group in SCHEMA_BACKED_GROUPS:
        cs.store(name=f"base_{group}", node=GROUP_SCHEMAS[group])
    expose_hydra_plugins()


def expose_hydra_plugins() -> None:
    """Make trainrun's Hydra plugins (hydra_plugins/trainrun_optuna) visible to Hydra's plugin scan.

    Hydra walks ``hydra_plugins.__path__``, which lists the ``hydra_plugins`` folders on sys.path. A
    wheel puts trainrun's there; an editable install maps it through an import hook instead, which
    the walk does not see, so its folder is added to the namespace path (once).
    """
    import importlib.util

    import hydra_plugins

    spec = importlib.util.find_spec("hydra_plugins.trainrun_optuna")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = str(Path(list(spec.submodule_search_locations)[0]).parent)
    if folder not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(folder)


_FLOAT_WORDS = {"nan", "inf", "+inf", "-inf"}


def normalize_overrides(overrides: list[str]) -> list[str]:
    """Command-line spellings of the slot groups that Hydra alone would refuse.

    * ``+experiment=x`` (the spelling trainrun documents) means ``experiment=x``: the slots exist in
      the defaults list with a null value, so ``+`` would fail with "Multiple values for experiment";
    * ``debug=nan`` picks the preset named nan: Hydra's grammar reads a bare ``nan`` (or ``inf``) as
      a float, which is no option name, so such a value is quoted.
    """
    normalized = []
    for override in overrides:
        key, sep, value = override.partition("=")
        group = key.removeprefix("+")
        if sep and group in SLOT_GROUPS:
            if value.lower() in _FLOAT_WORDS:
                value = f"'{value}'"
            override = f"{group}={value}"
        normalized.append(override)
    return normalized


def check_command_line(argv: list[str], optional_options: Mapping[str, Sequence[str]] | None = None) -> None:
    """:func:`check_overrides` for the overrides among ``python -m trainrun``'s arguments (Hydra's flags and
    their values left out; ``optional_options`` too when ``--config-dir`` adds options from elsewhere).

    Hydra's argument parser answers a bad flag, a bad flag value or overrides on both sides of a flag
    (``a=1 -m b=2``) with its whole usage text; each is a one-line ``ConfigError`` here. The words
    after ``--shell-completion`` are its commands, not overrides.
    """
    import argparse
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    try:  # quietly: --version prints and exits, some errors print the usage before they exit
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise ConfigError("command line", shlex.join(argv), f"{err}; see python -m trainrun --help") from None
    except SystemExit:
        return  # Hydra answers it (--version) or reports it
    overrides = list(args.overrides or [])
    flags = [arg for arg in rest if arg.startswith("-")]
    if flags:
        raise ConfigError("command line", shlex.join(argv), f"{flags[0]} is no option of python -m trainrun; "
                          "see python -m trainrun --help")
    if rest:
        ordered = [*(arg for arg in argv if arg not in {*overrides, *rest}), *overrides, *rest]
        raise ConfigError("command line", shlex.join(argv), f"{rest[0]} is apart from the overrides before "
                          "Hydra's flags, which its parser refuses; put every override after the flags: "
                          f"python -m trainrun {shlex.join(ordered)}")
    if args.shell_completion:
        return
    check_overrides(overrides, None if args.config_dir or args.config_path else optional_options)


_NEEDS_QUOTES = set(" \t()[]{}'\"=,~#&;!^<>`")
"""Characters Hydra's override grammar reads as syntax, or refuses, in an unquoted value (non-ASCII ones too)."""


def check_overrides(overrides: list[str], optional_options: Mapping[str, Sequence[str]] | None = None) -> None:
    """Refuse, before Hydra composes anything, an override its grammar cannot read, one naming a key no
    schema defines (``model.n_layer=3``, ``+model.n_layer=3``, ``~model.n_layer``) and one picking an
    option that ``optional_options`` (group -> its options) lacks, each as a ``ConfigError`` with the fix.

    Hydra's own reports for the first two are a lexer exception and a hint to add the typo with ``+``;
    for the third it says nothing and runs without the group. Keys of Hydra's own config (``hydra.*``),
    group paths (``hydra/launcher``) and packages (``@``) are left to Hydra.
    """
    from trainrun.config.suggest import missing_option_message, unknown_key_message

    parsed = []
    for index, text in enumerate(overrides):
        override = _parse_override(text)
        if override is None:
            raise _unreadable_override(overrides, index)
        parsed.append((override, text.partition("=")[2] if "=" in text else None))
    if any(o.key_or_group == "hydra.searchpath" for o, _ in parsed):
        optional_options = None  # other config directories may hold the options
    for override, text in parsed:
        key = override.key_or_group
        if override.package is not None or "/" in key or key.split(".")[0] == "hydra":
            continue
        message = unknown_key_message(key)
        if message is not None:
            raise ConfigError(key, text, message)
        options = (optional_options or {}).get(key)
        value = None if override.is_delete() else override.value()
        if options is not None and isinstance(value, str) and value not in options:
            raise ConfigError(key, value, missing_option_message(key, value, options))


def _parse_override(text: str):  # -> hydra.core.override_parser.types.Override | None
    """``text`` as Hydra's override grammar reads it; None if it cannot."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides([text])[0]
    except HydraException:
        return None


def _readable_override(key: str, value: str) -> str | None:
    """``key=value`` quoted for the shell and, where needed, for Hydra's grammar; None if no quoting helps."""
    escaped = value.replace('"', '\\"')
    for candidate in (value, f'"{value}"', f'"{escaped}"', f"'{value}'"):
        if _parse_override(f"{key}={candidate}") is not None:
            return _shell_quote(f"{key}={candidate}")
    return None


def _shell_quote(arg: str) -> str:
    """``arg`` quoted for a POSIX shell, preferring the plainest readable form."""
    if "'" not in arg:
        return f"'{arg}'"
    if not set(arg) & set('"$`\\!'):
        return f'"{arg}"'
    return shlex.quote(arg)


def _unreadable_override(overrides: list[str], index: int) -> ConfigError:
    """The error for ``overrides[index]``, which Hydra's grammar cannot read, with the quoting that fixes it."""
    text = overrides[index]
    key, sep, value = text.partition("=")
    if not sep and index and "=" in overrides[index - 1]:
        # An unquoted space: the shell made two arguments of one value (hydra.run.dir=/tmp/my run).
        key, _, value = f"{overrides[index - 1]} {text}".partition("=")
        what = "an unquoted space split this value into two arguments"
    elif not sep or _parse_override(f"{key}=x") is None:
        return ConfigError(key, value or None, "not an override; write key=value with a dotted key (e.g. "
                           "model.n_layers=4) and quote a value with spaces: 'hydra.run.dir=/tmp/my run'")
    elif "${" in value:
        return ConfigError(key.lstrip("+~"), value, "malformed interpolation; write ${section.key} (e.g. ${optim.lr}) "
                           "or ${resolver:argument} (e.g. ${oc.env:HOME})")
    else:
        special = " ".join(sorted({c for c in value if not c.isascii() or c in _NEEDS_QUOTES}))
        what = f"Hydra's override grammar cannot read {special or 'this value'} unquoted"
    fix = _readable_override(key, value)
    field = key.lstrip("+~")
    if fix is None:
        return ConfigError(field, value, f"{what}; see https://hydra.cc/docs/advanced/override_grammar/basic/")
    return ConfigError(field, value, f"{what}; quote it: {fix}")
