"""Data blends as written in a config: a list of weighted sources, or Megatron's flat string.

``data.blend`` (and ``data.valid_blend`` / ``data.test_blend``) accept either form::

    data:
      blend:
        - {name: web,  weight: 0.7, path: /data/web}
        - {name: code, weight: 0.3, path: /data/code}

    data.blend="0.7 /data/web 0.3 /data/code"      # Megatron's --data-path form

The list form is what a sweep overrides (``data.blend.0.weight=0.5``). The flat form names each
source after its directory. This module only reads the values (the config layer touches no file):
opening the directories is :mod:`trainrun.data.sources`' job.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import PurePath
from typing import Any

from trainrun.errors import ConfigError

SOURCE_SPLITS = ("train", "val")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class DataSource:
    """One source of a blend: a prepared dataset directory drawn with a relative weight."""

    name: str
    """Short name used in logs and metric keys (``val_loss/<name>``); unique within a blend."""
    path: str | None = None
    """Dataset directory (``trainrun-prepare`` output); stdlib: its cache dir (null: ``data.path``)."""
    weight: float = 1.0
    """Relative weight: the share of samples drawn from this source is weight / (sum of weights)."""
    dataset: str = "indexed"
    """Registered dataset that opens ``path``: indexed (``trainrun-prepare`` output) or stdlib (the bundled
    corpus)."""
    subset: str | None = None
    """stdlib only: all, library or tests (null: ``data.subset``)."""
    split: str | None = None
    """Which of the directory's splits this entry reads: train or val (null: train in ``data.blend``, val in
    ``data.valid_blend`` and ``data.test_blend``); ignored under ``data.split``, which divides train."""


ENTRY_KEYS = tuple(f.name for f in fields(DataSource))


def parse_blend(value: Any, field: str) -> tuple[DataSource, ...] | None:
    """The sources ``value`` names (None: no blend), checked; every error names ``field`` and the entry."""
    if value is None:
        return None
    if isinstance(value, str):
        return _checked(_parse_flat(value, field), field)
    if isinstance(value, Mapping) or not isinstance(value, Sequence):
        raise ConfigError(field, value, "must be a list of {name, weight, path} entries or Megatron's flat string "
                          "\"0.7 path/a 0.3 path/b\"")
    if not value:
        raise ConfigError(field, "[]", "an empty blend has nothing to read; give at least one source or null")
    return _checked(tuple(_entry(item, f"{field}.{i}") for i, item in enumerate(value)), field)


def _parse_flat(text: str, field: str) -> tuple[DataSource, ...]:
    """Megatron's ``"w1 path1 w2 path2 ..."`` (a single path alone: weight 1)."""
    words = text.split()
    if len(words) == 1:
        return (DataSource(name=_name_of(words[0]), path=words[0]),)
    if not words or len(words) % 2:
        raise ConfigError(field, text, "the flat form alternates weights and paths (\"0.7 path/a 0.3 path/b\"); "
                          f"got {len(words)} words")
    sources = []
    for i in range(0, len(words), 2):
        try:
            weight = float(words[i])
        except ValueError:
            raise ConfigError(field, text, f"word {i + 1} ({words[i]!r}) should be a weight: the flat form "
                              "alternates weights and paths") from None
        sources.append(DataSource(name=_name_of(words[i + 1]), path=words[i + 1], weight=weight))
    return tuple(sources)


def _name_of(path: str) -> str:
    """A source's default name: its directory's last component."""
    name = PurePath(path.rstrip("/")).name or "data"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _entry(item: Any, where: str) -> DataSource:
    """One list entry (a mapping from YAML or the command line, or a DataSource) as a DataSource."""
    if isinstance(item, DataSource):
        return item
    if not isinstance(item, Mapping):
        raise ConfigError(where, item, "each blend entry is a mapping such as {name: web, weight: 0.7, path: ...}")
    unknown = [k for k in item if k not in ENTRY_KEYS]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", item[unknown[0]],
                          f"not a blend entry field; the fields are {', '.join(ENTRY_KEYS)}")
    entry = dict(item)
    if entry.get("name") is None:
        if entry.get("path") is None:
            raise ConfigError(f"{where}.name", None, "give the entry a name (or a path, which names it)")
        entry["name"] = _name_of(str(entry["path"]))
    try:
        entry["weight"] = float(entry.get("weight", 1.0))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.weight", entry.get("weight"), "must be a number") from None
    return DataSource(**{k: (str(v) if k in ("name", "path", "dataset", "subset", "split") and v is not None
                             else v) for k, v in entry.items()})


def _checked(sources: tuple[DataSource, ...], field: str) -> tuple[DataSource, ...]:
    """Names unique and well-formed, weights finite and non-negative with a positive sum, known splits."""
    seen: set[str] = set()
    for i, src in enumerate(sources):
        where = f"{field}.{i}"
        if not NAME_PATTERN.fullmatch(src.name):
            raise ConfigError(f"{where}.name", src.name, "use letters, digits, _ . - (it becomes a metric key)")
        if src.name in seen:
            raise ConfigError(f"{where}.name", src.name, "two sources share this name; give each a unique name")
        seen.add(src.name)
        if not math.isfinite(src.weight) or src.weight < 0:
            raise ConfigError(f"{where}.weight", src.weight, "must be a finite number >= 0 (0 leaves the source out)")
        if src.split is not None and src.split not in SOURCE_SPLITS:
            raise ConfigError(f"{where}.split", src.split, f"must be one of {', '.join(SOURCE_SPLITS)} or null")
        if src.dataset == "indexed" and not src.path:
            raise ConfigError(f"{where}.path", src.path, "an indexed source needs a dataset directory "
                              "(`trainrun-prepare INPUTS --output DIR`)")
    if sum(s.weight for s in sources) <= 0:
        raise ConfigError(f"{field}.0.weight", 0, "the weights sum to 0; give at least one source a positive weight")
    return sources


def parse_split(value: str | None, field: str = "data.split") -> tuple[float, float, float] | None:
    """Megatron's ``split`` (``"969,30,1"``, ``"98,2"``, ``"0.9 0.1"``) as train/valid/test fractions summing to 1."""
    if value is None:
        return None
    parts = [p for p in re.split(r"[,\s/]+", str(value).strip()) if p]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(field, value, "must be up to three numbers, e.g. \"969,30,1\" (train,valid,test)") from None
    if not 1 <= len(numbers) <= 3 or any(not math.isfinite(n) or n < 0 for n in numbers) or sum(numbers) <= 0:
        raise ConfigError(field, value, "must be up to three non-negative numbers with a positive sum, e.g. "
                          "\"969,30,1\" (train,valid,test)")
    numbers += [0.0] * (3 - len(numbers))
    total = sum(numbers)
    if numbers[0] <= 0:
        raise ConfigError(field, value, "the train share is 0, so there is nothing to train on")
    return (numbers[0] / total, numbers[1] / total, numbers[2] / total)


def split_bounds(fractions: tuple[float, float, float], num_documents: int) -> tuple[int, int, int, int]:
    """Document boundaries ``(0, a, b, N)`` of train ``[0,a)``, valid ``[a,b)``, test ``[b,N)``: Megatron's rule
    (each boundary rounded, the rounding error taken off the last)."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * float(num_documents))))
    excess = bounds[-1] - num_documents
    return (0, *(max(b - excess, 0) for b in bounds[1:]))  # type: ignore[return-value]


def source_section(cfg: Any, src: DataSource) -> Any:
    """The data section that opens ``src``: ``cfg`` with its dataset, path and subset, blends cleared."""
    from dataclasses import replace

    return replace(cfg, name=src.dataset, path=src.path if src.path is not None else cfg.path,
                   subset=src.subset if src.subset is not None else cfg.subset, blend=None, valid_blend=None,
                   test_blend=None)


def source_sections(cfg: Any) -> list[tuple[str, DataSource, Any]]:
    """Every source a data config names, as ``(field, source, the data section that opens it)``.

    ``field`` is where the source is written (``data.blend.1``, ``data.valid_blend.0``; ``data`` for the
    single dataset), so a check of the section can name it; the section is ``cfg`` with the source's
    dataset, path and subset (blends cleared): what the registered dataset's builder and check read.
    """
    found: list[tuple[str, DataSource, Any]] = []
    for name in ("blend", "valid_blend", "test_blend"):
        for i, src in enumerate(parse_blend(getattr(cfg, name), f"data.{name}") or ()):
            found.append((f"data.{name}.{i}", src, source_section(cfg, src)))
    if not any(f.startswith("data.blend.") for f, _, _ in found):
        found.insert(0, ("data", DataSource(name=cfg.name, path=cfg.path, dataset=cfg.name), cfg))
    return found
