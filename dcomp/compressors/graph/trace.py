"""Tracing: torch.fx symbolic trace, then one pass that runs every node on real values and on
label tensors (see ``labels.py``) and lets the rule of each op (``rules.py``) record what it ties.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dcomp.compressors.graph.labels import WILD, LabelSpace
from dcomp.errors import DcompError, UsageError


@dataclass
class Slot:
    """Positions along ``dim`` of tensor ``attr`` of module ``owner`` belong to the units in ``labels``."""

    owner: str
    attr: str
    dim: int
    labels: torch.Tensor
    role: str            # "out" (a layer's outputs), "in" (a layer's inputs), "norm", "follow", "param", "grouped_in"
    groups: int = 1      # grouped_in: the convolution's groups


@dataclass(eq=False)   # compared by identity: its fields are tensors (list.remove must not compare them)
class Check:
    """A deferred check on a label tensor, evaluated once the classes are known."""

    kind: str            # "slice" (a dim cut at fixed offsets), "size" (a dim given as a literal), "split" (equal parts),
    #                      "count" (a dim sized by another tensor's dim: ``other`` along ``other_dim``)
    labels: torch.Tensor
    dim: int
    node: str
    scope: str
    value: int = 0
    dynamic_dims: tuple[int, ...] = ()
    parts: int = 1
    other: torch.Tensor | None = None
    other_dim: int = 0


@dataclass(eq=False)
class DimOf:
    """The label of a size read from a tensor's shape (``x.shape[d]``, ``x.size(d)``): which tensor, which dim.
    A reshape that uses it on another tensor ties the two counts (a "count" check)."""

    labels: torch.Tensor
    dim: int


@dataclass(eq=False)
class ShapeOf:
    """The label of ``x.shape`` / ``x.size()``: indexing it gives a :class:`DimOf`."""

    labels: torch.Tensor


@dataclass
class Attention:
    """An attention module whose heads are units: heads are removed whole, head_dim kept."""

    module: str
    heads: torch.Tensor      # one label per head
    head_dim: int


@dataclass
class Trace:
    model: nn.Module
    space: LabelSpace = field(default_factory=LabelSpace)
    slots: dict[tuple[str, str, int], Slot] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    attention: dict[str, Attention] = field(default_factory=dict)
    module_out: dict[str, torch.Tensor] = field(default_factory=dict)
    params: dict[str, tuple[str, str]] = field(default_factory=dict)   # param source name -> (owner, attr)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    unfollowed: list[tuple[str, str, str]] = field(default_factory=list)   # (module, op, reason)

    def slot(self, owner: str, attr: str, dim: int, labels: torch.Tensor, role: str, groups: int = 1) -> None:
        key = (owner, attr, dim if role != "grouped_in" else -100)
        old = self.slots.get(key)
        if old is not None:
            if old.labels.shape == labels.shape:
                self.space.union(old.labels, labels)  # a module called twice reads the same units
            return
        self.slots[key] = Slot(owner, attr, dim, labels.clone(), role, groups)

    def producer(self, module: str, n: int, what: str) -> torch.Tensor:
        """Output units of ``module`` (the same labels every time a shared module is called)."""
        if module not in self.module_out:
            self.module_out[module] = self.space.fresh((n,), "producer", module, what=what)
        return self.module_out[module]

    def unknown(self, node, what: str, arg_labels, out_value) -> Any:
        """An op no rule follows: what reaches it stays whole, what comes out is new and fixed."""
        scope = node.meta.get("dcomp_scope", "")
        reason = f"it reaches {what} at '{scope or node.name}', which structured pruning does not follow"
        found = False
        for lab in _tensors(arg_labels):
            self.space.fix(lab, reason)
            found = True
        if found:
            self.unfollowed.append((scope or node.name, what, "not followed: its inputs and outputs keep all channels"))
        return _fresh_like(self.space, out_value, reason)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _fresh_like(space: LabelSpace, value, reason: str):
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return torch.full((), WILD, dtype=torch.long)
        shape = tuple(value.shape)
        lab = space.fresh(shape[1:] if len(shape) > 1 else shape, "fixed", "op", reason=reason)
        return lab.unsqueeze(0).expand(shape) if len(shape) > 1 else lab
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh_like(space, v, reason) for v in value) if not hasattr(value, "_fields") \
            else tuple(_fresh_like(space, v, reason) for v in value)
    return None


class _Tracer:
    """torch.fx tracer that remembers which module each node came from, and treats modules named by
    ``leaves`` (regexes) as opaque."""

    def __new__(cls, leaves: list[str]):
        import torch.fx as fx

        class T(fx.Tracer):
            def __init__(self):
                super().__init__()
                self._dscope = ""
                self._dfail = None
                self.leaves = [re.compile(rx) for rx in leaves]

            def is_leaf_module(self, m, qualname):
                if any(rx.search(qualname) for rx in self.leaves) and qualname:
                    return True
                if isinstance(m, nn.MultiheadAttention):
                    return True
                return super().is_leaf_module(m, qualname)

            def call_module(self, m, forward, args, kwargs):
                old = self._dscope
                self._dscope = self.path_of_module(m)
                try:
                    return super().call_module(m, forward, args, kwargs)
                except Exception:
                    if self._dfail is None:
                        self._dfail = self._dscope or type(m).__name__   # the innermost module that failed
                    raise
                finally:
                    self._dscope = old

            def create_node(self, *a, **k):
                n = super().create_node(*a, **k)
                n.meta["dcomp_scope"] = self._dscope
                return n

        return T()


def symbolic_trace(model: nn.Module, leaves: list[str] | None = None):
    import torch.fx as fx

    if isinstance(model, torch.jit.ScriptModule):
        raise DcompError("structured pruning needs the model's Python code; a TorchScript model cannot be "
                         "traced: save a state_dict and pass --arch, or use an unstructured method")
    tracer = _Tracer(list(leaves or []))
    was_training = model.training
    model.train()   # trace the training-time graph: auxiliary heads (GoogLeNet, Inception) read channels too
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        where = tracer._dfail or type(model).__name__
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise UsageError(f"torch.fx cannot trace module '{where}' ({type(e).__name__}: {first}); pass "
                         f"--exclude '{re.escape(where)}' to keep it whole, or give the model as a "
                         f"package.module:factory / state_dict with --arch, or use an unstructured method") from None
    finally:
        model.train(was_training)
    return fx.GraphModule(model, graph)


def run(model: nn.Module, input_shape, leaves: list[str] | None = None, example: torch.Tensor | None = None) -> Trace:
    """Trace ``model`` and propagate labels through it on an input of ``input_shape`` (batch 1)."""
    import torch.fx as fx

    from dcomp.compressors.graph import rules

    gm = symbolic_trace(model, leaves)
    tr = Trace(model=model, modules=dict(model.named_modules()))
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = example if example is not None else torch.zeros(1, *[int(s) for s in input_shape], dtype=dtype)
    nodes = list(gm.graph.nodes)
    last_use: dict[Any, int] = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a] = i
    env: dict[Any, tuple[Any, Any]] = {}
    placeholders = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, node in enumerate(nodes):
                if node.op == "placeholder":
                    placeholders += 1
                    if placeholders == 1:
                        val = x
                        lab = tr.space.fresh(x.shape[1:], "fixed", "input", reason="it is coupled to the model input")
                        lab = lab.unsqueeze(0)
                    else:
                        val = node.args[0] if node.args else None
                        lab = None
                    env[node] = (val, lab)
                    continue
                args = fx.node.map_arg(node.args, lambda n: env[n][0])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n][0])
                if node.op == "get_attr":
                    val = _fetch(model, node.target)
                    lab = None
                    if isinstance(val, torch.Tensor):
                        lab = tr.space.fresh(val.shape, "param", node.target)
                        owner, _, attr = node.target.rpartition(".")
                        tr.params[node.target] = (owner, attr)
                    env[node] = (val, lab)
                    continue
                if node.op == "output":
                    for lab in _tensors(fx.node.map_arg(node.args, lambda n: env[n][1])):
                        tr.space.fix(lab, "it is the model output (the number of classes must stay)")
                    break
                try:
                    if node.op == "call_module":
                        val = tr.modules[node.target](*args, **kwargs)
                    elif node.op == "call_function":
                        val = node.target(*args, **kwargs)
                    else:
                        self_obj, *rest = args
                        val = getattr(self_obj, node.target)(*rest, **kwargs)
                except Exception as e:  # noqa: BLE001
                    first = (str(e).splitlines() or [type(e).__name__])[0][:160]
                    hint = ("; the traced graph includes training-only branches such as auxiliary heads: give a "
                            "larger input (--resize)" if "too small" in first or "can't be greater" in first else "")
                    raise DcompError(f"the model does not run on inputs of shape {list(input_shape)} "
                                     f"(at '{node.meta.get('dcomp_scope') or node.name}': {first}){hint}") from None
                labs = fx.node.map_arg(node.args, lambda n: env[n][1])
                klabs = fx.node.map_arg(node.kwargs, lambda n: env[n][1])
                lab = rules.apply(tr, node, args, kwargs, labs, klabs, val)
                env[node] = (val, lab)
                for a in node.all_input_nodes:
                    if last_use.get(a) == i:
                        env.pop(a, None)
    finally:
        model.train(was_training)
    return tr


def _fetch(model: nn.Module, target: str):
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
