"""Exact magnitude masks, shared by one-shot pruning and the training-time schedules.

"Exact" means: asked for sparsity s on n weights, exactly round(s * n) weights are pruned,
ties at the threshold broken by position. Thresholds come from ``kthvalue`` (no
``torch.quantile``, which refuses inputs over 16M elements), and memory stays at about one
extra copy of the weights, so a 50M-parameter layer is fine.
"""

from __future__ import annotations

import torch


def prune_count(n: int, sparsity: float) -> int:
    return min(n, max(0, int(round(sparsity * n))))


def _threshold_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """True where kept: the ``score.numel() - k`` largest scores (ties broken by position)."""
    flat = score.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    if k >= n:
        return torch.zeros_like(score, dtype=torch.bool)
    t = torch.kthvalue(flat, k).values
    keep = flat > t
    missing = (n - k) - int(keep.sum())
    if missing > 0:  # weights equal to the threshold: keep the first `missing` of them
        ties = torch.nonzero(flat == t).squeeze(1)[:missing]
        keep[ties] = True
    return keep.reshape(score.shape)


@torch.no_grad()
def magnitude_mask(weight: torch.Tensor, sparsity: float, current: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the largest |w|; prune exactly round(sparsity * numel) of them.

    With ``current`` (an existing mask), already-pruned weights rank lowest, so raising the
    sparsity only ever adds to the pruned set.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    score = weight.detach().abs().float()
    if current is not None:
        score = torch.where(current, score, torch.full_like(score, -1.0))
    return _threshold_mask(score, prune_count(weight.numel(), sparsity))


@torch.no_grad()
def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all given weights: exactly round(sparsity * total) pruned overall."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    names = list(weights)
    flat = torch.cat([weights[n].detach().abs().float().reshape(-1) for n in names])
    keep = _threshold_mask(flat, prune_count(flat.numel(), sparsity))
    out, offset = {}, 0
    for n in names:
        size = weights[n].numel()
        out[n] = keep[offset:offset + size].reshape(weights[n].shape)
        offset += size
    return out


def sparsity_of(mask: torch.Tensor) -> float:
    return 1.0 - float(mask.sum()) / max(mask.numel(), 1)
