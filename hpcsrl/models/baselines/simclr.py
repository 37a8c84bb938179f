"""SimCLR: shared encoder, projector 512 -> 2048 (BN, ReLU) -> 512, NT-Xent over the 2N views.

With ResNet-18 on 3 bands: 13,280,320 parameters (paper 13.57 M, 2 % more; its head sizes are
not stated and no common SimCLR head lands on 13.57 M exactly).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hpcsrl.losses.cosine import split_views
from hpcsrl.losses.ntxent import nt_xent
from hpcsrl.models.base import SSLMethod
from hpcsrl.models.heads import MLP
from hpcsrl.models.resnet import ResNet
from hpcsrl.models.units import Unit


class NTXentLoss(nn.Module):
    """Loss unit: rows of view a and view b (stacked, or as a pair) -> NT-Xent."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, h: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        z_a, z_b = h if isinstance(h, tuple) else split_views(h)
        return nt_xent(z_a, z_b, self.temperature)


class SimCLR(SSLMethod):
    method = "simclr"

    def __init__(self, backbone: str = "resnet18", in_channels: int = 3, proj_hidden: int = 2048,
                 proj_dim: int = 512, temperature: float = 0.2) -> None:
        super().__init__(dict(method=self.method, backbone=backbone, in_channels=in_channels,
                              proj_hidden=proj_hidden, proj_dim=proj_dim, temperature=temperature))
        self.backbone = ResNet(backbone, in_channels)
        self.projector = MLP(self.backbone.feature_dim, [proj_hidden], proj_dim)
        self.loss_unit = NTXentLoss(temperature)

    def forward(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        z = self.embedding(torch.cat([x_a, x_b], dim=0))  # both views in one batch, as the chain
        return nt_xent(*split_views(z), self.loss_unit.temperature)

    def units(self) -> list[Unit]:
        return [*self.backbone.units(), *self.projector.units("projector"),
                ("loss", self.loss_unit)]
