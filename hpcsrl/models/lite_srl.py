"""Lite-SRL (Sec. 3.2): a SimSiam-like siamese network with light heads, run in sequential form.

Structure (defaults; ResNet-18 on 3 bands):

    backbone    ResNet-18 without classifier, 512-d features            11,176,512 parameters
    projector   dense FC-BN(-ReLU) MLP: 512 -> 512, [f,a] 1024 -> 512,   1,577,472
                [f,a,b] 1536 -> 512 (two concatenation layers)
    predictor   bottleneck 512 -> 128 (BN, ReLU) -> 512, no BN/ReLU out   131,968
    total                                                               12,885,952 (paper 12.82 M)

Why these sizes: the paper says the projector's FC layers each carry BN + ReLU and that it has two
concatenation layers, and that the predictor is a bottleneck with a plain output; its total of
12.82 M leaves about 1.64 M parameters for both heads on top of ResNet-18 (11.18 M). A 512-wide
dense projector (1.58 M) plus a predictor with SimSiam's 4x bottleneck ratio (512 -> 128 -> 512,
0.13 M) lands 0.07 M above the paper (which does not give the widths).

Deviation from the paper (default): the projector's last layer is FC-BN without ReLU, as in
SimSiam. With the paper's ReLU the embedding is non-negative (see `DenseProjector`);
`proj_out_relu=True` restores the paper-literal head (same parameters, one more unit).

Partitionable units (28 by default, as many cut points as the paper's p1..p28 of Fig. 13a):

    1 backbone.conv1   2 backbone.bn1_relu   3 backbone.maxpool   4-11 backbone.layer{1-4}_{0,1}
    12 backbone.avgpool
    13 projector.fc1  14 .bn1  15 .relu1  16 .cat1  17 .fc2  18 .bn2  19 .relu2  20 .cat2
    21 projector.fc3  22 .bn3  (+ .relu3 with proj_out_relu=True)
    23 stop_grad: e -> (e, sg(e)), the detached copy the loss compares against
    24 predictor.fc1  25 .bn1  26 .relu1  27 .fc2
    28 loss

Sequential form (Fig. 3a): `chain_input` concatenates views a and b into one batch of 2N, the
encoder runs once, the embedding e = [e_a; e_b] is kept as a detached copy, the predictor maps e to
p = [p_a; p_b], and both loss terms 1/2 N(p_a, sg(e_b)) + 1/2 N(p_b, sg(e_a)) are computed at once.
In training mode BatchNorm sees both views together; with BN in eval mode this equals two separate
passes exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from hpcsrl.losses.cosine import lite_srl_loss, split_views
from hpcsrl.models.base import SSLMethod
from hpcsrl.models.chain import Fork
from hpcsrl.models.heads import MLP, DenseProjector
from hpcsrl.models.resnet import ResNet
from hpcsrl.models.units import Unit

PairLossFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class PairLoss(nn.Module):
    """Loss unit of the sequential form: (p, sg(e)) for both views stacked -> scalar loss."""

    def __init__(self, fn: PairLossFn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, h: tuple[Tensor, Tensor]) -> Tensor:
        p, e = h
        return self.fn(*split_views(p), *split_views(e))


class StopGradSiamese(SSLMethod):
    """Encoder (backbone + projector) shared by both views, predictor, stop-gradient pair loss."""

    loss_fn: PairLossFn = staticmethod(lite_srl_loss)

    def __init__(self, config: dict[str, Any], backbone: ResNet, projector: nn.Module,
                 predictor: MLP) -> None:
        super().__init__(config)
        self.backbone, self.projector, self.predictor = backbone, projector, predictor
        self.loss_unit = PairLoss(self.loss_fn)

    def forward(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        e = self.embedding(torch.cat([x_a, x_b], dim=0))
        p = self.predictor(e)
        (p_a, p_b), (e_a, e_b) = split_views(p), split_views(e)
        return self.loss_fn(p_a, p_b, e_a, e_b)

    def units(self) -> list[Unit]:
        """Backbone, projector, `stop_grad` (e -> (e, sg(e)), Fig. 3a), predictor, loss."""
        return [*self.backbone.units(), *self.projector.units("projector"),
                ("stop_grad", Fork(nn.Identity())), *self.predictor.units("predictor"),
                ("loss", self.loss_unit)]


class LiteSRL(StopGradSiamese):
    """Lite-SRL: backbone + dense projector (the encoder E), bottleneck predictor P, Eq. 5 loss."""

    method = "lite-srl"

    def __init__(self, backbone: str = "resnet18", in_channels: int = 3, proj_dim: int = 512,
                 proj_layers: int = 3, pred_hidden: int = 128, proj_out_relu: bool = False
                 ) -> None:
        net = ResNet(backbone, in_channels)
        super().__init__(
            dict(method=self.method, backbone=backbone, in_channels=in_channels,
                 proj_dim=proj_dim, proj_layers=proj_layers, pred_hidden=pred_hidden,
                 proj_out_relu=bool(proj_out_relu)),
            net, DenseProjector(net.feature_dim, proj_dim, proj_layers, bool(proj_out_relu)),
            MLP(proj_dim, [pred_hidden], proj_dim))
