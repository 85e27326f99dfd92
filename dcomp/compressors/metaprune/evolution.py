"""The evolutionary search of MetaPruning: a population of candidates inside the budget window, the
best ``parents`` of everything scored so far, then ``mutations`` (each gene redrawn with probability
``mutation_prob``) and ``crossovers`` (each gene from one of two parents) make the next population;
``iterations`` rounds. Only candidates inside the window are ever scored.

Scoring goes through ``score(list of genes) -> list of records``; records already in ``cache``
(keyed by the candidate's genes) are reused, so a rerun after an interruption replays the same
search (same seed, same draws) and scores only what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dcomp.compressors.metaprune.budget import Window
from dcomp.compressors.metaprune.space import SearchSpace
from dcomp.errors import DcompError


@dataclass
class EvoSettings:
    population: int = 50
    parents: int = 10
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.1
    iterations: int = 20
    tries: int = 50       # draws per wanted candidate before giving up on more


class Evolution:
    def __init__(self, space: SearchSpace, window: Window, settings: EvoSettings, seed: int, cost_fn):
        self.space = space
        self.window = window
        self.s = settings
        self.gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
        self.cost_fn = cost_fn     # genes -> Cost (latency filled in when the window asks for it)

    def feasible(self, genes) -> bool:
        return self.window.ok(self.cost_fn(genes))

    def _rand(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.gen))

    def _repair(self, genes: list[int]) -> tuple[int, ...] | None:
        """Walk a random draw into the window: lower a random gene while over, raise one while under."""
        top = len(self.space.grid) - 1
        went = set()
        for _ in range(4 * len(genes) * (top + 1)):
            c = self.cost_fn(tuple(genes))
            if self.window.ok(c):
                return tuple(genes)
            if self.window.over(c):
                idx = [i for i, g in enumerate(genes) if g > 0]
                step = -1
            else:
                idx = [i for i, g in enumerate(genes) if g < top]
                step = 1
            went.add(step)
            if not idx or len(went) > 1:
                return None   # over and under in turn: the window is narrower than one step here
            i = idx[self._rand(len(idx))]
            genes[i] += step
        return None

    def initial(self) -> list[tuple[int, ...]]:
        pop, seen = [], set()
        for _ in range(self.s.population * self.s.tries):
            if len(pop) >= self.s.population:
                break
            g = self.space.random_genes(self.gen)
            if not self.feasible(g):
                g = self._repair(list(g))
            if g is not None and g not in seen:
                seen.add(g)
                pop.append(g)
        if not pop:
            raise DcompError("no candidate falls inside the budget window; widen it (a lower --min-fraction) "
                             "or use a finer --grid")
        return pop

    def mutate(self, parents: list[tuple[int, ...]], seen: set) -> list[tuple[int, ...]]:
        out = []
        n = len(self.space.grid)
        for _ in range(self.s.mutations * self.s.tries):
            if len(out) >= self.s.mutations:
                break
            p = parents[self._rand(len(parents))]
            flip = torch.rand(len(p), generator=self.gen) < self.s.mutation_prob
            new = torch.randint(n, (len(p),), generator=self.gen)
            g = tuple(int(new[i]) if bool(flip[i]) else p[i] for i in range(len(p)))
            if g not in seen and self.feasible(g):
                seen.add(g)
                out.append(g)
        return out

    def crossover(self, parents: list[tuple[int, ...]], seen: set) -> list[tuple[int, ...]]:
        out = []
        if len(parents) < 2:
            return out
        for _ in range(self.s.crossovers * self.s.tries):
            if len(out) >= self.s.crossovers:
                break
            a, b = parents[self._rand(len(parents))], parents[self._rand(len(parents))]
            pick = torch.rand(len(a), generator=self.gen) < 0.5
            g = tuple(a[i] if bool(pick[i]) else b[i] for i in range(len(a)))
            if g not in seen and self.feasible(g):
                seen.add(g)
                out.append(g)
        return out

    def run(self, score, progress=None) -> tuple[list[dict], list[dict]]:
        """(every scored record, in order, with its first iteration; per-iteration summary)."""
        scored: dict[tuple, dict] = {}
        order: list[dict] = []
        history = []
        pop = self.initial()
        for it in range(self.s.iterations):
            fresh = [g for g in pop if g not in scored]
            for g, rec in zip(fresh, score(fresh)):
                rec = dict(rec, iteration=it)
                scored[g] = rec
                order.append(rec)
            top = sorted(scored.items(), key=lambda kv: (-kv[1]["top1"], kv[1].get("loss", 0.0), self.space.key(kv[0])))[:self.s.parents]
            parents = [g for g, _ in top]
            history.append({"iteration": it, "population": len(pop), "new": len(fresh),
                            "best_top1": top[0][1]["top1"], "best": self.space.key(top[0][0])})
            if progress is not None:
                progress(it + 1, self.s.iterations, top[0][1]["top1"])
            if it == self.s.iterations - 1:
                break
            seen = set(scored)
            pop = self.mutate(parents, seen) + self.crossover(parents, seen)
            if not pop:
                break    # nothing new inside the window: the search has converged
        return order, history
