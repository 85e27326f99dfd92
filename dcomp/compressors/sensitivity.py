"""Sensitivity sweeps: accuracy against sparsity, per pruning method, for the whole model and for
each prunable layer alone (the others dense), and per-layer budgets chosen from those curves.

    SweepConfig + apply_sweep(ckpt, cfg, ctx, cache=...)   the stage (``dcomp sweep``, recipe ``sweep``)
    choose_budget(sweep, method, max_drop)                 per-layer sparsities whose summed drops
                                                           stay within ``max_drop`` points and remove
                                                           the most weights (``prune --max-drop``)

Every point is made by ``dcomp.compressors.pruning.apply_prune`` (the code ``dcomp prune`` runs)
and, with ``retrain``, fine-tuned by ``dcomp.retrain.retrain`` (the one training loop) with the
masks kept. Accuracy is top-1 in percent on the chosen split: ``test`` (the dataset's test set,
what every other command reports), ``val`` (a fixed slice carved off the training set, the one
``select=best`` uses; with it retraining uses the rest of the training set) or ``train``.

A point is identified by a key: a hash of the model's tensors, the data, the split, the seed,
the retraining settings, the method, the scope and the sparsity. ``apply_sweep`` takes a cache
(key -> point) and calls ``on_point`` after each new one, so a caller can log points as they come
and a rerun reuses every point already measured.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Callable

import torch

from dcomp.config.sweep import DEFAULT_GRID, SWEEP_METHODS, SWEEP_VERSION, SweepConfig  # noqa: F401 - re-exported
from dcomp.errors import DcompError, UsageError
from dcomp.formats.checkpoint import Checkpoint
from dcomp.stages import StageContext, StageResult


def parse_grid(text: str) -> list[float]:
    """``0,0.5,0.9`` or ``0:0.9:0.1`` (start:stop:step, stop included) -> sparsities."""
    text = text.strip()
    try:
        if ":" in text:
            a, b, step = (float(x) for x in text.split(":"))
            if step <= 0:
                raise ValueError
            n = int(round((b - a) / step))
            return [round(a + i * step, 10) for i in range(n + 1)]
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--grid {text!r}: give comma-separated sparsities (0,0.5,0.9) or START:STOP:STEP (0:0.9:0.1)") from None


# ---- what a model offers ----------------------------------------------------------------------------

def model_digest(ckpt: Checkpoint) -> str:
    """A hash of the model: architecture, shapes, every tensor and mask (not the provenance)."""
    h = hashlib.sha256()
    h.update(json.dumps([ckpt.arch if not isinstance(ckpt.arch, dict) else {k: v for k, v in ckpt.arch.items() if not isinstance(v, (bytes, bytearray))},
                         ckpt.input_shape, ckpt.num_classes], sort_keys=True, default=str).encode())
    for group in (ckpt.state_dict, ckpt.masks):
        for k in sorted(group):
            t = group[k].detach().contiguous().cpu()
            h.update(k.encode() + str(t.dtype).encode() + str(list(t.shape)).encode())
            # flattened first: a 0-dim tensor (BatchNorm's num_batches_tracked) has no byte view
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if isinstance(ckpt.arch, dict):
        for v in ckpt.arch.values():
            if isinstance(v, (bytes, bytearray)):
                h.update(bytes(v))
    return h.hexdigest()


def prunable_layers(ckpt: Checkpoint, trust: bool = False) -> dict[str, int]:
    """Module name -> number of weights, for the layers unstructured pruning can touch."""
    from dcomp.compressors.pruning import _prunable_numels

    return {(n[:-len(".weight")] if n.endswith(".weight") else n): k for n, k in _prunable_numels(ckpt, trust).items()}


def structured_layers(ckpt: Checkpoint, method: str, trust: bool = False) -> tuple[list[str], dict[str, str]]:
    """The unit groups (named by their first producer) ``method`` can shrink, and notes for the rest."""
    from dcomp.compressors.graph import check_shrinkable, trace_dependencies
    from dcomp.compressors.pruning import PruneConfig, _structured_choices

    check_shrinkable(ckpt)
    model = ckpt.build_model(trust_pickle=trust)
    graph = trace_dependencies(model, ckpt.input_shape)
    try:
        choices, notes = _structured_choices(model, graph, PruneConfig(method=method, sparsity=0.5, min_weights=0))
    except UsageError as e:
        return [], {"*": str(e)}
    return [c.name for c in choices if c.value is not None], notes


def _applicable(ckpt: Checkpoint, method: str, trust: bool) -> tuple[list[str], str]:
    """Scopes a method can prune alone (layer names) and why none, if none."""
    if method in ("magnitude", "global"):
        names = list(prunable_layers(ckpt, trust))
        return names, "" if names else "no Linear or Conv layer"
    try:
        names, notes = structured_layers(ckpt, method, trust)
    except DcompError as e:
        return [], str(e)
    return names, "" if names else "; ".join(f"{k}: {v}" for k, v in list(notes.items())[:2]) or "no layer"


def plan(ckpt: Checkpoint, cfg: SweepConfig, trust: bool = False) -> list[tuple[str, str, float]]:
    """Every (method, scope, sparsity) to measure, in order; scope ``*`` is the whole model.
    Raises UsageError for a model with no prunable layer or an asked method that cannot apply."""
    if ckpt.quant:
        raise UsageError("this checkpoint is quantized; sweep the model before quantizing")
    if not prunable_layers(ckpt, trust):
        raise UsageError("the model has no prunable layer (Linear or Conv weights): nothing to sweep")
    if not (cfg.whole or cfg.per_layer):
        raise UsageError("nothing to measure: keep the whole-model curve or the per-layer curves (or both)")
    methods = cfg.methods
    asked = methods is not None
    if not asked:
        methods = ["magnitude", "neuron", "filter"]
    out = []
    for m in methods:
        scopes, why = _applicable(ckpt, m, trust)
        if not scopes:
            if asked:
                raise UsageError(f"method {m} cannot prune this model ({why}); use "
                                 + ("--method filter for Conv layers" if m == "neuron" else
                                    "--method neuron for Linear layers" if m == "filter" else "another method"))
            continue
        chosen = (["*"] if cfg.whole else []) + (scopes if cfg.per_layer and m != "global" else [])
        if m == "global" and not cfg.whole:
            if asked:
                raise UsageError("method global is one threshold over the whole model: it has no per-layer curve (keep the whole-model curve)")
            continue
        out += [(m, scope, s) for scope in chosen for s in cfg.grid]
    return out


# ---- measuring --------------------------------------------------------------------------------------

def point_key(digest: str, cfg: SweepConfig, data_spec: str, seed: int, method: str, scope: str, sparsity: float) -> str:
    settings = {"v": SWEEP_VERSION, "model": digest, "data": data_spec, "split": cfg.split, "seed": seed,
                "retrain": cfg.retrain.model_dump(mode="json") if cfg.retrain is not None else None,
                "method": method, "scope": scope, "sparsity": round(float(sparsity), 10)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def eval_dataset(data, split: str):
    """A Dataset whose x_test/y_test is the split accuracy is measured on (and whose training part
    excludes it, for ``val``), so apply_prune and retrain can be used unchanged."""
    from dcomp.data import Dataset

    if split == "test":
        return data
    if split == "train":
        return Dataset(data.spec, data.x_train, data.y_train, data.x_train, data.y_train, data.num_classes)
    xtr, ytr, xv, yv = data.split_validation(0.1)
    return Dataset(data.spec, xtr, ytr, xv, yv, data.num_classes)


def prune_config(method: str, scope: str, sparsity: float, layers: list[str]):
    """The PruneConfig of one point: the whole model (``*``) or one layer alone."""
    from dcomp.compressors.pruning import PruneConfig

    if scope == "*":
        return PruneConfig(method=method, sparsity=sparsity)
    rx = f"^{re.escape(scope)}$"
    others = [f"^{re.escape(n)}$" for n in layers if n != scope]
    return PruneConfig(method="magnitude" if method == "global" else method, sparsity=sparsity,
                       layers={rx: sparsity}, exclude=others, min_weights=0)


def kept_weights(ckpt: Checkpoint, names: dict[str, int]) -> int:
    """Weights still present (unmasked, in the current shapes) in the given layers."""
    n = 0
    for layer in names:
        key = f"{layer}.weight"
        w = ckpt.state_dict.get(key)
        if w is None:
            continue
        m = ckpt.masks.get(key)
        n += int(m.sum()) if m is not None and m.shape == w.shape else w.numel()
    return n


def measure_point(ckpt: Checkpoint, cfg: SweepConfig, data, method: str, scope: str, sparsity: float,
                  layers: dict[str, int], seed: int, trust: bool) -> dict[str, Any]:
    """Prune (and retrain) one point; returns its record (accuracies in percent)."""
    from dcomp.compressors.pruning import _recalibrate, apply_prune
    from dcomp.retrain import accuracy

    total = sum(layers.values())
    pcfg = prune_config(method, scope, sparsity, list(layers))
    if sparsity == 0.0:
        out = ckpt
    else:
        # no data for apply_prune: it would measure accuracy twice more; BatchNorm re-estimated here
        out = apply_prune(ckpt, pcfg, StageContext(seed=seed, trust_pickle=trust)).checkpoint
        if pcfg.recalibrate_bn:
            out = _recalibrate(out, data, pcfg.recalibrate_samples, trust) or out
    rec: dict[str, Any] = {"method": method, "scope": scope, "sparsity": sparsity,
                           "top1": accuracy(out, data, trust)}
    kept = kept_weights(out, layers)
    rec["weights_removed"] = total - kept
    rec["removed_fraction"] = (total - kept) / max(total, 1)
    if cfg.retrain is not None and cfg.retrain.epochs > 0:
        from dcomp.retrain import retrain

        out, _ = retrain(out, data, cfg.retrain, seed=seed, trust_pickle=trust)
        rec["top1_retrained"] = accuracy(out, data, trust)
    return rec


def apply_sweep(ckpt: Checkpoint, cfg: SweepConfig, ctx: StageContext | None = None,
                cache: dict[str, dict] | None = None, on_point: Callable[[dict, bool], None] | None = None,
                progress=None) -> StageResult:
    """Measure every point of ``plan(ckpt, cfg)``; points whose key is in ``cache`` are reused.
    ``on_point(record, reused)`` is called after each point; ``progress(done, total, label)`` too.
    The result's checkpoint is ``ckpt`` itself (a sweep does not change the model); its metrics
    are the sweep document (see ``sweep_document``)."""
    ctx = ctx or StageContext()
    if ctx.data is None:
        raise UsageError("a sweep measures accuracy: give --data")
    trust = ctx.trust_pickle
    todo = plan(ckpt, cfg, trust)
    data = eval_dataset(ctx.data, cfg.split)
    layers = prunable_layers(ckpt, trust)
    digest = model_digest(ckpt)
    cache = cache or {}
    points, measured, reused = [], 0, 0
    for i, (method, scope, s) in enumerate(todo):
        key = point_key(digest, cfg, ctx.data.spec, ctx.seed, method, scope, s)
        if progress is not None:
            progress(i, len(todo), f"{method} {'whole model' if scope == '*' else scope} @ {s:g}")
        hit = cache.get(key)
        if hit is not None:
            rec = dict(hit)
            reused += 1
        else:
            rec = measure_point(ckpt, cfg, data, method, scope, s, layers, ctx.seed, trust)
            rec["key"] = key
            measured += 1
        points.append(rec)
        if on_point is not None:
            on_point(rec, hit is not None)
    if progress is not None:
        progress(len(todo), len(todo), "done")
    doc = sweep_document(ckpt, cfg, ctx, points, layers, digest)
    doc["measured"], doc["reused"] = measured, reused
    return StageResult(checkpoint=ckpt, metrics=doc)


def sweep_document(ckpt: Checkpoint, cfg: SweepConfig, ctx: StageContext, points: list[dict],
                   layers: dict[str, int], digest: str) -> dict[str, Any]:
    base = next((p["top1"] for p in points if p["sparsity"] == 0.0), None)
    doc: dict[str, Any] = {
        "version": SWEEP_VERSION, "model_digest": digest, "data": ctx.data.spec if ctx.data else None,
        "split": cfg.split, "seed": ctx.seed, "config": cfg.model_dump(mode="json"),
        "layers": layers, "baseline_top1": base, "points": points,
    }
    doc["summary"] = summarize(doc)
    return doc


# ---- reading the curves -----------------------------------------------------------------------------

def curves(doc: dict[str, Any], key: str = "top1") -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(method, scope) -> [(sparsity, accuracy)] sorted by sparsity."""
    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for p in doc["points"]:
        if key in p:
            out.setdefault((p["method"], p["scope"]), []).append((float(p["sparsity"]), float(p[key])))
    return {k: sorted(v) for k, v in out.items()}


def baseline(doc: dict[str, Any]) -> float:
    b = doc.get("baseline_top1")
    if b is None:
        zero = [p["top1"] for p in doc["points"] if p["sparsity"] == 0.0]
        if not zero:
            raise UsageError("the sweep has no point at sparsity 0 (the dense baseline): add 0 to its grid")
        b = zero[0]
    return float(b)


def sparsity_at_drop(curve: list[tuple[float, float]], base: float, drop: float) -> float | None:
    """The largest grid sparsity before accuracy first falls more than ``drop`` points below
    ``base`` (None if even the first point does)."""
    best = None
    for s, a in curve:
        if base - a > drop + 1e-9:
            break
        best = s
    return best


def summarize(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per curve: the last sparsity within 1 point of the dense baseline, before and after retraining."""
    try:
        base = baseline(doc)
    except UsageError:
        return []
    rows = []
    pruned = curves(doc, "top1")
    retrained = curves(doc, "top1_retrained")
    for (m, scope), c in pruned.items():
        row = {"method": m, "scope": scope, "within_1pt": sparsity_at_drop(c, base, 1.0)}
        if (m, scope) in retrained:
            row["within_1pt_retrained"] = sparsity_at_drop(retrained[(m, scope)], base, 1.0)
        rows.append(row)
    return rows


# ---- budgets from the curves --------------------------------------------------------------------------

def choose_budget(doc: dict[str, Any], method: str, max_drop: float, resolution: float = 0.01,
                  caps: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-layer sparsities that remove the most weights while the per-layer drops (each layer's
    curve, made non-increasing in accuracy, measured with the others dense) sum to at most
    ``max_drop`` points. Exact for that additive model: a multiple-choice knapsack solved by
    dynamic programming over the drop budget in steps of ``resolution`` points (drops rounded up).
    ``caps``: layer -> a sparsity that layer must stay below.
    Returns {"sparsity": {layer: s}, "predicted_drop": d, "weights_removed": n}."""
    base = baseline(doc)
    per_layer = {scope: c for (m, scope), c in curves(doc).items() if m == method and scope != "*"}
    if not per_layer:
        raise UsageError(f"the sweep has no per-layer curve for method {method} "
                         f"(it has: {', '.join(sorted({p['method'] for p in doc['points']})) or 'none'}); "
                         f"rerun the sweep with --method {method}")
    removed = {}
    for p in doc["points"]:
        if p["method"] == method and p["scope"] != "*":
            removed[(p["scope"], float(p["sparsity"]))] = int(p.get("weights_removed", 0))
    units = int(max_drop / resolution + 1e-9)
    options: dict[str, list[tuple[float, int, int]]] = {}  # layer -> (sparsity, cost units, gain)
    for layer, c in per_layer.items():
        worst, opts = 0.0, [(0.0, 0, 0)]
        for s, a in c:
            worst = max(worst, base - a)  # conservative: a drop once seen counts at every higher sparsity
            if s == 0.0 or (caps and layer in caps and s >= caps[layer]):
                continue
            cost = int(-(-max(worst, 0.0) // resolution)) if worst > 0 else 0
            if cost <= units:
                opts.append((s, cost, removed.get((layer, s), 0)))
        options[layer] = opts
    # dp[b] = (gain, choice per layer) with total cost <= b
    dp: list[tuple[int, tuple]] = [(0, ())] * (units + 1)
    for layer in per_layer:
        new = []
        for b in range(units + 1):
            best = None
            for s, cost, gain in options[layer]:
                if cost > b:
                    continue
                g, ch = dp[b - cost]
                cand = (g + gain, ch + ((s, cost),))
                if best is None or cand[0] > best[0]:
                    best = cand
            new.append(best)
        dp = new
    gain, choice = dp[units]
    sp = {layer: s for layer, (s, _) in zip(per_layer, choice)}
    pred = 0.0
    for layer, s in sp.items():
        pred += max(0.0, max((base - a for x, a in per_layer[layer] if x <= s), default=0.0))
    return {"sparsity": sp, "predicted_drop": pred, "weights_removed": gain}


def read_sweep(path: str) -> dict[str, Any]:
    """A sweep JSON written by ``dcomp sweep``."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--sweep {path}: no such file (write one with dcomp sweep MODEL -o {path})")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--sweep {path}: not a sweep JSON ({e})") from None
    if not isinstance(doc, dict) or "points" not in doc or doc.get("version") != SWEEP_VERSION:
        raise UsageError(f"--sweep {path}: not a sweep JSON of version {SWEEP_VERSION} (written by dcomp sweep)")
    return doc


# ---- prune --max-drop --------------------------------------------------------------------------------

def resolve_max_drop(ckpt: Checkpoint, cfg, ctx: StageContext, sweep: dict[str, Any] | None = None,
                     tries: int = 20, shrink: float = 0.8):
    """Turn ``PruneConfig(max_drop=D)`` into per-layer sparsities: choose them from the per-layer
    curves of a sweep (``sweep``, else the file ``cfg.sweep``, else a sweep measured now with the
    others dense) with ``choose_budget``, then prune all of them at once and measure the real drop
    on the sweep's split. Drops of layers pruned together can add up to more than the sum of the
    drops measured one by one: while the measured drop exceeds D, the budget given to
    ``choose_budget`` shrinks (x``shrink``); when that gives a choice already rejected, the layer
    chosen at the highest sparsity must stay below it, so every retry is a new choice; after
    ``tries`` attempts every layer stays dense.
    Returns (the PruneConfig to run, or None when nothing is pruned, and the budget report)."""
    from dcomp.compressors.pruning import _recalibrate, apply_prune
    from dcomp.retrain import accuracy

    if ctx.data is None:
        raise UsageError("--max-drop measures accuracy: give --data")
    trust = ctx.trust_pickle
    source = "given"
    if sweep is None and cfg.sweep is not None:
        sweep, source = read_sweep(cfg.sweep), cfg.sweep
    digest = model_digest(ckpt)
    if sweep is not None and sweep.get("model_digest") not in (None, digest):
        raise UsageError("the sweep was measured on another model (its model digest differs): sweep this very "
                         "model (dcomp sweep MODEL; in a recipe, put the sweep stage right before prune) or leave out --sweep")
    if sweep is not None and not any(p["method"] == cfg.method and p["scope"] != "*" for p in sweep["points"]):
        sweep = None if source == "given" else sweep  # a recipe's sweep without this method: measure now
    if sweep is None:
        source = "measured now"
        sweep = apply_sweep(ckpt, SweepConfig(methods=[cfg.method], whole=False, per_layer=True),
                            StageContext(data=ctx.data, seed=ctx.seed, trust_pickle=trust)).metrics
    data = eval_dataset(ctx.data, sweep.get("split", "test"))
    excluded = [re.compile(rx) for rx in cfg.exclude]
    if excluded:  # excluded layers stay dense: drop their curves
        keep = [p for p in sweep["points"] if p["scope"] == "*" or not any(rx.search(p["scope"]) for rx in excluded)]
        sweep = {**sweep, "points": keep}
    base = accuracy(ckpt, data, trust)
    report: dict[str, Any] = {"max_drop": cfg.max_drop, "sweep": source, "split": sweep.get("split", "test"),
                              "top1_dense": base, "attempts": []}
    budget = float(cfg.max_drop)
    caps: dict[str, float] = {}
    failed: list[dict[str, float]] = []
    for _ in range(tries):
        choice = choose_budget(sweep, cfg.method, budget, caps=caps)
        while choice["sparsity"] in failed:  # a smaller budget chose the same again: forbid its highest sparsity
            sp = {k: v for k, v in choice["sparsity"].items() if v > 0}
            if not sp:
                break
            top = max(sp, key=lambda k: (sp[k], k))
            caps[top] = sp[top]
            choice = choose_budget(sweep, cfg.method, budget, caps=caps)
        sp = {k: v for k, v in choice["sparsity"].items() if v > 0}
        attempt = {"budget": budget, "sparsity": choice["sparsity"], "predicted_drop": choice["predicted_drop"]}
        report["attempts"].append(attempt)
        if not sp:
            break
        layers = {f"^{re.escape(k)}$": v for k, v in choice["sparsity"].items()}
        run = cfg.model_copy(update={"sparsity": 0.0, "layers": layers, "min_weights": 0})
        one_shot = run.model_copy(update={"rounds": 1, "retrain": None, "max_drop": None, "sweep": None})
        out = apply_prune(ckpt, one_shot, StageContext(seed=ctx.seed, trust_pickle=trust)).checkpoint
        if one_shot.recalibrate_bn:
            out = _recalibrate(out, data, one_shot.recalibrate_samples, trust) or out
        attempt["measured_drop"] = drop = base - accuracy(out, data, trust)
        if drop <= cfg.max_drop + 1e-9:
            report.update(sparsity=choice["sparsity"], predicted_drop=choice["predicted_drop"], measured_drop=drop)
            return run, report
        failed.append(choice["sparsity"])
        budget *= shrink
    report.update(sparsity={}, predicted_drop=0.0, measured_drop=0.0,
                  note="no combination within the bound: every layer left dense")
    return None, report
