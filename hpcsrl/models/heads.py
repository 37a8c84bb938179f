"""Projection and prediction heads, each usable as one module or as a list of per-layer units.

Every head layer (Linear, BatchNorm, ReLU, concatenation) is its own unit so the CWB planner can
cut between any two. Sizes are set by each method; for Lite-SRL they are chosen in `lite_srl.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hpcsrl.models.chain import At, Concat, Keep
from hpcsrl.models.units import Unit


class MLP(nn.Module):
    """Linear layers with BN + ReLU between them; `out_bn` / `out_relu` decide the last layer.

    `bn=False` gives the plain Linear-ReLU-Linear heads of SimCLR-style projectors without BN.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, out_bn: bool = False,
                 out_relu: bool = False, bn: bool = True) -> None:
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.names: list[str] = []
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            last = i == len(dims) - 2
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            self.names.append(f"fc{i + 1}")
            if (bn and not last) or (last and out_bn):
                layers.append(nn.BatchNorm1d(dims[i + 1]))
                self.names.append(f"bn{i + 1}")
            if not last or out_relu:
                layers.append(nn.ReLU())
                self.names.append(f"relu{i + 1}")
        self.layers = nn.ModuleList(layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def units(self, prefix: str, index: int = 0) -> list[Unit]:
        """Per-layer units acting on chain position `index` (the rest passes through)."""
        return [(f"{prefix}.{name}", At(layer, index))
                for name, layer in zip(self.names, self.layers, strict=True)]


class DenseProjector(nn.Module):
    """Projection MLP whose FC-BN-ReLU layers each see the concatenation of all earlier features.

    With 3 layers there are two concatenation layers: [f, a] feeds the second FC and [f, a, b]
    the third (a, b = outputs of layers 1 and 2). Reusing the backbone features this way lets
    narrow layers (`dim`, 512 by default) replace SimSiam's 2048-wide projector, which holds most
    of SimSiam's extra parameters. Every FC is followed by BN; every hidden FC also by ReLU.

    `out_relu` decides the last layer. The paper puts BN + ReLU after every FC, which makes the
    embedding non-negative: all embeddings crowd into one orthant and about half of each
    dimension's spread is cut off (on EuroSAT after 96 steps the embedding std was 0.019 with the
    ReLU, 0.029 without; 1/sqrt(512) = 0.044 is a fully spread embedding). SimSiam ends its
    projector with BN and no ReLU; `out_relu=False` does the same (same parameter count).
    """

    def __init__(self, in_dim: int, dim: int = 512, n_layers: int = 3,
                 out_relu: bool = True) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError("a projector needs at least one layer")
        widths = [in_dim + i * dim for i in range(n_layers)]  # input width of layer i
        self.fcs = nn.ModuleList(nn.Linear(w, dim) for w in widths)
        self.bns = nn.ModuleList(nn.BatchNorm1d(dim) for _ in widths)
        self.relu = nn.ReLU()
        self.out_relu = out_relu
        self.in_dim, self.out_dim = in_dim, dim

    def forward(self, x: Tensor) -> Tensor:
        h = x
        last = len(self.fcs) - 1
        for i, (fc, bn) in enumerate(zip(self.fcs, self.bns, strict=True)):
            y = bn(fc(h))
            if i < last or self.out_relu:
                y = self.relu(y)
            h = torch.cat([h, y], dim=1) if i < last else y
        return h

    def units(self, prefix: str = "projector") -> list[Unit]:
        """fc (keeping its input), bn, relu, cat per layer; the last layer has no cat (and no
        relu unless `out_relu`)."""
        units: list[Unit] = []
        last = len(self.fcs) - 1
        for i, (fc, bn) in enumerate(zip(self.fcs, self.bns, strict=True)):
            k = i + 1
            units.append((f"{prefix}.fc{k}", At(fc) if i == last else Keep(fc)))
            units.append((f"{prefix}.bn{k}", At(bn)))
            if i < last or self.out_relu:
                units.append((f"{prefix}.relu{k}", At(self.relu)))
            if i < last:
                units.append((f"{prefix}.cat{k}", Concat()))
        return units
