"""MetaPruning search against uniform-width and global-L1 filter pruning, each retrained the same way
(docs/bench/search.md).

    OMP_NUM_THREADS=1 python benchmarks/bench_search.py [--seeds 0,1,2] [--out docs/bench/search.jsonl]

For vgg-small and resnet-small on digits at 32x32 and on MNIST-10k (../shared/data/mnist10k.npz,
28x28): one base model per (net, data) (seed 0), then per seed one PruningNet (shared by both budgets,
as MetaPruning intends) and, at 50% and 30% of the base's MACs:

* searched      the searched widths (``apply_search``, window [0.9 x budget, budget]) with the
                base's top-L1 units (``--init l1``);
* searched-gen  the same widths with the PruningNet's generated weights (``--init generated``);
* uniform   every group keeps the same ratio (the largest with MACs <= budget), top-L1 units
            (``prune --method filter`` at one ratio);
* l1-global one L1 ranking over all groups (filter scores normalised by each group's mean, as
            ``prune --method filter --global-rank``), the removed fraction bisected to the budget.

Each is BatchNorm-recalibrated and retrained with the same schedule and seed; test top-1 before and
after. Every result is appended to the jsonl as it finishes and a rerun skips what is there, so a
partial run still makes a table (``--table`` prints it). Runs single-threaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "data" / "mnist10k.npz"
WORK = Path(os.environ.get("DCOMP_BENCH_WORK", "/tmp/dcomp-bench-search"))

DATASETS = {"digits32": ("digits", 32), "mnist10k": (f"npz:{MNIST}", None)}
# schedules (epochs) per dataset: the base model, the PruningNet, the retraining of every method
SCHED = {"digits32": {"base": 8, "pruningnet": 3, "retrain": 3},
         "mnist10k": {"base": 2, "pruningnet": 1, "retrain": 1}}
SEARCH = dict(population=12, parents=4, mutations=6, crossovers=6, iterations=3, recal_samples=256, val_samples=400)
BUDGETS = (0.5, 0.3)
NETS = ("vgg-small", "resnet-small")
METHODS = ("searched", "searched-gen", "uniform", "l1-global")


def cpu() -> float:
    return time.process_time()


def load(data_key):
    from dcomp.data import load_dataset

    spec, resize = DATASETS[data_key]
    return load_dataset(spec, resize=resize)


def base_model(net: str, data_key: str, ds):
    from dcomp.formats.checkpoint import Checkpoint, read_checkpoint
    from dcomp.models import build_zoo
    from dcomp.train import TrainConfig, fit

    path = WORK / f"base-{net}-{data_key}.pt"
    if path.is_file():
        return read_checkpoint(path.read_bytes()), 0.0
    t = cpu()
    torch.manual_seed(0)
    model = build_zoo(net, ds.input_shape, ds.num_classes)
    fit(model, ds, TrainConfig(epochs=SCHED[data_key]["base"], lr=0.05), seed=0)
    spec, resize = DATASETS[data_key]
    ck = Checkpoint(arch={"kind": "zoo", "name": net, "kwargs": {}}, state_dict={}, input_shape=list(ds.input_shape),
                    num_classes=ds.num_classes, data={"spec": ds.spec, "resize": resize})
    ck.update_from_model(model.eval())
    ck.save(path)
    return ck, cpu() - t


def at_removed(ckpt, space, removed, ds):
    """The checkpoint without ``removed`` units, BatchNorm re-estimated on 2,048 training images."""
    from dcomp.compressors.graph import recalibrate_batchnorm, shrink_checkpoint

    out, small = shrink_checkpoint(ckpt, model=space.model, graph=space.graph, removed=removed)
    recalibrate_batchnorm(small, ds.x_train[:2048])
    out.update_from_model(small)
    return out


def macs_of(ckpt) -> int:
    from dcomp.compressors.graph.macs import count_macs

    return count_macs(ckpt.build_model(), ckpt.input_shape)[0]


def uniform_removed(space, budget_macs):
    """Same ratio in every searched group, the largest (to 1/1000) whose MACs stay within the budget."""
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(20):
        r = (lo + hi) / 2
        removed = torch.zeros(space.graph.n_classes, dtype=torch.bool)
        for gi in space.groups:
            n = space.graph.groups[gi].channels
            k = max(1, int(round(r * n)))
            removed[space.order[gi][k:]] = True
        if cost_removed(space, removed) <= budget_macs:
            best, lo = (r, removed), r
        else:
            hi = r
    return best


def cost_removed(space, removed) -> int:
    shapes = {}
    cuts = space.graph.cuts(removed)
    macs = space.full_macs
    for layer in space.weight_layers:
        w = space.model.get_submodule(layer).weight
        if (layer, "weight") in cuts:
            kept = space.graph.cut_tensor(layer, "weight", torch.empty(w.shape, device="meta"), removed).numel()
        else:
            kept = w.numel()
        lm = space.layer_macs.get(layer, 0)
        macs += (lm * kept) // max(w.numel(), 1) - lm
        shapes[layer] = kept
    return int(macs)


def global_l1_removed(space, budget_macs):
    """One L1 ranking over all searched groups; the removed fraction bisected so MACs <= budget."""
    from dcomp.compressors.graph import choose, unit_scores

    scores = unit_scores(space.model, space.graph, "l1")
    lo, hi = 0.0, 0.99
    best = None
    for _ in range(16):
        f = (lo + hi) / 2
        removed, _ = choose(space.graph, scores, {gi: f for gi in space.groups}, global_rank=True)
        if cost_removed(space, removed) <= budget_macs:
            best, hi = (f, removed), f
        else:
            lo = f
    return best


def done_keys(path: Path) -> dict[str, dict]:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                out[r["id"]] = r
            except (json.JSONDecodeError, KeyError):
                continue
    return out


def append(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def run(seeds, out: Path, nets, datas) -> None:
    from dcomp.compressors.metaprune import SearchConfig
    from dcomp.compressors.metaprune.apply import apply_search
    from dcomp.compressors.metaprune.space import build_space
    from dcomp.retrain import accuracy, retrain
    from dcomp.stages import StageContext
    from dcomp.train import TrainConfig

    WORK.mkdir(parents=True, exist_ok=True)
    done = done_keys(out)
    for seed in seeds:
        for data_key in datas:
            ds = load(data_key)
            sched = SCHED[data_key]
            for net in nets:
                base, base_cpu = base_model(net, data_key, ds)
                bid = f"base/{net}/{data_key}"
                if bid not in done:
                    rec = {"id": bid, "kind": "base", "net": net, "data": data_key, "top1": accuracy(base, ds),
                           "macs": macs_of(base), "cpu_s": round(base_cpu, 1), "epochs": sched["base"]}
                    append(out, rec)
                    done[bid] = rec
                model = base.build_model().eval()
                space = build_space(model, base.input_shape, SearchConfig(max_macs="1x").grid)
                full = space.full_macs
                pn_path = WORK / f"pn-{net}-{data_key}-{seed}.pt"
                log_path = WORK / f"log-{net}-{data_key}-{seed}.jsonl"
                pn_state = torch.load(pn_path, weights_only=True) if pn_path.is_file() else None
                cache = {}
                if log_path.is_file():
                    for line in log_path.read_text().splitlines():
                        try:
                            rec = json.loads(line)
                            cache[f"{rec['key']}:{','.join(map(str, rec['genes']))}"] = rec
                        except (json.JSONDecodeError, KeyError):
                            continue

                def on_record(rec, log_path=log_path, cache=cache):
                    cache[f"{rec['key']}:{','.join(map(str, rec['genes']))}"] = rec
                    append(log_path, rec)

                rt_cfg = TrainConfig(epochs=sched["retrain"], lr=0.01, weight_decay=0.0)
                for b in BUDGETS:
                    ids = {m: f"{m}/{net}/{data_key}/{b}/{seed}" for m in METHODS}
                    if all(i in done for i in ids.values()):
                        continue
                    cands = {}
                    if ids["searched"] not in done or ids["searched-gen"] not in done:
                        cfg = SearchConfig(max_macs=f"{b}x", init="generated", train=TrainConfig(epochs=sched["pruningnet"], lr=0.01,
                                                                                weight_decay=0.0), **SEARCH)
                        saved = []
                        t = cpu()
                        r = apply_search(base, cfg, StageContext(data=ds, seed=seed), cache=cache, on_record=on_record,
                                         pruningnet=pn_state, on_pruningnet=saved.append)
                        if saved:
                            pn_state = saved[0]
                            torch.save(pn_state, pn_path)
                        m = r.metrics
                        info = {"search_cpu_s": round(cpu() - t, 1), "pruningnet_cpu_s": m["cpu_seconds"]["pruningnet"],
                                "search_only_cpu_s": m["cpu_seconds"]["search"], "evaluated": m["evaluated"],
                                "reused": m["reused"], "val_top1": m["winner"]["val_top1"],
                                "uniform_val_top1": (m["uniform"] or {}).get("top1"),
                                "widths": [w["units"] for w in m["winner"]["widths"].values()]}
                        if ids["searched-gen"] not in done:
                            cands["searched-gen"] = (r.checkpoint, info)
                        if ids["searched"] not in done:
                            removed = space.removed(tuple(m["winner"]["genes"]))
                            cands["searched"] = (at_removed(base, space, removed, ds), info)
                    if ids["uniform"] not in done:
                        ratio, removed = uniform_removed(space, b * full)
                        cands["uniform"] = (at_removed(base, space, removed, ds), {"ratio": round(ratio, 4)})
                    if ids["l1-global"] not in done:
                        frac, removed = global_l1_removed(space, b * full)
                        cands["l1-global"] = (at_removed(base, space, removed, ds), {"removed_fraction": round(frac, 4)})
                    for method, (ck, extra) in cands.items():
                        t = cpu()
                        before = accuracy(ck, ds)
                        rt, _ = retrain(ck, ds, rt_cfg, seed=seed)
                        rec = {"id": ids[method], "kind": "result", "method": method, "net": net, "data": data_key,
                               "budget": b, "seed": seed, "macs": macs_of(ck), "macs_ratio": macs_of(ck) / full,
                               "params": ck.param_count(), "top1_before": before, "top1": accuracy(rt, ds),
                               "retrain_cpu_s": round(cpu() - t, 1), "retrain_epochs": sched["retrain"], **extra}
                        append(out, rec)
                        done[rec["id"]] = rec
                        print(f"{rec['id']}: macs {rec['macs_ratio']:.3f} top1 {before:.2f} -> {rec['top1']:.2f}",
                              flush=True)


def table(out: Path) -> str:
    recs = list(done_keys(out).values())
    lines = []
    bases = {(r["net"], r["data"]): r for r in recs if r["kind"] == "base"}
    res = [r for r in recs if r["kind"] == "result"]
    lines.append("| net | data | base top-1 | MACs budget | method | MACs (x base) | top-1 before retrain | "
                 "top-1 after retrain (mean ± sd) | seeds |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["net"], r["data"], r["budget"]) for r in res}, key=lambda k: (k[1], k[0], -k[2]))
    for net, data, b in keys:
        for method in METHODS:
            rs = [r for r in res if (r["net"], r["data"], r["budget"], r["method"]) == (net, data, b, method)]
            if not rs:
                continue
            after = [r["top1"] for r in rs]
            sd = statistics.stdev(after) if len(after) > 1 else 0.0
            lines.append(f"| {net} | {data} | {bases.get((net, data), {}).get('top1', float('nan')):.2f} | {b:g}x | "
                         f"{method} | {statistics.mean(r['macs_ratio'] for r in rs):.3f} | "
                         f"{statistics.mean(r['top1_before'] for r in rs):.2f} | {statistics.mean(after):.2f} ± {sd:.2f} "
                         f"| {len(rs)} |")
    cost = [r for r in res if r["method"] == "searched"]
    if cost:
        lines.append("")
        lines.append("| net | data | budget | PruningNet CPU-s (first budget of a seed) | search CPU-s | candidates scored | "
                     "val top-1 winner / uniform (generated weights) |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in sorted(cost, key=lambda r: (r["data"], r["net"], -r["budget"], r["seed"])):
            lines.append(f"| {r['net']} | {r['data']} | {r['budget']:g}x (seed {r['seed']}) | {r['pruningnet_cpu_s']:.0f} | "
                         f"{r['search_only_cpu_s']:.0f} | {r['evaluated']} ({r['reused']} reused) | "
                         f"{r['val_top1']:.2f} / {r['uniform_val_top1'] if r['uniform_val_top1'] is None else round(r['uniform_val_top1'], 2)} |")
    search_cost: dict[tuple, float] = {}   # one search serves searched and searched-gen: count it once
    for r in res:
        k = (r["net"], r["data"], r["budget"], r["seed"])
        search_cost[k] = max(search_cost.get(k, 0.0), r.get("search_cpu_s", 0.0))
    total = sum(r.get("cpu_s", 0) for r in recs if r["kind"] == "base") + sum(search_cost.values()) + sum(
        r.get("retrain_cpu_s", 0) for r in res)
    lines.append("")
    lines.append(f"total CPU time of the recorded work: {total / 60:.1f} CPU-minutes")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--data", default=",".join(DATASETS))
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "search.jsonl"))
    ap.add_argument("--table", action="store_true", help="only print the table of what the jsonl holds")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    if not a.table:
        print(f"load average at start: {os.getloadavg()}", flush=True)
        run([int(s) for s in a.seeds.split(",")], out, a.nets.split(","), a.data.split(","))
        print(f"load average at end: {os.getloadavg()}", flush=True)
    print(table(out))


if __name__ == "__main__":
    sys.exit(main())
