"""The paper's method is the default: each loss switch, the reduction over mean teachers, the ramp-up of the
ensemble term, and view k -> peer k -> mean teacher k with augmentation on. A changed default or a mixed-up view
fails here directly, not through an accuracy threshold."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import pcltool.trainer as trainer_module
from pcltool.config import PCLConfig, load_recipe
from pcltool.data import load_dataset
from pcltool.pcl import PCLLossWeights, pcl_loss
from pcltool.trainer import PCLTrainer, loss_weights
from tests.conftest import QUICKSTART, ROOT

PAPER = {  # Wu & Gong, AAAI 2021, and the public reproduction's defaults
    "enabled": True, "peers": 3, "temperature": 3.0, "rampup_epochs": 80, "ema_decay": 0.999,
    "ce_weight": 1.0, "ensemble_ce_weight": 1.0, "kd_ensemble": True, "kd_mean": True,
    "kd_ensemble_weight": 1.0, "kd_mean_weight": 1.0, "mean_kd_reduction": "mean", "rampup_ensemble": True,
}


def test_the_method_section_defaults_are_the_papers():
    defaults = PCLConfig().model_dump()
    assert {k: defaults[k] for k in PAPER} == PAPER
    # pcltool's own choices, stated as such (README "The method"): the ensemble head's step and BN statistics
    assert defaults["ensemble_head_lr"] == "1/m" and defaults["mean_bn_stats"] == "own"


@pytest.mark.parametrize("name", ["cifar10.toml", "cifar100.toml"])
def test_the_shipped_cifar_recipes_train_the_papers_loss(name):
    path = ROOT / "recipes" / name
    if not path.exists():
        pytest.skip(f"no {name}")
    pcl = load_recipe(path).pcl.model_dump()
    assert {k: pcl[k] for k in PAPER if k not in ("rampup_epochs",)} == \
        {k: v for k, v in PAPER.items() if k not in ("rampup_epochs",)}
    assert loss_weights(load_recipe(path)) == PCLLossWeights()


def _kd(s, t, temperature=3.0):
    return F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean") \
        * temperature ** 2


def test_default_loss_averages_the_other_mean_teachers_and_ramps_the_ensemble_term():
    """L = CE(z_e) + Σ_j [CE(z_j) + λ KD(z_j, z_e) + λ/(m−1) Σ_{k≠j} KD(z_j, z'_k)], written out by hand."""
    g = torch.Generator().manual_seed(0)
    m, n, k = 3, 5, 4
    peers, ens, means = torch.randn(m, n, k, generator=g), torch.randn(n, k, generator=g), torch.randn(m, n, k, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    lam = 0.37
    by_hand = F.cross_entropy(ens, y) + sum(
        F.cross_entropy(peers[j], y) + lam * _kd(peers[j], ens)
        + lam / (m - 1) * sum(_kd(peers[j], means[i]) for i in range(m) if i != j) for j in range(m))
    weights = loss_weights(load_recipe(ROOT / "recipes" / "cifar10.toml"))
    got = pcl_loss(peers, ens, means, y, lam, weights)["total"]
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-6)
    summed = pcl_loss(peers, ens, means, y, lam, PCLLossWeights(mean_kd_reduction="sum"))["total"]
    assert abs(float(summed - got)) > 0.01  # the reduction is visible in the total
    unramped = pcl_loss(peers, ens, means, y, lam, PCLLossWeights(rampup_ensemble=False))["total"]
    assert abs(float(unramped - got)) > 0.01


def test_view_k_goes_to_peer_k_and_to_mean_teacher_k_with_augmentation_on(tiny_recipe, monkeypatch):
    """Before the first step the mean network equals the live one, so mean teacher k on view k must give exactly
    peer k's logits on view k; any other pairing of views gives clearly different logits."""
    recipe = tiny_recipe.model_copy(update={"train": tiny_recipe.train.model_copy(update={"precision": "fp32"})})
    assert recipe.data.augment != "none"
    data = load_dataset(recipe.data)
    trainer = PCLTrainer(recipe, data, torch.device("cpu"))
    seen = {}
    real = trainer_module.pcl_loss

    def spy(peer_logits, ensemble_logits, mean_logits, *args, **kwargs):
        seen.setdefault("peer", peer_logits.detach().clone())
        seen.setdefault("mean", mean_logits.detach().clone())
        return real(peer_logits, ensemble_logits, mean_logits, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "pcl_loss", spy)
    images, labels = next(trainer.epoch_batches())
    views = trainer._views(images)
    assert all(not torch.equal(views[a], views[b]) for a, b in itertools.combinations(range(3), 2))
    trainer._forward_loss(views, labels, torch.zeros(()))
    peer, mean = seen["peer"], seen["mean"]
    m = peer.shape[0]
    for k in range(m):
        torch.testing.assert_close(mean[k], peer[k], rtol=1e-4, atol=1e-4)
        for j in range(m):
            if j != k:
                assert (mean[k] - peer[j]).abs().max() > 1e-2, f"mean teacher {k + 1} looks like it saw view {j + 1}"


def test_the_quickstart_recipe_also_trains_the_papers_loss():
    assert loss_weights(load_recipe(QUICKSTART)) == PCLLossWeights()
