"""BatchNorm with batch statistics over all ranks, on CPU.

Horovod's own `hvd.SyncBatchNorm` refuses CPU tensors (its kernels are CUDA-only), so this one is
written with differentiable sums: the forward allreduces per-channel sums, the backward of that
allreduce is again an allreduce, and autograd derives the rest. Each rank's gradients are then
those of the sum of all ranks' losses through its own activations, which the distributed
optimiser's average turns into the gradient of the mean loss, as with `torch.nn.SyncBatchNorm`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from hpcsrl.precision import LOW

Allreduce = Callable[[Tensor], Tensor]


class _SumOverRanks(torch.autograd.Function):
    """y = sum over ranks of x; dy/dx: the sum over ranks of the upstream gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, reduce: Allreduce) -> Tensor:  # type: ignore[override]
        ctx.reduce = reduce
        return reduce(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.reduce(grad.contiguous()), None


class SyncBatchNorm(_BatchNorm):
    """Drop-in for BatchNorm1d/2d/3d whose training-mode statistics cover every rank's batch.

    Eval mode, or a single rank, is plain BatchNorm. Same parameters and buffers (names, shapes)
    as the layer it replaces, so checkpoints do not depend on it.
    """

    def __init__(self, num_features: int, reduce: Allreduce, ranks: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.reduce, self.ranks = reduce, ranks

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training or self.ranks == 1:
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias,
                self.training or not self.track_running_stats,
                self._average_factor(), self.eps)
        if x.dtype in LOW:
            x = x.float()  # under autocast: statistics summed (and allreduced) in fp32
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local_n = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
        total = _SumOverRanks.apply(torch.cat([x.sum(dims), local_n]), self.reduce)
        n = total[-1].detach()
        mean = total[:-1] / n
        centred = x - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims), self.reduce) / n
        if self.track_running_stats and self.running_mean is not None:
            factor = self._average_factor()
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * n / max(float(n) - 1.0, 1.0)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def _average_factor(self) -> float:
        """BatchNorm's running-average weight (momentum None: a cumulative average)."""
        if not (self.training and self.track_running_stats):
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum


def convert_sync_bn(module: nn.Module, reduce: Allreduce, ranks: int) -> nn.Module:
    """Replace every BatchNorm layer below `module` (in place) by a `SyncBatchNorm` holding the
    same parameter and buffer objects (an optimiser built before still updates them)."""
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, SyncBatchNorm):
            sync = SyncBatchNorm(child.num_features, reduce, ranks, child.eps, child.momentum,
                                 child.affine, child.track_running_stats)
            if child.affine:
                sync.weight, sync.bias = child.weight, child.bias
            if child.track_running_stats:
                sync.running_mean, sync.running_var = child.running_mean, child.running_var
                sync.num_batches_tracked = child.num_batches_tracked
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_bn(child, reduce, ranks)
    return module
