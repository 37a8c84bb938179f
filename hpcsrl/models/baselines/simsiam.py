"""SimSiam: Lite-SRL's training graph with SimSiam's wide heads.

projector 512 -> 2048 -> 2048 -> 2048 (BN after every layer, ReLU except the last),
predictor 2048 -> 512 -> 2048. With ResNet-18 on 3 bands: 22,732,864 parameters (paper 22.73 M).
"""

from __future__ import annotations

from hpcsrl.losses.cosine import simsiam_loss
from hpcsrl.models.heads import MLP
from hpcsrl.models.lite_srl import StopGradSiamese
from hpcsrl.models.resnet import ResNet


class SimSiam(StopGradSiamese):
    method = "simsiam"
    loss_fn = staticmethod(simsiam_loss)

    def __init__(self, backbone: str = "resnet18", in_channels: int = 3, proj_dim: int = 2048,
                 proj_hidden: int = 2048, pred_hidden: int = 512) -> None:
        net = ResNet(backbone, in_channels)
        super().__init__(
            dict(method=self.method, backbone=backbone, in_channels=in_channels,
                 proj_dim=proj_dim, proj_hidden=proj_hidden, pred_hidden=pred_hidden),
            net, MLP(net.feature_dim, [proj_hidden, proj_hidden], proj_dim, out_bn=True),
            MLP(proj_dim, [pred_hidden], proj_dim))
