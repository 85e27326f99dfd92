"""Module attributes that follow parameter shapes, and rebuilding a shrunk model from a state_dict.

``refresh(module)`` sets the attributes a module's forward uses (in/out features, channels,
groups of a depthwise conv, normalized_shape, num_features, embed_dim) from its parameters.
``conform(model, state_dict, resized)`` is how a shrunk checkpoint rebuilds: the builder makes the
model at its original shapes, the plain-data ``resized`` record (``{module: {attribute: int}}``,
e.g. an attention module's ``num_heads``/``head_dim`` or ViT's ``hidden_dim``) is applied, and
every parameter or buffer stored at another shape is replaced by an empty one of the stored shape
before ``refresh``; ``load_state_dict`` then fills the values.

A model rebuilt from a plain-data graph (``dcomp.models.graph_arch``) has no module attributes to
refresh where a container's forward was traced into a functional call: torchvision's ``LayerNorm2d``
becomes ``F.layer_norm(x, (C,), weight, bias, eps)`` with ``(C,)`` a literal of the graph.
``follow_norm_shapes`` sets such literals from the weight they normalise with.
"""

from __future__ import annotations

import torch
from torch import nn

from dcomp.compressors.graph.attention import is_window_attention, set_attention
from dcomp.errors import DcompError


def refresh(m: nn.Module) -> None:
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        m.in_channels, m.out_channels = int(m.weight.shape[0]), int(m.weight.shape[1]) * m.groups
    elif isinstance(m, nn.modules.conv._ConvNd):
        w = m.weight
        if m.groups > 1 and m.groups == m.in_channels == m.out_channels and w.shape[1] == 1:
            m.groups = int(w.shape[0])   # depthwise stays depthwise
        m.out_channels, m.in_channels = int(w.shape[0]), int(w.shape[1]) * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = int(m.weight.shape[0]), int(m.weight.shape[1])
    elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        t = m.weight if m.weight is not None else m.running_mean
        if t is not None:
            m.num_features = int(t.shape[0])
    elif isinstance(m, nn.GroupNorm):
        if m.weight is not None:
            m.num_channels = int(m.weight.shape[0])
    elif isinstance(m, nn.LayerNorm):
        if m.weight is not None and len(m.normalized_shape) == 1:
            m.normalized_shape = (int(m.weight.shape[0]),)
    elif isinstance(m, nn.MultiheadAttention):
        if m.in_proj_weight is not None:
            m.embed_dim = m.kdim = m.vdim = int(m.in_proj_weight.shape[1])


def follow_norm_shapes(model: nn.Module) -> bool:
    """In an fx.GraphModule, make every ``layer_norm`` whose weight (or bias) is a stored tensor take its
    ``normalized_shape`` from that tensor's shape (the graph holds it as a literal). True if one changed."""
    import torch.fx as fx
    import torch.nn.functional as F

    if not isinstance(model, fx.GraphModule):
        return False
    changed = False
    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in (F.layer_norm, torch.layer_norm):
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        ref = None
        for pos, key in ((2, "weight"), (3, "bias")):
            n = args[pos] if len(args) > pos else kwargs.get(key)
            if getattr(n, "op", None) == "get_attr":
                ref = n
                break
        if ref is None or not isinstance(shape, (list, tuple)) or not all(type(s) is int for s in shape):
            continue
        want = tuple(int(s) for s in model.get_parameter(ref.target).shape) \
            if ref.target in dict(model.named_parameters()) else tuple(model.get_buffer(ref.target).shape)
        if tuple(shape) == want or len(want) != len(shape):
            continue
        new = type(shape)(want) if isinstance(shape, tuple) else list(want)
        if len(args) > 1:
            args[1] = new
        else:
            kwargs["normalized_shape"] = new
        node.args, node.kwargs = tuple(args), kwargs
        changed = True
    if changed:
        model.recompile()
    return changed


def conform(model: nn.Module, state_dict: dict[str, torch.Tensor], resized: dict | None = None) -> list[str]:
    """Resize ``model`` in place to the shapes in ``state_dict`` (see the module doc); returns the names of
    the modules that changed."""
    changed = []
    for name, attrs in (resized or {}).items():
        if not isinstance(attrs, dict):
            raise DcompError(f"checkpoint field arch.resized[{name!r}] must be a table of attributes")
        try:
            mod = model.get_submodule(name) if name else model
        except AttributeError:
            raise DcompError(f"checkpoint resizes module {name!r}, which the architecture does not have") from None
        a = dict(attrs)
        if "num_heads" in a and "head_dim" in a and (isinstance(mod, nn.MultiheadAttention) or is_window_attention(mod)):
            heads, hd = a.pop("num_heads"), a.pop("head_dim")
            if not (isinstance(heads, int) and isinstance(hd, int) and heads > 0 and hd > 0):
                raise DcompError(f"checkpoint gives module {name!r} a bad head count or size")
            set_attention(mod, heads, hd)
        for k, v in a.items():
            old = getattr(mod, k, None)
            if type(old) is not int or type(v) is not int or v < 1:
                raise DcompError(f"checkpoint sets {name or 'the model'}.{k} = {v!r}, which is not an integer "
                                 f"size of that module")
            setattr(mod, k, v)
        changed.append(name)
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        touched = False
        for kind in ("_parameters", "_buffers"):
            table = getattr(mod, kind)
            for attr, t in list(table.items()):
                stored = state_dict.get(prefix + attr)
                if t is None or stored is None or tuple(t.shape) == tuple(stored.shape):
                    continue
                if t.dim() != stored.dim():
                    raise DcompError(f"stored {prefix + attr} has {stored.dim()} dims, the architecture {t.dim()}")
                new = torch.empty(tuple(stored.shape), dtype=t.dtype, device=t.device)
                table[attr] = nn.Parameter(new, requires_grad=t.requires_grad) if kind == "_parameters" else new
                touched = True
        if touched:
            refresh(mod)
            changed.append(name)
    if follow_norm_shapes(model):
        changed.append("(layer_norm shapes of the graph)")
    return sorted(set(changed))
