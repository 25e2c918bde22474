"""The PCL method as pure functions (Wu & Gong, AAAI 2021; see docs in ../shared/docs/PCL.md).

Nothing here knows about recipes, files or devices: tensors in, tensors out, so each formula can be checked
against hand values or another implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def ramp_up(epoch: float, length: float) -> float:
    """Sigmoid-shaped ramp-up weight of the distillation terms.

        λ(e) = exp(−5 · (1 − min(e, L)/L)²)

    ``epoch`` may be fractional (epoch + step/steps_per_epoch). λ(0) = e⁻⁵ ≈ 0.0067, λ(L) = 1, and it stays 1
    after L. ``length`` L = 0 means no ramp-up (λ = 1 throughout).
    """
    if length <= 0:
        return 1.0
    progress = min(max(epoch, 0.0), length) / length
    return math.exp(-5.0 * (1.0 - progress) ** 2)


def ema_decay(step: int, max_decay: float) -> float:
    """Decay α of the temporal mean at optimiser step ``step`` (counted from 0).

        α = min(1 − 1/(step + 1), max_decay)

    α = 0 at step 0, so the first update copies the live network; α then grows towards ``max_decay``.
    """
    if step < 0:
        raise ValueError("step counts from 0")
    return min(1.0 - 1.0 / (step + 1), max_decay)


@torch.no_grad()
def ema_update(mean_tensors: list[torch.Tensor], live_tensors: list[torch.Tensor], decay: float) -> None:
    """Temporal-mean update, in place and with foreach kernels (one launch for all tensors):

        θ' ← α θ' + (1 − α) θ        (α = ``decay``)

    written as ``θ' ← θ' + (1 − α)(θ − θ')`` = ``lerp(θ', θ, 1 − α)``. Floating-point tensors only;
    integer buffers (BatchNorm's ``num_batches_tracked``) are copied by the caller.
    """
    if len(mean_tensors) != len(live_tensors):
        raise ValueError("mean and live networks differ in structure")
    if mean_tensors:
        torch._foreach_lerp_(mean_tensors, live_tensors, 1.0 - decay)


def mean_bn_momentum(momentum: float, updates_per_step: int) -> float:
    """BatchNorm momentum that gives running statistics updated once per step the horizon they have when updated
    ``updates_per_step`` = k times per step with momentum μ:

        μ' = 1 − (1 − μ)^k

    The reproduction calls the trunk once per view, so every trunk BatchNorm layer takes k = m updates per step
    while each peer's layers take one (peer j runs on view j only). With batched views pcltool calls the trunk
    once per step on all m views together, so its trunk layers get μ' with k = m and the peers' layers keep μ
    (:func:`bn_updates_per_step`).
    """
    if updates_per_step < 1:
        raise ValueError("updates_per_step must be >= 1")
    return 1.0 - (1.0 - momentum) ** updates_per_step


def bn_updates_per_step(in_trunk: bool, num_peers: int) -> int:
    """Running-statistics updates a BatchNorm layer of the multi-branch network takes per training step in the
    reproduction: m for a trunk layer (the trunk runs once per view), 1 for a peer's layer (peer j sees view j)."""
    return num_peers if in_trunk else 1


def ensemble_head_lr_scale(num_peers: int) -> float:
    """Learning-rate multiplier of the ensemble head ``z_e = W_e [f_1; …; f_m]``.

    An SGD step on a linear layer moves its logits by −η·‖f‖²·(p − y) (per sample), so the head over the m
    concatenated features, ‖[f_1; …; f_m]‖² = Σ_j ‖f_j‖² ≈ m·‖f‖², moves m times faster than a peer's
    classifier at the same η. At the CIFAR recipes' η = 0.1 from step 0 that overshoots: the head's loss
    explodes within ten steps and its gradient, which flows into every peer's features, leaves all peers at
    chance (BENCHMARKS.md, "early stall"). Scaling the head's learning rate by

        η_e / η = 1 / m

    gives its logits the step size of one peer's classifier; the network and the loss stay the paper's.
    """
    if num_peers < 1:
        raise ValueError("num_peers must be >= 1")
    return 1.0 / num_peers


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled distillation, averaged over the batch (Hinton et al. 2015):

        KD_T(s, t) = T² · KL( softmax(t/T) ‖ softmax(s/T) )

    The teacher is detached: no gradient flows into it.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * (t * t)


@dataclass(frozen=True)
class PCLLossWeights:
    """Which terms are on and how they are weighted (defaults: the paper's loss)."""

    temperature: float = 3.0
    ce_weight: float = 1.0
    ensemble_ce_weight: float = 1.0
    kd_ensemble: bool = True
    kd_mean: bool = True
    kd_ensemble_weight: float = 1.0
    kd_mean_weight: float = 1.0
    mean_kd_reduction: str = "mean"  # "mean": 1/(m−1) Σ_{k≠j};  "sum": Σ_{k≠j}
    rampup_ensemble: bool = True


def pcl_loss(
    peer_logits: torch.Tensor,
    ensemble_logits: torch.Tensor | None,
    mean_logits: torch.Tensor | None,
    targets: torch.Tensor,
    rampup_weight: float,
    weights: PCLLossWeights = PCLLossWeights(),
) -> dict[str, torch.Tensor]:
    """The PCL objective and its parts for one batch.

    Shapes: ``peer_logits`` (m, N, K) — peer j on its own view x_j; ``ensemble_logits`` (N, K) — the ensemble
    head on the concatenated peer features; ``mean_logits`` (m, N, K) — mean teacher k on view x_k; ``targets`` (N,).

        L = CE(z_e, y)
          + Σ_j [ CE(z_j, y)
                  + λ · KD_T(z_j, z_e)                              (ensemble teacher → peer j; z_e detached)
                  + λ · 1/(m−1) · Σ_{k≠j} KD_T(z_j, z'_k) ]         (other peers' mean teachers → peer j)

    λ = ``rampup_weight``. Returns ``ce_peers``, ``ce_ensemble``, ``kd_ensemble``, ``kd_mean`` (each already summed
    over peers, unweighted and without λ) and ``total`` (weighted, with λ). With m = 1 and no ensemble (the plain
    baseline) only ``CE(z_1, y)`` remains.
    """
    m = peer_logits.shape[0]
    zero = peer_logits.new_zeros((), dtype=torch.float32)
    t = weights.temperature

    ce_peers = sum((F.cross_entropy(peer_logits[j].float(), targets) for j in range(m)), zero)
    ce_ensemble = F.cross_entropy(ensemble_logits.float(), targets) if ensemble_logits is not None else zero

    kd_ensemble = zero
    if weights.kd_ensemble and ensemble_logits is not None:
        kd_ensemble = sum((kd_loss(peer_logits[j], ensemble_logits, t) for j in range(m)), zero)

    kd_mean = zero
    if weights.kd_mean and mean_logits is not None and m > 1:
        scale = 1.0 / (m - 1) if weights.mean_kd_reduction == "mean" else 1.0
        kd_mean = scale * sum(
            (kd_loss(peer_logits[j], mean_logits[k], t) for j in range(m) for k in range(m) if k != j), zero
        )

    ensemble_lambda = rampup_weight if weights.rampup_ensemble else 1.0
    total = (
        weights.ce_weight * ce_peers
        + weights.ensemble_ce_weight * ce_ensemble
        + ensemble_lambda * weights.kd_ensemble_weight * kd_ensemble
        + rampup_weight * weights.kd_mean_weight * kd_mean
    )
    return {
        "total": total,
        "ce_peers": ce_peers,
        "ce_ensemble": ce_ensemble,
        "kd_ensemble": kd_ensemble,
        "kd_mean": kd_mean,
    }


def peer_disagreement(peer_logits: torch.Tensor) -> torch.Tensor:
    """Mean over peer pairs (j < k) of the fraction of samples whose top-1 predictions differ. (m, N, K) -> scalar.

    Near 0 means the peers have collapsed onto one another (a known PCL failure mode)."""
    m = peer_logits.shape[0]
    if m < 2:
        return peer_logits.new_zeros(())
    preds = peer_logits.argmax(-1)
    pairs = [(preds[j] != preds[k]).float().mean() for j in range(m) for k in range(j + 1, m)]
    return torch.stack(pairs).mean()
