"""fp8 training (``train.precision=fp8``): torchao's float8 linears, applied before parallelisation.

The config check (``config.validate.check_fp8_available``) already refused machines without a GPU
with fp8 tensor cores or without torchao; here the conversion itself. Like torchtitan, the output
projection stays in high precision (its logits feed the loss directly) and so do layers whose
dimensions are not multiples of 16, which the fp8 matmul kernels require.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)


def _fp8_friendly(module: nn.Module, fqn: str) -> bool:
    if not isinstance(module, nn.Linear) or fqn == "output":
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_float8(model: nn.Module) -> nn.Module:
    """Swap eligible ``nn.Linear`` layers for torchao's ``Float8Linear`` (dynamic tensorwise scaling)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    converted = convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=_fp8_friendly)
    count = sum(type(m).__name__ == "Float8Linear" for m in converted.modules())
    logger.info("fp8: %d linear layers train in float8 (torchao); the rest in bf16 autocast", count)
    return converted
