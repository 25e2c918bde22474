"""The method's functions against hand values and an independent (numpy) formula."""

import math

import numpy as np
import pytest
import torch

from pcltool.pcl import (PCLLossWeights, ema_decay, ema_update, kd_loss, mean_bn_momentum, pcl_loss,
                        peer_disagreement, ramp_up)


@pytest.mark.parametrize("epoch, expected", [
    (0, math.exp(-5)),                 # start: e^-5 = 0.006738
    (40, math.exp(-5 * 0.25)),         # half way: e^-1.25 = 0.286505
    (20, math.exp(-5 * 0.75 ** 2)),    # a quarter: e^-2.8125
    (79.5, math.exp(-5 * (0.5 / 80) ** 2)),
    (80, 1.0),
    (300, 1.0),                        # stays 1 after L
])
def test_ramp_up_hand_values(epoch, expected):
    assert ramp_up(epoch, 80) == pytest.approx(expected, rel=1e-12)


def test_ramp_up_is_not_switched_off_mid_ramp():
    # a public reproduction divided by the wrong constant and got ~0 for epochs 3-80; ours must rise steadily
    values = [ramp_up(e, 80) for e in range(0, 81)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert ramp_up(3, 80) > 0.008 and ramp_up(60, 80) > 0.7
    assert ramp_up(5, 0) == 1.0


def test_ema_decay_schedule():
    assert ema_decay(0, 0.999) == 0.0            # the first update copies
    assert ema_decay(1, 0.999) == 0.5
    assert ema_decay(9, 0.999) == pytest.approx(0.9)
    assert ema_decay(10_000, 0.999) == 0.999      # capped
    with pytest.raises(ValueError):
        ema_decay(-1, 0.999)


def test_ema_update_formula_and_first_step_copy():
    mean = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    live = [torch.tensor([3.0, -2.0]), torch.tensor([[10.0]])]
    ema_update(mean, live, 0.9)  # θ' = 0.9 θ' + 0.1 θ
    torch.testing.assert_close(mean[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2]))
    torch.testing.assert_close(mean[1], torch.tensor([[1.0]]))
    ema_update(mean, live, ema_decay(0, 0.999))  # step 0: copy
    torch.testing.assert_close(mean[0], live[0])


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kd(s, t, T):
    p_t = np.exp(_np_log_softmax(t / T))
    return T * T * np.mean(np.sum(p_t * (_np_log_softmax(t / T) - _np_log_softmax(s / T)), -1))


def _np_ce(z, y):
    return -np.mean(_np_log_softmax(z)[np.arange(len(y)), y])


def test_mean_bn_momentum_gives_the_horizon_of_k_updates():
    assert mean_bn_momentum(0.1, 1) == pytest.approx(0.1)
    assert mean_bn_momentum(0.1, 3) == pytest.approx(0.271)  # 1 - 0.9^3
    # one update with the raised momentum leaves what k updates with the original one leave of the old value
    old, new = torch.tensor(5.0), torch.tensor(1.0)
    k_times = old.clone()
    for _ in range(4):
        k_times = (1 - 0.1) * k_times + 0.1 * new
    once = (1 - mean_bn_momentum(0.1, 4)) * old + mean_bn_momentum(0.1, 4) * new
    assert once.item() == pytest.approx(k_times.item(), rel=1e-6)
    with pytest.raises(ValueError):
        mean_bn_momentum(0.1, 0)


def test_kd_loss_hand_value():
    # two classes, T = 1: KL([0.5, 0.5] || softmax([0, ln 3]) = [0.25, 0.75]) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    s = torch.tensor([[0.0, math.log(3.0)]])
    t = torch.tensor([[0.0, 0.0]])
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    # T² scaling
    assert kd_loss(s, t, 2.0).item() == pytest.approx(_np_kd(s.numpy().astype(np.float64), t.numpy().astype(np.float64), 2.0), rel=1e-5)
    assert _np_kd(s.numpy(), t.numpy(), 1.0) == pytest.approx(expected, rel=1e-5)


def test_kd_loss_teacher_gets_no_gradient():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    kd_loss(s, t, 3.0).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pcl_loss_matches_independent_formula(reduction):
    g = torch.Generator().manual_seed(0)
    m, n, k, T, lam = 3, 6, 5, 3.0, 0.37
    peers = torch.randn(m, n, k, generator=g)
    ens = torch.randn(n, k, generator=g)
    means = torch.randn(m, n, k, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    parts = pcl_loss(peers, ens, means, y, lam, PCLLossWeights(temperature=T, mean_kd_reduction=reduction))
    P, E, M, Y = peers.numpy().astype(np.float64), ens.numpy().astype(np.float64), means.numpy().astype(np.float64), y.numpy()
    ce_peers = sum(_np_ce(P[j], Y) for j in range(m))
    kd_e = sum(_np_kd(P[j], E, T) for j in range(m))
    scale = 1 / (m - 1) if reduction == "mean" else 1.0
    kd_m = scale * sum(_np_kd(P[j], M[q], T) for j in range(m) for q in range(m) if q != j)
    total = _np_ce(E, Y) + ce_peers + lam * kd_e + lam * kd_m
    assert parts["ce_peers"].item() == pytest.approx(ce_peers, rel=1e-5)
    assert parts["ce_ensemble"].item() == pytest.approx(_np_ce(E, Y), rel=1e-5)
    assert parts["kd_ensemble"].item() == pytest.approx(kd_e, rel=1e-5)
    assert parts["kd_mean"].item() == pytest.approx(kd_m, rel=1e-5)
    assert parts["total"].item() == pytest.approx(total, rel=1e-5)


def test_pcl_loss_switches_and_gradients():
    g = torch.Generator().manual_seed(1)
    peers = torch.randn(2, 4, 3, generator=g, requires_grad=True)
    ens = torch.randn(4, 3, generator=g, requires_grad=True)
    means = torch.randn(2, 4, 3, generator=g)
    y = torch.tensor([0, 1, 2, 0])
    off = pcl_loss(peers, ens, means, y, 1.0, PCLLossWeights(kd_ensemble=False, kd_mean=False))
    assert off["kd_ensemble"].item() == 0 and off["kd_mean"].item() == 0
    assert off["total"].item() == pytest.approx((off["ce_peers"] + off["ce_ensemble"]).item())
    # lambda does not scale the ensemble term when rampup_ensemble is off
    a = pcl_loss(peers, ens, means, y, 0.0, PCLLossWeights(rampup_ensemble=False))
    assert a["total"].item() == pytest.approx((a["ce_peers"] + a["ce_ensemble"] + a["kd_ensemble"]).item(), rel=1e-6)
    # the ensemble head learns only from its own CE: the KD terms send it no gradient
    kd_only = pcl_loss(peers, ens, means, y, 1.0, PCLLossWeights(ce_weight=0, ensemble_ce_weight=0))
    kd_only["total"].backward()
    assert ens.grad is None or ens.grad.abs().max() == 0
    assert peers.grad.abs().max() > 0


def test_baseline_loss_is_plain_cross_entropy():
    z = torch.randn(1, 8, 4)
    y = torch.randint(0, 4, (8,))
    parts = pcl_loss(z, None, None, y, 1.0)
    torch.testing.assert_close(parts["total"], torch.nn.functional.cross_entropy(z[0], y))


def test_peer_disagreement():
    a = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [0, 1]]])  # preds 0,0,1,1
    b = torch.tensor([[[1.0, 0], [0, 1], [0, 1], [1, 0]]])  # preds 0,1,1,0
    assert peer_disagreement(torch.cat([a, a])).item() == 0.0
    assert peer_disagreement(torch.cat([a, b])).item() == pytest.approx(0.5)
