"""The one rule for where a trainrun command may write its output directory.

Every command that writes an output directory (``trainrun-export``, ``trainrun-prepare``; and, for
the parts that apply to files, ``trainrun-report``) asks :func:`check_output_dir` first and writes
through :func:`staged_output`. The rule:

* the output is never a file, never one of the command's inputs, never holds one and never lies
  inside one (``may_nest_in_inputs`` lifts the last for a command that skips its own output when
  reading its inputs);
* the output is never a run directory (``.hydra/``, ``trainrun_status.json``, ``.trainrun.lock``,
  ``metrics.jsonl`` or ``checkpoints/``) or a checkpoint directory (``step_<N>/``, a ``latest`` naming one,
  or ``trainrun.json``), never lies inside a checkpoint directory and never holds either;
* ``--force`` replaces only a previous output of the same command, recognised by the marker file
  ``.<command>.json`` the command writes into every output; a non-empty directory without it is
  refused, ``--force`` or not;
* the new output is built in a temporary directory beside the old one and swapped in at the end,
  so a failure midway leaves the old output as it was.

Each refusal is one line naming the option and the fix (:class:`OutputError`).
This module must not import torch: the data CLI uses it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from trainrun.checkpoint.layout import LATEST_FILE, is_checkpoint
from trainrun.checkpoint.paths import run_checkpoint_dir

RUN_DIR_ENTRIES = (".hydra", "trainrun_status.json", ".trainrun.lock", "metrics.jsonl")
"""Names that make a directory a run directory (besides a ``checkpoints/`` that is a checkpoint directory)."""
_STEP_DIR = re.compile(r"^\.?(old_)?step_\d+$")


class OutputError(Exception):
    """An output location that would lose work or cannot be written; one line naming the option and the fix."""


def marker_name(command: str) -> str:
    """The file that marks a directory as ``command``'s output, e.g. ``.trainrun-export.json``."""
    return f".{command}.json"


MARKER_GLOB = marker_name("trainrun-*")
"""Matches the marker of any trainrun command's output."""


# ---- recognising work that must not be touched ------------------------------------------------------

def _names_a_step(latest: Path) -> bool:
    # "latest" alone is too common a name: it counts when it reads like trainrun's (step_<N>).
    if not latest.is_file():
        return False
    try:
        with open(latest, "rb") as fh:
            return _STEP_DIR.match(fh.read(64).decode("ascii", "replace").strip()) is not None
    except OSError:
        return False


def is_checkpoint_dir(directory: Path) -> bool:
    """``directory`` holds checkpoints (``step_<N>/``, a ``latest`` naming one) or is one (``trainrun.json``)."""
    if is_checkpoint(directory) or _names_a_step(directory / LATEST_FILE):
        return True
    try:
        with os.scandir(directory) as entries:
            return any(_STEP_DIR.match(e.name) and e.is_dir() for e in entries)
    except OSError:  # missing, not a directory, unreadable: nothing to protect we can see
        return False


def is_run_dir(directory: Path) -> bool:
    """``directory`` is a training run's directory (see :data:`RUN_DIR_ENTRIES`)."""
    if any(os.path.lexists(directory / name) for name in RUN_DIR_ENTRIES):
        return True
    return run_checkpoint_dir(directory).is_dir() and is_checkpoint_dir(run_checkpoint_dir(directory))


def work_kind(directory: Path) -> str | None:
    """``"run directory"`` or ``"checkpoint directory"`` when ``directory`` is one, else None."""
    if is_checkpoint_dir(directory):  # first: a checkpoint directory holds a .trainrun.lock too
        return "checkpoint directory"
    if is_run_dir(directory):
        return "run directory"
    return None


def _owners(path: Path) -> list[Path]:
    """``path`` (resolved) and the run and checkpoint directories around it (a step's checkpoint and run dirs)."""
    chain = [path.resolve()]
    for parent in chain[0].parents:
        if work_kind(parent) is None:
            break
        chain.append(parent)
    return chain


# ---- the checks --------------------------------------------------------------------------------------

def _refuse_file(output: Path, option: str) -> None:
    """The output, or a directory above it, is a file."""
    for path in (output, *output.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == output else f"lies under {path}, which is a file"
            raise OutputError(f"{option} {output} {where}, not a directory; choose a directory path")


def _refuse_overlap(output: Path, target: Path, source: Path, what: str, option: str, command: str,
                    inside: bool) -> None:
    """``target`` (the resolved output) is, holds or (``inside``) lies in ``source``, described as ``what``."""
    if source == target:
        relation = "is"
    elif source.is_relative_to(target):
        relation = "contains"
    elif inside and target.is_relative_to(source):
        relation = "lies inside"
    else:
        return
    raise OutputError(f"{option} {output} {relation} {what}, and {command} never writes over or into its inputs "
                      "(--force or not); choose an output directory that holds none of the inputs and lies "
                      "outside them")


def _refuse_work(output: Path, target: Path, option: str, command: str) -> None:
    """The output is a run or checkpoint directory, or lies inside a checkpoint directory."""
    kind = work_kind(target)
    if kind is not None:
        raise OutputError(f"{option} {output} is a {kind}, which {command} never replaces (--force or not); "
                          "choose a new directory for the output")
    for parent in target.parents:
        if is_checkpoint_dir(parent):
            raise OutputError(f"{option} {output} lies inside the checkpoint directory {parent}, which {command} "
                              "never writes into; choose a directory outside it")


def _held_work(directory: Path) -> Path | None:
    """The first run or checkpoint directory found at or below ``directory``, if any."""
    for root, dirs, _files in os.walk(directory):
        if work_kind(Path(root)) is not None:
            return Path(root)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return None


def _refuse_existing(output: Path, target: Path, option: str, command: str, force: bool,
                     recognise: Callable[[Path], bool] | None) -> None:
    """A non-empty output: replaced only with ``force`` and only when it is this command's earlier output."""
    if not target.is_dir() or not any(target.iterdir()):
        return
    marker = marker_name(command)
    if not ((target / marker).is_file() or (recognise is not None and recognise(target))):
        raise OutputError(f"{option} {output} is not empty and is not an earlier {command} output (it has no "
                          f"{marker}), so it is not replaced, --force or not; choose a new or empty directory")
    held = _held_work(target)
    if held is not None:
        raise OutputError(f"{option} {output} holds the {work_kind(held)} {held}, which {command} never deletes; "
                          "move it out or choose another output directory")
    if not force:
        raise OutputError(f"{option} {output} already holds a {command} output; pass --force to replace it, or "
                          "choose another directory")


def check_writable(output: Path, option: str) -> None:
    """The nearest existing directory at or above ``output`` accepts a file (where the output will be built)."""
    from trainrun.errors import RunEnvironmentError
    from trainrun.preflight import check_writable_dir

    existing = next(p for p in (output, *output.parents) if p.exists())
    try:
        check_writable_dir(existing, option)  # existing: creates nothing, only writes and deletes a probe
    except RunEnvironmentError as err:
        raise OutputError(str(err)) from None


def check_not_input(output: Path, command: str, inputs: Iterable[Path], option: str = "--output",
                    may_nest_in_inputs: bool = False) -> None:
    """The first part of :func:`check_output_dir`: ``output`` is not, holds no and lies in no input."""
    target = Path(output).resolve()
    for given in map(Path, inputs):
        own, *around = _owners(given)
        _refuse_overlap(output, target, own, f"the input {given}", option, command, inside=not may_nest_in_inputs)
        for source in around:
            _refuse_overlap(output, target, source, f"the {work_kind(source)} {source} of the input {given}",
                            option, command, inside=True)


def check_output_dir(output: Path, command: str, *, inputs: Iterable[Path] = (), force: bool = False,
                     option: str = "--output", may_nest_in_inputs: bool = False,
                     recognise: Callable[[Path], bool] | None = None) -> None:
    """Refuse ``output`` unless ``command`` may write it under the module's rule; raises OutputError.

    ``inputs``: everything the command reads (symlinks are resolved, and a step or checkpoint directory
    brings the checkpoint and run directories around it). ``recognise``: also accept, as this command's
    earlier output, a directory written before the marker file existed.
    """
    output = Path(output)
    target = output.resolve()
    check_not_input(output, command, inputs, option, may_nest_in_inputs)
    _refuse_file(output, option)  # after the inputs: "is the input" says more than "is a file"
    _refuse_work(output, target, option, command)
    _refuse_existing(output, target, option, command, force, recognise)
    check_writable(target, option)


def check_output_files(directory: Path, command: str, names: Iterable[str], is_ours: Callable[[Path], bool],
                       option: str = "--output") -> None:
    """For a command that writes the files ``names`` into ``directory`` (rather than a whole directory).

    The directory must not be a file or lie in a checkpoint directory, and each of ``names`` that
    already exists must be this command's earlier output (``is_ours``): anything else is refused,
    since the command would overwrite it. Raises OutputError.
    """
    directory = Path(directory)
    _refuse_file(directory, option)
    target = directory.resolve()
    for path in (target, *target.parents):
        if is_checkpoint_dir(path):
            where = "is" if path == target else f"lies inside {path}, which is"
            raise OutputError(f"{option} {directory} {where} a checkpoint directory, which {command} never writes "
                              "into; choose a directory outside it")
    for name in names:
        existing = target / name
        if os.path.lexists(existing) and not (existing.is_file() and is_ours(existing)):
            raise OutputError(f"{option} {directory} already holds {name}, which {command} did not write and would "
                              f"overwrite; move it away or choose another {option}")
    check_writable(target, option)


# ---- writing -----------------------------------------------------------------------------------------

def _under(filename: object, *roots: Path) -> bool:
    if not isinstance(filename, str | bytes | os.PathLike):
        return False
    path = Path(os.fsdecode(filename))
    return any(path == root or path.is_relative_to(root) for root in roots)


@contextmanager
def staged_output(output: Path, command: str, record: dict | None = None, option: str = "--output") -> Iterator[Path]:
    """Yield an empty directory beside ``output`` to build the output in; on success mark it and swap it in.

    The marker (:func:`marker_name`, holding ``record``) lets a later ``--force`` recognise the output.
    If the block raises, the old output is untouched and the temporary directory is removed. An
    OSError while creating, writing or swapping the output becomes one line naming ``option``.
    """
    from trainrun.data.fsutil import publish_dir, staging_dir

    final = Path(output).resolve()  # a symlinked output keeps its link: the directory it names is replaced
    tmp: Path | None = None
    try:
        with staging_dir(final) as tmp:
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # mkdtemp's directory is private; the output gets what mkdir would give
            yield tmp
            payload = {"command": command, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(record or {})}
            (tmp / marker_name(command)).write_text(json.dumps(payload, indent=2) + "\n")
            publish_dir(tmp, final, replace=True)
    except OSError as err:
        if tmp is None or _under(err.filename, tmp, final) or _under(err.filename2, tmp, final):
            raise OutputError(f"{option} {output} could not be written ({err.strerror or err}); free space or set "
                              f"{option} to a directory you can write to") from None
        raise


def run_output_command(command: str, body: Callable[[], str], errors: tuple[type[BaseException], ...]) -> int:
    """Run the body of a command that writes ``--output`` and return its exit status.

    ``body`` returns the summary line printed on success (0). An error of ``errors`` (one a user can fix)
    is one line on stderr, exit 2. Ctrl-C is one line, exit 130: :func:`staged_output` builds the output
    beside its place and swaps it in only once complete, so an earlier output is left as it was.
    """
    try:
        summary = body()
    except errors as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted (Ctrl-C); --output was left as it was", file=sys.stderr)
        return 130
    print(summary)
    return 0
