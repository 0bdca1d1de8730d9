"""``trainrun --help``: the config-group listing for conf/hydra/help/trainrun.yaml.

Hydra's ``$APP_CONFIG_GROUPS`` lists every option in the config repository, including the
ConfigStore schemas (``base_model``, ``base_run``, ...) that the YAML files extend and that no
user should pick. Hydra reads ``hydra.help.template`` from the composed config, so the help
template interpolates ``${trainrun_config_groups:}`` and this resolver writes the listing itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import OmegaConf

if TYPE_CHECKING:
    from hydra.core.config_loader import ConfigLoader

RESOLVER = "trainrun_config_groups"
HIDDEN_PREFIX = "base_"
"""Options with this prefix are schemas stored by :func:`trainrun.config.register_configs`."""
HIDDEN_GROUP = "base"
"""Groups with this name (e.g. experiment/base) hold shared recipes that other configs include."""
SHOWN_HYDRA_GROUPS = ("hydra/launcher",)
"""Hydra's own groups worth a user's attention; the rest are listed by ``--hydra-help``."""


def _options(loader: ConfigLoader, group: str) -> list[str]:
    """The selectable options of ``group`` (configs only, schemas hidden), sorted."""
    from hydra.core.object_type import ObjectType

    names = loader.get_group_options(group, results_filter=ObjectType.CONFIG)
    return sorted(n for n in names if not n.startswith(HIDDEN_PREFIX))


def _groups(loader: ConfigLoader, parent: str = "") -> list[str]:
    """Every group below ``parent``, recursively (``hydra`` and ``*/base`` excluded)."""
    found: list[str] = []
    for child in loader.list_groups(parent):
        group = f"{parent}/{child}" if parent else child
        if group == "hydra" or child == HIDDEN_GROUP:
            continue
        found.append(group)
        found.extend(_groups(loader, group))
    return found


def format_config_groups() -> str:
    """``group: option, option`` lines for the app's groups, then the shown Hydra groups.

    Groups with no selectable option (only a schema, or only subgroups) are left out, and so are
    the schemas and the shared bases: nobody picks those on the command line.
    """
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        # resolved outside Hydra's --help (e.g. a saved .hydra/hydra.yaml); there is no repository
        return "(run `trainrun --help` to list the config groups)"
    loader = GlobalHydra.instance().config_loader()

    def lines(groups: list[str]) -> list[str]:
        listed = ((g, _options(loader, g)) for g in sorted(groups))
        return [f"{g}: {', '.join(opts)}" for g, opts in listed if opts]

    app = lines(_groups(loader))
    hydra_groups = lines(list(SHOWN_HYDRA_GROUPS))
    text = "\n".join(app)
    if hydra_groups:
        text += "\n\nHydra groups (hydra/<group>=option; all of them: --hydra-help)\n\n" + "\n".join(hydra_groups)
    return text


def register_help_resolver() -> None:
    """Register ``${trainrun_config_groups:}`` with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, format_config_groups)
