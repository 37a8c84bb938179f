"""Dual-SimCLR: one backbone per modality; the Sentinel-2 and Sentinel-1 halves of a co-located
sample are the positive pair, other locations in the batch the negatives (NT-Xent). No
augmentation is needed.

Input: the s1s2 tensor (N, 14, H, W), channels 0-11 = S2 (data_super order), 12-13 = S1 (VV, VH);
`model(x)` or `model(x, anything)` (the second argument is ignored, so the trainer's two-view call
works unchanged). Each modality has a ResNet and a projector 512 -> 2048 (BN, ReLU) -> 128.
`encoder` concatenates both backbones' features (feature_dim 1024 for ResNet-18).

Units: the S2 backbone and projector act on position 0 of `(x_s2, x_s1)`, then the S1 ones on
position 1 (the two branches run one after the other, so the chain stays cuttable), then the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hpcsrl.errors import UserError
from hpcsrl.models.base import SSLMethod
from hpcsrl.models.baselines.simclr import NTXentLoss
from hpcsrl.models.chain import At
from hpcsrl.models.heads import MLP
from hpcsrl.models.resnet import ResNet
from hpcsrl.models.units import Unit

S2_CHANNELS = 12


class DualEncoder(nn.Module):
    """Evaluation encoder: [S2 backbone(x[:, :12]), S1 backbone(x[:, 12:])] features."""

    def __init__(self, s2: ResNet, s1: ResNet, split: int) -> None:
        super().__init__()
        self.s2, self.s1, self.split = s2, s1, split
        self.feature_dim = s2.feature_dim + s1.feature_dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.s2(x[:, :self.split]), self.s1(x[:, self.split:])], dim=1)


class DualSimCLR(SSLMethod):
    method = "dual-simclr"

    def __init__(self, backbone: str = "resnet18", in_channels: int = 14,
                 s2_channels: int = S2_CHANNELS, proj_hidden: int = 2048, proj_dim: int = 128,
                 temperature: float = 0.2) -> None:
        if not 0 < s2_channels < in_channels:
            raise UserError(f"dual-simclr needs the s1s2 band set (S2 then S1 channels, 14 in "
                            f"all); got {in_channels} channels: use --bands s1s2")
        super().__init__(dict(method=self.method, backbone=backbone, in_channels=in_channels,
                              s2_channels=s2_channels, proj_hidden=proj_hidden, proj_dim=proj_dim,
                              temperature=temperature))
        self.s2_backbone = ResNet(backbone, s2_channels)
        self.s1_backbone = ResNet(backbone, in_channels - s2_channels)
        self.s2_projector = MLP(self.s2_backbone.feature_dim, [proj_hidden], proj_dim)
        self.s1_projector = MLP(self.s1_backbone.feature_dim, [proj_hidden], proj_dim)
        self.loss_unit = NTXentLoss(temperature)
        self.split = s2_channels

    @property
    def encoder(self) -> nn.Module:
        return DualEncoder(self.s2_backbone, self.s1_backbone, self.split)

    def embedding(self, x: Tensor) -> Tensor:
        return torch.cat([self.s2_projector(self.s2_backbone(x[:, :self.split])),
                          self.s1_projector(self.s1_backbone(x[:, self.split:]))], dim=1)

    def forward(self, x_a: Tensor, x_b: Tensor | None = None) -> Tensor:
        z2 = self.s2_projector(self.s2_backbone(x_a[:, :self.split]))
        z1 = self.s1_projector(self.s1_backbone(x_a[:, self.split:]))
        return self.loss_unit((z2, z1))

    def chain_input(self, x_a: Tensor, x_b: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x_a[:, :self.split], x_a[:, self.split:]

    def units(self) -> list[Unit]:
        return [*((f"s2.{n}", At(m, 0)) for n, m in self.s2_backbone.units()),
                *self.s2_projector.units("s2.projector", index=0),
                *((f"s1.{n}", At(m, 1)) for n, m in self.s1_backbone.units()),
                *self.s1_projector.units("s1.projector", index=1),
                ("loss", self.loss_unit)]
