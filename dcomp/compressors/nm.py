"""N:M semi-structured masks (NVIDIA ASP style): in every group of M consecutive weights along
the input dimension, at most N are kept (the N largest |w|).

A Linear weight (out, in) is grouped along ``in``; a Conv weight (out, in, kh, kw) along the
flattened ``in*kh*kw`` of each output filter. The input size must be a multiple of M.
"""

from __future__ import annotations

import torch

from dcomp.config.prune import parse_nm  # noqa: F401 - re-exported


def nm_applicable(weight: torch.Tensor, m: int) -> str | None:
    """None if ``weight`` can take an N:M pattern, else why not."""
    if weight.dim() < 2:
        return "not a matrix"
    k = weight[0].numel()
    if k % m:
        return f"input size {k} is not a multiple of {m}"
    return None


@torch.no_grad()
def nm_mask(weight: torch.Tensor, n: int, m: int, current: torch.Tensor | None = None) -> torch.Tensor:
    """True where kept: the ``n`` largest |w| of every group of ``m``.
    Weights already pruned in ``current`` stay pruned (a group may then keep fewer than n)."""
    why = nm_applicable(weight, m)
    if why:
        raise ValueError(why)
    score = weight.detach().abs().float()
    if current is not None:
        score = torch.where(current, score, torch.full_like(score, -1.0))
    groups = score.reshape(-1, m)
    idx = torch.topk(groups, n, dim=1, sorted=False).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, idx, True)
    keep = keep.reshape(weight.shape)
    if current is not None:
        keep &= current
    return keep


def nm_holds(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of m consecutive weights (along the input dimension) has at most n non-zeros."""
    nz = (weight.reshape(-1, m) != 0).sum(1)
    return bool((nz <= n).all())
