"""A packed-size target for a recipe: per-layer sparsity and bits chosen so the .dcz lands on an
asked size (``dcomp run RECIPE --target-size 8KB`` / ``--target-ratio 60x``).

1. **Size model, measured.** For a grid of sparsities and bit widths, the model is pruned
   (layer-wise magnitude, every layer at that sparsity), quantized (k-means, the recipe's
   quantize settings without fine-tuning) and packed with the recipe's pack settings; the bytes
   of each weight tensor (indices, values, codebook, tables) are read back with
   ``inspect_bytes``. Bits per non-zero are interpolated between grid sparsities, so a layer's
   bytes are a continuous function of its sparsity. The rest (biases, header) is measured too.
2. **Accuracy cost.** Per layer, the one-shot drop of a sensitivity sweep (each layer alone,
   the others dense; ``dcomp.compressors.sensitivity``) plus the drop of that layer alone
   quantized to each bit width.
3. **Choice.** A multiple-choice knapsack per layer over (sparsity on a fine grid, bits): the
   least summed drop whose predicted bytes fit the target; then the largest layer's sparsity is
   solved continuously so the prediction equals the target.

``dcomp run`` then runs the recipe with those settings and, when the file it wrote misses the
target by more than ``tolerance``, corrects the fixed part (header, biases) and the bits per
non-zero by what it measured and runs again (the work directory resumes what did not change).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dcomp.errors import UsageError
from dcomp.formats.checkpoint import Checkpoint
from dcomp.stages import StageContext

UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000 ** 2, "mib": 1024 ** 2, "gb": 1000 ** 3, "gib": 1024 ** 3}
SIZE_GRID = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)
BITS = (3, 4, 5, 6, 8)
SENSITIVITY_GRID = None  # the sweep's grid (None: sensitivity.DEFAULT_GRID)


def parse_size(text: str) -> int:
    """``8KB`` (1000 bytes), ``8KiB`` (1024), ``1.5MB``, ``9000`` (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = (m.group(2) or "b").lower() if m else ""
    if not m or unit not in UNITS:
        raise UsageError(f"--target-size {text!r}: give a size such as 8KB (1000 bytes), 8KiB (1024) or 9000 (bytes)")
    n = int(round(float(m.group(1)) * UNITS[unit]))
    if n <= 0:
        raise UsageError(f"--target-size {text!r}: the size must be positive")
    return n


def parse_ratio(text: str) -> float:
    """``60x`` or ``60`` -> 60.0 (dense float32 bytes / file bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*[xX]?\s*", text or "")
    if not m or float(m.group(1)) <= 1:
        raise UsageError(f"--target-ratio {text!r}: give a compression ratio above 1, such as 60x")
    return float(m.group(1))


@dataclass
class SizeModel:
    numel: dict[str, int]                                   # weight tensor -> elements
    bits_per_nz: dict[tuple[str, int], list[tuple[float, float]]] = field(default_factory=dict)  # (layer, bits) -> [(s, bits/nz)]
    fixed: dict[tuple[str, int], float] = field(default_factory=dict)   # (layer, bits) -> bytes not per non-zero (codebook)
    other: float = 0.0                                      # biases, header, padding
    scale: float = 1.0                                      # correction of the per-layer bytes (from a run)

    def layer_bytes(self, layer: str, s: float, bits: int) -> float:
        pts = self.bits_per_nz[(layer, bits)]
        xs, ys = zip(*pts)
        nnz = self.numel[layer] - round(s * self.numel[layer])
        return self.scale * (nnz * float(np.interp(s, xs, ys)) / 8 + self.fixed[(layer, bits)])

    def total(self, plan: dict[str, tuple[float, int]]) -> float:
        return self.other + sum(self.layer_bytes(k, s, b) for k, (s, b) in plan.items())


def _one_shot(ckpt: Checkpoint, s: float, bits: int, quant_cfg, trust: bool) -> Checkpoint:
    from dcomp.compressors.pruning import PruneConfig, apply_prune
    from dcomp.compressors.quantization import apply_quantize

    pruned = apply_prune(ckpt, PruneConfig(sparsity=s, min_weights=0), StageContext(trust_pickle=trust)).checkpoint
    q = quant_cfg.model_copy(update={"bits": bits, "conv_bits": None, "fc_bits": None, "layers": {}, "finetune": None})
    return apply_quantize(pruned, q, StageContext(trust_pickle=trust)).checkpoint


def measure_size_model(ckpt: Checkpoint, quant_cfg, pack_cfg, trust: bool = False,
                       grid=SIZE_GRID, bits=BITS) -> SizeModel:
    """Pack the model at every (sparsity, bits) of the grids and record each weight's bytes."""
    from dcomp.formats.dcz import inspect_bytes, pack

    model: SizeModel | None = None
    others = []
    for b in bits:
        for s in grid:
            data, _ = pack(_one_shot(ckpt, s, b, quant_cfg, trust), pack_cfg)
            rep = inspect_bytes(data)
            rows = {r["name"]: r for r in rep["layers"]}
            weights = [n for n, r in rows.items() if n.endswith(".weight") and len(r["shape"]) >= 2]
            if model is None:
                model = SizeModel({n: rows[n]["numel"] for n in weights})
            for n in weights:
                r = rows[n]
                cb = r["bytes"]["codebook"]
                nnz = max(r["nnz"] or 1, 1)
                model.fixed[(n, b)] = cb
                model.bits_per_nz.setdefault((n, b), []).append((s, 8 * (r["total_bytes"] - cb) / nnz))
            others.append(rep["file_bytes"] - sum(rows[n]["total_bytes"] for n in weights))
    model.other = float(np.median(others))
    return model


def quant_drops(ckpt: Checkpoint, data, quant_cfg, layers: list[str], bits=BITS, trust: bool = False) -> dict[tuple[str, int], float]:
    """Top-1 drop of each layer alone quantized to each bit width (the others left float)."""
    from dcomp.compressors.quantization import apply_quantize
    from dcomp.retrain import accuracy

    base = accuracy(ckpt, data, trust)
    out = {}
    for n in layers:
        for b in bits:
            q = quant_cfg.model_copy(update={"bits": b, "conv_bits": None, "fc_bits": None, "finetune": None,
                                             "layers": {f"^{re.escape(n)}$": b},
                                             "exclude": [f"^{re.escape(o)}$" for o in layers if o != n]})
            out[(n, b)] = max(0.0, base - accuracy(apply_quantize(ckpt, q, StageContext(trust_pickle=trust)).checkpoint, data, trust))
    return out


def _prune_drop(curve: list[tuple[float, float]], base: float, s: float) -> float:
    """Interpolated one-shot drop at sparsity s from a per-layer curve made non-decreasing."""
    xs, ys, worst = [], [], 0.0
    for x, a in curve:
        worst = max(worst, base - a)
        xs.append(x)
        ys.append(worst)
    return max(0.0, float(np.interp(s, xs, ys)))


def plan_for_size(model: SizeModel, target: float, sweep: dict[str, Any], qdrops: dict[tuple[str, int], float],
                  bits=BITS, step: float = 0.0025, max_sparsity: float = 0.995) -> dict[str, Any]:
    """Per-layer (sparsity, bits) with the least predicted drop whose predicted bytes fit ``target``,
    then the largest layer's sparsity solved so the prediction equals the target."""
    from dcomp.compressors.sensitivity import baseline, curves

    base = baseline(sweep)
    per = {scope: c for (m, scope), c in curves(sweep).items() if m == "magnitude" and scope != "*"}
    layers = list(model.numel)
    budget = target - model.other
    if budget <= 0:
        raise UsageError(f"a {target:,.0f}-byte file cannot hold this model: the header and biases alone take about "
                         f"{model.other:,.0f} bytes")
    sgrid = np.round(np.arange(0.0, max_sparsity + 1e-9, step), 6)
    unit = max(budget / 4000, 1.0)  # DP resolution in bytes
    cap = int(budget // unit)
    INF = float("inf")
    dp = np.full(cap + 1, 0.0)       # least drop with cost <= b, over the layers so far
    choice: list[dict[int, tuple[float, int]]] = []
    for n in layers:
        mod = n[:-len(".weight")]
        opts = []
        for b in bits:
            for s in sgrid:
                cost = int(np.ceil(model.layer_bytes(n, float(s), b) / unit))
                if cost <= cap:
                    opts.append((cost, _prune_drop(per.get(mod, [(0.0, base)]), base, float(s)) + qdrops.get((n, b), 0.0), float(s), b))
        # keep only options not dominated (a cheaper one with less drop)
        opts.sort(key=lambda o: (o[0], o[1]))
        front, best = [], INF
        for o in opts:
            if o[1] < best - 1e-12:
                front.append(o)
                best = o[1]
        new = np.full(cap + 1, INF)
        arg: dict[int, tuple[float, int]] = {}
        for cost, drop, s, b in front:
            cand = np.full(cap + 1, INF)
            cand[cost:] = dp[:cap + 1 - cost] + drop
            better = cand < new
            new[better] = cand[better]
            for i in np.flatnonzero(better):
                arg[int(i)] = (s, b)
        choice.append(arg)
        dp = new
    if not np.isfinite(dp[cap]):
        raise UsageError(f"{target:,.0f} bytes is below what {max_sparsity:.1%} sparsity at {min(bits)} bits reaches "
                         f"(about {model.total({n: (max_sparsity, min(bits)) for n in layers}):,.0f} bytes): ask for more")
    # walk back
    plan: dict[str, tuple[float, int]] = {}
    b_left = cap
    for n, arg in zip(reversed(layers), reversed(choice)):
        i = b_left
        while i > 0 and i not in arg:
            i -= 1
        s, b = arg[i]
        plan[n] = (s, b)
        b_left = i - int(np.ceil(model.layer_bytes(n, s, b) / unit))
        b_left = max(b_left, 0)
    plan = {n: plan[n] for n in layers}
    # solve the largest layer's sparsity so the prediction meets the target exactly
    big = max(layers, key=lambda n: model.numel[n])
    s_b = plan[big][1]
    rest = model.total(plan) - model.layer_bytes(big, *plan[big])
    lo, hi = 0.0, max_sparsity
    for _ in range(50):
        mid = (lo + hi) / 2
        if rest + model.layer_bytes(big, mid, s_b) > target:
            lo = mid
        else:
            hi = mid
    plan[big] = (round(hi, 6), s_b)
    pred_drop = sum(_prune_drop(per.get(n[:-7], [(0.0, base)]), base, s) + qdrops.get((n, b), 0.0) for n, (s, b) in plan.items())
    return {"plan": plan, "predicted_bytes": model.total(plan), "predicted_drop": pred_drop}


def check_recipe(recipe) -> None:
    kinds = [s.kind for s in recipe.stages]
    if "prune" not in kinds or "quantize" not in kinds or "pack" not in kinds:
        raise UsageError("--target-size / --target-ratio set the recipe's prune and quantize stages and measure its "
                         "pack: the recipe needs a prune, a quantize and a pack stage (e.g. configs/deep-compression.yaml)")


def apply_plan(recipe, plan: dict[str, tuple[float, int]]):
    """A copy of ``recipe`` whose first prune stage prunes each layer to its planned sparsity
    (magnitude, layer-wise; its rounds and retraining kept) and whose quantize stage gives each
    layer its planned bits."""
    import copy

    from dcomp.compressors.pruning import PruneConfig
    from dcomp.compressors.quantization import QuantizeConfig

    check_recipe(recipe)
    out = copy.copy(recipe)
    out.stages = list(recipe.stages)
    kinds = [s.kind for s in recipe.stages]
    i = kinds.index("prune")
    p = recipe.stages[i].config
    layers = {f"^{re.escape(n[:-len('.weight')])}$": s for n, (s, _) in plan.items()}
    cfg = PruneConfig.model_validate({**p.model_dump(exclude_none=True), "method": "magnitude", "sparsity": max(s for s, _ in plan.values()),
                                      "layers": layers, "min_weights": 0, "max_drop": None, "sweep": None, "exclude": []})
    out.stages[i] = copy.copy(recipe.stages[i])
    out.stages[i].config = cfg
    j = kinds.index("quantize")
    q = recipe.stages[j].config
    out.stages[j] = copy.copy(recipe.stages[j])
    out.stages[j].config = QuantizeConfig.model_validate({**q.model_dump(exclude_none=True), "exclude": [],
                                                          "layers": {f"^{re.escape(n)}$": b for n, (_, b) in plan.items()}})
    return out


def weight_bytes(data: bytes) -> dict[str, int]:
    """Bytes of each weight tensor in a .dcz (from its header)."""
    from dcomp.formats.dcz import inspect_bytes

    return {r["name"]: r["total_bytes"] for r in inspect_bytes(data)["layers"]
            if r["name"].endswith(".weight") and len(r["shape"]) >= 2}


def run_for_size(recipe, target: tuple[str, float], inp, workdir, ctx: StageContext, load, on_stage, fresh: bool,
                 settings: dict[str, Any], tolerance: float = 0.02, runs: int = 3):
    """Plan, run the recipe, compare the file with the target, correct the size model and rerun
    (at most ``runs`` times) until the file is within ``tolerance`` of the target.
    Returns (state, records, report) like ``run_recipe`` plus the target report."""
    from dcomp.compressors.sensitivity import SweepConfig, apply_sweep
    from dcomp.recipe import run_recipe

    trust = ctx.trust_pickle
    ckpt = load(inp.data, inp.source)
    if ckpt.quant or ckpt.masks:
        raise UsageError("--target-size starts from a dense model: give the unpruned, unquantized input")
    dense = 4 * ckpt.param_count()
    kind, value = target
    target_bytes = int(value) if kind == "size" else int(round(dense / value))
    kinds = [s.kind for s in recipe.stages]
    qcfg = recipe.stages[kinds.index("quantize")].config
    pcfg = recipe.stages[kinds.index("pack")].config
    say = (lambda m: ctx.console.print(f"[dim]{m}[/dim]")) if ctx.console is not None else (lambda m: None)
    say(f"target {target_bytes:,} bytes: measuring the packed bytes per layer at {len(SIZE_GRID)} sparsities x {len(BITS)} bit widths")
    model = measure_size_model(ckpt, qcfg, pcfg, trust, grid=SIZE_GRID, bits=BITS)
    say("measuring each layer's sensitivity to pruning and to quantization (one-shot, the others dense)")
    grid = {"grid": list(SENSITIVITY_GRID)} if SENSITIVITY_GRID else {}
    sweep = apply_sweep(ckpt, SweepConfig(methods=["magnitude"], whole=False, **grid),
                        StageContext(data=ctx.data, seed=ctx.seed, trust_pickle=trust)).metrics
    qd = quant_drops(ckpt, ctx.data, qcfg, list(model.numel), bits=BITS, trust=trust)
    history = []
    state = records = None
    for i in range(runs):
        p = plan_for_size(model, target_bytes, sweep, qd, bits=BITS)
        say(f"run {i + 1}: " + ", ".join(f"{n[:-7]} {s:.2%}/{b} bits" for n, (s, b) in p["plan"].items())
            + f" -> predicted {p['predicted_bytes']:,.0f} bytes")
        state, records = run_recipe(apply_plan(recipe, p["plan"]), inp.data, inp.source, workdir, ctx, load, on_stage,
                                    fresh=fresh and i == 0, settings={**settings, "target_bytes": target_bytes})
        size = len(state.packed)
        wb = weight_bytes(state.packed)
        predicted_w = sum(model.layer_bytes(n, s, b) for n, (s, b) in p["plan"].items())
        history.append({"plan": {n: list(v) for n, v in p["plan"].items()}, "predicted_bytes": p["predicted_bytes"],
                        "reached_bytes": size, "weight_bytes": sum(wb.values()), "other_bytes": size - sum(wb.values()),
                        "predicted_drop": p["predicted_drop"]})
        if abs(size - target_bytes) <= tolerance * target_bytes:
            break
        # what the run measured replaces what was assumed: the fixed part and the bytes per weight
        model.scale *= sum(wb.values()) / max(predicted_w, 1.0)
        model.other = float(size - sum(wb.values()))
    size = len(state.packed)
    report = {"target_bytes": target_bytes, "asked": f"{kind} {value:g}", "dense_float32_bytes": dense,
              "reached_bytes": size, "error": (size - target_bytes) / target_bytes,
              "ratio": dense / size, "plan": history[-1]["plan"], "runs": history,
              "size_model": {"grid": list(SIZE_GRID), "bits": list(BITS), "other_bytes_measured": history[-1]["other_bytes"]}}
    return state, records, report
