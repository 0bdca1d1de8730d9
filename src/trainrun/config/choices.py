"""Every fixed set of allowed values, written once, as an Enum the schema types its field with.

OmegaConf checks Enum fields while Hydra composes, so ``model.norm=batchnorm`` fails before any
code runs, with the allowed values listed. Members are named exactly as users type them in YAML
and on the command line (``norm: rmsnorm``), and mix in ``str`` so that a member compares equal to
its spelling and serialises as it (JSON, wandb config). Names that components register at run
time (models, optimizers, schedules, datasets, executors, ...) are not here: they are strings
checked against ``trainrun.registry``.
"""

from __future__ import annotations

import signal
from enum import Enum


class Choice(str, Enum):
    """Base of trainrun's config enums: prints as its YAML spelling."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Device(Choice):
    """Where the run computes (``run.device``)."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Norm(Choice):
    """Normalisation layer of every block (``model.norm``)."""

    rmsnorm = "rmsnorm"
    layernorm = "layernorm"


class Position(Choice):
    """Position encoding (``model.position``)."""

    rope = "rope"
    learned = "learned"


class Mlp(Choice):
    """MLP of every block (``model.mlp``)."""

    swiglu = "swiglu"
    gelu = "gelu"


class RopeScaling(Choice):
    """How RoPE's frequencies are rescaled for a longer context (``model.rope_scaling.type``)."""

    none = "none"
    """Plain RoPE."""
    llama3 = "llama3"
    """Llama 3.1's: low frequencies divided by ``factor``, high ones kept, a smooth blend between."""


class CompileScope(Choice):
    """What of the model ``train.step_executor=compile`` compiles (``train.compile.scope``)."""

    blocks = "blocks"
    """Each transformer block on its own (torchtitan's style): short compile times, FSDP-friendly."""
    model = "model"
    """Forward and loss as one graph."""
    none = "none"
    """Nothing of the model: only the optimizer step, with ``train.compile.optimizer=true``."""


class OptimizerImpl(Choice):
    """Kernel flavour of the optimizer step (``optim.implementation``)."""

    auto = "auto"
    fused = "fused"
    foreach = "foreach"
    for_loop = "for_loop"


class Precision(Choice):
    """Training precision (``train.precision``)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    fp8 = "fp8"
    """torchao float8 training of the linear layers (CUDA, compute capability >= 8.9), bf16 autocast elsewhere."""

    @property
    def autocast_dtype(self):  # -> torch.dtype | None; torch is imported lazily to keep config light
        """The dtype autocast computes in; None for fp32 (no autocast)."""
        import torch

        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}[self.value]

    @property
    def activation_bytes(self) -> int:
        """Bytes per stored activation element under this precision's autocast."""
        return 4 if self is Precision.fp32 else 2


# "1F1B" is not a Python identifier, so this Enum is built with the functional API; members are
# looked up as PipelineSchedule["1F1B"], exactly as OmegaConf does with the YAML spelling.
PipelineSchedule = Choice("PipelineSchedule", [(n, n) for n in ("GPipe", "1F1B", "Interleaved1F1B")])
PipelineSchedule.__doc__ = ("Pipeline-parallel schedule (``parallel.pp_schedule``); "
                            "Interleaved1F1B runs several stages per rank.")


class ActivationCheckpointing(Choice):
    """Which blocks recompute their activations in backward (``parallel.activation_checkpointing``)."""

    none = "none"
    selective = "selective"
    full = "full"

    def recomputes(self, layer_index: int) -> bool:
        """Whether block ``layer_index`` (global index) is checkpointed: every other one for selective."""
        return (self is ActivationCheckpointing.full
                or (self is ActivationCheckpointing.selective and layer_index % 2 == 0))


class Verify(Choice):
    """How checkpoint files are checked against their manifest (``checkpoint.verify``)."""

    sha256 = "sha256"
    size = "size"
    none = "none"


class WandbMode(Choice):
    """Where wandb sends a run (``logging.wandb.mode``); turning wandb off is ``logging.wandb.enabled=false``."""

    online = "online"
    offline = "offline"


class LogLevel(Choice):
    """Python log level of trainrun's loggers (``logging.level``)."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


_UNCATCHABLE = {"SIGKILL", "SIGSTOP"}
ExitSignal = Choice("ExitSignal", [(s.name, s.name) for s in signal.Signals if s.name not in _UNCATCHABLE])
ExitSignal.__doc__ = "A catchable signal that asks trainrun to save and exit 3 (``checkpoint.exit_signals``)."


def enum_fields(cls: type) -> dict[str, type[Enum]]:
    """Fields of dataclass ``cls`` typed with a config Enum (or a list of one), by field name."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    found: dict[str, type[Enum]] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
        if isinstance(inner, type) and issubclass(inner, Choice):
            found[f.name] = inner
    return found


class StdlibSubset(Choice):
    """Which files of the bundled standard-library corpus it holds (``data.subset``)."""

    all = "all"
    library = "library"
    tests = "tests"
