"""Weight sharing by 1-D k-means (Deep Compression, stage 2) and centroid fine-tuning.

    QuantizeConfig + apply_quantize(ckpt, cfg, ctx)   the stage: per layer, k-means over the
                                                      non-pruned weights, k = 2^bits
    CentroidFinetune(ckpt, model)                     the training callback: assignments fixed,
                                                      centroids trained (used by dcomp.retrain)
    check_quantized(ckpt)                             the exact-reconstruction invariant

What a quantized checkpoint holds (see dcomp.formats.checkpoint), per quantized weight ``name``:

    ckpt.quant[name] = {"bits": b, "codebook": float32 (k,), "assignments": uint8 | int16 | int32
                        tensor shaped like the weight}
    ckpt.state_dict[name] == where(mask, codebook[assignments], 0)   bit for bit (+0.0 where pruned)

``k <= 2^b`` (fewer when a layer has fewer distinct non-zero values, or a cluster ends up empty);
the assignment dtype follows 2^b: uint8 up to 8 bits, int16 up to 15, int32 for 16. Pruned
positions hold assignment 0 (ignored). A layer without a mask is clustered whole: its zeros are
values like any other. Which weights: Linear/Conv-like weights (names ending in ``weight`` with
two or more dimensions); biases and normalisation parameters are never quantized.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from dcomp.compressors.kmeans import kmeans1d
from dcomp.config.quantize import DEFAULT_CONV_BITS, DEFAULT_FC_BITS, MAX_BITS, MIN_BITS, QuantizeConfig  # noqa: F401 - re-exported
from dcomp.errors import DcompError, FormatError, UsageError
from dcomp.formats.checkpoint import Checkpoint
from dcomp.stages import StageContext, StageResult
from dcomp.train import Callback, TrainContext


def index_dtype(bits: int) -> torch.dtype:
    """The assignment dtype for k = 2^bits: uint8 when k <= 256, int16 when k <= 32768, else int32."""
    if bits <= 8:
        return torch.uint8
    if bits <= 15:
        return torch.int16
    return torch.int32


def quantizable(ckpt: Checkpoint) -> dict[str, str]:
    """Weights that can be quantized -> "conv" (3+ dims) or "fc" (2 dims)."""
    out = {}
    for name in ckpt.param_names():
        t = ckpt.state_dict[name]
        if name.endswith("weight") and t.dim() >= 2 and t.is_floating_point():
            out[name] = "conv" if t.dim() >= 3 else "fc"
    return out


def plan_bits(ckpt: Checkpoint, cfg: QuantizeConfig) -> tuple[dict[str, int], dict[str, str]]:
    """(bits per weight to quantize, skipped weight -> reason). Raises before any work is done."""
    plan: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for name, kind in quantizable(ckpt).items():
        if any(re.search(p, name) for p in cfg.exclude):
            skipped[name] = "excluded"
            continue
        base = cfg.bits
        kind_bits = cfg.conv_bits if kind == "conv" else cfg.fc_bits
        bits = kind_bits if kind_bits is not None else (
            base if base is not None else (DEFAULT_CONV_BITS if kind == "conv" else DEFAULT_FC_BITS))
        for pattern, b in cfg.layers.items():
            if re.search(pattern, name):
                bits = b
        prev = ckpt.quant.get(name)
        if prev is not None and bits > int(prev["bits"]) and not cfg.requantize:
            raise UsageError(
                f"{name} is already quantized to {prev['bits']} bits; {bits} bits cannot bring back the lost "
                f"precision. Quantize the checkpoint from before quantization, or pass --requantize to keep "
                f"its at most {2 ** int(prev['bits'])} values under a {bits}-bit index")
        plan[name] = bits
    unknown = [p for p in cfg.layers if not any(re.search(p, n) for n in plan)]
    if unknown:
        raise UsageError(f"--layer {unknown[0]!r} matches no quantized weight; weights are: "
                         f"{', '.join(quantizable(ckpt)) or 'none'}")
    if not plan:
        raise UsageError("no weight to quantize: the model has no Linear/Conv weights left after --exclude")
    return plan, skipped


def _bit_view(t: torch.Tensor) -> torch.Tensor:
    ints = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}
    return t.view(ints[t.dtype]) if t.dtype in ints else t


def reconstruct(weight_like: torch.Tensor, codebook: torch.Tensor, assignments: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
    """``where(mask, codebook[assignments], 0)`` in the weight's dtype (+0.0 at pruned positions)."""
    values = codebook[assignments.long()].to(weight_like.dtype)
    if mask is None:
        return values
    return torch.where(mask, values, torch.zeros((), dtype=weight_like.dtype))


def check_quantized(ckpt: Checkpoint) -> None:
    """Raise FormatError unless every quant entry reproduces its weight exactly, bit for bit."""
    for name, q in ckpt.quant.items():
        w = ckpt.state_dict.get(name)
        if w is None:
            raise FormatError(f"quant entry {name!r} names no weight of the checkpoint")
        cb, a = q.get("codebook"), q.get("assignments")
        if not isinstance(cb, torch.Tensor) or cb.dtype != torch.float32 or cb.dim() != 1 or cb.numel() < 1:
            raise FormatError(f"{name}: codebook must be a non-empty 1-D float32 tensor")
        if not isinstance(a, torch.Tensor) or a.is_floating_point() or tuple(a.shape) != tuple(w.shape):
            raise FormatError(f"{name}: assignments must be an integer tensor shaped like the weight {list(w.shape)}")
        if cb.numel() > 2 ** int(q.get("bits", 0)):
            raise FormatError(f"{name}: {cb.numel()} codebook entries do not fit {q.get('bits')} bits")
        mask = ckpt.masks.get(name)
        live = a[mask] if mask is not None else a.reshape(-1)
        if live.numel() and (int(live.min()) < 0 or int(live.max()) >= cb.numel()):
            raise FormatError(f"{name}: an assignment points outside the codebook of {cb.numel()} entries")
        safe = a.long().clamp(0, cb.numel() - 1)
        if not torch.equal(_bit_view(w), _bit_view(reconstruct(w, cb, safe, mask))):
            raise FormatError(f"{name}: weights differ from codebook[assignments]; the checkpoint is inconsistent")


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, mask: torch.Tensor | None, bits: int, init: str = "linear",
                    max_iter: int = 1000, seed: int = 0, levels: str = "kmeans",
                    rd_lambda: float = 0.0) -> tuple[dict[str, Any], torch.Tensor, dict[str, Any]]:
    """Cluster one weight: (quant entry, new weight, per-layer metrics). ``codebook``/``rd_lambda``:
    ``levels`` is QuantizeConfig.codebook (k-means or a uniform grid, then rate-distortion rounding when rd_lambda > 0)."""
    w = weight.detach()
    values = w[mask] if mask is not None else w.reshape(-1)
    values32 = values.float()
    k = 2 ** bits
    res = kmeans1d(values32, k, init=init, max_iter=max_iter, seed=seed, with_inertia=False)
    rd = None
    if res.distinct > k and (levels == "uniform" or rd_lambda > 0):
        from dcomp.compressors.kmeans import rd_quantize1d, uniform_levels

        start = uniform_levels(values32, k) if levels == "uniform" else res.codebook
        rd = rd_quantize1d(values32, start, rd_lambda, update_centroids=levels == "kmeans")
        res.codebook, res.labels = rd.codebook, rd.labels
    codebook = res.codebook.to(w.dtype).float() if res.codebook.numel() else torch.zeros(1)
    if mask is not None and res.codebook.numel():
        # a pruned layer's zero pattern must not change: a non-zero weight may not become exactly 0
        tiny = torch.finfo(w.dtype).tiny
        codebook = torch.where(codebook == 0, torch.full_like(codebook, tiny), codebook)
    assignments = torch.zeros(w.shape, dtype=index_dtype(bits))
    if mask is not None:
        assignments[mask] = res.labels.to(assignments.dtype)
    else:
        assignments = res.labels.reshape(w.shape).to(assignments.dtype)
    new_w = reconstruct(w, codebook, assignments, mask)
    q_values = new_w[mask] if mask is not None else new_w.reshape(-1)
    err = (values.double() - q_values.double())
    sse, signal = float((err * err).sum()), float((values.double() ** 2).sum())
    n = values.numel()
    metrics = {
        "bits": bits, "k": k, "clusters": int(res.codebook.numel()), "distinct": res.distinct,
        "weights": n, "nonzero": int(torch.count_nonzero(new_w)), "params": w.numel(),
        "masked": mask is not None, "mse": sse / n if n else 0.0,
        "sqnr_db": (10 * math.log10(signal / sse) if sse > 0 and signal > 0 else None),
        "iterations": res.iterations, "converged": res.converged,
    }
    from dcomp.compressors.kmeans import label_entropy

    metrics["index_entropy"] = label_entropy(res.labels)  # bits per non-zero weight, order 0
    if rd is not None:
        metrics.update({"levels": levels, "rd_lambda": rd_lambda, "rd_iterations": rd.iterations})
    if res.distinct < k:
        metrics["note"] = f"only {res.distinct} distinct values: {res.distinct} clusters, exact"
    entry = {"bits": int(bits), "codebook": codebook.contiguous(), "assignments": assignments}
    return entry, new_w, metrics


def apply_quantize(ckpt: Checkpoint, cfg: QuantizeConfig, ctx: StageContext, progress=None) -> StageResult:
    """The quantize stage; never modifies ``ckpt``. With ``cfg.finetune`` (epochs > 0) ``ctx.data`` is
    required; with ``ctx.data`` the test accuracy before and after is measured."""
    if cfg.mode != "kmeans":
        from dcomp.compressors.lowbit import apply_lowbit

        return apply_lowbit(ckpt, cfg, ctx, progress)
    plan, skipped = plan_bits(ckpt, cfg)
    fine = cfg.finetune is not None and cfg.finetune.epochs > 0
    if fine and ctx.data is None:
        raise UsageError("centroid fine-tuning needs training data: give --data (e.g. --data digits)")

    out = ckpt.copy()
    layers: dict[str, dict[str, Any]] = {}
    for i, (name, bits) in enumerate(plan.items()):
        mask = out.masks.get(name)
        entry, new_w, m = quantize_weight(out.state_dict[name], mask, bits, cfg.init, cfg.max_iter, ctx.seed + i,
                                          cfg.codebook, cfg.rd_lambda)
        out.state_dict[name] = new_w
        out.quant[name] = entry
        layers[name] = m

    metrics: dict[str, Any] = {"layers": layers, "skipped": skipped}
    if ctx.data is not None:
        from dcomp.retrain import accuracy

        metrics["top1_before"] = accuracy(ckpt, ctx.data, ctx.trust_pickle)
        metrics["top1_quantized"] = accuracy(out, ctx.data, ctx.trust_pickle)
    if fine:
        from dcomp.retrain import accuracy, retrain

        if progress is None and ctx.console is not None:
            from dcomp.cli.ui import TrainProgress

            progress = TrainProgress(ctx.console, "centroid fine-tune")
        callbacks = [] if cfg.centroid_lr is None else [_CentroidLr(cfg.centroid_lr)]
        out, _ = retrain(out, ctx.data, cfg.finetune, callbacks, seed=ctx.seed, progress=progress,
                         trust_pickle=ctx.trust_pickle)
        metrics["top1_finetuned"] = accuracy(out, ctx.data, ctx.trust_pickle)
        _refresh_layer_metrics(ckpt, out, layers)
    if cfg.bias_bits is not None:
        metrics["biases"] = quantize_biases(out, cfg.bias_bits, cfg.exclude, cfg.init, cfg.max_iter, ctx.seed)
        if ctx.data is not None:
            from dcomp.retrain import accuracy

            metrics["top1_biases"] = accuracy(out, ctx.data, ctx.trust_pickle)
    if cfg.float16:
        metrics["float16"] = round_to_float16(out)
        if ctx.data is not None:
            from dcomp.retrain import accuracy

            metrics["top1_float16"] = accuracy(out, ctx.data, ctx.trust_pickle)
    if ctx.data is not None:
        metrics["top1_after"] = metrics.get("top1_float16", metrics.get(
            "top1_biases", metrics.get("top1_finetuned", metrics["top1_quantized"])))
    check_quantized(out)
    metrics["quantized_weights"] = sum(m["weights"] for m in layers.values())
    metrics["index_bits"] = sum(m["weights"] * m["bits"] for m in layers.values())
    out.add_provenance("quantize", cfg.model_dump(exclude_none=True), metrics)
    return StageResult(out, metrics)


def quantize_biases(ckpt: Checkpoint, bits: int, exclude: list[str] = (), init: str = "linear",
                    max_iter: int = 1000, seed: int = 0) -> dict[str, Any]:
    """In place: every 1-D floating-point parameter without a quant entry (biases, BatchNorm
    weight/bias; not buffers) becomes codebook[assignments] with at most 2^bits values (per-tensor
    k-means). Returns per-tensor metrics (as quantize_weight's)."""
    out: dict[str, Any] = {}
    for i, name in enumerate(ckpt.param_names()):
        t = ckpt.state_dict[name]
        if t.dim() != 1 or not t.is_floating_point() or name in ckpt.quant or t.numel() == 0:
            continue
        if any(re.search(p, name) for p in exclude):
            continue
        entry, new_t, m = quantize_weight(t, None, bits, init, max_iter, seed + 1000 + i)
        ckpt.state_dict[name] = new_t
        ckpt.quant[name] = entry
        out[name] = {k: m[k] for k in ("bits", "clusters", "params", "mse", "sqnr_db")}
    return out


FLOAT16_MAX = 65504.0


def round_to_float16(ckpt: Checkpoint) -> dict[str, Any]:
    """In place: every codebook, and every floating-point tensor that is not a quantized weight,
    becomes the nearest float16 value (still a float32 tensor). Quantized weights are rebuilt
    from the rounded codebook, so the invariant holds. Tensors with values beyond float16's range
    are left alone. Returns what was rounded and the largest relative change."""
    rounded, skipped, worst = [], [], 0.0

    def half(t: torch.Tensor, name: str) -> torch.Tensor:
        nonlocal worst
        finite = t[torch.isfinite(t)]
        if finite.numel() and float(finite.abs().max()) > FLOAT16_MAX:
            skipped.append(name)
            return t
        r = t.half().to(t.dtype)
        scale = float(t.abs().max()) if t.numel() else 0.0
        if scale > 0:
            worst = max(worst, float((r - t).abs().max()) / scale)
        rounded.append(name)
        return r

    for name, q in ckpt.quant.items():
        q["codebook"] = half(q["codebook"], f"{name} codebook")
        ckpt.state_dict[name] = reconstruct(ckpt.state_dict[name], q["codebook"], q["assignments"], ckpt.masks.get(name))
    for name, t in ckpt.state_dict.items():
        if name not in ckpt.quant and t.is_floating_point() and t.dtype != torch.float16:
            ckpt.state_dict[name] = half(t, name)
    return {"rounded": len(rounded), "skipped_out_of_range": skipped, "max_relative_change": worst}


def _refresh_layer_metrics(before: Checkpoint, after: Checkpoint, layers: dict[str, dict[str, Any]]) -> None:
    """After fine-tuning the centroids moved: MSE/SQNR against the unquantized weights again."""
    for name, m in layers.items():
        mask = after.masks.get(name)
        w0, w1 = before.state_dict[name], after.state_dict[name]
        a, b = (w0[mask], w1[mask]) if mask is not None else (w0.reshape(-1), w1.reshape(-1))
        err = a.double() - b.double()
        sse, signal = float((err * err).sum()), float((a.double() ** 2).sum())
        m["mse"] = sse / max(a.numel(), 1)
        m["sqnr_db"] = 10 * math.log10(signal / sse) if sse > 0 and signal > 0 else None


class _CentroidLr(Callback):
    """Marks a fixed centroid learning rate for the CentroidFinetune that dcomp.retrain adds."""

    def __init__(self, lr: float):
        self.lr = lr

    def on_train_begin(self, ctx: TrainContext) -> None:
        ctx.state["centroid_lr"] = self.lr


class CentroidFinetune(Callback):
    """Fine-tune a quantized model's codebooks with the assignments fixed (Han et al.).

    After backward, each centroid moves by ``-lr * mean`` of the gradients of the weights assigned
    to it (pruned positions excluded); after every optimizer step the quantized weights are
    rewritten to ``where(mask, codebook[assignments], 0)``, so they always equal their centroid.
    The optimizer must not own those weights: pass ``trainable_parameters()`` to ``fit``.
    ``lr``: fixed centroid learning rate; default the optimizer's current (scheduled) rate,
    or ``ctx.state["centroid_lr"]`` when a callback set it.

    Why the mean: the loss gradient of a centroid is the SUM over its cluster, which grows with the
    cluster's size. Han et al. step by the sum, which is stable with 32 clusters of a few hundred
    weights at a small rate, but with 2-4 clusters of thousands of weights one step moved a
    centroid by thousands of single-weight steps and training diverged (loss NaN). The mean moves a
    centroid at the scale of one weight's step whatever the cluster size.
    """

    def __init__(self, ckpt: Checkpoint, model: nn.Module, lr: float | None = None):
        self.lr = lr
        self.params = dict(model.named_parameters())
        missing = [n for n in ckpt.quant if n not in self.params]
        if missing:
            raise DcompError(f"quantized weight {missing[0]!r} is not a parameter of the rebuilt model")
        self.names = list(ckpt.quant)
        self.codebooks = {n: ckpt.quant[n]["codebook"].detach().float().clone() for n in self.names}
        self.assign = {n: ckpt.quant[n]["assignments"].long().reshape(-1) for n in self.names}
        self.masks = {n: ckpt.masks.get(n) for n in self.names}
        self.counts = {n: self._counts(n, self.masks[n]) for n in self.names}
        self.steps = 0

    def _counts(self, name: str, mask: torch.Tensor | None) -> torch.Tensor:
        """Live weights per centroid (at least 1, so an empty cluster gets a zero step)."""
        a = self.assign[name]
        ones = torch.ones(a.shape, dtype=torch.float32)
        if mask is not None:
            ones = mask.reshape(-1).float()
        return torch.zeros(self.codebooks[name].numel()).scatter_add_(0, a, ones).clamp_(min=1.0)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer may update: every parameter except the quantized weights."""
        quantized = set(self.names)
        return [p for n, p in self.params.items() if n not in quantized]

    def _mask(self, ctx: TrainContext | None, name: str) -> torch.Tensor | None:
        if ctx is not None and name in ctx.masks:
            return ctx.masks[name]
        return self.masks[name]

    @torch.no_grad()
    def _rewrite(self, ctx: TrainContext | None) -> None:
        for n in self.names:
            p = self.params[n]
            a = self.assign[n].reshape(p.shape)
            p.copy_(reconstruct(p, self.codebooks[n], a, self._mask(ctx, n)))

    def on_train_begin(self, ctx: TrainContext) -> None:
        self._rewrite(ctx)

    @torch.no_grad()
    def after_backward(self, ctx: TrainContext) -> None:
        lr = self.lr or ctx.state.get("centroid_lr") or ctx.optimizer.param_groups[0]["lr"]
        for n in self.names:
            p = self.params[n]
            if p.grad is None:
                continue
            g = p.grad.reshape(-1).float()
            mask = self._mask(ctx, n)
            if mask is not None:
                g = torch.where(mask.reshape(-1), g, torch.zeros((), dtype=g.dtype))
            cb = self.codebooks[n]
            sums = torch.zeros_like(cb).scatter_add_(0, self.assign[n], g)
            cb.sub_(lr * sums / self.counts[n])
            p.grad = None  # the optimizer must not move a shared weight itself
        self.steps += 1

    def after_step(self, ctx: TrainContext) -> None:
        self._rewrite(ctx)

    @torch.no_grad()
    def update_checkpoint(self, ckpt: Checkpoint) -> None:
        """Write the trained codebooks into ``ckpt.quant`` and the weights to match, exactly.

        The codebook is read back from the checkpoint's weights (they equal their centroid), so
        this is right also when training kept an earlier epoch's weights (``select=best``)."""
        for n in self.names:
            w = ckpt.state_dict[n]
            q = ckpt.quant[n]
            a = q["assignments"]
            mask = ckpt.masks.get(n)
            cb = self.codebooks[n].clone()
            flat_a = a.long().reshape(-1)
            flat_w = w.reshape(-1).float()
            live = mask.reshape(-1) if mask is not None else torch.ones_like(flat_a, dtype=torch.bool)
            cb[flat_a[live]] = flat_w[live]
            cb = cb.to(w.dtype).float()
            if mask is not None:
                cb = torch.where(cb == 0, torch.full_like(cb, torch.finfo(w.dtype).tiny), cb)
            ckpt.quant[n] = {**q, "codebook": cb.contiguous()}
            ckpt.state_dict[n] = reconstruct(w, cb, a, mask)
