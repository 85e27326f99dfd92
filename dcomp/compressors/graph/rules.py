"""One rule per kind of op: what it ties together and what labels its output carries.

A rule gets the real argument values (for shapes and constants), the argument labels, and the real
output; it returns the output labels. Rules by kind:

* layers (Conv1d/2d/3d, ConvTranspose, Linear, F.linear): inputs read along the channel axis, outputs
  are new units; a depthwise conv follows its input's units; a grouped conv must keep as many units
  in every group (a "split" check);
* norms (BatchNorm, GroupNorm, InstanceNorm, LayerNorm, F.layer_norm): follow the channel axis;
* attention (nn.MultiheadAttention, torchvision's Swin window attention, matmul between activations):
  heads become units, removed whole;
* element-wise ops (add, mul, where, ...): tie the units they combine (residuals, SE gates, scales);
* shape ops (view, reshape, permute, transpose, flatten, cat, split, chunk, getitem, roll, pad, ...):
  run on the labels themselves, with a check where a literal size or offset would no longer fit;
* reductions and spatial ops (mean, pooling, interpolate): keep the channel axis;
* anything else: named in the report, its inputs and outputs keep all their channels.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from dcomp.compressors.graph.labels import WILD
from dcomp.compressors.graph.trace import Attention, Check, DimOf, ShapeOf, Trace, _tensors

POINTWISE = {
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish",
    "hardswish_", "hardsigmoid", "hardtanh", "hardtanh_", "leaky_relu", "elu", "selu", "celu", "mish", "softplus",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "contiguous",
    "clone", "float", "double", "half", "to", "type", "detach", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
    "clamp", "clamp_min", "clamp_max", "clamp_", "softmax", "log_softmax", "erf", "sin", "cos", "square",
    "reciprocal", "sign", "round", "floor", "ceil", "nan_to_num", "requires_grad_", "cpu", "logsigmoid",
    "stochastic_depth", "identity", "sigmoid_", "gelu_", "exp_", "normalize",
}
ELEMENTWISE = {
    "add", "sub", "mul", "truediv", "div", "floordiv", "iadd", "isub", "imul", "itruediv", "add_", "sub_", "mul_",
    "div_", "where", "maximum", "minimum", "pow", "eq", "ne", "lt", "le", "gt", "ge", "masked_fill", "masked_fill_",
    "mod", "and_", "or_", "rsub", "addcmul", "lerp", "copysign", "fmod", "remainder",
}
STRUCTURAL = {
    "view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze", "unsqueeze", "expand",
    "expand_as", "repeat", "roll", "flip", "narrow", "select", "t", "movedim", "cat", "concat", "concatenate",
    "stack", "split", "chunk", "unbind", "getitem", "pad", "tensor_split", "swapaxes", "swapdims", "view_as",
    "reshape_as", "index_select", "squeeze_", "unsqueeze_", "tile",
}
REPLAY = {"_get_relative_position_bias", "_patch_merging_pad", "_patch_merging_pad_v2"}
CREATE = {"empty", "zeros", "ones", "full", "rand", "randn", "arange", "new_zeros", "new_ones", "new_full",
          "new_empty", "zeros_like", "ones_like", "empty_like", "rand_like", "randn_like", "full_like", "bernoulli",
          "bernoulli_", "tensor", "linspace", "eye", "fill_", "zero_", "uniform_", "normal_"}
REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod", "norm"}
SPATIAL_FN = {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
              "adaptive_max_pool2d", "adaptive_max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
              "max_pool1d", "max_pool2d", "max_pool3d", "interpolate", "upsample", "lp_pool2d",
              "max_pool2d_with_indices", "boolean_dispatch"}
SHAPE_QUERY = {"size", "dim", "getattr", "numel", "_assert", "len", "is_floating_point", "_assert_is_none"}

_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.Softmax, nn.LogSoftmax, nn.LocalResponseNorm, nn.Threshold, nn.LogSigmoid,
)
_SPATIAL_MODULES = (
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample, nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd, nn.ZeroPad2d,
)


def _name(node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", str(t))


def _bcast(vec: torch.Tensor, shape, dim: int) -> torch.Tensor:
    """Labels ``vec`` along ``dim`` of a tensor shaped ``shape``."""
    dim = dim % len(shape)
    view = [1] * len(shape)
    view[dim] = vec.numel()
    return vec.reshape(view).expand(tuple(shape))


def apply(tr: Trace, node, args, kwargs, labs, klabs, out):
    """Labels of ``node``'s output (see the module doc)."""
    if node.op == "call_module":
        return _module(tr, node, tr.modules[node.target], args, kwargs, labs, klabs, out)
    name = _name(node)
    if isinstance(node.target, type) and issubclass(node.target, tuple):   # a namedtuple of outputs
        return tuple(labs) + tuple(klabs.values())
    if not isinstance(out, (torch.Tensor, list, tuple)) or (isinstance(out, (list, tuple)) and not any(
            isinstance(o, torch.Tensor) for o in out)):
        shape = _shape_label(name, args, labs)
        if shape is not None:
            return shape
        if name == "getitem" and isinstance(labs[0], (list, tuple)):
            return labs[0][args[1]] if isinstance(args[1], int) else None
        return None  # sizes, flags, Python numbers
    if name in SHAPE_QUERY:
        return None
    first = labs[0] if labs else None
    if name in CREATE:
        return _any_label(None, out)
    if name in POINTWISE:
        return first if isinstance(first, torch.Tensor) else _any_label(labs, out)
    if name in ELEMENTWISE:
        return _elementwise(tr, labs, klabs, out)
    if name in STRUCTURAL or name in REPLAY:
        return _structural(tr, node, name, args, kwargs, labs, out)
    if name in REDUCE:
        return _reduce(tr, node, args, kwargs, first, out)
    if name in SPATIAL_FN and isinstance(first, torch.Tensor):
        return _spatial(tr, first, out)
    if name in ("matmul", "bmm", "mm"):
        return _matmul(tr, node, labs[0], labs[1], out)
    if name == "scaled_dot_product_attention":
        q, k, v = labs[0], labs[1], labs[2]
        s = _matmul(tr, node, q, k.transpose(-2, -1), torch.empty(q.shape[:-1] + (k.shape[-2],)))
        return _matmul(tr, node, s, v, out)
    if name == "linear":
        return _f_linear(tr, node, args, labs, out)
    if name == "layer_norm":
        return _f_norm(tr, node, labs, out, -1, ["input", "normalized_shape", "weight", "bias"], args[1])
    if name == "batch_norm":
        return _f_norm(tr, node, labs, out, 1, ["input", "running_mean", "running_var", "weight", "bias"])
    if name == "group_norm":
        lab = _f_norm(tr, node, labs, out, 1, ["input", "num_groups", "weight", "bias"])
        _split_check(tr, node, tr.space.rows(labs[0], 1), 0, int(args[1]))
        return lab
    if name in ("shifted_window_attention", "window_attention"):
        return _window_attention(tr, node, args, kwargs, labs, klabs, out)
    return tr.unknown(node, f"'{name}'", (labs, klabs), out)


def _shape_label(name, args, labs):
    """Where a size comes from: ``x.shape`` / ``x.size()`` -> ShapeOf, ``x.shape[d]`` / ``x.size(d)`` -> DimOf."""
    x = labs[0] if labs else None
    if name == "getattr" and isinstance(x, torch.Tensor) and len(args) > 1 and args[1] == "shape":
        return ShapeOf(x)
    if name == "size" and isinstance(x, torch.Tensor):
        if len(args) > 1 and isinstance(args[1], int):
            return DimOf(x, args[1] % max(x.dim(), 1))
        return ShapeOf(x)
    if name == "getitem" and isinstance(x, ShapeOf) and isinstance(args[1], int):
        return DimOf(x.labels, args[1] % max(x.labels.dim(), 1))
    return None


def _any_label(labs, out):
    return None if not isinstance(out, torch.Tensor) else torch.full(out.shape, WILD, dtype=torch.long)


# ---- element-wise ---------------------------------------------------------------------------------

def _elementwise(tr: Trace, labs, klabs, out):
    if not isinstance(out, torch.Tensor):
        return None
    tensors = [lab for lab in list(_tensors(labs)) + list(_tensors(klabs))]
    if not tensors:
        return torch.full(out.shape, WILD, dtype=torch.long)
    shape = out.shape
    res = None
    for lab in tensors:
        try:
            lab = lab.expand(shape) if lab.shape != shape else lab
        except RuntimeError:
            lab = torch.broadcast_to(lab, shape)
        if res is None:
            res = lab
        else:
            tr.space.union(res, lab)
            res = torch.where(res >= 0, res, lab)
    return res


# ---- layers ---------------------------------------------------------------------------------------

def _module(tr: Trace, node, m: nn.Module, args, kwargs, labs, klabs, out):
    name = str(node.target)
    x = labs[0] if labs else klabs.get("input")
    if isinstance(m, _POINTWISE_MODULES):
        return x
    if isinstance(m, (nn.modules.conv._ConvNd,)) and isinstance(x, torch.Tensor):
        return _conv(tr, name, m, x, out)
    if isinstance(m, nn.Linear) and isinstance(x, torch.Tensor):
        cin = tr.space.rows(x, -1)
        tr.slot(name, "weight", 1, cin, "in")
        units = tr.producer(name, m.out_features, "linear")
        tr.slot(name, "weight", 0, units, "out")
        if m.bias is not None:
            tr.slot(name, "bias", 0, units, "out")
        return _bcast(units, out.shape, -1)
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)) \
            and isinstance(x, torch.Tensor):
        ch = tr.space.rows(x, 1)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            if getattr(m, attr, None) is not None:
                tr.slot(name, attr, 0, ch, "norm" if attr == "weight" else "follow")
        if isinstance(m, nn.GroupNorm):
            _split_check(tr, node, ch, 0, m.num_groups)
        return x
    if isinstance(m, nn.LayerNorm) and isinstance(x, torch.Tensor):
        if len(m.normalized_shape) != 1:
            return tr.unknown(node, f"LayerNorm over {len(m.normalized_shape)} dims", labs, out)
        ch = tr.space.rows(x, -1)
        for attr in ("weight", "bias"):
            if getattr(m, attr, None) is not None:
                tr.slot(name, attr, 0, ch, "norm" if attr == "weight" else "follow")
        return x
    if isinstance(m, nn.MultiheadAttention):
        return _mha(tr, node, name, m, args, kwargs, labs, klabs, out)
    if isinstance(m, _SPATIAL_MODULES) and isinstance(x, torch.Tensor):
        return _spatial(tr, x, out)
    if isinstance(m, nn.Flatten) and isinstance(x, torch.Tensor):
        return torch.flatten(x, m.start_dim, m.end_dim)
    if isinstance(m, nn.Unflatten) and isinstance(x, torch.Tensor):
        return x.reshape(out.shape)
    return tr.unknown(node, f"{type(m).__name__}", (labs, klabs), out)


def _conv(tr: Trace, name: str, m, x, out):
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    cin = tr.space.rows(x, 1)
    g = m.groups
    if not transposed and g > 1 and g == m.in_channels == m.out_channels:
        # depthwise: output channel c reads input channel c only, so it follows its producer
        tr.slot(name, "weight", 0, cin, "follow")
        if m.bias is not None:
            tr.slot(name, "bias", 0, cin, "follow")
        return _bcast(cin, out.shape, 1)
    if transposed:
        if g != 1:
            tr.space.fix(cin, f"it feeds the grouped transposed convolution '{name}'")
            units = tr.space.fresh((m.out_channels,), "fixed", name, reason=f"'{name}' is a grouped transposed convolution")
            return _bcast(units, out.shape, 1)
        tr.slot(name, "weight", 0, cin, "in")
        units = tr.producer(name, m.out_channels, "conv")
        tr.slot(name, "weight", 1, units, "out")
    else:
        units = tr.producer(name, m.out_channels, "conv")
        tr.slot(name, "weight", 0, units, "out")
        if g == 1:
            tr.slot(name, "weight", 1, cin, "in")
        else:
            tr.slot(name, "weight", 1, cin, "grouped_in", groups=g)
            tr.checks.append(Check("split", cin, 0, name, name, parts=g))
            tr.checks.append(Check("split", units, 0, name, name, parts=g))
    if m.bias is not None:
        tr.slot(name, "bias", 0, units, "out")
    return _bcast(units, out.shape, 1)


def _f_linear(tr: Trace, node, args, labs, out):
    w_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if getattr(w_node, "op", None) != "get_attr":
        return tr.unknown(node, "F.linear with a computed weight", labs, out)
    owner, _, attr = w_node.target.rpartition(".")
    cin = tr.space.rows(labs[0], -1)
    tr.slot(owner, attr, 1, cin, "in")
    units = tr.producer(owner if attr == "weight" else w_node.target, args[1].shape[0], "linear")
    tr.slot(owner, attr, 0, units, "out")
    if getattr(b_node, "op", None) == "get_attr":
        bo, _, ba = b_node.target.rpartition(".")
        tr.slot(bo, ba, 0, units, "out")
    return _bcast(units, out.shape, -1)


def _f_norm(tr: Trace, node, labs, out, dim, names, nshape=None):
    if nshape is not None and len(nshape) != 1:
        return tr.unknown(node, f"layer_norm over {len(nshape)} dims", labs, out)
    ch = tr.space.rows(labs[0], dim)
    given = dict(zip(names, node.args)) | dict(node.kwargs)
    for key in ("weight", "bias", "running_mean", "running_var"):
        n = given.get(key)
        role = "norm" if key == "weight" else "follow"
        if getattr(n, "op", None) == "get_attr":
            owner, _, attr = n.target.rpartition(".")
            tr.slot(owner, attr, 0, ch, role)
    return labs[0]


def _split_check(tr: Trace, node, vec, dim, parts):
    tr.checks.append(Check("split", vec, dim, node.name, node.meta.get("dcomp_scope", ""), parts=int(parts)))


# ---- attention ------------------------------------------------------------------------------------

def _mha(tr: Trace, node, name, m: nn.MultiheadAttention, args, kwargs, labs, klabs, out):
    q = labs[0] if labs else klabs.get("query")
    k = labs[1] if len(labs) > 1 else klabs.get("key")
    v = labs[2] if len(labs) > 2 else klabs.get("value")
    if not m._qkv_same_embed_dim or not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return tr.unknown(node, "MultiheadAttention with separate key/value sizes", (labs, klabs), out)
    for t in (q, k, v):
        cin = tr.space.rows(t, -1)
        tr.slot(name, "in_proj_weight", 1, cin, "in")
    heads = tr.producer(name + ":heads", m.num_heads, "heads")
    hd = m.head_dim
    rows = heads.repeat_interleave(hd).repeat(3)
    tr.slot(name, "in_proj_weight", 0, rows, "out")
    if m.in_proj_bias is not None:
        tr.slot(name, "in_proj_bias", 0, rows, "out")
    tr.slot(name + ".out_proj", "weight", 1, heads.repeat_interleave(hd), "in")
    units = tr.producer(name + ".out_proj", m.out_proj.out_features, "linear")
    tr.slot(name + ".out_proj", "weight", 0, units, "out")
    if m.out_proj.bias is not None:
        tr.slot(name + ".out_proj", "bias", 0, units, "out")
    if m.bias_k is not None or m.bias_v is not None:
        tr.space.fix(heads, f"'{name}' has bias_k/bias_v")
    tr.attention[name] = Attention(name, heads, hd)
    res = _bcast(units, out[0].shape, -1)
    return (res, None if out[1] is None else _any_label(None, out[1]))


def _window_attention(tr: Trace, node, args, kwargs, labs, klabs, out):
    """torchvision's Swin ``shifted_window_attention(x, qkv_weight, proj_weight, bias, window, heads, ...)``."""
    names = ["input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
             "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training"]
    a = dict(zip(names, node.args)) | dict(node.kwargs)
    v = dict(zip(names, args)) | dict(kwargs)
    lab = dict(zip(names, labs)) | dict(klabs)
    qkv_w, proj_w = a.get("qkv_weight"), a.get("proj_weight")
    if getattr(qkv_w, "op", None) != "get_attr" or getattr(proj_w, "op", None) != "get_attr":
        return tr.unknown(node, "shifted_window_attention with computed weights", (labs, klabs), out)
    qkv, _, qattr = qkv_w.target.rpartition(".")
    proj, _, pattr = proj_w.target.rpartition(".")
    module = qkv.rpartition(".")[0]
    nh = int(v["num_heads"])
    hd = v["qkv_weight"].shape[0] // 3 // nh
    cin = tr.space.rows(lab["input"], -1)
    tr.slot(qkv, qattr, 1, cin, "in")
    heads = tr.producer(module + ":heads", nh, "heads")
    rows = heads.repeat_interleave(hd).repeat(3)
    tr.slot(qkv, qattr, 0, rows, "out")
    if getattr(a.get("qkv_bias"), "op", None) == "get_attr":
        bo, _, ba = a["qkv_bias"].target.rpartition(".")
        tr.slot(bo, ba, 0, rows, "out")
    tr.slot(proj, pattr, 1, heads.repeat_interleave(hd), "in")
    for key, dim in (("relative_position_bias", 1), ("logit_scale", 0)):
        if isinstance(lab.get(key), torch.Tensor):
            tr.space.union(tr.space.rows(lab[key], dim), heads)
    units = tr.producer(proj, v["proj_weight"].shape[0], "linear")
    tr.slot(proj, pattr, 0, units, "out")
    if getattr(a.get("proj_bias"), "op", None) == "get_attr":
        bo, _, ba = a["proj_bias"].target.rpartition(".")
        tr.slot(bo, ba, 0, units, "out")
    tr.attention[module] = Attention(module, heads, hd)
    return _bcast(units, out.shape, -1)


def _matmul(tr: Trace, node, a, b, out):
    """Product of two activations (attention scores, attention x values): the contracted positions are
    tied, and each output element ties its row of ``a`` with its column of ``b`` (a head is one unit)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() < 2 or b.dim() < 2:
        return tr.unknown(node, "matmul", [a, b], out)
    tr.space.union(tr.space.rows(a, -1), tr.space.rows(b, -2))
    ra = _reduce_labels(tr, a, (a.dim() - 1,), keepdim=True)        # (..., n, 1)
    rb = _reduce_labels(tr, b, (b.dim() - 2,), keepdim=True)        # (..., 1, m)
    shape = out.shape
    ra, rb = ra.expand(shape), rb.expand(shape)
    tr.space.union(ra, rb)
    return torch.where(ra >= 0, ra, rb)


# ---- shapes ---------------------------------------------------------------------------------------

def _literal_sizes(node, args, method: bool):
    """(sizes as given, which of them came from the graph) for view/reshape/expand."""
    raw = node.args[1:] if method else (node.args[1] if len(node.args) > 1 else node.kwargs.get("shape", ()))
    if method and len(raw) == 1 and isinstance(raw[0], (list, tuple)):
        raw = raw[0]
    return list(raw)


def _structural(tr: Trace, node, name, args, kwargs, labs, out):
    import torch.fx as fx

    x = labs[0] if labs else None
    scope = node.meta.get("dcomp_scope", "")
    method = node.op == "call_method"
    if name in ("cat", "concat", "concatenate", "stack"):
        seq = [lab if lab is not None else torch.full(t.shape, WILD, dtype=torch.long)
               for lab, t in zip(labs[0], args[0])]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return torch.cat(seq, dim) if name != "stack" else torch.stack(seq, dim)
    if x is None and name != "getitem":
        return _any_label(None, out)
    if name == "getitem":
        if isinstance(x, (list, tuple)):
            return x[args[1]]
        if not isinstance(x, torch.Tensor):
            return _any_label(None, out)
        idx = args[1] if isinstance(args[1], tuple) else (args[1],)
        _index_checks(tr, node, x, idx, scope)
        return x[args[1]]
    if name in ("view", "reshape"):
        sizes = _literal_sizes(node, args, method)
        res = x.reshape(out.shape)
        dyn = tuple(i for i, s in enumerate(sizes) if isinstance(s, fx.Node) or s == -1)
        for i, s in enumerate(sizes):
            if isinstance(s, int) and s != -1 and i > 0 and s > 1:
                tr.checks.append(Check("size", res, i, node.name, scope, value=s, dynamic_dims=dyn))
        size_labs = labs[1:] if method else (labs[1] if len(labs) > 1 else ())
        if method and len(size_labs) == 1 and isinstance(size_labs[0], (list, tuple)):
            size_labs = size_labs[0]
        if len(size_labs) == res.dim():
            for i, d in enumerate(size_labs):
                if isinstance(d, DimOf) and (d.labels is not x or d.dim != i):
                    tr.checks.append(Check("count", res, i, node.name, scope, other=d.labels, other_dim=d.dim))
        return res
    if name in ("view_as", "reshape_as"):
        return x.reshape(out.shape)
    if name in ("expand", "expand_as"):
        return x.expand(out.shape)
    if name == "pad":
        pad = args[1] if len(args) > 1 else kwargs.get("pad")
        return F.pad(x, pad, value=WILD)
    if name in ("split", "tensor_split"):
        size = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        res = torch.split(x, size, dim) if name == "split" else torch.tensor_split(x, size, dim)
        tr.checks.append(Check("slice", x, dim % x.dim(), node.name, scope))
        return res
    if name == "chunk":
        n = args[1] if len(args) > 1 else kwargs.get("chunks")
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        tr.checks.append(Check("split", x, dim % x.dim(), node.name, scope, parts=int(n)))
        return torch.chunk(x, n, dim)
    if name in ("narrow", "select", "index_select"):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        tr.checks.append(Check("slice", x, dim % x.dim(), node.name, scope))
    if name in REPLAY:
        # torchvision's fx-wrapped shape helpers: replay them on the labels (shifted so padding reads WILD)
        return node.target(x + 1, *list(args[1:]), **kwargs) - 1
    fn = getattr(torch, name, None) if not method else None
    rest = list(args[1:])
    try:
        if method:
            return getattr(x, name)(*rest, **kwargs)
        return fn(x, *rest, **kwargs)
    except Exception:  # noqa: BLE001 - a shape op the labels cannot replay
        return tr.unknown(node, f"'{name}'", labs, out)


def _index_checks(tr: Trace, node, x, idx, scope):
    """x[idx]: a dim cut at fixed offsets (or strided) must not lose positions."""
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        after = [i for i in idx[e + 1:]]
        pairs = list(zip(_dims(idx[:e], 0), idx[:e]))
        pairs += list(zip(_dims(after, x.dim() - sum(1 for i in after if i is not None)), after))
    else:
        pairs = list(zip(_dims(idx, 0), idx))
    for dim, item in pairs:
        if item is None or dim >= x.dim() or (isinstance(item, slice) and item == slice(None)):
            continue
        tr.checks.append(Check("slice", x, dim, node.name, scope))


def _dims(items, start):
    out, d = [], start
    for i in items:
        out.append(d)
        if i is not None:
            d += 1
    return out


def _reduce_labels(tr: Trace, x: torch.Tensor, dims, keepdim: bool):
    dims = tuple(sorted(d % x.dim() for d in dims))
    kept = [d for d in range(x.dim()) if d not in dims]
    t = x.permute(*kept, *dims)
    shape = [x.shape[d] for d in kept]
    flat = t.reshape(-1, max(1, int(torch.tensor([x.shape[d] for d in dims]).prod()))) if dims else t.reshape(-1, 1)
    rep = tr.space.rows(flat, 0).reshape(shape)
    if keepdim:
        for d in dims:
            rep = rep.unsqueeze(d)
    return rep


def _reduce(tr: Trace, node, args, kwargs, x, out):
    if not isinstance(x, torch.Tensor):
        return _any_label(None, out)
    dims = args[1] if len(args) > 1 and not isinstance(args[1], bool) else kwargs.get("dim")
    if _name(node) == "norm":
        dims = kwargs.get("dim", args[2] if len(args) > 2 else None)
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
    if dims is None:
        res = torch.full((), WILD, dtype=torch.long)
        return res if isinstance(out, torch.Tensor) else tuple(res for _ in out)
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    res = _reduce_labels(tr, x, dims, bool(keepdim))
    if isinstance(out, torch.Tensor):
        return res.expand(out.shape) if res.shape != out.shape else res
    return tuple(res for _ in out)   # max/min with dim: (values, indices)


def _spatial(tr: Trace, x, out):
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[1] != x.shape[1]:
        return None
    return _bcast(tr.space.rows(x, 1), out.shape, 1)


_ = operator  # operator names arrive through node targets
