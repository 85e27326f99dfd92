"""Importance of every unit (class), as separate callables.

Each returns a float64 vector indexed by class id (``DependencyGraph.n_classes``); a group's
scores are ``scores[group.units]``. A unit's score sums over every tensor slice that belongs to it:

* ``l1``      L1 norm of the output slices (a conv filter: Li et al.; a head: its q/k/v rows)
* ``l2``      L2 norm of the output slices (a neuron's weight row)
* ``channel`` L1 norm of the input slices its consumers read
* ``bn``      |gamma| of the normalisation layers that follow it (network slimming, Liu et al.);
              units with no norm layer fall back to ``l1``
* ``taylor``  first-order Taylor |sum w * dL/dw| over all its slices (Molchanov et al.), from
              gradients on training data (``taylor_gradients``); needs --data
"""

from __future__ import annotations

import torch
from torch import nn

from dcomp.compressors.graph.groups import DependencyGraph

IMPORTANCE = ("l1", "l2", "channel", "bn", "taylor")
_ROLES = {"l1": ("out",), "l2": ("out",), "channel": ("in", "grouped_in"), "bn": ("norm",),
          "taylor": ("out", "in", "grouped_in", "norm", "follow", "param")}


def _per_position(t: torch.Tensor, slot) -> torch.Tensor:
    if slot.role == "grouped_in":
        g = slot.groups
        return t.reshape(g, t.shape[0] // g, t.shape[1], -1).sum(dim=(1, 3)).reshape(-1)
    return t.movedim(slot.dim, 0).reshape(t.shape[slot.dim], -1).sum(1)


@torch.no_grad()
def unit_scores(model: nn.Module, graph: DependencyGraph, method: str = "l1",
                grads: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    if method not in IMPORTANCE:
        raise ValueError(f"unknown importance {method!r}: one of {', '.join(IMPORTANCE)}")
    if method == "taylor" and grads is None:
        raise ValueError("taylor importance needs gradients (taylor_gradients, i.e. --data)")
    score = torch.zeros(graph.n_classes, dtype=torch.float64)
    seen = torch.zeros(graph.n_classes, dtype=torch.bool)
    for s in graph.slots:
        if s.role not in _ROLES[method]:
            continue
        mod = model.get_submodule(s.owner) if s.owner else model
        t = getattr(mod, s.attr, None)
        if t is None:
            continue
        t = t.detach().double()
        if method == "taylor":
            g = grads.get(f"{s.owner}.{s.attr}" if s.owner else s.attr)
            if g is None:
                continue
            t = (t * g.double()).abs()
        elif method == "l2":
            t = t * t
        else:
            t = t.abs()
        per = _per_position(t, s)
        ok = s.labels >= 0
        score.index_add_(0, s.labels[ok], per[ok])
        seen[s.labels[ok]] = True
    if method == "l2":
        score = score.sqrt()
    if method in ("bn", "channel") and not bool(seen.all()):
        fallback = unit_scores(model, graph, "l1")
        score = torch.where(seen, score, fallback)
    return score


def taylor_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Summed gradients of the cross-entropy loss on (x, y), by parameter name (model left unchanged)."""
    was = model.training
    model.eval()
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    try:
        for i in range(0, len(x), batch_size):
            model.zero_grad(set_to_none=True)
            out = model(x[i:i + batch_size])
            loss = nn.functional.cross_entropy(out, y[i:i + batch_size], reduction="sum")
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n] += p.grad.detach()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return acc


def top_units(score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Sorted indices of the ``n_keep`` highest scores (ties: lower index first)."""
    n_keep = max(1, min(int(n_keep), score.numel()))
    order = torch.sort(score, descending=True, stable=True).indices
    return torch.sort(order[:n_keep]).values
