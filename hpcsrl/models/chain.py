"""Unit wrappers that thread extra tensors (stop-gradient copies, raw inputs, skip features) along a
unit chain, so heads with concatenations or carried targets stay a flat, cuttable sequence.

Between units `h` is a Tensor or a tuple `(main, *extras)`. Most units only touch one position;
these wrappers say which, and pass everything else through unchanged (so it crosses cuts as-is).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def pack(items: list[Any]) -> Any:
    """A one-element chain value is a bare tensor; longer ones are tuples."""
    return items[0] if len(items) == 1 else tuple(items)


def unpack(h: Any) -> list[Any]:
    return list(h) if isinstance(h, (tuple, list)) else [h]


class At(nn.Module):
    """Apply `module` to position `index` of the chain value; the rest passes through."""

    def __init__(self, module: nn.Module, index: int = 0) -> None:
        super().__init__()
        self.module, self.index = module, index

    def forward(self, h: Any) -> Any:
        items = unpack(h)
        items[self.index] = self.module(items[self.index])
        return pack(items)


class Keep(nn.Module):
    """`main -> (module(main), main, ...)`: keeps a layer's input for a later `Concat`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, h: Any) -> Any:
        items = unpack(h)
        return pack([self.module(items[0]), *items])


class Concat(nn.Module):
    """`(y, x, ...) -> (cat[x, y], ...)`: joins a kept input with the layer output (dense link)."""

    def forward(self, h: Any) -> Any:
        y, x, *rest = unpack(h)
        return pack([torch.cat([x, y], dim=1), *rest])


class Fork(nn.Module):
    """`main -> (module(main), main.detach(), ...)`: keeps a stop-gradient copy of `main`.

    Used where the embedding e leaves the encoder: the copy is the constant target sg(e) of the
    loss, so no gradient ever flows back through it (Eq. 4-5 of the Lite-SRL paper).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, h: Any) -> Any:
        items = unpack(h)
        main = items[0]
        return pack([self.module(main), main.detach(), *items[1:]])

