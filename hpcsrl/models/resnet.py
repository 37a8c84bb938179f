"""ResNet-18/34/50 backbones (no classifier) for any number of input bands, as a flat unit list.

The backbone is an `nn.Sequential` whose children are its partitionable units, in order:

    conv1          7x7/2 convolution (in_channels -> 64); 3x3/1 (small) or 3x3/2 (mid stem)
    bn1_relu       batch norm + ReLU (one unit: the ReLU is in place on the BN output)
    maxpool        3x3/2 max pooling (absent with the small and mid stems)
    layer1_0 ...   one unit per residual block (a block is a parallel zone: never cut inside)
    avgpool        global average pooling + flatten -> (N, feature_dim)

ResNet-18 and -34 use BasicBlocks (2 + 2 + 2 + 2 and 3 + 4 + 6 + 3 blocks, feature_dim 512),
ResNet-50 Bottlenecks (3 + 4 + 6 + 3, feature_dim 2048). So ResNet-18 has 3 + 8 + 1 = 12 units,
ResNet-34 20 and ResNet-50 20. With the Lite-SRL heads (see `lite_srl.py`) ResNet-18 gives the
paper's 28 partitionable layers. Parameters (3 bands): ResNet-18 11,176,512; ResNet-34
21,284,672; ResNet-50 23,508,032 (torchvision's counts minus the 1000-class classifier).

Stems: `imagenet` reduces the input 32-fold, so a 64-px EuroSAT chip ends as 2 x 2 cells; `small`
(a 3x3 stride-1 convolution and no max-pool, as self-supervised libraries use for 32-64 px
images) reduces it 8-fold (8 x 8 cells) at about 16x the compute per image, one unit fewer;
`mid` (a 3x3 stride-2 convolution, no max-pool) sits between: 16-fold (4 x 4 cells) at about 4x
the ImageNet stem's compute, for budgets where the small stem trains too few epochs.
Width: the channels of the first stage (64, doubling per stage: feature_dim 8 x width for
ResNet-18/34). `--width 32` costs about a third per image on this CPU (one core, small stem,
32-px views, bf16: 137 vs 44 img/s), so a fixed budget trains three times the epochs.
The method classes take only the depth name, so the registry builds a method inside
`backbone_shape(stem, width)` and records a non-default stem or width in the model config.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from hpcsrl.errors import UserError
from hpcsrl.models.units import Unit

# depth name -> (block type, blocks per stage)
ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
BACKBONES: tuple[str, ...] = tuple(ARCHS)
STEMS: tuple[str, ...] = ("imagenet", "small", "mid")
DEFAULT_STEM = "imagenet"
DEFAULT_WIDTH = 64
_STEM: ContextVar[str] = ContextVar("resnet_stem", default=DEFAULT_STEM)
_WIDTH: ContextVar[int] = ContextVar("resnet_width", default=DEFAULT_WIDTH)


def check_stem(stem: str) -> str:
    if stem not in STEMS:
        raise UserError(f"unknown stem {stem!r}: choose one of {', '.join(STEMS)}")
    return stem


def check_width(width: int) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or not 4 <= width <= 256:
        raise UserError(f"ResNet width must be an integer from 4 to 256 (got {width!r}): the "
                        "channels of the first stage, 64 in the standard ResNet")
    return width


@contextmanager
def backbone_shape(stem: str = DEFAULT_STEM, width: int = DEFAULT_WIDTH) -> Iterator[None]:
    """ResNets built inside this block (without explicit arguments) get `stem` and `width`."""
    tokens = _STEM.set(check_stem(stem)), _WIDTH.set(check_width(width))
    try:
        yield
    finally:
        _STEM.reset(tokens[0])
        _WIDTH.reset(tokens[1])


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """1x1 projection when the block changes shape; identity (None) otherwise."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, width, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3x3(width, width), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4, residual connection (ResNet-50)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class GlobalPool(nn.Module):
    """Global average pooling + flatten: (N, C, H, W) -> (N, C)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class ResNet(nn.Sequential):
    """A ResNet trunk whose children are exactly its partitionable units (see module docstring).

    Maps (N, in_channels, H, W) -> (N, feature_dim); any H, W >= 32 works (>= 8 with the small
    stem, >= 16 with the mid stem). `stem`/`width` None: those set by `backbone_shape` (default
    imagenet, 64).
    """

    def __init__(self, depth: str = "resnet18", in_channels: int = 3,
                 stem: str | None = None, width: int | None = None) -> None:
        stem = check_stem(stem or _STEM.get())
        width = check_width(_WIDTH.get() if width is None else width)
        if depth not in ARCHS:
            raise UserError(f"unknown backbone {depth!r}: choose one of {', '.join(BACKBONES)}")
        if in_channels < 1:
            raise UserError(f"a backbone needs at least one input band (got {in_channels})")
        kind, counts = ARCHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if stem in ("small", "mid"):
            layers["conv1"] = nn.Conv2d(in_channels, width, 3, stride=1 if stem == "small" else 2,
                                        padding=1, bias=False)
        else:
            layers["conv1"] = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        layers["bn1_relu"] = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        if stem == "imagenet":
            layers["maxpool"] = nn.MaxPool2d(3, stride=2, padding=1)
        cin = width
        for stage, n_blocks in enumerate(counts, start=1):
            stage_width = width * 2 ** (stage - 1)
            for i in range(n_blocks):
                stride = 2 if (i == 0 and stage > 1) else 1
                layers[f"layer{stage}_{i}"] = block(cin, stage_width, stride)
                cin = stage_width * block.expansion
        layers["avgpool"] = GlobalPool()
        super().__init__(layers)
        self.depth, self.in_channels, self.feature_dim = depth, in_channels, cin
        self.stem, self.width = stem, width
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def units(self, prefix: str = "backbone") -> list[Unit]:
        """The children as (name, module) units, names prefixed (e.g. 'backbone.layer1_0')."""
        return [(f"{prefix}.{name}", module) for name, module in self.named_children()]
