"""Structured pruning that physically shrinks a model: the dependency graph.

Removing an output channel of a layer is only correct when everything that reads it shrinks with
it. This package finds those dependencies by tracing the model with ``torch.fx`` and running every
op on *label tensors* (``labels.py``, ``trace.py``): one rule per kind of op (``rules.py``) says what
the op ties together. The result (``groups.py``) is a list of **groups**: producers (conv and linear
outputs, attention heads) whose units must be removed together, with every tensor slice that
belongs to each unit. Concatenation, split/chunk, depthwise and grouped convolutions, channel
shuffles, squeeze-and-excitation gates, LayerNorm/GroupNorm/BatchNorm, flatten/view/permute and
attention heads are followed; what is not followed is named (``DependencyGraph.unfollowed``) and
the channels that reach it are kept whole, while the rest of the model is still pruned.

    graph = analyse(model, input_shape)
    scores = importance.unit_scores(model, graph, "l1")
    removed, notes = choose(graph, scores, {i: 0.5 for i, g in enumerate(graph.groups) if not g.blocked})
    small, resized = shrink(model, graph, removed)

``resized`` is plain data for the checkpoint (``arch["resized"]``): what the shapes alone do not
say (heads of an attention module, a hidden size a forward uses as a literal); ``resize.conform``
applies it when the model is rebuilt.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from dcomp.compressors.graph.groups import DependencyGraph, Group, check_split_counts
from dcomp.compressors.graph.importance import IMPORTANCE, taylor_gradients, top_units, unit_scores
from dcomp.errors import DcompError

__all__ = ["DependencyGraph", "Group", "IMPORTANCE", "analyse", "choose", "shrink", "remove_units",
           "shrink_checkpoint", "check_shrinkable", "recalibrate_batchnorm", "unit_scores", "top_units",
           "taylor_gradients", "trace_dependencies"]


def analyse(model: nn.Module, input_shape, exclude: list[str] | None = None) -> DependencyGraph:
    """Trace ``model`` on an input of ``input_shape`` (no batch dim) and return its groups. Modules whose
    name matches an ``exclude`` regex are not traced into: what reaches them is kept whole."""
    from dcomp.compressors.graph import groups, trace

    return groups.build(trace.run(model, input_shape, leaves=exclude))


trace_dependencies = analyse


def choose(graph: DependencyGraph, scores: torch.Tensor, ratios: dict[int, float], global_rank: bool = False):
    """Which units to remove: each group ``i`` in ``ratios`` loses that fraction of its units, lowest
    ``scores`` first (with ``global_rank``: one ranking over all those groups, scores normalised by each
    group's mean, removing the mean ratio overall). A group always keeps at least one unit, and equal
    splits (grouped convs, chunk) keep as many units in every part.
    Returns (removed class mask, {group index: note}) where notes say what was adjusted."""
    removed = torch.zeros(graph.n_classes, dtype=torch.bool)
    notes: dict[int, str] = {}
    keep_n: dict[int, int] = {}
    if global_rank and ratios:
        parts, owners = [], []
        for gi in ratios:
            s = scores[graph.groups[gi].units]
            parts.append(s / (s.mean() + 1e-12))
            owners.append(torch.full((s.numel(),), gi, dtype=torch.long))
        flat, own = torch.cat(parts), torch.cat(owners)
        ratio = sum(ratios.values()) / len(ratios)
        n_remove = round(ratio * flat.numel())
        order = torch.sort(flat, stable=True).indices[:n_remove]
        gone = torch.bincount(own[order], minlength=max(ratios) + 1)
        for gi in ratios:
            keep_n[gi] = graph.groups[gi].channels - int(gone[gi])
    else:
        for gi, r in ratios.items():
            n = graph.groups[gi].channels
            keep_n[gi] = n - int(round(n * float(r)))
    for gi, k in keep_n.items():
        g = graph.groups[gi]
        n = g.channels
        if k < 1:
            k = 1
            notes[gi] = "keeps 1 unit (the ratio would leave none)"
        if k >= n:
            continue
        s = scores[g.units]
        if g.bins:
            keep_idx = _split_keep(g, s, k)
            if keep_idx is None:
                notes[gi] = "kept whole: no width near the asked one keeps its equal splits (grouped conv / chunk) equal"
                continue
            if keep_idx.numel() != k:
                notes[gi] = f"keeps {keep_idx.numel()} of {n} units (nearest width that keeps its equal splits equal)"
        else:
            keep_idx = top_units(s, k)
        mask = torch.ones(n, dtype=torch.bool)
        mask[keep_idx] = False
        removed[g.units[mask]] = True
    why = check_split_counts(graph, removed)
    if why:
        for gi in list(keep_n):
            g = graph.groups[gi]
            trial = removed.clone()
            trial[g.units] = False
            if check_split_counts(graph, trial) is None or any(
                    bool(torch.isin(cls, g.units).any()) for cls, _, _ in g.splits):
                if g.splits:
                    removed[g.units] = False
                    notes[gi] = f"kept whole: {why}"
        if check_split_counts(graph, removed):
            raise DcompError(f"cannot keep equal splits: {why}")
    return removed, notes


def _split_keep(g: Group, s: torch.Tensor, k: int) -> torch.Tensor | None:
    """Indices (into g.units) to keep, about ``k`` of them, such that every equal split of the group keeps
    equal parts: each bin keeps the same fraction f, trying every f a bin can express."""
    sizes = [b.numel() for b in g.bins]
    pos = [torch.nonzero(torch.isin(g.units, b)).squeeze(1) for b in g.bins]
    pinned = [bool(getattr(b, "pinned", False)) for b in g.bins]
    fracs = sorted({j / n for n, pin in zip(sizes, pinned) if not pin for j in range(1, n + 1)})
    best = None
    for f in fracs:
        kept = torch.cat([p if pin else p[top_units(s[p], max(1, int(math.floor(n * f + 0.5))))]
                          for p, n, pin in zip(pos, sizes, pinned)])
        gone = torch.ones(g.channels, dtype=torch.bool)
        gone[kept] = False
        removed = {int(u) for u in g.units[gone]}
        ok = True
        for cls, parts, _ in g.splits:
            per = cls.numel() // parts
            counts = {sum(1 for c in cls[p * per:(p + 1) * per].tolist() if c not in removed) for p in range(parts)}
            if len(counts) > 1:
                ok = False
                break
        if ok and (best is None or abs(kept.numel() - k) < abs(best.numel() - k)
                   or (abs(kept.numel() - k) == abs(best.numel() - k) and kept.numel() > best.numel())):
            best = kept
    return None if best is None else torch.sort(best).values


def shrink(model: nn.Module, graph: DependencyGraph, removed: torch.Tensor) -> tuple[nn.Module, dict]:
    """A smaller copy of ``model`` without the ``removed`` units, and the plain-data ``resized`` record."""
    new = copy.deepcopy(model)
    resized = graph.apply(new, removed)
    return new, resized


def _check_runs(new: nn.Module, old: nn.Module, input_shape) -> None:
    param = next(old.parameters(), None)
    x = torch.zeros(1, *[int(s) for s in input_shape], dtype=param.dtype if param is not None else torch.float32)
    modes = new.training, old.training
    new.eval(), old.eval()
    try:
        with torch.no_grad():
            a, b = new(x), old(x)
    except Exception as e:  # noqa: BLE001
        raise DcompError(f"the shrunk model does not run ({(str(e).splitlines() or [''])[0]}); "
                         f"this model has a dependency structured pruning missed, please report it") from None
    finally:
        new.train(modes[0]), old.train(modes[1])
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
        raise DcompError(f"the shrunk model's output shape {list(a.shape)} differs from {list(b.shape)}; refusing")


def remove_units(model: nn.Module, keep: dict[str, torch.Tensor], input_shape) -> nn.Module:
    """A new, smaller model: each producer named in ``keep`` keeps only the output units listed (indices
    into its output channels); everything tied to them shrinks consistently. Layers tied to each other
    (outputs added) must be given the same units, or only one of them."""
    graph = analyse(model, input_shape)
    removed = graph.removed_mask(keep)
    new, _ = shrink(model, graph, removed)
    _check_runs(new, model, input_shape)
    return new


def check_shrinkable(ckpt) -> None:
    from dcomp.models.arch import REBUILDABLE_KINDS

    kind = ckpt.arch.get("kind")
    if kind not in REBUILDABLE_KINDS:
        raise DcompError(f"structured pruning changes layer shapes, so the checkpoint must rebuild from a zoo or "
                         f"package.module:factory architecture; this one is {kind}: save a state_dict and pass --arch, "
                         f"or use an unstructured method")
    if ckpt.quant:
        raise DcompError("this checkpoint is already quantized; prune before quantizing")


def shrink_checkpoint(ckpt, keep: dict[str, torch.Tensor] | None = None, model: nn.Module | None = None,
                      graph: DependencyGraph | None = None, trust_pickle: bool = False,
                      removed: torch.Tensor | None = None):
    """A new checkpoint without the units (``keep`` per producer, or a ``removed`` class mask); masks are
    cut the same way, and ``arch["resized"]`` records what the shapes do not say."""
    check_shrinkable(ckpt)
    model = model if model is not None else ckpt.build_model(trust_pickle=trust_pickle)
    graph = graph if graph is not None else analyse(model, ckpt.input_shape)
    if removed is None:
        removed = graph.removed_mask(keep or {})
    new_model, resized = shrink(model, graph, removed)
    _check_runs(new_model, model, ckpt.input_shape)
    out = ckpt.copy()
    out.update_from_model(new_model)
    if resized:
        arch = dict(out.arch)
        merged = {k: dict(v) for k, v in (arch.get("resized") or {}).items()}
        for k, v in resized.items():
            merged.setdefault(k, {}).update(v)
        arch["resized"] = merged
        out.arch = arch
    masks = {}
    for pname, m in ckpt.masks.items():
        owner, _, attr = pname.rpartition(".")
        masks[pname] = graph.cut_tensor(owner, attr, m, removed).clone()
    out.masks = masks
    return out, new_model


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> bool:
    """Recompute BatchNorm running statistics of ``model`` on inputs ``x`` (no weights change).

    After units are removed, the remaining units see different inputs, so the stored running
    means/variances no longer fit; re-estimating them is cheap and recovers most of the accuracy
    before any retraining. Returns False (and does nothing) when the model has no BatchNorm.
    Only BatchNorm layers are put in training mode (dropout and the rest stay in eval mode).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return False
    was_training = model.training
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.eval()
    for m in bns:
        m.train()
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            if len(xb) > 1:
                model(xb)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)
    return True


_ = math
