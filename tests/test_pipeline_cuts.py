"""DHP stages without MPI: cut descriptors, and gradient transparency of the stage slicing.

Running a method's units as stages one after another, each with re-leafed inputs (as a receiver
gets them) and the gradients handed back through the cut descriptors' dense layout, must give
bit-identical parameter gradients (and loss) to the unsplit model.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from hpcsrl.models.registry import build_method
from hpcsrl.models.units import tensors_of
from hpcsrl.pipeline.compute import TorchStage
from hpcsrl.pipeline.cuts import chain_input_only, describe_cuts, slice_stage, spec_of, stage_bounds
from hpcsrl.pipeline.run import MOMENTUM_METHODS, SUPPORTED

# ResNet-34/50 take ~10 s each on 2 cores: slow, but run by `make test`.
BACKBONES = ("resnet18", pytest.param("resnet34", marks=pytest.mark.slow),
             pytest.param("resnet50", marks=pytest.mark.slow))


def _inputs(method: str, batch: int = 4, size: int = 32) -> tuple[int, torch.Tensor, torch.Tensor]:
    channels = 14 if method == "dual-simclr" else 3
    g = torch.Generator().manual_seed(1)
    x_a = torch.randn(batch, channels, size, size, generator=g)
    x_b = torch.randn(batch, channels, size, size, generator=g)
    cl = torch.channels_last
    return channels, x_a.contiguous(memory_format=cl), x_b.contiguous(memory_format=cl)


def _cuts_for(n_units: int, method: str) -> list[list[int]]:
    """A few cut sets: every boundary (ResNet-18 Lite-SRL only: 27 stages), and 2-4 stages."""
    sets = [[n_units // 2], [3, n_units - 6], [1, n_units // 3, n_units - 2, n_units - 1]]
    return [sorted(set(c)) for c in sets]


def _staged_grads(model, cuts, x_a, x_b, channels) -> tuple[float, dict[str, torch.Tensor]]:
    units = model.units()
    bounds = stage_bounds(cuts, len(units))
    specs = describe_cuts(model.config, x_a.shape[0], channels, x_a.shape[-1], cuts)
    stages = []
    for s, (a, b) in enumerate(bounds):
        part = slice_stage(model, a, b)
        opt = torch.optim.SGD(part.params or [torch.zeros(1, requires_grad=True)], lr=0.0)
        source = (lambda mb: model.chain_input(x_a, x_b)) if s == 0 else None
        stages.append(TorchStage(part, specs[s - 1] if s else None,
                                 specs[s] if s < len(bounds) - 1 else None, opt,
                                 lambda mb: 0.0, source))
    h = None
    for st in stages:
        # what a receiver holds: a fresh buffer laid out per the descriptor, filled by MPI
        if h is not None:
            bufs = [sp.empty() for sp in st.in_spec.tensors]
            for buf, t in zip(bufs, h, strict=True):
                buf.copy_(t)
            h = bufs
        h = st.forward(0, h)
    grads = None
    for st in reversed(stages):
        if grads is not None:
            bufs = [sp.empty() for sp in st.out_spec.grad_specs()]
            for buf, g in zip(bufs, grads, strict=True):
                buf.copy_(g)
            grads = bufs
        grads = st.backward(grads)
    return stages[-1].loss, {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", SUPPORTED)
def test_stages_are_gradient_transparent(method: str, backbone: str) -> None:
    channels, x_a, x_b = _inputs(method)
    torch.manual_seed(0)
    ref = build_method(method, backbone, in_channels=channels)
    ref.to(memory_format=torch.channels_last)
    n_units = len(ref.units())
    cut_sets = _cuts_for(n_units, method)
    if method == "lite-srl" and backbone == "resnet18":
        cut_sets.append(list(range(1, n_units)))
    models = [copy.deepcopy(ref) for _ in cut_sets]
    loss = ref(x_a, x_b)  # the unsplit model, as the single-process trainer calls it
    loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
    for cuts, model in zip(cut_sets, models, strict=True):
        staged_loss, got = _staged_grads(model, cuts, x_a, x_b, channels)
        assert staged_loss == loss.item(), cuts
        assert got.keys() == {n for n, g in want.items() if g is not None}, cuts
        for name, g in got.items():
            assert torch.equal(g, want[name]), f"{method}/{backbone} cuts {cuts}: {name}"


def test_cut_descriptors_mark_the_detached_target_and_keep_channels_last() -> None:
    torch.manual_seed(0)
    model = build_method("lite-srl", "resnet18", in_channels=3)
    names = [n for n, _ in model.units()]
    after_fork = names.index("stop_grad") + 1
    after_fc1 = names.index("projector.fc1") + 1
    specs = describe_cuts(model.config, 4, 3, 32, [1, after_fc1, after_fork])
    assert specs[0].tensors[0].channels_last and specs[0].tensors[0].grad
    assert specs[0].tensors[0].shape == (8, 64, 16, 16)  # both views: 2 x batch
    assert [t.grad for t in specs[1].tensors] == [True, True]  # (y, x) of the dense projector
    assert [t.grad for t in specs[2].tensors] == [True, False]  # (e, sg(e))
    assert specs[2].grad_nbytes == specs[2].nbytes // 2
    assert spec_of(torch.zeros(2, 3)).packed is False


def test_every_parameter_belongs_to_one_stage_and_momentum_methods_are_listed() -> None:
    model = build_method("simsiam", "resnet18")
    units = model.units()
    bounds = stage_bounds([5, 15], len(units))
    names = [n for a, b in bounds for n in slice_stage(model, a, b).param_names]
    assert names == [n for n, _ in model.named_parameters()]
    assert set(MOMENTUM_METHODS).isdisjoint(SUPPORTED)


@pytest.mark.parametrize("method", ["lite-srl", "dual-simclr"])
def test_a_pickled_stage_carries_only_its_own_units(method: str) -> None:
    """What rank 0 sends a stage's ranks: that stage's parameters and buffers and no other
    (the receiver never holds the whole model); the first stage's chain-input shell has none."""
    channels, x_a, x_b = _inputs(method)
    torch.manual_seed(0)
    model = build_method(method, "resnet18", in_channels=channels)
    model.to(memory_format=torch.channels_last)
    bounds = stage_bounds([6, 16], len(model.units()))
    total = sum(p.numel() for p in model.parameters())
    seen = 0
    for a, b in bounds:
        part = slice_stage(model, a, b)
        got = pickle.loads(pickle.dumps(part))
        held = {id(p): p for _, u in got.units for p in u.parameters()}
        assert sorted(map(id, got.params)) == sorted(held)  # the slice's lists share the units'
        assert sum(p.numel() for p in held.values()) == sum(p.numel() for p in part.params)
        for p, q in zip(part.params, got.params, strict=True):
            assert torch.equal(p, q) and p.stride() == q.stride() and q.requires_grad
        seen += sum(p.numel() for p in got.params)
    assert seen == total
    shell = chain_input_only(model)
    assert len(pickle.dumps(shell)) < 10_000 and not list(shell.parameters())
    want, got_in = model.chain_input(x_a, x_b), shell.chain_input(x_a, x_b)
    for w, g in zip(tensors_of(want), tensors_of(got_in), strict=True):
        assert torch.equal(w, g)
