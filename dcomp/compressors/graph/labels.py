"""Channel labels: the bookkeeping under the dependency graph.

Every tensor in the traced model gets a *label tensor* of its own shape: each element holds the
id of the unit it belongs to (an output channel of a convolution, a hidden unit of a Linear, an
attention head, an element of a parameter), or ``WILD`` (-1) when it belongs to none. Shape
operations (view, permute, cat, chunk, roll, indexing, ...) are executed on the label tensors
themselves, so they follow any reshuffle of the channel axis for free; operations that tie
elements together (an addition, a per-channel gate, a layer reading a channel) record *edges*
between labels. At the end the connected components of the edges are the **classes**: the
smallest sets of units that can only be removed together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

WILD = -1


@dataclass
class Source:
    """A block of consecutive labels that one thing introduced."""

    kind: str            # "producer" (units that can be removed), "param" (elements of a parameter), "fixed"
    name: str            # module (producer), parameter path (param), or what made it (fixed)
    base: int
    size: int
    shape: tuple[int, ...] = ()
    reason: str = ""     # fixed: why these units must stay
    what: str = "conv"   # producer: "conv", "linear", "heads"


@dataclass
class LabelSpace:
    sources: list[Source] = field(default_factory=list)
    edges: list[torch.Tensor] = field(default_factory=list)   # (2, E) label pairs
    fixed: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    count: int = 0

    def fresh(self, shape, kind: str, name: str, reason: str = "", what: str = "conv") -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        n = 1
        for s in shape:
            n *= s
        base = self.count
        self.count += n
        self.sources.append(Source(kind, name, base, n, shape, reason, what))
        return torch.arange(base, base + n, dtype=torch.long).reshape(shape)

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Tie labels element-wise (broadcasting); WILD on either side ties nothing."""
        a, b = torch.broadcast_tensors(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        ok = (a >= 0) & (b >= 0) & (a != b)
        if not bool(ok.any()):
            return
        a, b = a[ok], b[ok]
        if a.numel() > 64:   # drop repeated pairs; one int64 key per pair (a 1-D unique is far faster than dim=1)
            n = int(torch.maximum(a.max(), b.max())) + 1
            keys = torch.unique(a * n + b)
            a, b = keys // n, keys % n
        self.edges.append(torch.stack([a, b]))

    def fix(self, labels: torch.Tensor, reason: str) -> None:
        lab = labels.reshape(-1)
        lab = torch.unique(lab[lab >= 0])
        if lab.numel():
            self.fixed.append((lab, reason))

    def rows(self, labels: torch.Tensor, dim: int) -> torch.Tensor:
        """One label per index of ``dim``: the elements of each slice are tied together (a layer that
        reads channel ``i`` reads all of them). Returns a vector of length ``labels.shape[dim]``."""
        dim = dim % labels.dim() if labels.dim() else 0
        if labels.dim() and all(labels.stride(d) == 0 or labels.shape[d] == 1 for d in range(labels.dim()) if d != dim):
            # a broadcast vector (a layer's output units): one label per index already
            return labels[tuple(slice(None) if d == dim else 0 for d in range(labels.dim()))].clone()
        t = labels.movedim(dim, 0)
        t = t.reshape(t.shape[0], -1)
        rep = t.max(dim=1).values if t.shape[1] else torch.full((t.shape[0],), WILD, dtype=torch.long)
        if t.shape[1] > 1:
            # Only slices that are not already constant need edges.
            varied = (t != rep[:, None]) & (t >= 0)
            if bool(varied.any()):
                self.union(rep[:, None].expand_as(t)[varied], t[varied])
        return rep

    def components(self) -> torch.Tensor:
        """Class id of every label (connected components of the edges)."""
        n = self.count
        if not self.edges:
            return torch.arange(n, dtype=torch.long)
        import numpy as np
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        e = torch.cat(self.edges, dim=1).numpy()
        g = coo_matrix((np.ones(e.shape[1], dtype=np.int8), (e[0], e[1])), shape=(n, n))
        _, comp = connected_components(g, directed=False)
        return torch.from_numpy(comp.astype(np.int64))

    def source_of(self) -> torch.Tensor:
        """Index into ``sources`` of every label."""
        out = torch.empty(self.count, dtype=torch.long)
        for i, s in enumerate(self.sources):
            out[s.base:s.base + s.size] = i
        return out
