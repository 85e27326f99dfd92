"""The search space: which groups get a searched width, and what a candidate costs.

A **candidate** is a tuple of genes, one per searchable group of the dependency graph
(``dcomp.compressors.graph``): gene ``i`` indexes the width grid (ratios, paper: 31 from 0.10 to
1.00), and the group keeps ``max(1, round(ratio x units))`` units. Which units: the first ones of
the group's *order*, the units sorted by L1 norm of the input model (so a candidate keeps the same
units whether its weights are generated or taken from the input). A group is searchable when it is
a conv/linear group the graph may shrink freely (not blocked, no equal-split constraint such as a
grouped convolution, not excluded); every other group keeps its width.

Costs are exact without building the candidate: each tensor's shape after the cut comes from
cutting a ``meta`` tensor with the graph's own slicing (``DependencyGraph.cut_tensor``), so the
parameter count is the sum of those shapes, and a conv/linear layer's MACs scale with its weight's
element count (its output positions do not change when channels are removed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from dcomp.errors import UsageError


def paper_grid(lo: float = 0.1, hi: float = 1.0, n: int = 31) -> list[float]:
    return [round(lo + (hi - lo) * i / (n - 1), 6) for i in range(n)] if n > 1 else [hi]


@dataclass
class Cost:
    macs: int
    params: int
    latency_ms: float | None = None

    def get(self, metric: str) -> float | None:
        return {"macs": self.macs, "params": self.params, "latency_ms": self.latency_ms}[metric]


@dataclass
class SearchSpace:
    model: nn.Module                 # the input model (not modified)
    graph: object                    # its DependencyGraph
    input_shape: tuple
    grid: list[float]
    groups: list[int]                # searchable group indices, in graph order
    order: dict[int, torch.Tensor]   # group index -> its units (class ids), most important first
    skipped: dict[str, str] = field(default_factory=dict)   # group name -> why it keeps its width
    full_macs: int = 0
    layer_macs: dict[str, int] = field(default_factory=dict)
    weight_layers: list[str] = field(default_factory=list)  # conv/linear modules whose weight is cut
    _cost_cache: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [self.graph.groups[gi].name for gi in self.groups]

    def channels(self) -> list[int]:
        return [self.graph.groups[gi].channels for gi in self.groups]

    def widths(self, genes) -> list[int]:
        return [max(1, min(n, int(round(self.grid[int(g)] * n)))) for g, n in zip(genes, self.channels())]

    def removed(self, genes) -> torch.Tensor:
        removed = torch.zeros(self.graph.n_classes, dtype=torch.bool)
        for gi, k in zip(self.groups, self.widths(genes)):
            removed[self.order[gi][k:]] = True
        return removed

    def full_genes(self) -> tuple[int, ...]:
        return tuple(len(self.grid) - 1 for _ in self.groups)

    def min_genes(self) -> tuple[int, ...]:
        return tuple(0 for _ in self.groups)

    def uniform(self, index: int) -> tuple[int, ...]:
        return tuple(int(index) for _ in self.groups)

    def random_genes(self, gen: torch.Generator) -> tuple[int, ...]:
        return tuple(int(v) for v in torch.randint(len(self.grid), (len(self.groups),), generator=gen))

    def key(self, genes) -> str:
        return ",".join(str(int(g)) for g in genes)

    # ---- shapes and costs --------------------------------------------------------------------------

    def shapes(self, genes) -> dict[str, torch.Size]:
        """Every parameter's shape in the candidate (``removed`` applied), by parameter name."""
        removed = self.removed(genes)
        cuts = self.graph.cuts(removed)
        out = {}
        for pname, p in self.model.named_parameters():
            owner, _, attr = pname.rpartition(".")
            if (owner, attr) in cuts:
                t = torch.empty(p.shape, device="meta")
                out[pname] = self.graph.cut_tensor(owner, attr, t, removed).shape
            else:
                out[pname] = p.shape
        return out

    def cost(self, genes) -> Cost:
        k = tuple(int(g) for g in genes)
        hit = self._cost_cache.get(k)
        if hit is not None:
            return hit
        shapes = self.shapes(k)
        params = sum(int(torch.Size(s).numel()) for s in shapes.values())
        macs = self.full_macs
        for layer in self.weight_layers:
            full = self.model.get_submodule(layer).weight
            kept = int(torch.Size(shapes[f"{layer}.weight"]).numel())
            lm = self.layer_macs.get(layer, 0)
            macs += (lm * kept) // max(full.numel(), 1) - lm
        c = Cost(macs=int(macs), params=int(params))
        if len(self._cost_cache) < 200_000:
            self._cost_cache[k] = c
        return c


def build_space(model: nn.Module, input_shape, grid: list[float], exclude: list[str] | None = None,
                order_by: str = "l1") -> SearchSpace:
    """The search space of ``model`` (see the module doc). Raises UsageError when no group can be searched."""
    from dcomp.compressors.graph import analyse, unit_scores
    from dcomp.compressors.graph.macs import count_macs

    graph = analyse(model, input_shape)
    rx = [re.compile(r) for r in (exclude or [])]
    groups, skipped = [], {}
    for gi, g in enumerate(graph.groups):
        if g.blocked:
            skipped[g.name] = f"kept: {g.blocked}"
        elif g.what not in ("conv", "linear"):
            skipped[g.name] = f"kept: a {g.what} group (MetaPruning searches conv and linear widths)"
        elif g.bins or g.splits:
            skipped[g.name] = "kept: equal splits (grouped convolution or chunk) tie its width"
        elif any(r.search(p) for r in rx for p in g.producers):
            skipped[g.name] = "excluded"
        elif g.channels < 2:
            skipped[g.name] = "kept: a single unit"
        else:
            groups.append(gi)
    if not groups:
        why = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3]) or "the graph found no conv or Linear layer"
        raise UsageError(f"the model has no prunable group to search ({why}); MetaPruning needs conv or Linear "
                         f"layers whose output channels can be removed")
    scores = unit_scores(model, graph, order_by)
    order = {}
    for gi in groups:
        units = graph.groups[gi].units
        idx = torch.sort(scores[units], descending=True, stable=True).indices
        order[gi] = units[idx]
    total, per = count_macs(model, input_shape)
    # the conv/linear layers whose weight any searchable group cuts
    removed_all = torch.zeros(graph.n_classes, dtype=torch.bool)
    for gi in groups:
        removed_all[order[gi][1:]] = True
    cuts = graph.cuts(removed_all)
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and (name, "weight") in cuts:
            layers.append(name)
    return SearchSpace(model=model, graph=graph, input_shape=tuple(int(s) for s in input_shape), grid=list(grid),
                       groups=groups, order=order, skipped=skipped, full_macs=int(total), layer_macs=per,
                       weight_layers=layers)
