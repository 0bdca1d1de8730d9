"""Names no schema defines: find them in a composed config and say which valid name was meant.

A misspelled key reaches trainrun two ways. Hydra refuses ``model.n_layer=3`` itself (the schemas
are structs) and hints at ``+model.n_layer=3``; with ``+`` (or ``++``) Hydra adds the key, and
OmegaConf would carry it into the dataclass as a stray attribute while the run trains the default.
Both end here: :func:`unknown_keys` finds such keys in a composed config, :func:`unknown_key_message`
names the closest valid spelling (difflib), and :func:`missing_option_message` does the same for a
group option that does not exist (``experiment=gpt_12m``).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterator, Sequence
from functools import cache

from omegaconf import DictConfig, OmegaConf

from trainrun.config.schema import TrainRunConfig
from trainrun.config.store import OPTIONAL_GROUPS, SLOT_GROUPS

ROOT_GROUPS = (*SLOT_GROUPS, *OPTIONAL_GROUPS)
"""Config groups picked on the command line that are no section of ``TrainRunConfig`` (debug is both)."""

_CUTOFF = 0.6
"""difflib's similarity a guess needs (its default): n_layer -> n_layers, modle -> model, but not lr -> log_interval."""


@cache
def _fields(cls: type) -> dict[str, object]:
    """Field name -> type hint of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@cache
def _root_fields() -> dict[str, object]:
    """What the top level of a composed config may hold: the sections, the command-line groups, hydra."""
    from hydra.conf import HydraConf

    return {**_fields(TrainRunConfig), **dict.fromkeys(ROOT_GROUPS), "hydra": HydraConf}


def _dataclass_of(hint: object) -> type | None:
    """The dataclass a field holds (also through ``X | None``); None for values, lists, dicts and ``Any``."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _first_unknown(path: str) -> tuple[int, list[str]] | None:
    """Index of the first part of dotted ``path`` that no schema defines, with the names valid there.

    None when every part is defined, or the path reaches a field below which nothing is checked (a
    value, a free-form ``dict`` or ``Any`` field such as ``hydra.launcher``, a config group).
    """
    names = _root_fields()
    for index, part in enumerate(path.partition("[")[0].split(".")):  # an element of a list is the list's own business
        if part not in names:
            return index, sorted(names)
        cls = _dataclass_of(names[part])
        if cls is None:
            return None
        names = _fields(cls)
    return None


def _schema_paths(cls: type = TrainRunConfig, prefix: str = "") -> Iterator[str]:
    """Every dotted field path of trainrun's schema (sections and their fields, nested ones too)."""
    for name, hint in _fields(cls).items():
        yield prefix + name
        sub = _dataclass_of(hint)
        if sub is not None:
            yield from _schema_paths(sub, f"{prefix}{name}.")


MOVED_KEYS = {
    "run.output_dir": "hydra.run.dir",  # one run directory, resolved and locked once by the entry point
    # Each executor's settings in its own section, which the other executors refuse.
    "train.compile_scope": "train.compile.scope",
    "train.compile_optimizer": "train.compile.optimizer",
    "train.cuda_graph_warmup_steps": "train.cuda_graph.warmup_steps",
    "train.cuda_graph_compile_blocks": "train.cuda_graph.compile_blocks",
    "parallel.timeout_min": "parallel.collective_timeout_s (seconds, not minutes)",
}
"""Settings that were removed, and where their job went (for a user's old command line)."""


def closest_key(path: str) -> str | None:
    """The valid key the user most likely meant by dotted ``path``; None if none is close (or ``path`` is valid).

    First a close spelling at the same level (``model.n_layer`` -> ``model.n_layers``, ``modle`` ->
    ``model``), then the same name in another section (``train.lr`` -> ``optim.lr``), then a close
    dotted path anywhere.
    """
    found = _first_unknown(path)
    if found is None:
        return None
    index, names = found
    parts = path.split(".")
    wrong, head, rest = parts[index], parts[:index], parts[index + 1:]
    close = difflib.get_close_matches(wrong, names, n=1, cutoff=_CUTOFF)
    if close:
        return ".".join([*head, close[0], *rest])
    if head and head[0] == "hydra":
        return None
    paths = list(_schema_paths())
    same_name = [p for p in paths if p.rsplit(".", 1)[-1] == wrong]
    if len(same_name) == 1:
        return ".".join([same_name[0], *rest])
    close = difflib.get_close_matches(".".join([*head, wrong]), paths, n=1, cutoff=0.8)
    return ".".join([close[0], *rest]) if close else None


def unknown_key_message(path: str) -> str | None:
    """``"no such setting; did you mean <key>?"`` (or the valid names) for a dotted ``path`` no schema defines;
    None if the schemas define it."""
    found = _first_unknown(path)
    if found is None:
        return None
    index, names = found
    what = "no such setting or config group" if index == 0 else "no such setting"
    if path in MOVED_KEYS:
        return f"{what} any more; use {MOVED_KEYS[path]}"
    guess = closest_key(path)
    if guess is not None:
        return f"{what}; did you mean {guess}?"
    where = ".".join(path.split(".")[:index]) or "the top level"
    return f"{what}; valid names in {where}: {', '.join(names)}"


def unknown_keys(cfg: DictConfig, schema: type = TrainRunConfig) -> list[str]:
    """Dotted paths of the keys of composed ``cfg`` that dataclass ``schema`` does not define (a top-level
    ``hydra`` is Hydra's to check; what a ``dict``, ``list`` or ``Any`` field holds is not checked)."""
    return list(_unknown_below(cfg, schema, ""))


def _unknown_below(node: DictConfig, cls: type, prefix: str) -> Iterator[str]:
    fields = _fields(cls)
    for key in node:
        path = f"{prefix}{key}"
        if key not in fields:
            if path != "hydra":
                yield path
            continue
        sub = _dataclass_of(fields[key])
        if sub is None or OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue  # a value, a free-form dict or list: whatever it holds is the field's own business
        child = node[key]
        if isinstance(child, DictConfig):
            yield from _unknown_below(child, sub, path + ".")


def missing_option_message(group: str, option: str, options: Sequence[str]) -> str:
    """``no such option; did you mean <group>=<closest>? available: ...`` for an option ``group`` lacks."""
    close = difflib.get_close_matches(option, list(options), n=1, cutoff=_CUTOFF)
    guess = f"did you mean {group}={close[0]}? " if close else ""
    available = f"available: {', '.join(options)}" if options else f"{group} has no options"
    return f"no such option; {guess}{available}"
