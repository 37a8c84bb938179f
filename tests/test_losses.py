"""Losses against direct evaluations of their formulas, and the stop-gradient property."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpcsrl.losses import byol_loss, lite_srl_loss, moco_infonce, negative_cosine, nt_xent
from hpcsrl.losses.cosine import simsiam_loss


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _eq2(p_a, p_b, e_a, e_b):
    """Eq. 2 of the Lite-SRL paper, per sample with explicit l2 norms, averaged over the batch."""
    total = 0.0
    for i in range(len(p_a)):
        pa, pb, ea, eb = (v[i].numpy() for v in (p_a, p_b, e_a, e_b))
        total += (-0.5 * pa @ eb / (np.sqrt(pa @ pa) * np.sqrt(eb @ eb))
                  - 0.5 * pb @ ea / (np.sqrt(pb @ pb) * np.sqrt(ea @ ea)))
    return total / len(p_a)


def test_lite_srl_loss_equals_eq2():
    p_a, p_b, e_a, e_b = (_rand(5, 7, seed=s) for s in range(4))
    assert lite_srl_loss(p_a, p_b, e_a, e_b).item() == pytest.approx(_eq2(p_a, p_b, e_a, e_b),
                                                                     abs=1e-12)
    assert simsiam_loss is lite_srl_loss


def test_negative_cosine_bounds():
    z = _rand(4, 6)
    assert negative_cosine(z, z).item() == pytest.approx(-1.0)
    assert negative_cosine(z, -3 * z).item() == pytest.approx(1.0)


def test_no_gradient_through_stop_gradient_branch():
    e = _rand(8, 6, seed=1).requires_grad_()
    w = _rand(6, 6, seed=2).requires_grad_()
    p = e @ w  # a stand-in predictor
    loss = lite_srl_loss(p[:4], p[4:], e[:4], e[4:])
    (g_e,) = torch.autograd.grad(loss, e, retain_graph=True)
    # the same gradient when the targets are explicit constants: the sg branch contributes nothing
    const = e.detach().clone()
    loss_c = lite_srl_loss(p[:4], p[4:], const[:4], const[4:])
    (g_c,) = torch.autograd.grad(loss_c, e)
    assert torch.equal(g_e, g_c)
    # and with the predictions frozen, the loss does not depend on e at all
    loss_t = lite_srl_loss(p.detach()[:4], p.detach()[4:], e[:4], e[4:])
    assert not loss_t.requires_grad


def _nt_xent_naive(z_a, z_b, t):
    z = torch.nn.functional.normalize(torch.cat([z_a, z_b]), dim=1)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / den)
    return total / n2


def test_nt_xent_matches_naive():
    z_a, z_b = _rand(5, 8, seed=3), _rand(5, 8, seed=4)
    assert nt_xent(z_a, z_b, 0.3).item() == pytest.approx(_nt_xent_naive(z_a, z_b, 0.3), rel=1e-9)


def test_moco_infonce_matches_naive():
    q, k = _rand(4, 6, seed=5), _rand(4, 6, seed=6)
    queue = torch.nn.functional.normalize(_rand(10, 6, seed=7), dim=1)
    qn, kn = (torch.nn.functional.normalize(v, dim=1) for v in (q, k))
    t = 0.2
    expect = np.mean([-math.log(math.exp(float(qn[i] @ kn[i]) / t) / (
        math.exp(float(qn[i] @ kn[i]) / t) + sum(math.exp(float(qn[i] @ c) / t) for c in queue)))
        for i in range(4)])
    assert moco_infonce(q, k, queue, t).item() == pytest.approx(expect, rel=1e-9)


def test_byol_loss_is_two_minus_two_cos():
    p_a, p_b, t_a, t_b = (_rand(3, 5, seed=s) for s in range(10, 14))
    cos = torch.nn.functional.cosine_similarity
    expect = 0.5 * ((2 - 2 * cos(p_a, t_b)).mean() + (2 - 2 * cos(p_b, t_a)).mean())
    assert byol_loss(p_a, p_b, t_a, t_b).item() == pytest.approx(expect.item(), abs=1e-12)
    assert byol_loss(p_a, p_b, p_b, p_a).item() == pytest.approx(0.0, abs=1e-12)
