"""Structured pruning that physically shrinks a model: neurons, filters, channels.

Removing output unit ``j`` of a Linear or Conv2d layer is only correct when every layer that
reads that unit shrinks with it. This module finds those dependencies by tracing the model
with ``torch.fx`` (and running a shape pass on a dummy input), then:

* ``trace_dependencies(model, input_shape)`` returns the **groups**: sets of producer layers
  whose output units are coupled (their outputs meet in an addition, as in a residual block,
  so they must keep the same units), with the BatchNorm layers that normalise those units and
  the consumer layers that read them (a Linear after ``Flatten`` reads ``factor`` = H*W input
  features per channel, grouped per channel).
* ``remove_units(model, keep, input_shape)`` returns a new, smaller model.
* ``shrink_checkpoint(ckpt, keep)`` does the same on a checkpoint (masks sliced consistently).

A group is *blocked* when shrinking it could break the model: it reaches the model output
(the class count stays), it is coupled to the model input, or it flows through an operation
this module does not understand (concatenation, reshapes other than flatten, grouped
convolutions, LayerNorm, ...). Asking to shrink a blocked group raises a ``DcompError``
that names the layer and the reason; nothing is guessed.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dcomp.errors import DcompError

INPUT = "<input>"

# Leaf modules that keep the channel dimension (dim 1) as it is.
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.hardswish, F.hardsigmoid, F.hardtanh,
    torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_pool1d, F.avg_pool1d, F.mish,
}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
_ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}


@dataclass
class Group:
    """Producer layers whose output units are removed together."""

    producers: list[str]                     # Linear / Conv2d module names
    channels: int                            # output units of each producer
    bns: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (module, input features per unit)
    blocked: str | None = None               # why it must not shrink; None = free
    kind: str = "linear"                     # "linear", "conv" or "mixed" (the producers' type)


@dataclass
class DependencyGraph:
    groups: list[Group]
    group_of: dict[str, int]                 # producer name -> index into groups

    def group(self, layer: str) -> Group:
        return self.groups[self.group_of[layer]]


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> str:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        return ra


def _shape(node) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def trace_dependencies(model: nn.Module, input_shape) -> DependencyGraph:
    """Trace ``model`` and group its Linear/Conv2d layers by coupled output units (see module doc)."""
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    if isinstance(model, torch.jit.ScriptModule):
        raise DcompError("structured pruning needs the model's Python code; a TorchScript model cannot be "
                         "traced: save a state_dict and pass --arch, or use an unstructured method")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DcompError(f"structured pruning traces the model with torch.fx, which failed ({first}); "
                         f"use an unstructured method (magnitude, global, std, nm) instead") from None
    param = next(model.parameters(), None)
    dummy = torch.zeros(2, *[int(s) for s in input_shape], dtype=param.dtype if param is not None else torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(dummy)
    except Exception as e:  # noqa: BLE001
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DcompError(f"the model does not run on inputs of shape {list(input_shape)} ({first})") from None
    finally:
        model.train(was_training)

    modules = dict(gm.named_modules())
    uf = _UnionFind()
    reasons: dict[str, list[str]] = {}
    info: dict[Any, tuple[str, int] | None] = {}
    producers: dict[str, nn.Module] = {}
    consumers: dict[str, tuple[str, int]] = {}
    bns: dict[str, str] = {}

    def block(key: str, why: str) -> None:
        reasons.setdefault(key, []).append(why)

    def block_inputs(node, why: str) -> None:
        for a in node.all_input_nodes:
            if info.get(a) is not None:
                block(info[a][0], why)

    def first(node):
        a = node.args[0] if node.args else None
        return info.get(a) if isinstance(a, fx.Node) else None

    def flatten_of(src_node, out_node):
        """Info after flattening src_node's tensor to (N, features)."""
        inp = info.get(src_node)
        if inp is None:
            return None
        shp, out = _shape(src_node), _shape(out_node)
        if shp is None or out is None or len(out) != 2 or out[0] != shp[0]:
            block(inp[0], f"it goes through a reshape at '{out_node.name}' that is not a flatten")
            return None
        return inp[0], inp[1] * math.prod(shp[2:])

    placeholders = 0
    for node in gm.graph.nodes:
        res: tuple[str, int] | None = None
        if node.op == "placeholder":
            placeholders += 1
            if placeholders == 1 and _shape(node) is not None:
                res = (INPUT, 1)
                uf.find(INPUT)
                block(INPUT, "it is coupled to the model input")
        elif node.op == "get_attr":
            res = None
        elif node.op == "call_module":
            m = modules[node.target]
            name = str(node.target)
            inp = first(node)
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                producers[name] = m
                uf.find(name)
                if isinstance(m, nn.Conv2d) and m.groups != 1:
                    block(name, f"'{name}' is a grouped convolution")
                    if inp is not None:
                        block(inp[0], f"it feeds the grouped convolution '{name}'")
                    inp = None
                if isinstance(m, nn.Linear) and (len(_shape(node) or ()) != 2):
                    block(name, f"'{name}' is applied to a tensor that is not (batch, features)")
                    if inp is not None:
                        block(inp[0], f"it feeds '{name}' on a tensor that is not (batch, features)")
                    inp = None
                if inp is not None:
                    if isinstance(m, nn.Conv2d) and inp[1] != 1:
                        block(inp[0], f"it reaches the convolution '{name}' after a flatten")
                    elif name in consumers and consumers[name][1] != inp[1]:
                        block(inp[0], f"'{name}' is called on inputs of different layouts")
                    else:
                        if name in consumers:
                            uf.union(consumers[name][0], inp[0])
                        consumers[name] = inp
                res = (name, 1)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if inp is not None:
                    if inp[1] != 1:
                        block(inp[0], f"BatchNorm '{name}' normalises flattened features")
                    else:
                        if name in bns:
                            uf.union(bns[name], inp[0])
                        bns[name] = inp[0]
                res = inp
            elif isinstance(m, _PASS_MODULES):
                res = inp
            elif isinstance(m, nn.Flatten):
                if m.start_dim == 1 and m.end_dim == -1:
                    res = flatten_of(node.args[0], node)
                else:
                    block_inputs(node, f"it goes through Flatten '{name}' with start_dim {m.start_dim}")
            else:
                block_inputs(node, f"it feeds {type(m).__name__} '{name}', which structured pruning does not handle")
        elif node.op in ("call_function", "call_method"):
            fn = node.target
            is_m = node.op == "call_method"
            tensor_args = [a for a in node.all_input_nodes if _shape(a) is not None]
            if (not is_m and fn in _PASS_FUNCTIONS) or (is_m and fn in _PASS_METHODS):
                others = [a for a in node.all_input_nodes[1:] if info.get(a) is not None]
                if others:
                    block_inputs(node, f"'{node.name}' mixes several tensors")
                else:
                    res = first(node)
            elif (not is_m and fn in _ELEMENTWISE) or (is_m and fn in _ELEMENTWISE_METHODS):
                res = _elementwise(node, info, uf, block, tensor_args)
            elif (not is_m and fn is torch.flatten) or (is_m and fn == "flatten"):
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                src = node.args[0]
                shp = _shape(src) if isinstance(src, fx.Node) else None
                if info.get(src) is not None and (start != 1 or end != -1):
                    if shp is not None and len(shp) == 2 and start in (0, 1) and end in (-1, 1):
                        res = info.get(src) if start == 1 else None
                        if start == 0:
                            block(info[src][0], f"'{node.name}' flattens the batch dimension")
                    else:
                        block(info[src][0], f"'{node.name}' flattens dimensions other than 1..-1")
                elif info.get(src) is not None:
                    res = flatten_of(src, node)
            elif is_m and fn in ("view", "reshape") or (not is_m and fn is torch.reshape):
                src = node.args[0]
                if info.get(src) is not None:
                    shp, out = _shape(src), _shape(node)
                    if shp is not None and shp == out:
                        res = info[src]
                    else:
                        res = flatten_of(src, node)
            elif is_m and fn in ("size", "dim") or (not is_m and fn is getattr):
                res = None  # shape queries: harmless
            elif (is_m and fn == "mean") or (not is_m and fn is torch.mean):
                src = node.args[0]
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                shp = _shape(src) if isinstance(src, fx.Node) else None
                if info.get(src) is not None:
                    dims_t = (dims,) if isinstance(dims, int) else tuple(dims or ())
                    if shp is not None and dims_t and all((d % len(shp)) >= 2 for d in dims_t):
                        res = info[src]
                    else:
                        block(info[src][0], f"'{node.name}' averages over the channel dimension")
            else:
                block_inputs(node, f"it goes through '{node.name}' ({getattr(fn, '__name__', fn)}), which structured "
                                   f"pruning does not handle")
        elif node.op == "output":
            block_inputs(node, "it is the model output (the number of classes must stay)")
        info[node] = res

    # Collect groups.
    roots: dict[str, list[str]] = {}
    for name in producers:
        roots.setdefault(uf.find(name), []).append(name)
    groups: list[Group] = []
    group_of: dict[str, int] = {}
    for root, members in roots.items():
        why: list[str] = []
        for key in list(reasons):
            if uf.find(key) == root:
                why.extend(reasons[key])
        widths = {_out_units(producers[m]) for m in members}
        if len(widths) != 1:
            why.append(f"coupled layers {', '.join(members)} have different widths")
        kinds = {"conv" if isinstance(producers[m], nn.Conv2d) else "linear" for m in members}
        g = Group(producers=sorted(members), channels=max(widths), blocked=why[0] if why else None)
        g.kind = kinds.pop() if len(kinds) == 1 else "mixed"
        g.bns = sorted(b for b, k in bns.items() if uf.find(k) == root)
        g.consumers = sorted((c, f) for c, (k, f) in consumers.items() if uf.find(k) == root)
        for c, f in g.consumers:
            m = modules[c]
            need = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            if need != g.channels * f and g.blocked is None:
                g.blocked = f"'{c}' reads {need} inputs, not {g.channels} units x {f}"
        for m in members:
            group_of[m] = len(groups)
        groups.append(g)
    return DependencyGraph(groups=groups, group_of=group_of)


def _elementwise(node, info, uf, block, tensor_args):
    keyed = [a for a in tensor_args if info.get(a) is not None]
    if not keyed:
        return None
    factors = {info[a][1] for a in keyed}
    key = info[keyed[0]][0]
    for a in keyed[1:]:
        key = uf.union(key, info[a][0])
    if len(factors) != 1:
        block(key, f"'{node.name}' combines tensors of different layouts")
        return None
    out = _shape(node)
    for a in tensor_args:
        if info.get(a) is None:
            shp = _shape(a)
            # A constant or unrelated tensor is fine only if it broadcasts over the channel dimension.
            if shp is not None and math.prod(shp) > 1 and not (out and len(shp) == len(out) and shp[1] == 1):
                block(key, f"'{node.name}' combines it with a tensor that has its own channels")
    return key, factors.pop()


def _out_units(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


# ---- removing units ------------------------------------------------------------------------

@dataclass
class RemovalPlan:
    """Which indices every affected module keeps: output units, input features, BatchNorm channels."""

    out_index: dict[str, torch.Tensor] = field(default_factory=dict)
    in_index: dict[str, torch.Tensor] = field(default_factory=dict)
    bn_index: dict[str, torch.Tensor] = field(default_factory=dict)

    def slice_weight(self, module: str, w: torch.Tensor) -> torch.Tensor:
        """Slice a tensor shaped like ``module``'s weight (a mask, say) the way the weight is sliced."""
        if module in self.out_index:
            w = w.index_select(0, self.out_index[module])
        if module in self.in_index and w.dim() >= 2:
            w = w.index_select(1, self.in_index[module])
        return w

    def affected(self) -> set[str]:
        return set(self.out_index) | set(self.in_index) | set(self.bn_index)


def plan_removal(model: nn.Module, graph: DependencyGraph, keep: dict[str, torch.Tensor]) -> RemovalPlan:
    modules = dict(model.named_modules())
    by_group: dict[int, tuple[str, torch.Tensor]] = {}
    for name, idx in keep.items():
        if name not in graph.group_of:
            if name in modules:
                raise DcompError(f"layer '{name}' is a {type(modules[name]).__name__}; only Linear and Conv2d "
                                 f"layers lose units")
            raise DcompError(f"the model has no layer '{name}'")
        g = graph.group(name)
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        idx = torch.unique(idx)  # sorted, no repeats
        if idx.numel() == 0:
            raise DcompError(f"keeping no units of '{name}' would cut the network; keep at least one")
        if int(idx[0]) < 0 or int(idx[-1]) >= g.channels:
            raise DcompError(f"units to keep of '{name}' must lie in [0, {g.channels}), got {int(idx[0])}..{int(idx[-1])}")
        gi = graph.group_of[name]
        if gi in by_group and not torch.equal(by_group[gi][1], idx):
            raise DcompError(f"layers '{by_group[gi][0]}' and '{name}' are coupled (their outputs are added), "
                             f"so they must keep the same units")
        by_group[gi] = (name, idx)
    plan = RemovalPlan()
    for gi, (name, idx) in by_group.items():
        g = graph.groups[gi]
        if idx.numel() == g.channels:
            continue
        if g.blocked:
            raise DcompError(f"cannot remove units of '{name}': {g.blocked}")
        for p in g.producers:
            plan.out_index[p] = idx
        for b in g.bns:
            plan.bn_index[b] = idx
        for c, f in g.consumers:
            plan.in_index[c] = (idx[:, None] * f + torch.arange(f)).reshape(-1) if f > 1 else idx
    return plan


@torch.no_grad()
def apply_plan(model: nn.Module, plan: RemovalPlan) -> nn.Module:
    """Shrink the modules of ``model`` in place as ``plan`` says."""
    for name in sorted(plan.affected()):
        m = model.get_submodule(name)
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = plan.slice_weight(name, m.weight.data)
            m.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)
            if m.bias is not None and name in plan.out_index:
                m.bias = nn.Parameter(m.bias.data.index_select(0, plan.out_index[name]).clone(),
                                      requires_grad=m.bias.requires_grad)
            if isinstance(m, nn.Linear):
                m.out_features, m.in_features = w.shape[0], w.shape[1]
            else:
                m.out_channels, m.in_channels = w.shape[0], w.shape[1]
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            idx = plan.bn_index[name]
            if m.affine:
                m.weight = nn.Parameter(m.weight.data.index_select(0, idx).clone(), requires_grad=m.weight.requires_grad)
                m.bias = nn.Parameter(m.bias.data.index_select(0, idx).clone(), requires_grad=m.bias.requires_grad)
            if m.running_mean is not None:
                m.running_mean = m.running_mean.index_select(0, idx).clone()
                m.running_var = m.running_var.index_select(0, idx).clone()
            m.num_features = int(idx.numel())
    return model


def remove_units(model: nn.Module, keep: dict[str, torch.Tensor], input_shape) -> nn.Module:
    """A new, smaller model: each Linear/Conv2d named in ``keep`` keeps only the output units listed
    there (sorted LongTensor), and every dependent layer shrinks consistently (see module doc).

    Coupled layers (outputs added together) must be given the same units, or only one of them.
    Raises ``DcompError`` naming the layer when a request cannot be done safely.
    """
    graph = trace_dependencies(model, input_shape)
    plan = plan_removal(model, graph, keep)
    new = apply_plan(copy.deepcopy(model), plan)
    _check_runs(new, model, input_shape)
    return new


def _check_runs(new: nn.Module, old: nn.Module, input_shape) -> None:
    param = next(old.parameters(), None)
    x = torch.zeros(2, *[int(s) for s in input_shape], dtype=param.dtype if param is not None else torch.float32)
    modes = new.training, old.training
    new.eval(), old.eval()
    try:
        with torch.no_grad():
            a, b = new(x), old(x)
    except Exception as e:  # noqa: BLE001
        raise DcompError(f"the shrunk model does not run ({(str(e).splitlines() or [''])[0]}); "
                         f"this model has a dependency structured pruning missed, please report it") from None
    finally:
        new.train(modes[0]), old.train(modes[1])
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
        raise DcompError(f"the shrunk model's output shape {list(a.shape)} differs from {list(b.shape)}; refusing")


# ---- scoring ---------------------------------------------------------------------------------

@torch.no_grad()
def unit_scores(model: nn.Module, group: Group, method: str) -> torch.Tensor:
    """Importance of each output unit of ``group``, summed over its coupled producers.

    neuron: L2 norm of the weight row feeding the unit; filter: L1 norm of the filter (Li et al.);
    channel: L1 norm of the slices that consumers read from the unit (input-channel importance).
    """
    score = torch.zeros(group.channels, dtype=torch.float64)
    if method in ("neuron", "filter"):
        for p in group.producers:
            w = model.get_submodule(p).weight.detach().reshape(group.channels, -1).double()
            score += w.norm(dim=1) if method == "neuron" else w.abs().sum(1)
    elif method == "channel":
        for c, f in group.consumers:
            w = model.get_submodule(c).weight.detach().double().abs()
            per_in = w.sum(0).reshape(w.shape[1], -1).sum(1)  # (in,)
            score += per_in.reshape(group.channels, f).sum(1)
    else:
        raise ValueError(f"unknown structured method {method!r}")
    return score


def top_units(score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Sorted indices of the ``n_keep`` highest scores (ties: lower index first)."""
    n_keep = max(1, min(int(n_keep), score.numel()))
    order = torch.sort(score, descending=True, stable=True).indices
    return torch.sort(order[:n_keep]).values


# ---- BatchNorm recalibration ---------------------------------------------------------------------

@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> bool:
    """Recompute BatchNorm running statistics of ``model`` on inputs ``x`` (no weights change).

    After units are removed, the remaining units see different inputs, so the stored running
    means/variances no longer fit; re-estimating them is cheap and recovers most of the accuracy
    before any retraining. Returns False (and does nothing) when the model has no BatchNorm.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return False
    was_training = model.training
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            if len(xb) > 1:
                model(xb)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)
    return True


# ---- checkpoints -------------------------------------------------------------------------------

def check_shrinkable(ckpt) -> None:
    kind = ckpt.arch.get("kind")
    if kind not in ("zoo", "import", "factory", "graph"):
        raise DcompError(f"structured pruning changes layer shapes, so the checkpoint must rebuild from a zoo or "
                         f"package.module:factory architecture; this one is {kind}: save a state_dict and pass --arch, "
                         f"or use an unstructured method")
    if ckpt.quant:
        raise DcompError("this checkpoint is already quantized; prune before quantizing")


def shrink_checkpoint(ckpt, keep: dict[str, torch.Tensor], model: nn.Module | None = None,
                      graph: DependencyGraph | None = None, trust_pickle: bool = False):
    """A new checkpoint with the units in ``keep`` kept (see remove_units); masks are sliced the same way."""
    check_shrinkable(ckpt)
    model = model if model is not None else ckpt.build_model(trust_pickle=trust_pickle)
    graph = graph if graph is not None else trace_dependencies(model, ckpt.input_shape)
    plan = plan_removal(model, graph, keep)
    new_model = apply_plan(copy.deepcopy(model), plan)
    _check_runs(new_model, model, ckpt.input_shape)
    out = ckpt.copy()
    out.update_from_model(new_model)
    masks = {}
    for pname, m in ckpt.masks.items():
        mod = pname.rsplit(".", 1)[0] if "." in pname else ""
        if mod in plan.out_index or mod in plan.in_index:
            if pname.endswith(".weight"):
                m = plan.slice_weight(mod, m)
            elif mod in plan.out_index:
                m = m.index_select(0, plan.out_index[mod])
        masks[pname] = m.clone()
    out.masks = masks
    return out, new_model
