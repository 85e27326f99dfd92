"""Groups: the units that must be removed together, and how removing them changes each tensor.

``build(trace)`` turns the labels of a traced model into classes (``labels.LabelSpace.components``),
evaluates the deferred checks (literal sizes, fixed offsets, equal splits), derives how parameters
used directly in the forward (layer scales, position embeddings, class tokens) are sliced, and
collects the **groups**: producers (conv/linear outputs, attention heads) whose units are tied.
``DependencyGraph.apply`` removes a set of classes from a model in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dcomp.compressors.graph.labels import WILD
from dcomp.compressors.graph.trace import Attention, Check, Slot, Trace
from dcomp.errors import DcompError

_NO_ATTRS = {"stride", "padding", "dilation", "kernel_size", "groups", "training", "inplace", "dim", "eps"}


@dataclass
class Group:
    """Producers whose output units are tied; ``units`` are class ids, in the first producer's order."""

    name: str
    producers: list[str]
    units: torch.Tensor
    blocked: str | None = None
    what: str = "conv"                      # "conv", "linear", "heads" or "mixed"
    bins: list[torch.Tensor] | None = None  # equal-split constraint: each bin keeps as many units
    splits: list[tuple[torch.Tensor, int, str]] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return int(self.units.numel())


@dataclass
class DependencyGraph:
    groups: list[Group]
    group_of: dict[str, int]               # producer name -> index into groups
    slots: list[Slot]                       # with .labels replaced by class ids
    attention: dict[str, Attention]
    attr_fixes: list[tuple[str, str, torch.Tensor]]   # (module, attribute, class per position)
    unfollowed: list[tuple[str, str, str]]
    n_classes: int
    units_of: dict[str, torch.Tensor]      # producer -> class id of each of its output units

    def group(self, layer: str) -> Group:
        return self.groups[self.group_of[layer]]

    # ---- removing --------------------------------------------------------------------------------

    def removed_mask(self, keep: dict[str, torch.Tensor]) -> torch.Tensor:
        """Classes removed when each group named in ``keep`` (by any producer) keeps the unit indices given
        (indices into the group's units, which are the producer's output channels)."""
        removed = torch.zeros(self.n_classes, dtype=torch.bool)
        seen: dict[int, tuple[str, torch.Tensor]] = {}
        for name, idx in keep.items():
            if name not in self.group_of:
                known = {s.owner for s in self.slots}
                raise DcompError(f"layer '{name}' has no units that can be removed (it is not a conv, Linear or "
                                 f"attention layer, or it is not on the traced path)" if name in known
                                 else f"the model has no prunable layer '{name}' (no layer '{name}' produces units)")
            gi = self.group_of[name]
            g = self.groups[gi]
            idx = torch.unique(torch.as_tensor(idx, dtype=torch.long).reshape(-1))
            units = self.units_of.get(name, g.units)
            if idx.numel() == 0:
                raise DcompError(f"keeping no units of '{name}' would cut the network; keep at least one")
            if int(idx[0]) < 0 or int(idx[-1]) >= units.numel():
                raise DcompError(f"units to keep of '{name}' must lie in [0, {units.numel()}), got {int(idx[0])}..{int(idx[-1])}")
            kept = torch.unique(units[idx])
            if gi in seen and not torch.equal(seen[gi][1], kept):
                raise DcompError(f"layers '{seen[gi][0]}' and '{name}' are coupled (their outputs are added), "
                                 f"so they must keep the same units")
            seen[gi] = (name, kept)
            drop = g.units[~torch.isin(g.units, kept)]
            if drop.numel() and g.blocked:
                raise DcompError(f"cannot remove units of '{name}': {g.blocked}")
            removed[drop] = True
        return removed

    def cuts(self, removed: torch.Tensor) -> dict[tuple[str, str], list[tuple[Slot, torch.Tensor]]]:
        """(module, tensor attribute) -> the slots that lose positions, with the positions kept."""
        out: dict[tuple[str, str], list[tuple[Slot, torch.Tensor]]] = {}
        for s in self.slots:
            keep = (s.labels < 0) | ~removed[s.labels.clamp(min=0)]
            if not bool(keep.all()):
                out.setdefault((s.owner, s.attr), []).append((s, keep))
        self._cuts = (removed, out)
        return out

    def cut_tensor(self, owner: str, attr: str, t: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like ``owner.attr``: the weight itself, or its mask) with the removed positions cut."""
        cached = getattr(self, "_cuts", None)
        cuts = cached[1] if cached is not None and cached[0] is removed else self.cuts(removed)
        for s, keep in sorted(cuts.get((owner, attr), []), key=lambda it: it[0].role == "grouped_in"):
            if s.role == "grouped_in":
                t = _grouped_in(t, keep, s.groups, owner)
            else:
                t = t.index_select(s.dim, torch.nonzero(keep).squeeze(1))
        return t

    @torch.no_grad()
    def apply(self, model: nn.Module, removed: torch.Tensor) -> dict[str, dict]:
        """Remove the classes in ``removed`` from ``model`` in place. Returns what the weights alone do not
        say, as plain data ({module: {attribute: value}}), for the checkpoint (see resize.conform)."""
        from dcomp.compressors.graph.resize import follow_norm_shapes, refresh, set_attention

        touched = set()
        for owner, attr in self.cuts(removed):
            mod = model.get_submodule(owner) if owner else model
            t = getattr(mod, attr)
            new = self.cut_tensor(owner, attr, t.detach(), removed).clone()
            if isinstance(t, nn.Parameter):
                setattr(mod, attr, nn.Parameter(new, requires_grad=t.requires_grad))
            else:
                mod._buffers[attr] = new
            touched.add(owner)
        resized: dict[str, dict] = {}
        for owner in sorted(touched):
            refresh(model.get_submodule(owner) if owner else model)
        follow_norm_shapes(model)   # layer_norm literals of a graph-described model (no module to refresh)
        for module, attr, cls in self.attr_fixes:
            keep = (cls < 0) | ~removed[cls.clamp(min=0)]
            value = int(keep.sum())
            mod = model.get_submodule(module) if module else model
            if getattr(mod, attr) != value:
                setattr(mod, attr, value)
                resized.setdefault(module, {})[attr] = value
        for name, att in self.attention.items():
            heads = int((~removed[att.heads]).sum())
            mod = model.get_submodule(name)
            if heads != att.heads.numel() or any(o == name or o.startswith(name + ".") for o in touched):
                set_attention(mod, heads, att.head_dim)
                resized.setdefault(name, {}).update({"num_heads": heads, "head_dim": att.head_dim})
        return resized


def _grouped_in(w: torch.Tensor, keep: torch.Tensor, groups: int, owner: str) -> torch.Tensor:
    per_in = keep.numel() // groups
    rows = w.shape[0] // groups
    parts = []
    counts = set()
    for gi in range(groups):
        local = torch.nonzero(keep[gi * per_in:(gi + 1) * per_in]).squeeze(1)
        counts.add(int(local.numel()))
        parts.append(w[gi * rows:(gi + 1) * rows].index_select(1, local))
    if len(counts) != 1:
        raise DcompError(f"grouped convolution '{owner}' would keep different numbers of inputs per group")
    return torch.cat(parts, 0)


# ---- building the groups ------------------------------------------------------------------------

def _on_dim(cls: torch.Tensor, dim: int) -> torch.Tensor:
    """Classes of ``cls`` that do not appear at every index of ``dim`` (removing them shortens it)."""
    t = cls.movedim(dim, 0).reshape(cls.shape[dim], -1)
    rows = t.shape[0]
    ok = t >= 0
    if not bool(ok.any()) or rows == 1:
        return torch.empty(0, dtype=torch.long)
    r = torch.arange(rows).unsqueeze(1).expand_as(t)
    keys = torch.unique(t[ok] * rows + r[ok])   # one int64 per distinct (class, index): a 1-D unique is fast
    c, counts = torch.unique(keys // rows, return_counts=True)
    return c[counts < rows]


def _compact(labels: torch.Tensor, dim: int) -> torch.Tensor:
    """``labels`` without the repeats of broadcast dims other than ``dim`` (same (label, index along dim) pairs)."""
    dim = dim % labels.dim() if labels.dim() else 0
    for d in range(labels.dim()):
        if d != dim and labels.stride(d) == 0 and labels.shape[d] > 1:
            labels = labels.narrow(d, 0, 1)
    return labels


def _classes(comp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.where(labels >= 0, comp[labels.clamp(min=0)], torch.full_like(labels, WILD))


def build(tr: Trace) -> DependencyGraph:
    space = tr.space
    reasons: list[str] = []
    fixed_extra: list[tuple[torch.Tensor, str]] = []
    attr_fixes: list[tuple[str, str, torch.Tensor]] = []
    size_checks = [c for c in tr.checks if c.kind == "size"]
    for _ in range(6):   # channel shuffles add ties, which can move other checks: iterate to a fixed point
        comp = space.components()
        added = False
        for c in list(size_checks):
            cls = _classes(comp, _compact(c.labels, c.dim))
            if _on_dim(cls, c.dim).numel() == 0:
                continue
            carrying = [d for d in c.dynamic_dims if d != c.dim and _on_dim(cls, d).numel()]
            if carrying:
                # the channel axis was split into (fixed count, dynamic size): units at the same index of
                # the dynamic part are removed together (a channel shuffle stays a shuffle)
                space.union(c.labels.narrow(c.dim, 0, 1), c.labels)
                size_checks.remove(c)
                added = True
        if not added:
            break
    comp = space.components()
    n = int(comp.max()) + 1 if comp.numel() else 0
    for c in size_checks:
        cls = _classes(comp, _compact(c.labels, c.dim))
        on = _on_dim(cls, c.dim)
        if on.numel() == 0:
            continue
        attr = _literal_attr(tr.model, c.scope, c.value)
        if attr is not None:
            rows = cls.movedim(c.dim, 0).reshape(cls.shape[c.dim], -1).max(dim=1).values
            attr_fixes.append((attr[0], attr[1], rows))
        else:
            fixed_extra.append((on, f"'{c.node}' reshapes it to the fixed size {c.value}"))
            tr.unfollowed.append((c.scope or c.node, "reshape", f"fixed size {c.value} on the channel axis: kept whole"))
    for c in tr.checks:
        if c.kind == "count":
            # a reshape sized by another tensor's dim: the two counts must stay equal. When the same units
            # sit on both, removing them keeps that; otherwise both are kept whole.
            a = _on_dim(_classes(comp, _compact(c.labels, c.dim)), c.dim)
            b = _on_dim(_classes(comp, _compact(c.other, c.other_dim)), c.other_dim)
            if (a.numel() or b.numel()) and not torch.equal(torch.unique(a), torch.unique(b)):
                fixed_extra.append((torch.cat([a, b]), f"'{c.node}' reshapes it to the size of another tensor"))
                tr.unfollowed.append((c.scope or c.node, "reshape",
                                      "size read from another tensor's channel count: both kept whole"))
        if c.kind == "slice":
            on = _on_dim(_classes(comp, _compact(c.labels, c.dim)), c.dim)
            if on.numel():
                fixed_extra.append((on, f"'{c.node}' cuts it at fixed offsets"))
                tr.unfollowed.append((c.scope or c.node, "slice/split", "fixed offsets on the channel axis: kept whole"))

    # Fixed classes and their reasons.
    why = torch.full((n,), -1, dtype=torch.long)

    def mark(cls: torch.Tensor, reason: str) -> None:
        cls = cls[cls >= 0]
        if cls.numel():
            fresh = cls[why[cls] < 0]
            if fresh.numel():
                reasons.append(reason)
                why[fresh] = len(reasons) - 1

    for s in space.sources:
        if s.kind == "fixed":
            mark(torch.unique(comp[s.base:s.base + s.size]), s.reason)
    for lab, reason in space.fixed:
        mark(torch.unique(comp[lab]), reason)
    for cls, reason in fixed_extra:
        mark(cls, reason)

    # Slots in class ids; parameters used directly in the forward get slots from their ties.
    slots = []
    for key, s in tr.slots.items():
        slots.append(Slot(s.owner, s.attr, s.dim, _classes(comp, s.labels), s.role, s.groups))
    have = {(s.owner, s.attr) for s in slots}
    src = space.source_of()
    big = len(space.sources) + 1
    smin = torch.full((n,), big, dtype=torch.long).scatter_reduce(0, comp, src, "amin")
    smax = torch.full((n,), -1, dtype=torch.long).scatter_reduce(0, comp, src, "amax")
    for s in space.sources:
        if s.kind != "param" or s.name not in tr.params:
            continue
        owner, attr = tr.params[s.name]
        cls = comp[s.base:s.base + s.size].reshape(s.shape)
        foreign = smin[cls] != smax[cls]
        if not bool(foreign.any()) or (owner, attr) in have:
            continue
        cls = torch.where(foreign, cls, torch.full_like(cls, WILD))
        best = None
        for d in range(cls.dim()):
            rows = cls.movedim(d, 0).reshape(cls.shape[d], -1)
            hi = rows.max(dim=1).values
            lo = torch.where(rows < 0, torch.full_like(rows, 1 << 62), rows).min(dim=1).values
            const = bool(((lo == hi) | (hi < 0)).all())
            distinct = torch.unique(hi[hi >= 0]).numel()
            if const and (best is None or distinct > best[1]):
                best = (d, distinct, hi)
        if best is None:
            mark(torch.unique(cls[cls >= 0]), f"parameter '{s.name}' mixes channels in a way that cannot be sliced")
            tr.unfollowed.append((owner, s.name, "parameter mixes channels: kept whole"))
            continue
        slots.append(Slot(owner, attr, best[0], best[2], "param"))

    # Groups: producers tied through shared classes.
    prods = [(name, comp[lab]) for name, lab in tr.module_out.items()]
    parent = list(range(len(prods)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner_of: dict[int, int] = {}
    for i, (_, cls) in enumerate(prods):
        for c in torch.unique(cls).tolist():
            j = owner_of.setdefault(c, i)
            if j != i:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in range(len(prods)):
        members.setdefault(find(i), []).append(i)
    splits = [c for c in tr.checks if c.kind == "split"]
    split_cls = [(_classes(comp, c.labels.movedim(c.dim, 0).reshape(c.labels.shape[c.dim], -1).max(dim=1).values
                              if c.labels.dim() > 1 else c.labels), c.parts, c.node) for c in splits]
    groups: list[Group] = []
    group_of: dict[str, int] = {}
    for root, idx in members.items():
        names = [prods[i][0] for i in idx]
        order, seen = [], set()
        for i in idx:
            for c in prods[i][1].tolist():
                if c not in seen:
                    seen.add(c)
                    order.append(c)
        units = torch.tensor(order, dtype=torch.long)
        bad = why[units]
        blocked = reasons[int(bad[bad >= 0][0])] if bool((bad >= 0).any()) else None
        whats = {tr.space.sources[int(src[tr.module_out[nm][0]])].what for nm in names}
        g = Group(name=names[0], producers=names, units=units, blocked=blocked,
                  what=whats.pop() if len(whats) == 1 else "mixed")
        g.splits = [(cls, parts, node) for cls, parts, node in split_cls if bool(torch.isin(cls, units).any())]
        if g.splits and not g.blocked:
            g.bins, g.blocked = _bins(units, g.splits)
        for nm in names:
            group_of[nm] = len(groups)
        groups.append(g)
    attention = {k: Attention(a.module, comp[a.heads], a.head_dim) for k, a in tr.attention.items()}
    return DependencyGraph(groups=groups, group_of=group_of, slots=slots, attention=attention,
                           attr_fixes=attr_fixes, unfollowed=tr.unfollowed, n_classes=n,
                           units_of={name: cls for name, cls in prods})


def _bins(units: torch.Tensor, splits) -> tuple[list[torch.Tensor] | None, str | None]:
    """Units grouped by the part of every equal split (grouped conv, chunk, GroupNorm) they fall in; each bin
    then keeps the same fraction (``choose`` checks the parts come out equal). A unit spread evenly over all
    parts of a split (a channel shuffle does that) is free with respect to it."""
    keys: dict[int, tuple] = {int(u): () for u in units}
    for cls, parts, node in splits:
        if cls.numel() % parts:
            return None, f"'{node}' splits {cls.numel()} channels into {parts} parts"
        per = cls.numel() // parts
        counts: dict[int, list[int]] = {}
        for p in range(parts):
            for c in cls[p * per:(p + 1) * per].tolist():
                if c in keys:
                    counts.setdefault(c, [0] * parts)[p] += 1
        for u in keys:
            n = counts.get(u)
            if n is None:
                key = -1
            elif sum(1 for x in n if x) == 1:
                key = next(i for i, x in enumerate(n) if x)
            elif len(set(n)) == 1:
                key = -2
            else:
                key = -3   # spread unevenly over the parts: removing it would unbalance them, so it stays
            keys[u] = keys[u] + (key,)
    bins: dict[tuple, list[int]] = {}
    for u, k in keys.items():
        bins.setdefault(k, []).append(u)
    pos = {int(u): i for i, u in enumerate(units.tolist())}
    out = []
    for k, v in bins.items():
        b = torch.tensor(sorted(v, key=pos.__getitem__), dtype=torch.long)
        b.pinned = -3 in k   # kept whole
        out.append(b)
    if all(b.pinned for b in out):
        return None, "its units are spread unevenly over the parts of an equal split (chunk after channel shuffles)"
    return out, None


def _literal_attr(model: nn.Module, scope: str, value: int):
    """The one int attribute of the module at ``scope`` (or a parent) equal to ``value``, if any."""
    parts = scope.split(".") if scope else []
    for i in range(len(parts), -1, -1):
        path = ".".join(parts[:i])
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        hits = [k for k, v in vars(mod).items() if not k.startswith("_") and k not in _NO_ATTRS
                and type(v) is int and v == value]
        if len(hits) > 1:   # several attributes have this value: a name that says "size" breaks the tie
            named = [k for k in hits if any(w in k for w in ("dim", "hidden", "channel", "width", "features", "heads"))]
            hits = named if len(named) == 1 else hits
        if len(hits) == 1:
            return path, hits[0]
        if len(hits) > 1:
            return None
    return None


def check_split_counts(graph: DependencyGraph, removed: torch.Tensor) -> str | None:
    """Why ``removed`` breaks an equal split, or None."""
    for g in graph.groups:
        for cls, parts, node in g.splits:
            per = cls.numel() // parts
            keep = (cls < 0) | ~removed[cls.clamp(min=0)]
            counts = {int(keep[p * per:(p + 1) * per].sum()) for p in range(parts)}
            if len(counts) > 1:
                return f"'{node}' would get parts of different sizes"
    return None


_ = (Check, math)
