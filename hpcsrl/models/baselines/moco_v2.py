"""MoCo-v2: query encoder + MLP head, momentum key encoder, a queue of past keys as negatives.

head 512 -> 512 (ReLU) -> 128 (MoCo-v2's MLP, hidden = feature width), temperature 0.2, key
momentum 0.99, queue 4096 keys (buffers, not parameters). Symmetrised: both views are queries and
keys. With ResNet-18 on 3 bands: 23,009,664 parameters (query + key encoder). The paper's 22.48 M
equals 2 x (ResNet-18 + one 512 -> 128 linear layer), i.e. MoCo-v1's linear head; the MLP head of v2
adds 2 x 262,656.

Units: encoder layers act on position 0 of `(x, x_key)`; the last unit holds the key encoder and
the queue, runs the keys under no_grad and remembers them; `after_step` does the momentum update
and enqueues them (so the forward pass itself never changes state).

Data parallel, each rank computes the keys of its own shard only; like MoCo under DDP, the queue
enqueues the keys of every rank (`KeyQueue.gather`, set by `hpcsrl.parallel.horovod`), so all
replicas hold the same negatives, as one process on the global batch would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcsrl.losses.cosine import split_views
from hpcsrl.losses.infonce import moco_infonce
from hpcsrl.models.base import MomentumMethod, MomentumTarget
from hpcsrl.models.chain import At
from hpcsrl.models.heads import MLP
from hpcsrl.models.resnet import ResNet
from hpcsrl.models.units import Unit


class KeyQueue(nn.Module):
    """A ring buffer of normalised keys (K, d), stored in checkpoints.

    `pending` collects the keys of every forward pass since the last step (all micro-batches of
    an accumulated step, at most K rows); `gather`, when set, turns a rank's keys into the
    concatenation of every rank's (an allgather), so every replica enqueues the same rows.
    Any K works with any batch: the ring wraps, and more than K new keys keep the last K.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.pending: Tensor | None = None
        self.gather: Callable[[Tensor], Tensor] | None = None

    def remember(self, k: Tensor) -> None:
        """Keep keys `k` for the next `push` (after earlier ones of the same step)."""
        k = k.detach()
        if self.pending is not None:
            k = torch.cat([self.pending, k])
        self.pending = k[-self.keys.shape[0]:]

    @torch.no_grad()
    def push(self, k: Tensor) -> None:
        size = self.keys.shape[0]
        if self.gather is not None:
            k = self.gather(k.detach().contiguous())
        k = F.normalize(k.detach(), dim=1)[-size:]
        idx = (int(self.ptr) + torch.arange(k.shape[0])) % size
        self.keys[idx] = k
        self.ptr.fill_((int(self.ptr) + k.shape[0]) % size)


class MoCoLoss(nn.Module):
    """Last unit: (q, x) -> symmetric InfoNCE of q against key(x) (views swapped) and the queue."""

    def __init__(self, key: MomentumTarget, queue: KeyQueue, temperature: float) -> None:
        super().__init__()
        self.key, self.queue, self.temperature = key, queue, temperature

    def forward(self, h: tuple[Tensor, Tensor]) -> Tensor:
        q, x = h
        k = self.key(x)
        self.queue.remember(k)
        (q_a, q_b), (k_a, k_b) = split_views(q), split_views(k)
        t, keys = self.temperature, self.queue.keys
        return 0.5 * (moco_infonce(q_a, k_b, keys, t) + moco_infonce(q_b, k_a, keys, t))


class MoCoV2(MomentumMethod):
    method = "moco-v2"

    def __init__(self, backbone: str = "resnet18", in_channels: int = 3, proj_hidden: int = 512,
                 proj_dim: int = 128, queue_size: int = 4096, temperature: float = 0.2,
                 tau: float = 0.99) -> None:
        super().__init__(dict(method=self.method, backbone=backbone, in_channels=in_channels,
                              proj_hidden=proj_hidden, proj_dim=proj_dim, queue_size=queue_size,
                              temperature=temperature, tau=tau))
        self.backbone = ResNet(backbone, in_channels)
        self.projector = MLP(self.backbone.feature_dim, [proj_hidden], proj_dim, bn=False)
        self.key = MomentumTarget(self._online())
        self.queue = KeyQueue(queue_size, proj_dim)
        self.loss_unit = MoCoLoss(self.key, self.queue, temperature)
        self.tau = tau

    def forward(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        x = torch.cat([x_a, x_b], dim=0)
        return self.loss_unit((self.embedding(x), x))

    def units(self) -> list[Unit]:
        return [*((name, At(m)) for name, m in self.backbone.units()),
                *self.projector.units("projector"), ("loss", self.loss_unit)]

    @torch.no_grad()
    def after_step(self, progress: float | None = None) -> None:
        self.key.update(self._online(), self.tau)
        if self.queue.pending is not None:
            self.queue.push(self.queue.pending)
            self.queue.pending = None
