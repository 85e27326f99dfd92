"""The prune stage: one config, one ``apply_prune``, every pruning method.

Unstructured (a mask; pruned weights become exactly 0 and stay so when retrained):
    magnitude  layer-wise: each layer loses exactly round(s * n) of its smallest |w|
    global     one threshold over all selected layers: exactly round(s * total) pruned overall
    std        Han et al.: prune |w| <= quality * std(layer weights); sparsity follows from the weights
    nm         N:M semi-structured (default 2:4): N kept of every M consecutive input weights
Structured (a smaller dense model; see dcomp.compressors.graph, the dependency graph):
    neuron     units of Linear layers, scored by the L2 norm of their weight rows
    filter     filters of conv layers, scored by their L1 norm (Li et al.)
    channel    output channels of conv layers, scored by the L1 norm of the input-channel
               slices their consumers read (input-channel pruning, done by shrinking the producer)
    group      every prunable group: conv filters, Linear units and attention heads (L1 by default)
``importance`` replaces the score (l1, l2, channel, bn = BatchNorm scale, taylor = first-order
Taylor on training data); ``global_rank`` ranks all groups together (scores normalised by each
group's mean) instead of removing the same fraction from each. ``exclude`` regexes name layers
whose groups stay whole, and modules that are not traced into (what reaches them stays whole).

Per-layer control: ``layers`` maps a regex to the layer's own value (a sparsity; a quality for
``std``; an N:M for ``nm``); the last matching regex wins and "0" leaves a layer dense.
``exclude`` regexes leave layers dense; layers with fewer than ``min_weights`` weights are left
dense unless a ``layers`` regex names them. Regexes are searched in the module name and the
parameter name (``fc1`` matches ``fc1.weight``; ``^fc1$`` matches the module). Biases and
BatchNorm are never pruned. The structured methods never remove the classifier's outputs.

Iterative pruning (Han et al.): with ``rounds`` = N the target is reached in N steps,
s_i = s * i / N (``schedule="linear"``) or s_i = s * (1 - (1 - i/N)^3) (``"cubic"``, Zhu & Gupta),
each followed by ``retrain.epochs`` epochs of retraining with the masks kept.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dcomp.compressors.masks import prune_count
from dcomp.compressors.nm import nm_applicable, nm_mask
from dcomp.config.checks import compile_regex
from dcomp.config.prune import IMPORTANCE_OF, METHODS, SPARSITY_METHODS, STRUCTURED, PruneConfig  # noqa: F401 - re-exported
from dcomp.errors import DcompError, UsageError
from dcomp.formats.checkpoint import Checkpoint
from dcomp.stages import StageContext, StageResult


def config_error(e) -> str:
    """One line from a pydantic ValidationError of PruneConfig."""
    err = e.errors()[0]
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    loc = [str(p) for p in err.get("loc", ()) if str(p) != "retrain"]
    if loc and not msg.startswith("-"):
        return f"--{loc[0].replace('_', '-')}: {msg}"
    return msg


# ---- choosing layers -----------------------------------------------------------------------------

def _hits(rx: re.Pattern, param: str) -> bool:
    module = param[:-len(".weight")] if param.endswith(".weight") else param
    return bool(rx.search(module) or rx.search(param))


@dataclass
class LayerChoice:
    name: str            # parameter name (unstructured) or producer module name (structured)
    value: Any           # target for this layer, None = left dense
    mode: str            # "layer", "global", or "" when dense
    note: str = ""       # why left dense / override


def choose_layers(names: dict[str, int], cfg: PruneConfig) -> list[LayerChoice]:
    """Decide each layer's target. ``names`` maps layer name -> number of weights.
    Raises UsageError for a regex that matches nothing, or when nothing is left to prune."""
    if not names:
        raise DcompError("the model has no prunable layers (Linear or Conv weights); nothing to prune")
    excl = [(compile_regex(rx, "--exclude"), rx) for rx in cfg.exclude]
    overrides = cfg.overrides()
    for rx, _, text in overrides:
        if not any(_hits(rx, n) for n in names):
            raise UsageError(f"--layer {text!r} matches no prunable layer (layers: {_some(names)})")
    for rx, text in excl:
        if not any(_hits(rx, n) for n in names):
            raise UsageError(f"--exclude {text!r} matches no prunable layer (layers: {_some(names)})")
    out = []
    for name, numel in names.items():
        if any(_hits(rx, name) for rx, _ in excl):
            out.append(LayerChoice(name, None, "", "excluded"))
            continue
        hit = [(v, t) for rx, v, t in overrides if _hits(rx, name)]
        if hit:
            v, t = hit[-1]
            out.append(LayerChoice(name, v, "layer" if v is not None else "", f"--layer {t}"))
        elif numel < cfg.min_weights:
            out.append(LayerChoice(name, None, "", f"tiny (< {cfg.min_weights} weights)"))
        else:
            out.append(LayerChoice(name, cfg.target(), "global" if cfg.method == "global" else "layer"))
    if not any(c.value is not None for c in out):
        raise UsageError("no layer is left to prune after --exclude / --layer / --min-weights "
                         f"(layers: {_some(names)})")
    return out


def _some(names) -> str:
    names = list(names)
    return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")


def schedule_fraction(i: int, rounds: int, schedule: str) -> float:
    t = i / rounds
    return t if schedule == "linear" else 1.0 - (1.0 - t) ** 3


# ---- unstructured -------------------------------------------------------------------------------------

@torch.no_grad()
def unstructured_masks(weights: dict[str, torch.Tensor], choices: list[LayerChoice], method: str,
                       frac: float = 1.0, current: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Masks (True = kept) for the chosen layers at ``frac`` of their target. Already-pruned weights
    (``current``) stay pruned. Returns (masks, notes) where notes say why a layer was skipped."""
    current = current or {}
    masks: dict[str, torch.Tensor] = {}
    notes: dict[str, str] = {}
    pool: list[str] = []
    for c in choices:
        if c.value is None:
            continue
        w = weights[c.name]
        cur = current.get(c.name)
        if cur is not None and cur.shape != w.shape:
            cur = None
        if c.mode == "global":
            pool.append(c.name)
        elif method == "nm":
            n, m = c.value
            why = nm_applicable(w, m)
            if why:
                notes[c.name] = f"skipped: {why}"
                continue
            masks[c.name] = nm_mask(w, n, m, cur)
        elif method == "std":
            thr = float(c.value) * frac * float(w.float().std())
            keep = w.abs() > thr
            masks[c.name] = keep & cur if cur is not None else keep
        else:
            masks[c.name] = _layer_mask(w, float(c.value) * frac, cur)
    if pool:
        target = next(c.value for c in choices if c.mode == "global") * frac
        masks.update(_global_masks({n: weights[n] for n in pool},
                                   {n: current[n] for n in pool if n in current and current[n].shape == weights[n].shape},
                                   target))
    return masks, notes


def _layer_mask(w: torch.Tensor, sparsity: float, cur: torch.Tensor | None) -> torch.Tensor:
    from dcomp.compressors.masks import magnitude_mask

    keep = magnitude_mask(w, sparsity, cur)
    return keep & cur if cur is not None else keep


def _global_masks(weights: dict[str, torch.Tensor], current: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all layers, exactly round(s * total) pruned (already pruned rank lowest)."""
    from dcomp.compressors.masks import _threshold_mask

    names = list(weights)
    parts = []
    for n in names:
        s = weights[n].detach().abs().float().reshape(-1)
        if n in current:
            s = torch.where(current[n].reshape(-1), s, torch.full_like(s, -1.0))
        parts.append(s)
    flat = torch.cat(parts)
    del parts
    keep = _threshold_mask(flat, prune_count(flat.numel(), sparsity))
    out, offset = {}, 0
    for n in names:
        size = weights[n].numel()
        k = keep[offset:offset + size].reshape(weights[n].shape).clone()
        out[n] = k & current[n] if n in current else k
        offset += size
    return out


def _prunable_numels(ckpt: Checkpoint, trust_pickle: bool) -> dict[str, int]:
    """Prunable weight names and sizes. Zoo/import architectures are built on the meta device
    (no memory, no initialisation), so a 50M-weight layer costs nothing here."""
    from dcomp.models import conform_to_state_dict, prunable_parameters
    from dcomp.models.arch import REBUILDABLE_KINDS, build_reference, needs_trust, trust_of

    model = None
    kind = ckpt.arch.get("kind")
    if kind in REBUILDABLE_KINDS and needs_trust(ckpt.arch, trust_of(ckpt, trust_pickle)) is None:
        try:
            with torch.device("meta"):
                model = build_reference(ckpt, trust_pickle)
                conform_to_state_dict(model, ckpt.state_dict, ckpt.arch.get("resized"))
        except Exception:  # noqa: BLE001 - fall back to the ordinary build, which reports errors properly
            model = None
    if model is None:
        model = ckpt.build_model(trust_pickle=trust_pickle)
    return {n: ckpt.state_dict[n].numel() for n, p in prunable_parameters(model).items()
            if n in ckpt.state_dict and tuple(ckpt.state_dict[n].shape) == tuple(p.shape)}


def _shallow_copy(ckpt: Checkpoint) -> Checkpoint:
    """A new checkpoint sharing the (never modified in place) tensors: no copy of 50M weights."""
    return dataclasses.replace(ckpt, state_dict=dict(ckpt.state_dict), masks=dict(ckpt.masks),
                               quant=dict(ckpt.quant), data=dict(ckpt.data), provenance=list(ckpt.provenance))


def _prune_unstructured_round(ckpt: Checkpoint, choices, cfg: PruneConfig, frac: float) -> tuple[Checkpoint, dict[str, str]]:
    out = _shallow_copy(ckpt)
    masks, notes = unstructured_masks(out.state_dict, choices, cfg.method, frac, ckpt.masks)
    for name, keep in masks.items():
        out.state_dict[name] = out.state_dict[name].masked_fill(~keep, 0)
        out.masks[name] = keep
    return out, notes


def _unstructured_report(ckpt: Checkpoint, choices, notes) -> tuple[list[dict], dict]:
    rows, total, pruned = [], 0, 0
    for c in choices:
        w = ckpt.state_dict[c.name]
        m = ckpt.masks.get(c.name)
        zeros = int(m.numel() - m.sum()) if m is not None else int(w.numel() - torch.count_nonzero(w))
        n = w.numel()
        note = notes.get(c.name, c.note)
        rows.append({"layer": c.name, "shape": list(w.shape), "weights": n, "pruned": zeros,
                     "sparsity": zeros / max(n, 1), "target": _plain_target(c.value), "note": note})
        total += n
        pruned += zeros
    overall = {"prunable_weights": total, "pruned": pruned, "sparsity": pruned / max(total, 1),
               "params": ckpt.param_count(), "nonzero": ckpt.nonzero_count()}
    return rows, overall


def _plain_target(v):
    if isinstance(v, tuple):
        return f"{v[0]}:{v[1]}"
    return v


# ---- structured --------------------------------------------------------------------------------------

def _structured_choices(model, graph, cfg: PruneConfig) -> tuple[list[LayerChoice], dict[str, str]]:
    """One choice per group (named by its first producer); notes for groups left alone."""
    want = {"neuron": ("linear",), "filter": ("conv",), "channel": ("conv",),
            "group": ("conv", "linear", "heads", "mixed")}[cfg.method]
    sizes = {}
    for g in graph.groups:
        for p in g.producers:
            sizes[p] = _producer_numel(model, p)
    # --exclude may also name modules that are not producers (kept whole, not traced into); each must name something.
    modules = [n for n, _ in model.named_modules() if n]
    for rx in cfg.exclude:
        if not any(re.search(rx, n) for n in modules):
            raise UsageError(f"--exclude {rx!r} matches no module of the model (layers: {_some(sizes)})")
    excl = [rx for rx in cfg.exclude if any(_hits(re.compile(rx), p) for p in sizes)]
    # Regexes are checked against every producer, so a regex naming a coupled layer counts.
    by_layer = {c.name: c for c in choose_layers(sizes, cfg.model_copy(update={"min_weights": 0, "exclude": excl}))} \
        if sizes else {}
    out, notes = [], {}
    for g in graph.groups:
        head = g.name
        if g.blocked:
            notes[head] = f"kept: {g.blocked}"
            continue
        if g.what not in want:
            notes[head] = f"not a {'Linear' if want == ('linear',) else 'conv'} layer"
            continue
        cs = [by_layer[p] for p in g.producers]
        if any(c.note == "excluded" for c in cs):
            out.append(LayerChoice(head, None, "", "excluded"))
            continue
        ov = [c for c in cs if c.note.startswith("--layer")]
        if ov:
            out.append(LayerChoice(head, ov[-1].value, "layer" if ov[-1].value is not None else "", ov[-1].note))
        elif sum(sizes[p] for p in g.producers) < cfg.min_weights:
            out.append(LayerChoice(head, None, "", f"tiny (< {cfg.min_weights} weights)"))
        else:
            out.append(LayerChoice(head, cfg.sparsity, "layer"))
    if not any(c.value is not None for c in out):
        kind = {"neuron": "Linear", "filter": "Conv2d", "channel": "Conv2d", "group": "prunable"}[cfg.method]
        raise UsageError(f"--method {cfg.method}: no {kind} layer can lose units "
                         f"({'; '.join(f'{k}: {v}' for k, v in list(notes.items())[:3]) or 'all excluded'})"
                         + (" - use --method filter, channel or group" if cfg.method == "neuron" and not out else "")
                         + (" - use --method neuron or group" if cfg.method in ("filter", "channel") and not out else ""))
    return out, notes


def _producer_numel(model, name: str) -> int:
    if name.endswith(":heads"):
        m = model.get_submodule(name[:-len(":heads")])
        w = getattr(m, "in_proj_weight", None)
        if w is None and hasattr(m, "qkv"):
            w = m.qkv.weight
        return int(w.numel()) if w is not None else 0
    w = getattr(model.get_submodule(name), "weight", None)
    return int(w.numel()) if w is not None else 0


def _prune_structured_round(ckpt: Checkpoint, cfg: PruneConfig, frac: float, orig: dict[str, int],
                            trust: bool, data=None, built=None) -> tuple[Checkpoint, list[LayerChoice], dict[str, str]]:
    from dcomp.compressors.graph import analyse, choose, shrink_checkpoint, taylor_gradients, unit_scores

    if built is not None:   # the model and graph of this very checkpoint, already made
        model, graph = built
    else:
        model = ckpt.build_model(trust_pickle=trust)
        graph = analyse(model, ckpt.input_shape, exclude=cfg.exclude)
    choices, notes = _structured_choices(model, graph, cfg)
    importance = cfg.importance or IMPORTANCE_OF[cfg.method]
    grads = None
    if importance == "taylor":
        if data is None:
            raise UsageError("--importance taylor scores units by gradients on training data: give --data")
        grads = taylor_gradients(model, data.x_train[:cfg.taylor_samples], data.y_train[:cfg.taylor_samples])
    scores = unit_scores(model, graph, importance, grads)
    keep: dict[int, int] = {}
    for c in choices:
        if c.value is None:
            continue
        gi = graph.group_of[c.name]
        g = graph.groups[gi]
        c0 = orig.get(c.name, g.channels)
        n_keep = c0 - prune_count(c0, float(c.value) * frac)
        if n_keep < 1:
            notes[c.name] = "keeps 1 unit (the ratio would leave none)"
        keep[gi] = max(1, n_keep)
    ratios = {gi: 1.0 - k / graph.groups[gi].channels for gi, k in keep.items()}
    removed, cnotes = choose(graph, scores, ratios, global_rank=cfg.global_rank)
    for gi, note in cnotes.items():
        notes[graph.groups[gi].name] = note
    if not bool(removed.any()):
        return ckpt.copy(), choices, notes
    out, _ = shrink_checkpoint(ckpt, model=model, graph=graph, removed=removed)
    return out, choices, notes


def _structured_report(before: Checkpoint, after: Checkpoint, groups_before, trust: bool) -> tuple[list[dict], dict]:
    from dcomp.compressors.graph.macs import count_macs

    rows = []
    model_b = before.build_model(trust_pickle=trust)
    model_a = after.build_model(trust_pickle=trust)
    for g in groups_before:
        for p in g.producers:
            if p.endswith(":heads"):
                mod = p[:-len(":heads")]
                hb, ha = model_b.get_submodule(mod).num_heads, model_a.get_submodule(mod).num_heads
                rows.append({"layer": p, "group": g.name, "shape_before": [hb], "shape_after": [ha], "units_before": hb,
                             "units_after": ha,
                             "weights_before": _producer_numel(model_b, p), "weights_after": _producer_numel(model_a, p),
                             "note": g.blocked and "kept: " + g.blocked or ""})
                continue
            wb = before.state_dict.get(f"{p}.weight")
            wa = after.state_dict.get(f"{p}.weight")
            if wb is None or wa is None:
                continue
            dim = 1 if isinstance(model_b.get_submodule(p), nn.modules.conv._ConvTransposeNd) else 0
            rows.append({"layer": p, "group": g.name, "shape_before": list(wb.shape), "shape_after": list(wa.shape),
                         "units_before": int(wb.shape[dim]), "units_after": int(wa.shape[dim]),
                         "weights_before": wb.numel(), "weights_after": wa.numel(),
                         "note": g.blocked and "kept: " + g.blocked or ""})

    def count(m, types):
        return sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, types) and mod.weight is not None)

    conv = nn.modules.conv._ConvNd
    overall = {"params_before": before.param_count(), "params_after": after.param_count(),
               "conv_weights_before": count(model_b, conv), "conv_weights_after": count(model_a, conv),
               "linear_weights_before": count(model_b, nn.Linear), "linear_weights_after": count(model_a, nn.Linear)}
    overall["param_ratio"] = overall["params_after"] / max(overall["params_before"], 1)
    if overall["conv_weights_before"]:
        overall["conv_ratio"] = overall["conv_weights_after"] / overall["conv_weights_before"]
    try:
        overall["macs_before"] = count_macs(model_b, before.input_shape)[0]
        overall["macs_after"] = count_macs(model_a, after.input_shape)[0]
    except Exception:  # noqa: BLE001 - counting is a report, never a reason to fail the prune
        pass
    return rows, overall


def _recalibrate(ckpt: Checkpoint, data, samples: int, trust: bool) -> Checkpoint | None:
    """A copy of ``ckpt`` with BatchNorm statistics re-estimated on training data; None without BatchNorm."""
    from dcomp.compressors.graph import recalibrate_batchnorm

    model = ckpt.build_model(trust_pickle=trust)
    if isinstance(model, torch.jit.ScriptModule):
        return None
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None  # nothing to re-estimate: never touch the training split (data-free runs have none)
    if not recalibrate_batchnorm(model, data.x_train[:samples]):
        return None
    out = _shallow_copy(ckpt)
    state = model.state_dict()
    for k, v in state.items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            out.state_dict[k] = v.detach().clone()
    return out


# ---- the stage -----------------------------------------------------------------------------------------

def apply_prune(ckpt: Checkpoint, cfg: PruneConfig, ctx: StageContext | None = None,
                sweep: dict[str, Any] | None = None) -> StageResult:
    """Prune ``ckpt`` as ``cfg`` says (see the module doc); returns a new checkpoint and metrics.
    ``sweep``: a sensitivity sweep document ``cfg.max_drop`` may choose from (a recipe's sweep stage)."""
    ctx = ctx or StageContext()
    trust = ctx.trust_pickle
    if ckpt.quant:
        raise DcompError("this checkpoint is already quantized; prune before quantizing")
    budget = None
    if cfg.max_drop is not None:  # per-layer sparsities from a sweep (dcomp.compressors.sensitivity)
        from dcomp.compressors.sensitivity import resolve_max_drop

        cfg, budget = resolve_max_drop(ckpt, cfg, ctx, sweep)
        if cfg is None:
            from dcomp.retrain import accuracy

            out = _shallow_copy(ckpt)
            out.add_provenance("prune", {"max_drop": budget["max_drop"]}, {"budget": budget})
            top1 = accuracy(ckpt, ctx.data, trust)
            return StageResult(checkpoint=out, metrics={"method": "none", "structured": False, "target": 0.0,
                                                        "rounds": 0, "layers": [], "budget": budget,
                                                        "top1_before": top1, "top1_after": top1,
                                                        "overall": {"prunable_weights": 0, "pruned": 0, "sparsity": 0.0,
                                                                    "params": ckpt.param_count(), "nonzero": ckpt.nonzero_count()}})
    retraining = cfg.retrain is not None and cfg.retrain.epochs > 0
    if retraining and ctx.data is None:
        raise UsageError("retraining between rounds needs a dataset (--data)")
    structured = cfg.method in STRUCTURED

    # Decide the layers first: bad regexes fail before any work.
    built = None
    if structured:
        from dcomp.compressors.graph import analyse, check_shrinkable

        check_shrinkable(ckpt)
        if (cfg.importance or IMPORTANCE_OF[cfg.method]) == "taylor" and ctx.data is None:
            raise UsageError("--importance taylor scores units by gradients on training data: give --data")
        model = ckpt.build_model(trust_pickle=trust)
        graph0 = analyse(model, ckpt.input_shape, exclude=cfg.exclude)
        choices, notes = _structured_choices(model, graph0, cfg)
        orig = {g.name: g.channels for g in graph0.groups}
        built = (model, graph0)
    else:
        numels = _prunable_numels(ckpt, trust)
        choices = choose_layers(numels, cfg)
        notes = {}

    from dcomp.retrain import accuracy

    history: list[dict[str, Any]] = []
    top1_before = accuracy(ckpt, ctx.data, trust) if ctx.data is not None else None
    out = ckpt
    for i in range(1, cfg.rounds + 1):
        frac = schedule_fraction(i, cfg.rounds, cfg.schedule)
        if structured:
            out, _, notes = _prune_structured_round(out, cfg, frac, orig, trust, ctx.data, built if i == 1 else None)
            built = None
        else:
            out, notes = _prune_unstructured_round(out, choices, cfg, frac)
        rec: dict[str, Any] = {"round": i, "fraction_of_target": frac}
        if cfg.method in SPARSITY_METHODS:
            rec["target"] = cfg.sparsity * frac
        if ctx.data is not None and cfg.recalibrate_bn:
            recal = _recalibrate(out, ctx.data, cfg.recalibrate_samples, trust)
            if recal is not None:
                rec["top1_pruned_stale_bn"] = accuracy(out, ctx.data, trust)
                out = recal
        if ctx.data is not None:
            rec["top1_pruned"] = accuracy(out, ctx.data, trust)
        if retraining:
            from dcomp.retrain import retrain

            progress = None
            if ctx.console is not None:
                from dcomp.cli.ui import TrainProgress

                progress = TrainProgress(ctx.console, f"retrain {i}/{cfg.rounds}")
            out, _ = retrain(out, ctx.data, cfg.retrain, seed=ctx.seed + i, progress=progress, trust_pickle=trust)
            rec["top1_retrained"] = accuracy(out, ctx.data, trust)
        history.append(rec)
        if ctx.console is not None and cfg.rounds > 1:
            ctx.console.print(f"round {i}/{cfg.rounds}: " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items() if k != "round"))

    if structured:
        rows, overall = _structured_report(ckpt, out, graph0.groups, trust)
        overall["not_followed"] = [{"module": m, "op": op, "reason": why} for m, op, why in graph0.unfollowed]
        for r in rows:
            r["note"] = r["note"] or notes.get(r["group"], "") or next(
                (c.note for c in choices if c.name == r["group"]), "")
    else:
        rows, overall = _unstructured_report(out, choices, notes)
    metrics: dict[str, Any] = {"method": cfg.method, "structured": structured, "target": _plain_target(cfg.target()),
                               "rounds": cfg.rounds, "layers": rows, "overall": overall}
    if budget is not None:
        metrics["budget"] = budget
    if cfg.rounds > 1 or retraining or ctx.data is not None:
        metrics["history"] = history
    if top1_before is not None:
        metrics["top1_before"] = top1_before
        last = history[-1]
        metrics["top1_after"] = last.get("top1_retrained", last.get("top1_pruned"))
    out = out if out is not ckpt else _shallow_copy(ckpt)
    params = cfg.model_dump(exclude_none=True)
    out.add_provenance("prune", params, {k: v for k, v in metrics.items() if k != "layers"}
                       | {"layer_sparsity": {r["layer"]: r.get("sparsity", r.get("units_after")) for r in rows}})
    return StageResult(checkpoint=out, metrics=metrics)
