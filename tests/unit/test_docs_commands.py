"""Every trainrun command in README.md and docs/*.md composes, so the docs cannot drift from conf/.

A command (in a code block, or an inline code span that starts with one) is ``python -m trainrun ...``,
``trainrun ...``, ``torchrun ... -m trainrun ...`` or ``sbatch launchers/torchrun.sbatch ...``; its
overrides go through what the CLI does before a run starts: the command-line check
(:func:`trainrun.config.store.check_command_line`), Hydra's composition with the same overrides (what
``--cfg job`` prints), the conversion to the typed config and its validation for the processes the
command starts. A sweep (``-m``) composes each of its
points. ``trainrun-prepare`` and ``trainrun-export`` lines are parsed by their own argument parsers.
Lines with placeholders (``<...>``, ``...``) or a user's own config directory are skipped with the
reason shown (pytest's ``-ra`` summary lists them). README's Layout section names only paths that
exist, and every package, test tier and doc.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from trainrun.config.convert import config_dir, optional_group_options, to_dataclass
from trainrun.config.store import check_command_line, normalize_overrides, register_configs
from trainrun.config.validate import validate_config
from trainrun.errors import ConfigError
from trainrun.launch.sweep_callback import world_size_per_job

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

DEGREES = 0
"""World size of a command whose launcher starts as many processes as the parallel degrees ask."""

MAX_POINTS = 8
"""Points of a documented sweep composed at most (the first ones in Hydra's order)."""

# Hydra's flags: those that take a value, those that do not. A user's config directory cannot be composed here.
_FLAG_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--shell-completion", "-sc",
               "--experimental-rerun"}
_FLAG = {"-m", "--multirun", "--resolve", "--help", "-h", "--hydra-help", "--version", "--run", "-r"}
_USER_CONFIG = {"--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn"}


@dataclass(frozen=True)
class Command:
    """One documented command: where it is, the tool and its arguments."""

    where: str
    text: str
    tool: str
    args: tuple[str, ...]
    world_size: int | None = None
    """Processes the command starts: torchrun's; :data:`DEGREES`: as many as the parallel degrees ask (sbatch);
    None: one, or for a dry run the degrees' (the CLI's own rule)."""


def code_block_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, logical line) of every shell-like fenced code block (continuations joined)."""
    lines, in_block, skip_block, pending, start = [], False, False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            skip_block = in_block and line.strip()[3:] in {"python", "yaml", "json", "toml", "text"}
            continue
        if not in_block or skip_block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((start, pending + line))
        pending = ""
    return lines


def _segments(tokens: list[str]) -> list[list[str]]:
    """Split a token list at the shell's command separators; redirections and their targets are left out."""
    segments, current, redirect = [], [], False
    for token in tokens:
        if token in {"&&", "||", ";", "|"}:
            segments.append(current)
            current, redirect = [], False
        elif re.fullmatch(r"\d?(>>?|<)&?", token):
            redirect = True
        elif not redirect:
            current.append(token)
    return [*segments, current]


def _torchrun_world_size(tokens: list[str]) -> int:
    sizes = {"--nproc-per-node": 1, "--nproc_per_node": 1, "--nnodes": 1}
    for flag, value in zip(tokens, tokens[1:], strict=False):
        if flag in sizes and value.isdigit():
            sizes[flag] = int(value)
    return max(sizes["--nproc-per-node"], sizes["--nproc_per_node"]) * sizes["--nnodes"]


def _command(tokens: list[str]) -> tuple[str, list[str], int | None] | None:
    """The trainrun tool a segment runs, its arguments and its world size, or None."""
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens:
        return None
    head = Path(tokens[0]).name
    if head in {"python", "python3"} and tokens[1:3] == ["-m", "trainrun"]:
        return "trainrun", tokens[3:], None
    if head in {"trainrun", "trainrun-prepare", "trainrun-export", "trainrun-report"}:
        return head, tokens[1:], None
    if head == "torchrun" and "trainrun" in tokens:
        i = tokens.index("trainrun")
        if tokens[i - 1] == "-m":
            return "trainrun", tokens[i + 1:], _torchrun_world_size(tokens[:i])
    if head == "sbatch":
        for i, token in enumerate(tokens):
            if token.endswith("torchrun.sbatch"):
                return "trainrun", tokens[i + 1:], DEGREES
    return None


_INLINE = re.compile(r"`((?:python -m trainrun|trainrun|torchrun)(?: [^`]*)?)`")


def inline_commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every inline code span outside code blocks that starts with a trainrun command."""
    found, in_block = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif not in_block:
            found += [(number, match) for match in _INLINE.findall(line)]
    return found


def documented_commands() -> list[Command]:
    """Every trainrun command in the docs' code blocks and inline code spans."""
    commands = []
    for path in DOCS:
        for number, line in code_block_lines(path) + inline_commands(path):
            if "trainrun" not in line:
                continue
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:  # a here-document or an unbalanced quote: no command of ours
                continue
            for segment in _segments(tokens):
                found = _command(segment)
                if found:
                    where = f"{path.relative_to(REPO)}:{number}"
                    commands.append(Command(where, line.strip(), found[0], tuple(found[1]), found[2]))
    return commands


COMMANDS = documented_commands()


def test_the_docs_have_commands():
    assert len(COMMANDS) > 30, [c.where for c in COMMANDS]
    assert {c.tool for c in COMMANDS} >= {"trainrun", "trainrun-prepare", "trainrun-export"}


def _placeholder(command: Command) -> str | None:
    """The placeholder (``<run dir>``, ``...``) in a command, if any (``'</s>'`` is a value, not one)."""
    found = re.search(r"<[A-Za-z][^>]*>?|\.\.\.|…", " ".join(command.args))
    return found.group(0) if found else None


def _overrides_and_sweep(args: tuple[str, ...]) -> tuple[list[str], bool, str | None]:
    """(overrides, is a sweep, why the command cannot be composed here) of a ``python -m trainrun`` command."""
    overrides, multirun, it = [], False, iter(args)
    for arg in it:
        if arg in _USER_CONFIG or arg.startswith("hydra.searchpath="):
            value = f" {next(it, '')}" if arg in _USER_CONFIG else ""
            return [], False, f"uses a config directory of the user's ({arg}{value})"
        if arg in _FLAG_VALUE:
            next(it, None)
        elif arg in {"-m", "--multirun"}:
            multirun = True
        elif arg not in _FLAG and not arg.startswith("--"):
            overrides.append(arg)
    return overrides, multirun, None


def _points(overrides: list[str]) -> list[list[str]]:
    """The points of a sweep over ``overrides``, in the order Hydra's basic sweeper launches them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(point) for batch in batches for point in batch][:MAX_POINTS]


def compose_like_the_cli(overrides: list[str], world_size: int | None) -> None:
    """What ``python -m trainrun <overrides> --cfg job`` does, then what the job checks before it builds anything:
    the typed config and its validation for ``world_size`` processes (a submitit launcher's: its nodes x tasks;
    see :attr:`Command.world_size`). A dataset directory of the user's (``data.path=data/mine``) is not checked."""
    register_configs()
    overrides = normalize_overrides(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    if "submitit" in str(cfg.hydra.launcher.get("_target_", "")):
        world_size = world_size_per_job(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    typed = to_dataclass(cfg)
    p = typed.parallel
    try:
        validate_config(typed, world_size=p.dp_replicate * p.dp_shard * p.tp * p.pp if world_size == DEGREES
                        else world_size)
    except ConfigError as err:
        # A documented dataset directory (data.path, or a blend entry's path) exists on the user's machine only.
        if not re.fullmatch(r"data\.((valid_|test_)?blend\.\d+\.)?path", err.field) or (REPO / str(err.value)).exists():
            raise


@pytest.mark.filterwarnings("ignore:.*is validated against ConfigStore schema:UserWarning")
@pytest.mark.parametrize("command", [c for c in COMMANDS if c.tool == "trainrun"], ids=lambda c: c.where)
def test_documented_trainrun_command_composes(command: Command):
    if (arg := _placeholder(command)) is not None:
        pytest.skip(f"placeholder {arg!r} in: {command.text}")
    overrides, multirun, why_not = _overrides_and_sweep(command.args)
    if why_not:
        pytest.skip(f"{why_not}: {command.text}")
    check_command_line(list(command.args), optional_group_options())
    for point in _points(overrides) if multirun else [overrides]:
        compose_like_the_cli(point, command.world_size)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.tool in {"trainrun-prepare", "trainrun-export"}],
                         ids=lambda c: c.where)
def test_documented_prepare_and_export_commands_parse(command: Command):
    if (arg := _placeholder(command)) is not None:
        pytest.skip(f"placeholder {arg!r} in: {command.text}")
    if command.tool == "trainrun-prepare":
        from trainrun.data.prepare import build_parser
    else:
        from trainrun.hf.export import build_parser
    build_parser().parse_args(list(command.args))  # argparse exits 2 on an unknown flag or a missing argument


def _layout_names(text: str) -> dict[str, list[str]]:
    """README's Layout section as folder -> the names listed in parentheses after it (top-level folders: '')."""
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    names: dict[str, list[str]] = {"": []}
    for match in re.finditer(r"`([\w./-]+)`(?: \(([^)]*)\))?", section):
        if match.group(1).endswith("/"):
            names[""].append(match.group(1))
        if match.group(2):
            names.setdefault(match.group(1), []).extend(re.findall(r"`([\w./-]+)`", match.group(2)))
    return names


def test_readme_layout_names_what_exists_and_every_package_folder_and_doc():
    names = _layout_names((REPO / "README.md").read_text())
    missing = [f"{parent}{name}" for parent, listed in names.items() for name in listed
               if not (REPO / parent / name).exists() and not list((REPO / parent).glob(f"{name}.*"))]
    assert missing == [], "README's Layout names paths that do not exist"
    listed = {f"{parent}{name}" for parent, children in names.items() for name in children}
    expected = {f"src/trainrun/{p.parent.name}/" for p in (REPO / "src" / "trainrun").glob("*/__init__.py")}
    expected |= {f"tests/{p.name}/" for p in (REPO / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"}
    expected |= {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert expected - listed == set(), "add these to README's Layout section"
