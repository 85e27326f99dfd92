"""Low-rank factorization: one Linear / Conv2d layer becomes two smaller ones (truncated SVD).

    FactorizeConfig + apply_factorize(ckpt, cfg, ctx)   the stage (`dcomp factorize`, recipe `factorize`)
    factorize_linear / factorize_conv                   one layer -> nn.Sequential of two factor layers
    apply_factorized_arch(model, spec)                  rebuild: swap in empty factor layers (build_model)
    layer_macs(model, input_shape)                      multiply-accumulates per Linear/Conv layer

Schemes (W the layer's weight, SVD W = U S V^T, rank r; the singular values are split as
sqrt(S) into both factors, which keeps their scales alike for retraining and quantization):

    linear        Linear(in, out)  ->  Linear(in, r, bias=False), Linear(r, out)
    conv-channel  Conv(I, O, kh x kw) -> Conv(I, r, kh x kw, same stride/padding, no bias), Conv(r, O, 1x1)
                  (W reshaped to O x I*kh*kw; Zhang et al.'s channel decomposition)
    conv-spatial  Conv(I, O, kh x kw) -> Conv(I, r, kh x 1), Conv(r, O, 1 x kw)
                  (W reshaped to I*kh x kw*O; Jaderberg et al.'s scheme 2 / Tai et al.)

How the rank is chosen, per layer: ``rank`` (one number; ``layers`` overrides per regex),
``energy`` (the smallest r keeping that fraction of sum(s^2)), or ``ratio`` (the largest r whose
factorized layer has at most that fraction of the layer's parameters). A layer is left whole,
and listed with the reason, when the factorized form would have as many or more parameters or
multiply-accumulates than the layer (unless ``force``), when it is pruned (masks: factorize
before pruning), grouped, or a factor already.

What the checkpoint holds: the factor layers' weights under the layer's name (``fc1.0.weight``,
``fc1.1.weight``, ``fc1.1.bias``) and ``arch["factorized"] = {layer: {"kind", "rank"}}``: plain
data, applied by ``Checkpoint.build_model`` after the architecture is built and before layers
are resized to the stored shapes, so the model rebuilds in a fresh process without pickle, the
factors export to ONNX as ordinary layers, and prune / quantize treat them as ordinary layers.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from dcomp.config.factorize import KINDS, FactorizeConfig
from dcomp.errors import DcompError, FormatError, UsageError
from dcomp.formats.checkpoint import Checkpoint
from dcomp.stages import StageContext, StageResult


# ---- the linear algebra -----------------------------------------------------------------------------

def _matrix(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The matrix whose SVD a scheme truncates (float64)."""
    w = weight.detach().double()
    if kind == "linear":
        return w
    o, i, kh, kw = w.shape
    if kind == "conv-channel":
        return w.reshape(o, i * kh * kw)
    # spatial: rows (i, y), columns (x, o)
    return w.permute(1, 2, 3, 0).reshape(i * kh, kw * o)


def singular_values(weight: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.linalg.svdvals(_matrix(weight, kind))


def full_rank(weight: torch.Tensor, kind: str) -> int:
    return min(_matrix(weight, kind).shape)


def truncated(weight: torch.Tensor, kind: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with matrix ~= A @ B, A (m, r), B (r, n), singular values split as sqrt into both."""
    m = _matrix(weight, kind)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def reconstruction_error(weight: torch.Tensor, kind: str, rank: int) -> float:
    """||W - W_r||_F / ||W||_F of the scheme's matrix at rank ``rank``."""
    s2 = singular_values(weight, kind) ** 2
    total = float(s2.sum())
    return math.sqrt(float(s2[rank:].sum()) / total) if total > 0 else 0.0


def factor_shapes(module: nn.Module, kind: str, rank: int) -> nn.Sequential:
    """Two empty factor layers for ``module`` at ``rank`` (weights to be loaded or set)."""
    bias = getattr(module, "bias", None) is not None
    if kind == "linear":
        first = nn.Linear(module.in_features, rank, bias=False)
        second = nn.Linear(rank, module.out_features, bias=bias)
    elif kind == "conv-channel":
        first = nn.Conv2d(module.in_channels, rank, module.kernel_size, module.stride, module.padding,
                          module.dilation, bias=False, padding_mode=module.padding_mode)
        second = nn.Conv2d(rank, module.out_channels, 1, bias=bias)
    elif kind == "conv-spatial":
        kh, kw = module.kernel_size
        (sh, sw), (dh, dw) = module.stride, module.dilation
        ph, pw = _padding(module)
        first = nn.Conv2d(module.in_channels, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False)
        second = nn.Conv2d(rank, module.out_channels, (1, kw), (1, sw), (0, pw), (1, dw), bias=bias)
    else:
        raise FormatError(f"unknown factorization kind {kind!r} (known: {', '.join(KINDS)})")
    return nn.Sequential(OrderedDict([("0", first), ("1", second)]))


def _padding(module: nn.Conv2d) -> tuple[int, int]:
    if isinstance(module.padding, str):
        raise DcompError("padding='same'/'valid' convs are not factorized spatially; use the channel scheme")
    return tuple(int(p) for p in module.padding)


@torch.no_grad()
def factorize_module(module: nn.Module, kind: str, rank: int) -> nn.Sequential:
    """``module`` (Linear or Conv2d) as two factor layers of rank ``rank``, weights from the SVD."""
    w = module.weight
    seq = factor_shapes(module, kind, rank)
    a, b = truncated(w, kind, rank)
    first, second = seq[0], seq[1]
    if kind == "linear":
        first.weight.copy_(b.to(w.dtype))
        second.weight.copy_(a.to(w.dtype))
    elif kind == "conv-channel":
        o, i, kh, kw = w.shape
        first.weight.copy_(b.reshape(-1, i, kh, kw).to(w.dtype))
        second.weight.copy_(a.reshape(o, -1, 1, 1).to(w.dtype))
    else:
        o, i, kh, kw = w.shape
        r = a.shape[1]
        first.weight.copy_(a.reshape(i, kh, r).permute(2, 0, 1).reshape(r, i, kh, 1).to(w.dtype))
        second.weight.copy_(b.reshape(r, kw, o).permute(2, 0, 1).reshape(o, r, 1, kw).to(w.dtype))
    if module.bias is not None:
        second.bias.copy_(module.bias)
    return seq


def kind_of(module: nn.Module, conv: str = "channel") -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1 and not isinstance(module.padding, str):
        if module.padding_mode != "zeros" and conv == "spatial":
            return None
        return f"conv-{conv}"
    return None


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_factorized_arch(model: nn.Module, spec: dict[str, Any]) -> None:
    """At rebuild time: replace each listed layer by empty factor layers of the recorded rank
    (``Checkpoint.build_model`` then loads the stored weights). ``spec`` is read from a file, so
    every entry is checked: an unknown layer, kind or rank is a FormatError, never code."""
    if not isinstance(spec, dict):
        raise FormatError("arch.factorized must be a mapping layer -> {kind, rank}")
    for name, entry in spec.items():
        if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
            raise FormatError(f"arch.factorized[{name!r}]: kind must be one of {', '.join(KINDS)}")
        rank = entry.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 1 << 20:
            raise FormatError(f"arch.factorized[{name!r}]: rank must be a positive integer, got {rank!r}")
        try:
            module = model.get_submodule(str(name))
        except AttributeError:
            raise FormatError(f"arch.factorized names layer {name!r}, which the architecture does not have") from None
        want = nn.Linear if entry["kind"] == "linear" else nn.Conv2d
        if not isinstance(module, want) or (want is nn.Conv2d and module.groups != 1):
            raise FormatError(f"arch.factorized[{name!r}] is {entry['kind']} but the layer is {type(module).__name__}")
        _set(model, str(name), factor_shapes(module, entry["kind"], rank))


# ---- counting --------------------------------------------------------------------------------------

@torch.no_grad()
def layer_macs(model: nn.Module, input_shape) -> dict[str, dict[str, Any]]:
    """Per Linear/Conv2d module: MACs for one sample, and its input / output spatial sizes."""
    out: dict[str, dict[str, Any]] = {}
    hooks = []

    def hook(name):
        def fn(mod, inp, res):
            x = inp[0]
            if isinstance(mod, nn.Linear):
                positions = x.numel() // x.shape[0] // mod.in_features
                macs = positions * mod.in_features * mod.out_features
                out[name] = {"macs": macs}
            else:
                kh, kw = mod.kernel_size
                per_out = mod.in_channels // mod.groups * kh * kw
                out[name] = {"macs": res[0].numel() * per_out, "in_hw": list(x.shape[-2:]),
                             "out_hw": list(res.shape[-2:])}
        return fn

    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            hooks.append(m.register_forward_hook(hook(name)))
    was = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return out


def factor_cost(module: nn.Module, kind: str, rank: int, info: dict[str, Any]) -> tuple[int, int]:
    """(weights, MACs per sample) of the two factor layers (biases not counted: unchanged)."""
    if kind == "linear":
        positions = info["macs"] // max(module.in_features * module.out_features, 1)
        w = rank * (module.in_features + module.out_features)
        return w, w * positions
    o, i = module.out_channels, module.in_channels
    kh, kw = module.kernel_size
    oh, ow = info["out_hw"]
    if kind == "conv-channel":
        return rank * (i * kh * kw + o), rank * i * kh * kw * oh * ow + o * rank * oh * ow
    ih, iw = info["in_hw"]
    mid_w = iw  # the kh x 1 conv keeps the width (no horizontal stride or padding)
    return rank * (i * kh + kw * o), rank * i * kh * oh * mid_w + o * rank * kw * oh * ow


def _per_rank(module: nn.Module, kind: str) -> int:
    """Weights the two factor layers add per unit of rank."""
    if kind == "linear":
        return module.in_features + module.out_features
    kh, kw = module.kernel_size
    if kind == "conv-channel":
        return module.in_channels * kh * kw + module.out_channels
    return module.in_channels * kh + kw * module.out_channels


def choose_rank(module: nn.Module, kind: str, cfg: FactorizeConfig, name: str) -> tuple[int | None, str]:
    """(rank, how it was chosen) for one layer, or (None, reason) to leave it whole."""
    override = None
    for pattern, r in cfg.layers.items():
        if re.search(pattern, name) or re.search(pattern, f"{name}.weight"):
            override = int(r)
    full = full_rank(module.weight, kind)
    if override is not None:
        if override > full:
            raise UsageError(f"--layer: rank {override} is larger than layer {name} allows (at most {full} for its "
                             f"{'x'.join(map(str, module.weight.shape))} weight as {kind})")
        return override, "--layer"
    if cfg.rank is not None:
        if cfg.rank >= full:
            return None, f"rank {cfg.rank} >= this layer's full rank {full}"
        return cfg.rank, "--rank"
    if cfg.energy is not None:
        s2 = singular_values(module.weight, kind) ** 2
        total = float(s2.sum())
        if total == 0:
            return None, "all-zero weight"
        cum = torch.cumsum(s2, 0) / total
        r = int(torch.searchsorted(cum, torch.tensor(cfg.energy - 1e-12, dtype=cum.dtype))) + 1
        return min(r, full), f"energy {cfg.energy}"
    if cfg.ratio is not None:
        params = module.weight.numel()
        r = int(cfg.ratio * params // _per_rank(module, kind))
        if r < 1:
            return None, f"even rank 1 has more than {cfg.ratio:g} of its {params} weights"
        return min(r, full), f"ratio {cfg.ratio}"
    return None, "no --layer rank matches"


def _masked_or_quantized(ckpt: Checkpoint, name: str) -> str | None:
    w = f"{name}.weight"
    if w in ckpt.quant:
        return "quantized"
    if w in ckpt.masks:
        return "pruned (has a mask)"
    return None


# ---- the stage ------------------------------------------------------------------------------------

def apply_factorize(ckpt: Checkpoint, cfg: FactorizeConfig, ctx: StageContext, progress=None) -> StageResult:
    """The factorize stage; never modifies ``ckpt``. With ``cfg.finetune`` (epochs > 0) ``ctx.data``
    is required; with ``ctx.data`` the test accuracy before and after is measured."""
    from dcomp.models.arch import REBUILDABLE_KINDS

    kind_arch = ckpt.arch.get("kind")
    if kind_arch not in REBUILDABLE_KINDS:
        raise UsageError(f"a {kind_arch} architecture cannot be restructured; factorize needs a zoo model, a "
                         f"state_dict with --arch package.module:factory, or a model dcomp describes as a graph")
    if ckpt.quant:
        raise UsageError("this checkpoint is quantized: factorize before quantizing (then quantize the factors)")
    fine = cfg.finetune is not None and cfg.finetune.epochs > 0
    if fine and ctx.data is None:
        raise UsageError("fine-tuning the factorized model needs training data: give --data (e.g. --data digits)")

    model = ckpt.build_model(trust_pickle=ctx.trust_pickle)
    macs = layer_macs(model, ckpt.input_shape)
    done_before = set((ckpt.arch.get("factorized") or {}))
    layers: list[dict[str, Any]] = []
    plan: dict[str, tuple[str, int]] = {}
    largest_full, largest_name = 0, ""
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        row: dict[str, Any] = {"layer": name, "shape": list(module.weight.shape),
                               "params_before": module.weight.numel(),
                               "macs_before": macs.get(name, {}).get("macs", 0)}
        layers.append(row)
        kind = kind_of(module, cfg.conv)
        if any(name == d or name.startswith(d + ".") for d in done_before):
            row["note"] = "a factor already"
            continue
        if any(re.search(p, name) or re.search(p, f"{name}.weight") for p in cfg.exclude):
            row["note"] = "excluded"
            continue
        if kind is None:
            row["note"] = "grouped or unsupported conv (left whole)"
            continue
        why = _masked_or_quantized(ckpt, name)
        if why:
            row["note"] = f"{why}: factorize before pruning, then prune the factors"
            continue
        full = full_rank(module.weight, kind)
        if full > largest_full:
            largest_full, largest_name = full, name
        rank, how = choose_rank(module, kind, cfg, name)
        row.update(kind=kind, full_rank=full)
        if rank is None:
            row["note"] = how
            continue
        p_after, m_after = factor_cost(module, kind, rank, macs[name])
        row.update(rank=rank, params_after=p_after, macs_after=m_after,
                   rel_error=reconstruction_error(module.weight, kind, rank),
                   energy=1.0 - reconstruction_error(module.weight, kind, rank) ** 2)
        if not cfg.force and (p_after >= row["params_before"] or m_after >= row["macs_before"]):
            worse = "parameters" if p_after >= row["params_before"] else "MACs"
            row["note"] = (f"left whole: rank {rank} factors have more {worse} "
                           f"({p_after if worse == 'parameters' else m_after:,} >= "
                           f"{row['params_before'] if worse == 'parameters' else row['macs_before']:,})")
            continue
        row["note"] = f"factorized ({how})"
        plan[name] = (kind, rank)
    if cfg.rank is not None and largest_full and cfg.rank > largest_full and not plan:
        raise UsageError(f"--rank {cfg.rank} is larger than any layer allows: the largest is {largest_name} with "
                         f"full rank {largest_full}")

    for name, (kind, rank) in plan.items():
        _set(model, name, factorize_module(model.get_submodule(name), kind, rank))

    out = ckpt.copy()
    out.arch = {**ckpt.arch, "factorized": {**(ckpt.arch.get("factorized") or {}),
                                            **{n: {"kind": k, "rank": r} for n, (k, r) in plan.items()}}}
    if not out.arch["factorized"]:
        out.arch.pop("factorized")
    out.update_from_model(model)
    out.masks = {k: v.clone() for k, v in ckpt.masks.items() if k in out.state_dict}

    p_before = sum(r["params_before"] for r in layers)
    p_after = sum(r.get("params_after", r["params_before"]) if r["layer"] in plan else r["params_before"] for r in layers)
    m_before = sum(r["macs_before"] for r in layers)
    m_after = sum(r.get("macs_after", r["macs_before"]) if r["layer"] in plan else r["macs_before"] for r in layers)
    metrics: dict[str, Any] = {
        "layers": layers, "factorized": len(plan), "left_whole": [r["layer"] for r in layers if r["layer"] not in plan],
        "weights_before": p_before, "weights_after": p_after, "macs_before": m_before, "macs_after": m_after,
        "params_before": ckpt.param_count(), "params_after": out.param_count(),
    }
    if ctx.data is not None:
        from dcomp.retrain import accuracy

        metrics["top1_before"] = accuracy(ckpt, ctx.data, ctx.trust_pickle)
        metrics["top1_factorized"] = accuracy(out, ctx.data, ctx.trust_pickle)
    if fine and plan:
        from dcomp.retrain import accuracy, retrain

        if progress is None and ctx.console is not None:
            from dcomp.cli.ui import TrainProgress

            progress = TrainProgress(ctx.console, "fine-tune factors")
        out, _ = retrain(out, ctx.data, cfg.finetune, seed=ctx.seed, progress=progress, trust_pickle=ctx.trust_pickle)
        metrics["top1_finetuned"] = accuracy(out, ctx.data, ctx.trust_pickle)
    if ctx.data is not None:
        metrics["top1_after"] = metrics.get("top1_finetuned", metrics["top1_factorized"])
    out.add_provenance("factorize", cfg.model_dump(exclude_none=True), {k: v for k, v in metrics.items() if k != "layers"})
    return StageResult(out, metrics)
