"""The bundled default corpus: this interpreter's standard library ``.py`` files as byte tokens.

It needs no download, is the same on every machine with the same Python, and is built once into a
cache directory keyed by the file list, the file sizes and the options.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from trainrun.config.schema import DataConfig
from trainrun.data.fsutil import publish_dir, staging_dir
from trainrun.data.layout import META_FILE, DatasetDirWriter
from trainrun.data.split import document_scores, validation_mask
from trainrun.data.tokenizer import ByteTokenizer
from trainrun.errors import ConfigError, RunEnvironmentError

logger = logging.getLogger(__name__)

CORPUS_VERSION = 1  # bump when the build changes, so old caches are not reused
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/trainrun`` or ``~/.cache/trainrun``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trainrun"


def list_source_files(root: Path) -> list[tuple[str, int]]:
    """``(relative posix path, size)`` of every ``.py`` file under ``root``, sorted by path.

    Third-party packages (``site-packages``) are skipped: they differ between environments.
    """
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                full = os.path.join(dirpath, name)
                try:
                    size = os.stat(full).st_size
                except OSError:
                    continue
                found.append((Path(full).relative_to(root).as_posix(), size))
    found.sort()
    return found


TEST_DIRS = frozenset({"test", "tests", "idle_test"})


def is_test_file(rel: str) -> bool:
    """Whether a stdlib file is test code: under a test directory, or a ``test_*.py`` module."""
    parts = rel.split("/")
    return any(p in TEST_DIRS for p in parts[:-1]) or parts[-1].startswith("test_")


def select_subset(files: list[tuple[str, int]], subset: str) -> list[tuple[str, int]]:
    """The files of ``subset``: all, library (not test code) or tests (see :func:`is_test_file`)."""
    if subset == "all":
        return files
    want_tests = subset == "tests"
    return [f for f in files if is_test_file(f[0]) == want_tests]


def corpus_key(files: list[tuple[str, int]], val_fraction: float, max_documents: int | None) -> str:
    """Short hash identifying the corpus a build would produce (``files`` already narrowed to a subset)."""
    h = hashlib.sha256()
    h.update(json.dumps([CORPUS_VERSION, val_fraction, max_documents]).encode())
    for rel, size in files:
        h.update(f"{rel}\0{size}\n".encode())
    return h.hexdigest()[:16]


def _read_documents(root: Path, files: list[tuple[str, int]], limit: int | None) -> list[tuple[str, bytes]]:
    """The first ``limit`` readable UTF-8 files, in sorted order, as raw bytes."""
    docs: list[tuple[str, bytes]] = []
    for rel, _ in files:
        if limit is not None and len(docs) >= limit:
            break
        try:
            raw = (root / rel).read_bytes()
            raw.decode("utf-8")  # byte tokens need no decoding, but non-UTF-8 files are not "text"
        except (OSError, UnicodeDecodeError):
            logger.debug("skipping %s (unreadable or not UTF-8)", rel)
            continue
        if raw:
            docs.append((rel, raw))
    return docs


def stdlib_corpus_dir(cache: Path, files: list, val_fraction: float, max_documents: int | None,
                      subset: str = "all") -> Path:
    """The cache directory of the corpus built from ``files`` (one subset's) with these options (one per Python
    version)."""
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    tag = "" if subset == "all" else f"{subset}-"
    return cache / f"stdlib-{pyver}-{tag}{corpus_key(files, val_fraction, max_documents)}"


def cache_dirs(cfg: DataConfig) -> list[tuple[Path, str, str]]:
    """What building the corpus writes, for the start-up checks to probe: its cache directory, unless the
    corpus is already built there (a read-only shared cache is fine once the corpus this config reads is in it).

    Registered as the ``stdlib`` dataset's ``writes`` hook: (path, the setting that moves it, a note).
    """
    cache = Path(cfg.path).expanduser() if cfg.path else default_cache_root()
    subset = str(cfg.subset.value if hasattr(cfg.subset, "value") else cfg.subset)
    built = stdlib_corpus_dir(cache, select_subset(list_source_files(stdlib_root()), subset), cfg.val_fraction,
                              cfg.max_documents, subset)
    if (built / META_FILE).is_file():
        return []
    from_env = os.environ.get("TRAINRUN_CACHE_DIR")
    if from_env and Path(from_env).expanduser() == cache:  # name the setting the user actually changes
        return [(cache, "TRAINRUN_CACHE_DIR", "the stdlib corpus cache, read as paths.cache_dir and data.path")]
    return [(cache, "data.path", "the stdlib corpus cache")]


def build_stdlib_corpus(cache_root: str | os.PathLike | None = None, val_fraction: float = 0.02,
                        max_documents: int | None = None, root: str | os.PathLike | None = None,
                        subset: str = "all") -> Path:
    """Build (once) and return the dataset directory of the standard-library corpus.

    ``cache_root`` (``data.path``; default :func:`default_cache_root`) holds one directory per
    Python version and option set. Building happens in a staging directory that is renamed into
    place, so concurrent processes and crashes never expose a partial dataset.
    """
    src = Path(root) if root is not None else stdlib_root()
    files = select_subset(list_source_files(src), subset)
    if not files:
        # A Python installed without its library sources: the environment, not a setting.
        raise RunEnvironmentError("data.name=stdlib finds no .py files in the standard library", str(src),
                                  "use data.name=indexed with a dataset from `trainrun-prepare`")
    cache = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    final = stdlib_corpus_dir(cache, files, val_fraction, max_documents, subset)
    if (final / META_FILE).is_file():
        logger.debug("using cached corpus %s", final)
        return final

    docs = _read_documents(src, files, max_documents)
    if len(docs) < 2:
        raise ConfigError("data.max_documents", max_documents, f"only {len(docs)} usable files under {src}; "
                          "need at least 2")
    val = validation_mask(document_scores([rel for rel, _ in docs]), val_fraction)
    tokenizer = ByteTokenizer()
    with staging_dir(final) as tmp:
        with DatasetDirWriter(tmp, tokenizer, "byte") as writer:
            for (_rel, raw), is_val in zip(docs, val, strict=True):
                writer.add("val" if is_val else "train", np.frombuffer(raw, dtype=np.uint8))
            what = "" if subset == "all" else f"{subset} subset, "
            meta = writer.finish(source=f"Python {sys.version.split()[0]} standard library at {src} "
                                        f"({what}{len(docs)} files, val_fraction={val_fraction})")
        if publish_dir(tmp, final):
            logger.info("built stdlib corpus %s: %d documents, %d tokens", final,
                        sum(meta["num_documents"].values()), sum(meta["num_tokens"].values()))
    return final
