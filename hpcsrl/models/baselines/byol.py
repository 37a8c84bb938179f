"""BYOL: online network (backbone, projector, predictor) against a momentum target (backbone,
projector), normalised-MSE loss.

projector 512 -> 4096 (BN, ReLU) -> 256, predictor 256 -> 4096 (BN, ReLU) -> 256, target tau 0.99
rising to 1 along a cosine when the trainer passes progress. With ResNet-18 on 3 bands: 30,779,264
parameters counting online + target. The paper's 31.81 M is 1,026,000 more: exactly two unused
1000-class ResNet-18 classifiers (512 x 1000 + 1000 each), which common BYOL code keeps inside the
wrapped network; we have no classifier to count.

Units: backbone, projector and predictor layers act on position 0 of the chain value
`(x, x_target)`; the raw batch rides along to the last unit, which runs the target network under
no_grad and computes the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hpcsrl.losses.byol import byol_loss
from hpcsrl.losses.cosine import split_views
from hpcsrl.models.base import MomentumMethod, MomentumTarget, momentum_schedule
from hpcsrl.models.chain import At
from hpcsrl.models.heads import MLP
from hpcsrl.models.resnet import ResNet
from hpcsrl.models.units import Unit


class TargetLoss(nn.Module):
    """Last unit: (p, x) -> loss(p, target(x)) with the momentum target run without gradients."""

    def __init__(self, target: MomentumTarget) -> None:
        super().__init__()
        self.target = target

    def forward(self, h: tuple[Tensor, Tensor]) -> Tensor:
        p, x = h
        return byol_loss(*split_views(p), *split_views(self.target(x)))


class BYOL(MomentumMethod):
    method = "byol"

    def __init__(self, backbone: str = "resnet18", in_channels: int = 3, proj_hidden: int = 4096,
                 proj_dim: int = 256, pred_hidden: int = 4096, tau: float = 0.99) -> None:
        super().__init__(dict(method=self.method, backbone=backbone, in_channels=in_channels,
                              proj_hidden=proj_hidden, proj_dim=proj_dim, pred_hidden=pred_hidden,
                              tau=tau))
        self.backbone = ResNet(backbone, in_channels)
        self.projector = MLP(self.backbone.feature_dim, [proj_hidden], proj_dim)
        self.predictor = MLP(proj_dim, [pred_hidden], proj_dim)
        self.target = MomentumTarget(self._online())
        self.tau = tau

    def forward(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        x = torch.cat([x_a, x_b], dim=0)
        p = self.predictor(self.embedding(x))
        return byol_loss(*split_views(p), *split_views(self.target(x)))

    def units(self) -> list[Unit]:
        return [*((name, At(m)) for name, m in self.backbone.units()),
                *self.projector.units("projector"), *self.predictor.units("predictor"),
                ("loss", TargetLoss(self.target))]

    @torch.no_grad()
    def after_step(self, progress: float | None = None) -> None:
        self.target.update(self._online(), momentum_schedule(self.tau, progress))
