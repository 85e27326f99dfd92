"""The ``search`` stage: budgets checked, PruningNet trained (or loaded), evolutionary search, and the
winner applied as a physically smaller checkpoint (``apply_search``)."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable

import torch
from torch import nn

from dcomp.compressors.metaprune.budget import OPTION, Window, fmt_value, parse_budget
from dcomp.config.search import SearchConfig
from dcomp.compressors.metaprune.evolution import EvoSettings, Evolution
from dcomp.compressors.metaprune.space import Cost, SearchSpace, build_space
from dcomp.compressors.sensitivity import model_digest
from dcomp.errors import UsageError
from dcomp.formats.checkpoint import Checkpoint
from dcomp.stages import StageContext, StageResult


def _cpu() -> float:
    return time.process_time()


def run_key(ckpt: Checkpoint, cfg: SearchConfig, data_spec: str, seed: int) -> str:
    """What a candidate's score depends on: the model, the data, the PruningNet's settings and the seed
    (not the budget: one PruningNet and its scores serve every budget)."""
    fields = cfg.model_dump(include={"grid", "hidden", "pruningnet_init", "train", "recal_samples", "val_fraction",
                                     "val_samples", "exclude"})
    blob = json.dumps({"model": model_digest(ckpt), "data": data_spec, "seed": seed, "cfg": fields}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Latency:
    """onnxruntime latency (median ms) of a candidate at one batch size, cached per candidate."""

    def __init__(self, space: SearchSpace, batch: int, threads: int):
        self.space, self.batch, self.threads = space, batch, threads
        self.cache: dict[tuple, float] = {}

    def of_model(self, model: nn.Module) -> float:
        import numpy as np

        from dcomp.formats.onnx_export import export_module
        from dcomp.runtime.runner import OrtRunner

        runner = OrtRunner(export_module(model, self.space.input_shape), self.threads)
        x = np.zeros((self.batch, *self.space.input_shape), dtype=np.float32)
        for _ in range(3):
            runner.run(x)
        times = []
        t_end = time.perf_counter() + 0.2
        while len(times) < 10 or (time.perf_counter() < t_end and len(times) < 200):
            t = time.perf_counter()
            runner.run(x)
            times.append(time.perf_counter() - t)
        return float(np.median(times) * 1000.0)

    def __call__(self, genes) -> float:
        k = tuple(genes)
        if k not in self.cache:
            from dcomp.compressors.graph import shrink

            small, _ = shrink(self.space.model, self.space.graph, self.space.removed(k))
            self.cache[k] = self.of_model(small)
        return self.cache[k]


def resolve_window(space: SearchSpace, cfg: SearchConfig, latency: Latency | None) -> tuple[Window, dict]:
    """The window per metric, with every check done before any training: a budget below the smallest
    candidate names the smallest reachable value."""
    full = space.cost(space.full_genes())
    small = space.cost(space.min_genes())
    if latency is not None:
        full.latency_ms = latency.of_model(space.model)
        small.latency_ms = latency(space.min_genes())
    bounds, info = {}, {}
    for metric, value in (("macs", cfg.max_macs), ("params", cfg.max_params), ("latency_ms", cfg.max_latency_ms)):
        if value is None:
            continue
        kind, v = parse_budget(value, OPTION[metric])
        ref = full.get(metric)
        hi = v * ref if kind == "fraction" else v
        lo_possible = small.get(metric)
        if hi < lo_possible:
            raise UsageError(f"{OPTION[metric]} {value}: impossible, the smallest reachable value is "
                             f"{fmt_value(metric, lo_possible)} ({lo_possible / ref:.3f}x of the model's "
                             f"{fmt_value(metric, ref)}) with every searched group at ratio {space.grid[0]:g}; "
                             f"raise the budget or add smaller ratios to --grid")
        lo = min(cfg.min_fraction * hi, ref)
        bounds[metric] = (lo, hi)
        info[metric] = {"budget": str(value), "max": hi, "min": lo, "model": ref, "smallest": lo_possible}
    return Window(bounds), info


class Scorer:
    """Top-1 on held-out training data of a candidate's generated weights after BatchNorm re-estimation."""

    def __init__(self, net, x_recal, x_val, y_val):
        self.net, self.x_recal, self.x_val, self.y_val = net, x_recal, x_val, y_val

    def score(self, genes) -> tuple[float, float]:
        from dcomp.compressors.graph import recalibrate_batchnorm
        from dcomp.train import evaluate

        small, _ = self.net.candidate_model(genes)
        recalibrate_batchnorm(small, self.x_recal, batch_size=64)
        r = evaluate(small, self.x_val, self.y_val)
        return float(r["top1"]), round(float(r["loss"]), 6)


def apply_search(ckpt: Checkpoint, cfg: SearchConfig, ctx: StageContext | None = None,
                 cache: dict[str, dict] | None = None, on_record: Callable[[dict], None] | None = None,
                 pruningnet: dict | None = None, on_pruningnet: Callable[[dict], None] | None = None,
                 progress: Callable[[str], None] | None = None) -> StageResult:
    """Search widths for ``ckpt`` under ``cfg``'s budget; see the package doc.

    ``cache``: earlier records (key -> record) to reuse; ``on_record`` receives each new record (the CLI
    appends it to the log). ``pruningnet``: a saved PruningNet ({"key", "state"}) reused when its key
    matches; ``on_pruningnet`` receives the trained one to save.
    """
    from dcomp.compressors.graph import check_shrinkable, shrink_checkpoint
    from dcomp.compressors.metaprune.pruningnet import PruningNet, RandomCandidates
    from dcomp.train import dist_info, fit

    ctx = ctx or StageContext()
    say = progress or (lambda msg: ctx.console.print(msg) if ctx.console is not None else None)
    if ctx.data is None:
        raise UsageError("search trains a PruningNet and scores candidates on training data: give --data")
    check_shrinkable(ckpt)
    if ckpt.masks:
        raise UsageError("search starts from a dense model; this checkpoint has pruning masks (search before prune)")
    trust = ctx.trust_pickle
    model = ckpt.build_model(trust_pickle=trust)
    model.eval()
    space = build_space(model, ckpt.input_shape, cfg.grid, cfg.exclude)
    latency = None
    if cfg.max_latency_ms is not None:
        latency = Latency(space, cfg.latency_batch, int(ctx.threads or 1))
    window, budget = resolve_window(space, cfg, latency)

    def cost(genes) -> Cost:
        c = space.cost(genes)
        if latency is not None and c.latency_ms is None and not Window(
                {m: b for m, b in window.bounds.items() if m != "latency_ms"}).over(c):
            c.latency_ms = latency(genes)
        return c

    rank, world = dist_info()
    ds = ctx.data
    x_tr, y_tr, x_val, y_val = ds.split_validation(cfg.val_fraction)
    x_val, y_val = x_val[:cfg.val_samples], y_val[:cfg.val_samples]
    g = torch.Generator().manual_seed(ctx.seed * 31 + 5)
    x_recal = x_tr[torch.randperm(len(x_tr), generator=g)[:cfg.recal_samples]]
    key = run_key(ckpt, cfg, ds.spec, ctx.seed)

    # ---- the PruningNet -------------------------------------------------------------------------
    torch.manual_seed(ctx.seed)
    net = PruningNet(space, hidden=cfg.hidden, init=cfg.pruningnet_init, seed=ctx.seed)
    t0 = _cpu()
    trained_now = False
    if pruningnet is not None and pruningnet.get("key") == key:
        net.load_state_dict(pruningnet["state"])
        say("PruningNet: reused the saved one")
    else:
        from dcomp.train import TensorBatches

        source = TensorBatches(x_tr, y_tr)   # the held-out part never trains the PruningNet
        prog = None
        if ctx.console is not None and cfg.train.epochs > 0:
            from dcomp.cli.ui import TrainProgress

            prog = TrainProgress(ctx.console, "PruningNet")
        fit(net, source, cfg.train.model_copy(update={"select": "last"}), callbacks=[RandomCandidates(net, ctx.seed)],
            seed=ctx.seed, progress=prog)
        trained_now = True
        if on_pruningnet is not None and rank == 0:
            on_pruningnet({"key": key, "state": {k: v.detach().clone() for k, v in net.state_dict().items()}})
    net.eval()
    cpu_train = _cpu() - t0

    # ---- the search -------------------------------------------------------------------------------
    scorer = Scorer(net, x_recal, x_val, y_val)
    cache = dict(cache or {})
    reused = 0

    def record(genes, scored) -> dict:
        c = cost(genes)
        rec = {"key": key, "genes": list(genes), "widths": space.widths(genes), "macs": c.macs, "params": c.params,
               "top1": scored[0], "loss": scored[1]}
        if c.latency_ms is not None:
            rec["latency_ms"] = c.latency_ms
        return rec

    def score(cands: list[tuple]) -> list[dict]:
        nonlocal reused
        out: dict[tuple, dict] = {}
        todo = []
        for gk in cands:
            hit = cache.get(f"{key}:{space.key(gk)}")
            if hit is not None and "top1" in hit:
                out[gk] = {k: v for k, v in hit.items() if k != "iteration"}
                reused += 1
            else:
                todo.append(gk)
        mine = todo[rank::world]
        done = {gk: scorer.score(gk) for gk in mine}
        if world > 1:
            import torch.distributed as dist

            parts = [None] * world
            dist.all_gather_object(parts, [(list(k), v) for k, v in done.items()])
            done = {tuple(k): v for part in parts for k, v in part}
        for gk in todo:
            rec = record(gk, done[gk])
            out[gk] = rec
            cache[f"{key}:{space.key(gk)}"] = rec
            if on_record is not None and rank == 0:
                on_record(rec)
        return [out[gk] for gk in cands]

    settings = EvoSettings(population=cfg.population, parents=cfg.parents, mutations=cfg.mutations,
                           crossovers=cfg.crossovers, mutation_prob=cfg.mutation_prob, iterations=cfg.iterations)
    evo = Evolution(space, window, settings, ctx.seed, cost)
    t1 = _cpu()
    records, history = evo.run(score, progress=lambda i, n, best: say(f"search iteration {i}/{n}: best val top-1 {best:.2f}%"))
    # the uniform-width baseline: the widest single ratio for every group within the upper bounds
    uni = None
    for i in range(len(space.grid) - 1, -1, -1):
        if not window.over(cost(space.uniform(i))):
            uni = space.uniform(i)
            break
    uniform = score([uni])[0] if uni is not None else None
    cpu_search = _cpu() - t1
    best = sorted(records, key=lambda r: (-r["top1"], r["loss"], space.key(r["genes"])))[0]
    genes = tuple(best["genes"])

    # ---- the output ---------------------------------------------------------------------------------
    removed = space.removed(genes)
    out, small = shrink_checkpoint(ckpt, model=model, graph=space.graph, removed=removed)
    if cfg.init == "generated":
        small, _ = net.candidate_model(genes)
    from dcomp.compressors.graph import recalibrate_batchnorm

    recalibrate_batchnorm(small, x_tr[:max(cfg.recal_samples, 2048)])
    out.update_from_model(small)
    from dcomp.train import evaluate

    top1_test = float(evaluate(small, ds.x_test, ds.y_test)["top1"])
    final = space.cost(genes)
    widths = {name: {"units": w, "of": n} for name, w, n in zip(space.names, space.widths(genes), space.channels())}
    full = space.cost(space.full_genes())
    metrics: dict[str, Any] = {
        "budget": budget, "window": window.describe(), "groups": space.names, "skipped": space.skipped,
        "grid": space.grid, "winner": {"genes": list(genes), "widths": widths, "macs": final.macs,
                                       "params": final.params, "val_top1": best["top1"],
                                       **({"latency_ms": best["latency_ms"]} if "latency_ms" in best else {})},
        "uniform": None if uniform is None else {"ratio": space.grid[uni[0]], **uniform},
        "model": {"macs": full.macs, "params": full.params},
        "macs_ratio": final.macs / max(full.macs, 1), "params_ratio": final.params / max(full.params, 1),
        "init": cfg.init, "top1_test_before_retrain": top1_test, "evaluated": len(records), "reused": reused,
        "pruningnet_trained": trained_now, "history": history,
        "cpu_seconds": {"pruningnet": round(cpu_train, 2), "search": round(cpu_search, 2)},
        "ranks": world, "key": key, "candidates": records,
    }
    params = cfg.model_dump(exclude={"train"}) | {"train": cfg.train.model_dump()}
    out.add_provenance("search", params, {k: v for k, v in metrics.items() if k not in ("candidates", "history")})
    return StageResult(checkpoint=out, metrics=metrics)

