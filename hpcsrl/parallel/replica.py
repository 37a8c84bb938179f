"""What every data-parallel backend does to the model before training it on each rank."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from hpcsrl.models.baselines.moco_v2 import KeyQueue
from hpcsrl.parallel.sync_bn import convert_sync_bn


def prepare_replica(model: nn.Module, total: Callable[[Tensor], Tensor],
                    gather: Callable[[Tensor], Tensor], ranks: int, sync_bn: bool) -> nn.Module:
    """Parameters back in contiguous layout (collectives and flat gradient buffers want it;
    gradients follow their parameter's layout, and channels-last inputs still select the NHWC
    kernels); MoCo's key queues enqueue the keys of all ranks (`gather`), as MoCo does under data
    parallelism: a rank's own keys alone would give every replica other negatives and let the
    replicas drift apart; BatchNorm statistics over all ranks (`total`) with `sync_bn`."""
    model.to(memory_format=torch.contiguous_format)
    for m in model.modules():
        if isinstance(m, KeyQueue):
            m.gather = gather
    return convert_sync_bn(model, total, ranks) if sync_bn else model
