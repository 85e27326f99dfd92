"""Sparsity-inducing regularisers added to the training loss, and the structural removal after.

    L1           lambda * sum |w|                        over every Linear/Conv weight
    group lasso  lambda * sum_g ||w_g||_2 (un-squared)    Wen et al.'s SSL groups:
                   Conv   filter   one group per output channel  W[o, :, :, :] (+ bias[o])
                          channel  one group per input channel   W[:, i, :, :]
                          shape    one group per (i, kh, kw)     W[:, i, y, x]
                   Linear row      one group per output unit     W[o, :] (+ bias[o])
                          column   one group per input unit      W[:, i]
                 A kind names the same idea for both layer types, so ``filter`` also means
                 ``row`` on Linear layers and ``channel``/``shape`` mean ``column`` there.

How the penalty acts: by default as a PROXIMAL step after every optimizer step (soft-thresholding
with step lr * lambda: w <- sign(w) max(|w| - lr*lambda, 0) for L1, w_g <- w_g max(0, 1 - lr*lambda /
||w_g||) for a group), so weights and whole groups reach exactly zero and stay there while the
data does not pull them out; the penalty value is added (detached) to the reported loss. With
``proximal=False`` the penalty is a differentiable loss term (subgradient), which in the short
runs used here only brings norms near zero, never to it. Lambda's useful range is tied to the
learning rate: a group moves by at most lr*lambda per step.

The output (classifier) layer's rows are never penalised: its units are the classes. The
bias belongs to its unit's filter/row group, so a zero group means a zero output before the
activation, which is what makes removing the unit exact for ReLU nets without normalisation.

After training, ``group_removal`` finds groups whose norm fell below a threshold: units whose
filter/row, or whose column in the next layer, is below it are removed STRUCTURALLY with
``dcomp.compressors.graph.remove_units`` (a smaller model, not a mask); shape-wise groups
below it are zeroed and masked (they do not remove a unit).
"""

from __future__ import annotations

import torch
from torch import nn

from dcomp.config.retrain import GroupKind, GroupLassoConfig, L1Config  # noqa: F401 - re-exported
from dcomp.errors import DcompError
from dcomp.train import Callback

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_kind(kind: str, module: nn.Module) -> str:
    """The group kind for this layer type: filter/channel/shape for Conv, row/column for Linear."""
    if isinstance(module, nn.Linear):
        return "row" if kind in ("filter", "row") else "column"
    return {"row": "filter", "column": "channel"}.get(kind, kind)


def group_norms(module: nn.Module, kind: str) -> torch.Tensor:
    """1-D tensor of the L2 norms of ``module``'s groups of ``kind`` (differentiable)."""
    w = module.weight
    kind = layer_kind(kind, module)
    if kind in ("row", "filter"):
        flat = w.reshape(w.shape[0], -1)
        if getattr(module, "bias", None) is not None:
            flat = torch.cat([flat, module.bias[:, None]], dim=1)
        return flat.norm(dim=1)
    if kind in ("column", "channel"):
        return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
    if kind == "shape":
        return w.reshape(w.shape[0], -1).norm(dim=0)
    raise ValueError(f"unknown group kind {kind!r}")


@torch.no_grad()
def group_shrink(module: nn.Module, kind: str, step: float) -> None:
    """Proximal step of ``step * sum ||w_g||``: every group shrinks by ``step`` in norm, or to 0."""
    kind = layer_kind(kind, module)
    norms = group_norms(module, kind)
    scale = (1.0 - step / norms.clamp_min(1e-12)).clamp_min(0.0)
    w = module.weight
    if kind in ("row", "filter"):
        w.mul_(scale.reshape(-1, *([1] * (w.dim() - 1))))
        if getattr(module, "bias", None) is not None:
            module.bias.mul_(scale)
    elif kind in ("column", "channel"):
        w.mul_(scale.reshape(1, -1, *([1] * (w.dim() - 2))))
    else:  # shape
        w.mul_(scale.reshape(1, *w.shape[1:]))


class LayerTap:
    """Records which Linear/Conv layers a forward pass calls, in order, and (optionally) the input
    of the last one called: the features feeding the classifier."""

    def __init__(self, model: nn.Module, keep_inputs: bool = False):
        self.order: list[str] = []
        self.last_input: torch.Tensor | None = None
        self.keep_inputs = keep_inputs
        self.handles = [model.register_forward_pre_hook(self._reset)]
        for name, m in model.named_modules():
            if isinstance(m, LAYER_TYPES):
                self.handles.append(m.register_forward_pre_hook(self._hook(name)))

    def _reset(self, module, args):
        self.order = []
        self.last_input = None

    def _hook(self, name):
        def fn(module, args):
            self.order.append(name)
            if self.keep_inputs:
                self.last_input = args[0]
        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.no_grad()
def call_order(model: nn.Module, input_shape) -> list[str]:
    """Names of the Linear/Conv layers in the order a forward pass calls them."""
    tap = LayerTap(model)
    was = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_shape))
    finally:
        model.train(was)
        tap.remove()
    return tap.order


class Regularizer(Callback):
    """Adds L1 and/or group-lasso penalties to the loss; ``last_penalty`` holds the latest value."""

    def __init__(self, l1: L1Config | None = None, group_lasso: GroupLassoConfig | None = None):
        if l1 is None and group_lasso is None:
            raise ValueError("Regularizer needs an L1 or a group-lasso config")
        self.l1, self.gl = l1, group_lasso
        self.last_penalty = 0.0

    def on_train_begin(self, ctx):
        modules = dict(ctx.model.named_modules())
        self.modules = {n: m for n, m in modules.items() if isinstance(m, LAYER_TYPES)}
        for cfg in (self.l1, self.gl):
            if cfg is not None and cfg.layers is not None:
                bad = [n for n in cfg.layers if n not in self.modules]
                if bad:
                    raise DcompError(f"regulariser layers not in the model: {', '.join(bad[:3])} "
                                     f"(Linear/Conv modules are: {', '.join(list(self.modules)[:6])})")
        if not self.modules:
            raise DcompError("the model has no Linear or Conv layers to regularise")
        self.tap = LayerTap(ctx.model)
        self.classifier: str | None = None

    def _groups(self):
        """(module name, module, layer kind) of every penalised group family."""
        names = self.gl.layers or list(self.modules)
        for n in names:
            m = self.modules[n]
            for kind in dict.fromkeys(layer_kind(k, m) for k in self.gl.groups):
                if n == self.classifier and kind in ("row", "filter"):
                    continue  # the classes are not removable
                yield n, m, kind

    def penalty(self) -> torch.Tensor:
        pen = torch.zeros(())
        if self.l1 is not None and self.l1.lam > 0:
            names = self.l1.layers or list(self.modules)
            pen = pen + self.l1.lam * sum(self.modules[n].weight.abs().sum() for n in names)
        if self.gl is not None and self.gl.lam > 0:
            terms = [group_norms(m, k).sum() for _, m, k in self._groups()]
            if terms:
                pen = pen + self.gl.lam * torch.stack(terms).sum()
        return pen

    def compute_loss(self, ctx, x, out, y, loss):
        if self.classifier is None:
            self.classifier = self.tap.order[-1] if self.tap.order else list(self.modules)[-1]
            self.tap.remove()
        differentiable = (self.l1 is not None and not self.l1.proximal) or (self.gl is not None and not self.gl.proximal)
        if differentiable:
            pen = self.penalty()
        else:
            with torch.no_grad():
                pen = self.penalty()
        self.last_penalty = float(pen.detach())
        # proximal terms are shown in the loss but act through after_step
        return loss + (pen if differentiable else pen.detach())

    @torch.no_grad()
    def after_step(self, ctx):
        lr = float(ctx.optimizer.param_groups[0]["lr"])
        if self.l1 is not None and self.l1.proximal and self.l1.lam > 0:
            for n in self.l1.layers or list(self.modules):
                w = self.modules[n].weight
                w.copy_(w.sign() * (w.abs() - lr * self.l1.lam).clamp_min(0))
        if self.gl is not None and self.gl.proximal and self.gl.lam > 0:
            for _, m, kind in self._groups():
                group_shrink(m, kind, lr * self.gl.lam)

    def on_train_end(self, ctx):
        if getattr(self, "tap", None) is not None:
            self.tap.remove()


def _out_units(m: nn.Module) -> int:
    return m.weight.shape[0]


def _in_units(m: nn.Module) -> int:
    return m.weight.shape[1] * (getattr(m, "groups", 1) or 1)


@torch.no_grad()
def group_removal(model: nn.Module, input_shape, threshold: float, kinds: list[str],
                  layers: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Which units to keep and which shape-wise groups to zero.

    Returns ``(keep, shape_masks)``: ``keep`` maps a module name to the LongTensor of its
    output units to keep (only layers that lose units; the classifier never does) and
    ``shape_masks`` maps a weight name to a bool mask (False = zeroed) for shape-wise groups.
    """
    order = call_order(model, input_shape)
    modules = dict(model.named_modules())
    allowed = set(layers) if layers is not None else set(order)
    keep: dict[str, torch.Tensor] = {}
    shape_masks: dict[str, torch.Tensor] = {}
    for i, name in enumerate(order):
        if name not in allowed or order.index(name) != i:  # a layer called twice: leave it alone
            continue
        m = modules[name]
        lk = {layer_kind(k, m) for k in kinds}
        if "shape" in lk and not isinstance(m, nn.Linear):
            w = m.weight
            dead = group_norms(m, "shape") < threshold
            if dead.any():
                shape_masks[f"{name}.weight"] = (~dead).reshape(1, *w.shape[1:]).expand_as(w).clone()
        if i == len(order) - 1:
            continue  # the classifier keeps its outputs
        dead = torch.zeros(_out_units(m), dtype=torch.bool)
        if lk & {"row", "filter"}:
            dead |= group_norms(m, "row" if isinstance(m, nn.Linear) else "filter") < threshold
        nxt = modules[order[i + 1]]
        if any(layer_kind(k, nxt) in ("column", "channel") for k in kinds) and order[i + 1] in allowed:
            cols = group_norms(nxt, "column" if isinstance(nxt, nn.Linear) else "channel")
            if cols.numel() == dead.numel():
                dead |= cols < threshold
            elif isinstance(nxt, nn.Linear) and cols.numel() % dead.numel() == 0:  # conv -> flatten -> linear
                per = cols.numel() // dead.numel()
                dead |= nxt.weight.reshape(nxt.weight.shape[0], dead.numel(), per).norm(dim=(0, 2)) < threshold
        if dead.all():  # keep the strongest unit so the net still computes something
            strength = group_norms(m, "row" if isinstance(m, nn.Linear) else "filter")
            dead[int(strength.argmax())] = False
        if dead.any():
            keep[name] = torch.nonzero(~dead).squeeze(1).long()
    return keep, shape_masks


def remove_groups(model: nn.Module, input_shape, threshold: float, kinds: list[str],
                  layers: list[str] | None = None) -> tuple[nn.Module, dict]:
    """Zero the shape-wise groups below ``threshold`` and remove the dead units structurally.

    Returns the (possibly new, smaller) model, the shape masks, and counts for the report.
    """
    keep, shape_masks = group_removal(model, input_shape, threshold, kinds, layers)
    params = dict(model.named_parameters())
    for name, m in shape_masks.items():
        params[name].data.mul_(m)
    before = {n: _out_units(mm) for n, mm in model.named_modules() if isinstance(mm, LAYER_TYPES)}
    removed = {n: before[n] - int(k.numel()) for n, k in keep.items()}
    if keep:
        from dcomp.compressors.graph import remove_units

        model = remove_units(model, keep, tuple(input_shape))
    return model, {"shape_masks": shape_masks, "units_removed": removed,
                   "shape_groups_zeroed": {n: int((~m[0]).sum()) for n, m in shape_masks.items()}}
