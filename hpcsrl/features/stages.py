"""Frozen features pooled from the last stages of a ResNet trunk, concatenated.

A linear probe on the globally pooled last stage is the classic frozen-encoder protocol. On
small chips the earlier stages carry texture and colour cues that the last stage of a briefly
pre-trained encoder has partly discarded; concatenating their pooled outputs (as DINO / DINOv2
concatenate the last blocks' class tokens for their linear evaluation) keeps the encoder frozen and
the classifier linear. The columns are ordered earliest stage first and end with the encoder's
own output, so the last `feature_dim` columns are exactly the classic features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hpcsrl.errors import UserError
from hpcsrl.models.resnet import ResNet


def find_trunk(encoder: nn.Module) -> ResNet:
    """The ResNet trunk inside `encoder` (itself or a wrapped child)."""
    for module in encoder.modules():
        if isinstance(module, ResNet):
            return module
    raise UserError(f"features of several stages need a ResNet trunk; {type(encoder).__name__} "
                    "has none (--probe-stages 1)")


def stage_ends(trunk: ResNet) -> list[nn.Module]:
    """The last block of every stage (layer1, layer2, ...), in order."""
    ends: dict[str, nn.Module] = {}
    for name, module in trunk.named_children():
        if name.startswith("layer"):
            ends[name.split("_")[0]] = module   # later blocks of a stage overwrite earlier ones
    return list(ends.values())


class StagePooled(nn.Module):
    """`encoder`'s features with the globally pooled outputs of the `stages - 1` stages before
    the last one in front: (N, C, H, W) -> (N, sum(dims)), `dims` the width of each part."""

    def __init__(self, encoder: nn.Module, stages: int) -> None:
        super().__init__()
        ends = stage_ends(find_trunk(encoder))
        if not 1 <= stages <= len(ends):
            raise UserError(f"--probe-stages {stages}: this trunk has {len(ends)} stages "
                            f"(choose 1..{len(ends)})")
        self.encoder = encoder
        self.earlier: Sequence[nn.Module] = ends[len(ends) - stages:-1]
        self.dims: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        pooled: list[Tensor] = []
        hooks = [m.register_forward_hook(
            lambda _m, _i, out: pooled.append(torch.flatten(
                nn.functional.adaptive_avg_pool2d(out, 1), 1))) for m in self.earlier]
        try:
            last = self.encoder(x).flatten(1)
        finally:
            for h in hooks:
                h.remove()
        parts = [*pooled, last]
        self.dims = [p.shape[1] for p in parts]
        return torch.cat([p.to(last.dtype) for p in parts], dim=1)


def last_stage_columns(dims: Sequence[int], stages: int) -> slice:
    """Columns of a `StagePooled` output holding its last `stages` parts."""
    return slice(sum(dims) - sum(dims[len(dims) - stages:]), sum(dims))
