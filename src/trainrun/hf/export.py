"""``trainrun-export``: write a trainrun checkpoint as a Hugging Face transformers model directory.

``trainrun-export <run dir | checkpoint dir | step dir> --output DIR [--step N]`` writes
``config.json``, ``model.safetensors`` (or shards and ``model.safetensors.index.json`` above
``--max-shard-size``), ``generation_config.json`` and the data's tokenizer, which
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` load offline.

Any layout's checkpoint (FSDP, TP, PP, HSDP) is read in this one CPU process through DCP, which
reshards; only ``model.*`` tensors are read (never optimizer state), one output shard at a time, so
memory peaks at one shard, never above one copy of the weights. The DCP metadata is read with
trainrun's restricted unpickler and the checkpoint is verified against its manifest first.
``--output`` follows :mod:`trainrun.outputs`: never the checkpoint, its run directory or the
dataset read (nor above or inside them), never any run or checkpoint directory, and ``--force``
replaces only an earlier export (marked by ``.trainrun-export.json``).
Errors a user can cause are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import torch

from trainrun.checkpoint.dcp_io import load_tensors, read_tensor_metadata
from trainrun.checkpoint.layout import META_FILE, read_meta
from trainrun.checkpoint.paths import CheckpointNotFound, find_checkpoint
from trainrun.checkpoint.separate_qkv import FUSED, PARTS, separate_sources
from trainrun.config.choices import Verify
from trainrun.config.schema import ModelConfig
from trainrun.errors import CheckpointError, ConfigError
from trainrun.extras import MissingExtraError, require
from trainrun.hf.config import CONFIG_FILE, hf_config
from trainrun.hf.mapping import ExportError, Target, export_targets
from trainrun.hf.safetensors_io import save_shard, shard_names, write_index
from trainrun.hf.tokenizer import find_tokenizer, write_tokenizer
from trainrun.outputs import OutputError, check_output_dir, run_output_command, staged_output

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT = "trainrun-export"  # the command name, which also names its output marker (.trainrun-export.json)
DEFAULT_MAX_SHARD = "5GB"  # transformers' own default for save_pretrained
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of ``text``: a number with an optional unit (``500MB``, ``2GiB``, ``1e6`` is not accepted)."""
    m = _SIZE.match(text)
    if m is None:
        raise ExportError(f"--max-shard-size {text!r} is not a size; use e.g. 5GB, 500MB or 2GiB")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    scale = (1024 if binary else 1000) ** " KMGT".index(unit or " ")
    if number * scale < 1:
        raise ExportError(f"--max-shard-size {text!r} must be positive")
    return int(number * scale)


# ---- finding and reading the checkpoint --------------------------------------------------------------

def resolve_checkpoint(path: Path, step: int | None, verify: str) -> Path:
    """The step directory to export: ``path`` itself, its ``step_<step>``, or its newest committed checkpoint.

    ``path`` may be a run directory, a checkpoint directory or a step directory
    (:func:`trainrun.checkpoint.paths.find_checkpoint`). The chosen checkpoint must verify against its
    manifest; a broken one is refused, not silently replaced by an older one.
    """
    try:
        return find_checkpoint(path, verify, step, fall_back=False)
    except CheckpointNotFound as err:
        hint = "give a run directory, a checkpoint directory or a step_<N> directory" if not path.exists() else \
            "pass --step N to export another one"
        raise ExportError(f"{err}; {hint}") from None


def read_checkpoint_meta(step_dir: Path) -> tuple[ModelConfig, dict]:
    """The checkpoint's model config (architecture only: ``init_from`` is not followed) and its metadata."""
    meta = read_meta(step_dir)
    saved = meta.get("model")
    if not isinstance(saved, dict):
        raise ExportError(f"{step_dir / META_FILE} has no model section; is this a trainrun checkpoint?")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    # The weights are in the checkpoint: re-reading the Hugging Face directory it started from is not needed.
    fields = {k: v for k, v in saved.items() if k in known and k != "init_from"}
    try:
        return ModelConfig(**fields), meta
    except (ConfigError, TypeError) as err:
        raise ExportError(f"{step_dir / META_FILE} has an unusable model section ({err})") from None


def checkpoint_shapes(step_dir: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """trainrun name -> (shape, dtype) of every model tensor in the checkpoint, from its DCP metadata."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        stored = read_tensor_metadata(step_dir)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    return {key.removeprefix("model."): (tuple(meta.size), meta.properties.dtype)
            for key, meta in stored.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}


Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


def fused_view(stored: Shapes) -> Shapes:
    """The checkpoint's tensors as the current model names them: a checkpoint written before q/k/v were
    fused has each block's separate wq/wk/wv (weight, bias), which read as the ``wqkv`` they make
    (``load_tensors`` fuses them on load). A current checkpoint: ``stored``."""
    view = dict(stored)
    for name in [n for n in stored if PARTS[0] in n]:
        target = name.replace(PARTS[0], FUSED)
        parts = separate_sources(target)
        if not all(part in stored for part in parts):
            continue  # the coverage check names what is missing
        view[target] = ((sum(stored[part][0][0] for part in parts), *stored[name][0][1:]), stored[name][1])
        for part in parts:
            del view[part]
    return view


def load_model_tensors(step_dir: Path, names: list[str], shapes: Shapes,
                       n_kv_heads: int | None = None) -> dict[str, torch.Tensor]:
    """Full tensors ``names`` of the checkpoint's model, read and resharded by DCP in this one process.

    ``n_kv_heads`` given, a checkpoint written before q/k/v were fused reads too (``shapes`` from
    :func:`fused_view`): each ``wqkv`` is fused from its stored q, k and v as the model holds it now."""
    tensors = {name: torch.empty(shapes[name][0], dtype=shapes[name][1]) for name in names}
    try:
        load_tensors(step_dir, {"model": tensors}, qkv_groups=n_kv_heads)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    return tensors


# ---- mapping and writing ----------------------------------------------------------------------------

def _check_coverage(cfg: ModelConfig, targets: list[Target], shapes: dict) -> None:
    """Every model tensor of the checkpoint is exported, and every one the mapping needs is there."""
    used = {name for t in targets for name in t.sources}
    if cfg.tie_embeddings:
        used.add("output.weight")  # the same tensor as the embedding, saved under both names
    missing = sorted(used - set(shapes))
    if missing:
        raise ExportError(f"the checkpoint lacks model tensors {missing[:3]} that its config implies")
    extra = sorted(set(shapes) - used)
    if extra:
        raise ExportError(f"the checkpoint holds model tensors the mapping does not cover ({extra[:3]})")


def _target_bytes(target: Target, shapes: dict, dtype: torch.dtype) -> int:
    if not target.sources:
        return math.prod(target.shape) * dtype.itemsize
    if target.ranges:
        return sum((b - a) * math.prod(shapes[name][0][1:])
                   for name, (a, b) in zip(target.sources, target.ranges, strict=True)) * dtype.itemsize
    return sum(math.prod(shapes[name][0]) for name in target.sources) * dtype.itemsize


def plan_shards(targets: list[Target], shapes: dict, dtype: torch.dtype, max_bytes: int) -> list[list[Target]]:
    """Targets grouped into files of at most ``max_bytes`` each (a larger tensor gets a file of its own)."""
    shards: list[list[Target]] = [[]]
    size = 0
    for target in targets:
        nbytes = _target_bytes(target, shapes, dtype)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(target)
        size += nbytes
    return shards


def build_target(target: Target, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The transformers tensor of ``target`` from trainrun's (full) tensors."""
    if not target.sources:
        return torch.zeros(target.shape, dtype=dtype)
    if target.ranges:  # row slices of the fused wqkv
        parts = [tensors[name][a:b] for name, (a, b) in zip(target.sources, target.ranges, strict=True)]
    else:
        parts = [tensors[name] for name in target.sources]
    value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if target.transpose:
        value = value.t()
    return value.to(dtype).contiguous()


def write_weights(step_dir: Path, cfg: ModelConfig, output: Path, dtype: torch.dtype, max_bytes: int) -> int:
    """Write the safetensors file(s) of ``cfg``'s transformers model; returns the number of files."""
    targets = export_targets(cfg)
    shapes = fused_view(checkpoint_shapes(step_dir))
    _check_coverage(cfg, targets, shapes)
    shards = plan_shards(targets, shapes, dtype, max_bytes)
    names = shard_names(len(shards))
    weight_map, total = {}, 0
    for shard, file in zip(shards, names, strict=True):
        tensors = load_model_tensors(step_dir, sorted({n for t in shard for n in t.sources}), shapes, cfg.kv_heads)
        out = {}
        for target in shard:
            out[target.hf_name] = build_target(target, tensors, dtype)
            total += out[target.hf_name].numel() * dtype.itemsize
            weight_map[target.hf_name] = file
        del tensors
        save_shard(out, output / file)
        del out
    if len(shards) > 1:
        write_index(output, weight_map, total)
    return len(shards)


def _permissions_from_umask(directory: Path) -> None:
    """Give the exported files the modes a plain open would: safetensors writes them private.

    (``staged_output`` does the same for the directory, which mkdtemp makes private.)
    """
    umask = os.umask(0)
    os.umask(umask)
    for file in directory.iterdir():
        file.chmod(0o666 & ~umask)


def export(path: Path, output: Path, step: int | None = None, dtype: str = "float32",
           max_shard_size: str = DEFAULT_MAX_SHARD, data_dir: str | None = None, tokenizer: bool = True,
           verify: str = "sha256", force: bool = False) -> Path:
    """Export the checkpoint ``path`` (see :func:`resolve_checkpoint`) to ``output``; returns the step directory.

    Raises ExportError or OutputError for anything the user can fix. ``output`` obeys
    :mod:`trainrun.outputs`: never an input, a run or a checkpoint directory; ``force`` replaces
    only an earlier export. It is written under a temporary name and swapped in at the end, so it
    never holds half an export and a failure leaves the earlier one.
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    inputs = [path] + ([Path(data_dir)] if data_dir else [])
    # Before the checkpoint is verified (which reads all of it): a refused output fails in a moment.
    check_output_dir(output, EXPORT, inputs=inputs, force=force)
    step_dir = resolve_checkpoint(path, step, verify)
    cfg, meta = read_checkpoint_meta(step_dir)
    export_targets(cfg)  # refuses an architecture without a transformers equivalent before any reading
    source = None
    if tokenizer:
        source = find_tokenizer(meta.get("config", {}).get("data", {}), data_dir, meta.get("data_checksum"))
        if source.vocab_size > cfg.vocab_size:
            raise ExportError(f"the tokenizer has {source.vocab_size} ids but the model only {cfg.vocab_size} "
                              "embedding rows; pass the --data the checkpoint trained on")
    eod = source.eod_id if source else None
    if source is not None and source.directory is not None:  # the checkpoint's own data.path is an input too
        check_output_dir(output, EXPORT, inputs=[*inputs, step_dir, source.directory], force=force)
    record = {"checkpoint": str(step_dir.resolve()), "dtype": dtype}
    with staged_output(output, EXPORT, record) as tmp:
        files = write_weights(step_dir, cfg, tmp, DTYPES[dtype], max_bytes)
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(cfg, eod, eod, dtype), indent=2) + "\n")
        generation = {"bos_token_id": eod, "eos_token_id": eod, "pad_token_id": eod}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if source is not None:
            write_tokenizer(source, tmp, cfg.max_seq_len)
        _permissions_from_umask(tmp)
    logger.info("exported %s to %s (%s, %d safetensors file(s))", step_dir, output, hf_config(cfg, eod, eod, dtype)
                ["architectures"][0], files)
    return step_dir


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``trainrun-export``."""
    p = argparse.ArgumentParser(prog="trainrun-export",
                                description="Write a trainrun checkpoint as a Hugging Face transformers model.")
    p.add_argument("checkpoint", help="run directory, checkpoint directory (holding step_<N>/) or a step_<N> directory")
    p.add_argument("--output", "-o", required=True, help="directory to write (config.json, model.safetensors, ...)")
    p.add_argument("--step", type=int, default=None, help="step to export (default: the newest committed checkpoint)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the written weights")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD,
                   help="largest safetensors file before the weights are split into shards (e.g. 5GB, 500MiB)")
    p.add_argument("--data", default=None, help="dataset directory whose tokenizer to export (default: the "
                   "checkpoint's data.path; the bundled corpus is bytes)")
    p.add_argument("--no-tokenizer", action="store_true", help="write the model only")
    p.add_argument("--verify", default=Verify.sha256.value, choices=[v.value for v in Verify],
                   help="how the checkpoint's files are checked against its manifest first")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier trainrun-export output (never an input, a run or a checkpoint directory, "
                        "or a directory this command did not write)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``trainrun-export``; returns the exit status (2 for errors a user can fix)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse printed its one-line error (or --help)
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def run() -> str:
        require("safetensors", "hf", "trainrun-export")  # before any checkpoint is read
        step_dir = export(Path(args.checkpoint), Path(args.output), args.step, args.dtype, args.max_shard_size,
                          args.data, not args.no_tokenizer, args.verify, args.force)
        return f"exported {step_dir} to {args.output}"

    return run_output_command("trainrun-export", run, (ExportError, OutputError, OSError, MissingExtraError))


if __name__ == "__main__":
    sys.exit(main())
