"""The data a run reads: its training blend, validation and test sources, opened and checked once.

``data.blend`` (or the single dataset of ``data.name``/``data.path``) names the training sources;
each is opened by its registered dataset (``indexed``, ``stdlib`` or a plugin's). What each role
reads is a :class:`SplitView`, a contiguous range of one split file's documents:

===========================  ======================  ==========================  ========================
setting                      train                   valid                       test
===========================  ======================  ==========================  ========================
(default)                    each source's train     each source's val           none
``data.split="969,30,1"``    first 96.9% of train    next 3%                     last 0.1%
``data.valid_blend``         (as above)              those entries (val split)   (as above)
``data.test_blend``          (as above)              (as above)                  those entries (val split)
===========================  ======================  ==========================  ========================

Refused here, before anything is built, each with one line naming the setting: sources whose
tokenizers differ, a validation or test view that overlaps what a training source reads, a split
share that leaves a source without documents.

The run's data checksum (what resume compares) hashes every view's source checksum and document
range, so it covers every source of the blend and the split; a plain single-source run keeps its
directory's checksum, so checkpoints from before blends existed still resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainrun.config.blend import DataSource, parse_blend, parse_split, source_section, split_bounds
from trainrun.config.schema import DataConfig
from trainrun.data.datasets import TokenDataset
from trainrun.data.indexed import IndexedDataset
from trainrun.data.tokenizer import TOKENIZER_FILE
from trainrun.errors import ConfigError, DataError
from trainrun.registry import DATASETS

logger = logging.getLogger(__name__)

ROLES = ("train", "valid", "test")


@dataclass(frozen=True)
class SplitView:
    """Documents ``[first_document, end_document)`` of one split file of a source: one stream's tokens."""

    source: str
    """The source's name (metric keys: ``val_loss/<source>``)."""
    role: str
    """train, valid or test."""
    weight: float
    """The source's weight in its role's blend."""
    dataset: IndexedDataset
    file_split: str
    """Which file of the directory: train or val."""
    first_document: int
    end_document: int
    checksum: str
    """The source directory's checksum (``meta.json``)."""
    path: Path

    @property
    def num_documents(self) -> int:
        """Documents in the view."""
        return self.end_document - self.first_document

    def token_range(self) -> tuple[int, int]:
        """``[start, end)`` of the view's tokens in the file's token stream."""
        ds, item = self.dataset, self.dataset.dtype.itemsize
        if self.num_documents <= 0:
            return (0, 0)
        start = int(ds.pointers[self.first_document]) // item
        last = self.end_document - 1
        return start, int(ds.pointers[last]) // item + int(ds.sizes[last])

    def num_samples(self, seq_len: int) -> int:
        """Windows of ``seq_len + 1`` tokens the view holds (see :class:`~trainrun.data.loader.SampleStream`)."""
        start, end = self.token_range()
        return max(end - start - 1, 0) // seq_len

    @property
    def tokens(self) -> np.ndarray:
        """The view's tokens: a slice of the memory-mapped ``.bin`` (nothing is read)."""
        start, end = self.token_range()
        return self.dataset.tokens[start:end]

    def identity(self) -> dict:
        """What names this view's tokens exactly: the key of its cached indices and a part of the data checksum."""
        start, end = self.token_range()
        return {"source_checksum": self.checksum, "split": self.file_split, "first_document": self.first_document,
                "end_document": self.end_document, "first_token": start, "end_token": end}

    def overlaps(self, other: SplitView) -> bool:
        """Whether both views read some of the same documents of the same file."""
        return (self.checksum == other.checksum and self.file_split == other.file_split
                and self.first_document < other.end_document and other.first_document < self.end_document)


@dataclass
class DataSources:
    """Everything a run reads, opened: one view per source and role, the shared tokenizer, the data checksum."""

    train: list[SplitView]
    valid: list[SplitView]
    test: list[SplitView]
    datasets: dict[str, TokenDataset]
    """Each training source's opened directory, by name."""
    checksum: str
    split: tuple[float, float, float] | None = None

    @property
    def first(self) -> TokenDataset:
        """The first training source (tokenizer, vocabulary: shared by all, see :func:`open_sources`)."""
        return next(iter(self.datasets.values()))

    @property
    def tokenizer(self):
        """The tokenizer every source shares."""
        return self.first.tokenizer

    @property
    def vocab_size(self) -> int:
        """The shared vocabulary size."""
        return self.first.vocab_size

    @property
    def eod_id(self) -> int:
        """The shared end-of-document token."""
        return self.first.eod_id

    @property
    def max_token_id(self) -> int:
        """Largest token id of any source."""
        return max(d.max_token_id for d in self.datasets.values())

    @property
    def path(self) -> Path:
        """The first source's directory (a single-source run's dataset)."""
        return self.first.path

    def source_checksums(self) -> dict[str, str]:
        """A checksum per source, by name: its data and the document ranges every role reads of it (training
        sources by name, explicit validation and test entries as ``valid:<name>``/``test:<name>``).

        What a resume under ``data.allow_blend_change`` compares for the sources both runs share: sources may
        come and go, but one that stays must read the same documents (its data, and its ``data.split`` shares).
        """
        explicit = {v.source for v in self.valid + self.test} - {v.source for v in self.train}
        by_key: dict[str, list[dict]] = {}
        for role in ROLES:
            for v in getattr(self, role):
                key = f"{role}:{v.source}" if v.source in explicit else v.source
                by_key.setdefault(key, []).append({"role": role, **v.identity()})
        return {key: hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest()
                for key, ids in by_key.items()}

    def describe(self) -> str:
        """One line per role: sources, weights, documents."""
        lines = []
        for role in ROLES:
            views = getattr(self, role)
            if views:
                total = sum(v.weight for v in views)
                lines.append(f"{role}: " + ", ".join(
                    f"{v.source} ({v.weight / total:.3g}, {v.num_documents} docs of {v.path.name}/{v.file_split})"
                    for v in views))
        return "; ".join(lines)


def training_sources(cfg: DataConfig) -> tuple[DataSource, ...]:
    """``data.blend``, or the one source ``data.name``/``data.path`` name."""
    blend = parse_blend(cfg.blend, "data.blend")
    if blend is not None:
        return blend
    return (DataSource(name=cfg.name, path=cfg.path, dataset=cfg.name),)


def open_sources(cfg: DataConfig) -> DataSources:
    """Open every source ``cfg`` names and build each role's views; refuses what cannot be read consistently."""
    split = parse_split(cfg.split)
    opened: dict[tuple[str, str | None, str | None], TokenDataset] = {}

    def open_source(src: DataSource) -> TokenDataset:
        key = (src.dataset, src.path, src.subset)
        if key not in opened:
            opened[key] = DATASETS.get(src.dataset)(source_section(cfg, src))
        return opened[key]

    sources = training_sources(cfg)
    datasets = {src.name: open_source(src) for src in sources}
    train, valid, test = [], [], []
    for i, src in enumerate(sources):
        ds = datasets[src.name]
        if split is None:
            train.append(_whole(src, "train", ds, src.split or "train"))
            valid.append(_whole(src, "valid", ds, "val"))
        else:
            views = _split_views(src, ds, split, f"data.blend.{i}" if cfg.blend is not None else "data.path")
            train.append(views[0])
            valid.append(views[1])
            test.append(views[2])
    for role, field, views in (("valid", "data.valid_blend", valid), ("test", "data.test_blend", test)):
        explicit = parse_blend(getattr(cfg, role + "_blend"), field)
        if explicit is not None:
            views[:] = [_whole(src, role, open_source(src), src.split or "val") for src in explicit]
            for src in explicit:
                datasets.setdefault(f"{role}:{src.name}", open_source(src))
    _check_tokenizers(datasets)
    train = [v for v in train if v.weight > 0]
    valid = [v for v in valid if v.weight > 0 and v.num_documents > 0]
    test = [v for v in test if v.weight > 0 and v.num_documents > 0]
    _check_no_overlap(train, valid, test)
    checksum = _data_checksum(train, valid, test, split, cfg)
    kept = {name: d for name, d in datasets.items() if ":" not in name}
    return DataSources(train=train, valid=valid, test=test, datasets=kept, checksum=checksum, split=split)


def _whole(src: DataSource, role: str, ds: TokenDataset, file_split: str) -> SplitView:
    indexed = ds.train if file_split == "train" else ds.val
    return SplitView(src.name, role, src.weight, indexed, file_split, 0, len(indexed), ds.checksum, ds.path)


def _split_views(src: DataSource, ds: TokenDataset, split: tuple[float, float, float], field: str) -> list[SplitView]:
    """Megatron's split of the source's train file into train, valid and test document ranges."""
    bounds = split_bounds(split, len(ds.train))
    views = [SplitView(src.name, role, src.weight, ds.train, "train", bounds[r], bounds[r + 1], ds.checksum, ds.path)
             for r, role in enumerate(ROLES)]
    for view, share in zip(views, split, strict=True):
        if share > 0 and view.num_documents == 0:
            raise ConfigError("data.split", ",".join(f"{s:g}" for s in split),
                              f"leaves the {view.role} share of {field} ({ds.path}, {len(ds.train)} documents) "
                              "without a document; give it a larger share or use data.valid_blend/test_blend")
    return views


def _tokenizer_identity(ds: TokenDataset) -> tuple:
    file = ds.path / TOKENIZER_FILE
    digest = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else type(ds.tokenizer).__name__
    return (ds.vocab_size, ds.eod_id, digest)


def _check_tokenizers(datasets: dict[str, TokenDataset]) -> None:
    """Every source was tokenized alike: one embedding table serves them all."""
    items = list(datasets.items())
    first_name, first = items[0]
    want = _tokenizer_identity(first)
    for name, ds in items[1:]:
        if _tokenizer_identity(ds) != want:
            raise DataError("data.blend", str(ds.path), f"source {name.split(':')[-1]} was tokenized differently from "
                            f"{first_name} ({ds.path.name}: vocab_size {ds.vocab_size}, eod {ds.eod_id}; "
                            f"{first.path.name}: vocab_size {first.vocab_size}, eod {first.eod_id}, or another "
                            "tokenizer.json); prepare every source with the same --tokenizer")


def _check_no_overlap(train: list[SplitView], valid: list[SplitView], test: list[SplitView]) -> None:
    """No validation or test document is also trained on."""
    for role, views in (("valid", valid), ("test", test)):
        for view in views:
            for trained in train:
                if view.overlaps(trained):
                    raise ConfigError(f"data.{role}_blend", view.source,
                                      f"reads documents {view.first_document}..{view.end_document - 1} of "
                                      f"{view.path}/{view.file_split}, which training source {trained.source} "
                                      "trains on; evaluate on its val split (split: val) or use data.split")


def _data_checksum(train: list[SplitView], valid: list[SplitView], test: list[SplitView],
                   split: tuple[float, float, float] | None, cfg: DataConfig) -> str:
    """Hash of every view's identity (single plain source: its directory's checksum, as before blends)."""
    plain = (cfg.blend is None and split is None and cfg.valid_blend is None and cfg.test_blend is None)
    if plain and len(train) == 1:
        return train[0].checksum
    described = {role: sorted(json.dumps({"source": v.source, **v.identity()}, sort_keys=True) for v in views)
                 for role, views in zip(ROLES, (train, valid, test), strict=True)}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
