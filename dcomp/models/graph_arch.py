"""An architecture as plain data: what a checkpoint can hold instead of a reference to code.

``describe(model, example_input)`` traces ``model`` with torch.fx and writes down, as JSON-able
data only:

- ``modules``: every submodule in ``named_modules()`` order, either a container (rebuilt as a
  plain ``nn.Module``) or a leaf of a whitelisted ``torch.nn`` type with its constructor
  arguments (read back from the module's attributes);
- ``tensors``: parameters and buffers that sit directly on containers (not inside a leaf), with
  shape and dtype (the values stay in the checkpoint's state_dict);
- ``nodes``: the fx graph, whose ``call_function`` targets come from a whitelist of torch /
  torch.nn.functional / operator / math functions, ``call_method`` names from a whitelist of
  tensor methods, and whose constants are encoded as data.

``rebuild(desc)`` turns such a description back into an ``fx.GraphModule`` whose state_dict
keys (and their order) equal the original's and which computes the same outputs. It is written
for untrusted input: every name is checked against a pattern, every type / function / method
against the whitelists (looked up in dicts built from constant lists: never ``getattr`` on a
name from the file, never ``eval``), and anything else raises :class:`GraphFormatError` (a
``FormatError``: one line). ``describe`` checks its own work by rebuilding and comparing
outputs; anything outside the whitelists raises :class:`DescribeError`, so the caller can keep
a factory reference instead.
"""

from __future__ import annotations

import inspect
import keyword
import math
import operator
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from dcomp.errors import DcompError, FormatError

FORMAT = "dcomp-graph"
VERSION = 1

# Bounds for untrusted descriptions (far above any real classifier; keep memory use bounded).
MAX_MODULES = 100_000
MAX_NODES = 200_000
MAX_DEPTH = 24
MAX_ELEMENTS = 1 << 31   # parameters + buffers a rebuilt model may allocate (8 GiB of float32)


class DescribeError(DcompError):
    """The model uses something the graph description cannot hold (the message says what)."""


class GraphFormatError(FormatError):
    """A graph description is malformed or names something outside the whitelists."""


# ---- whitelists --------------------------------------------------------------------------------

_LEAF_TYPES: tuple[type, ...] = (
    nn.Linear, nn.Bilinear, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.Threshold,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ChannelShuffle, nn.Embedding,
)
LEAF_TYPES: dict[str, type] = {t.__name__: t for t in _LEAF_TYPES}
_CONTAINER_TYPES = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# constructor arguments that never describe the architecture
_SKIP_ARGS = {"device", "dtype", "_weight", "_freeze", "init"}

_TORCH_FUNCS = """
abs add addmm amax amin argmax argmin avg_pool1d baddbmm batch_norm bmm cat chunk clamp clamp_max
clamp_min clone conv1d conv2d conv3d conv_transpose1d conv_transpose2d cos cumsum div dropout einsum
eq erf exp expand_copy flatten flip floor_divide ge gelu gt hardtanh layer_norm le log log_softmax
logsumexp lt matmul max max_pool1d max_pool2d maximum mean min minimum mm mul narrow ne neg norm
ones_like permute pow reciprocal relu reshape roll rsqrt sigmoid sin softmax split sqrt square
squeeze stack std sub sum t tanh tensor_split tile topk transpose tril triu unbind unsqueeze var
where zeros_like full_like adaptive_avg_pool1d
""".split()
_F_FUNCS = """
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
avg_pool1d avg_pool2d avg_pool3d batch_norm conv1d conv2d conv3d dropout dropout1d dropout2d elu
embedding gelu glu group_norm hardsigmoid hardswish hardtanh instance_norm interpolate layer_norm
leaky_relu linear log_softmax logsigmoid max_pool1d max_pool2d max_pool3d mish normalize pad
pixel_shuffle prelu relu relu6 scaled_dot_product_attention selu sigmoid silu softmax softmin
softplus softsign tanh upsample
""".split()
_OPERATOR_FUNCS = """
add sub mul truediv floordiv mod pow neg pos abs matmul getitem eq ne lt le gt ge and_ or_ xor
invert not_ iadd isub imul itruediv
""".split()
_MATH_FUNCS = "sqrt ceil floor log exp".split()

# getattr(x, name) as fx records ``x.shape``: only these names
GETATTR_NAMES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT", "is_cuda"})

TENSOR_METHODS = frozenset("""
abs add add_ addmm amax amin argmax argmin bmm chunk clamp clamp_ clamp_max clamp_min clone contiguous
cos cumsum detach dim div div_ eq exp expand expand_as flatten flip float ge gt half le log log_softmax
lt masked_fill matmul max mean min mm mul mul_ narrow ne neg norm numel permute pow relu relu_ repeat
reshape reshape_as roll rsqrt sigmoid sigmoid_ sin size softmax split sqrt square squeeze std sub sub_
sum t tanh tanh_ tile transpose tril triu type_as unbind unflatten unsqueeze var view view_as
""".split())

_DTYPES = {n: getattr(torch, n) for n in ("float32", "float64", "float16", "bfloat16", "int64", "int32",
                                         "int16", "int8", "uint8", "bool")}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
                   "preserve_format": torch.preserve_format}
_MEMORY_FORMAT_NAMES = {v: k for k, v in _MEMORY_FORMATS.items()}


def _function_table() -> dict[str, Any]:
    table: dict[str, Any] = {}
    for prefix, mod, names in (("torch", torch, _TORCH_FUNCS), ("torch.nn.functional", F, _F_FUNCS),
                               ("operator", operator, _OPERATOR_FUNCS), ("math", math, _MATH_FUNCS)):
        for n in names:
            fn = getattr(mod, n, None)  # the names are this module's constants, not data
            if fn is not None:
                table[f"{prefix}.{n}"] = fn
    table["builtins.getattr"] = getattr
    return table


FUNCTIONS: dict[str, Any] = _function_table()
_FUNCTION_NAMES: dict[int, str] = {}
for _name, _fn in FUNCTIONS.items():
    _FUNCTION_NAMES.setdefault(id(_fn), _name)

# torchvision library functions that torch.fx records as calls (torchvision wraps them with
# torch.fx.wrap). Library code, not file code: looked up through dcomp.models.vision, and only
# when a model or a description names one, so graph_arch itself never needs torchvision.
_TORCHVISION_FUNCS = {
    "torchvision.ops.stochastic_depth.stochastic_depth": ("torchvision.ops.stochastic_depth", "stochastic_depth"),
}


def _torchvision_function(name: str) -> Any | None:
    if name not in _TORCHVISION_FUNCS:
        return None
    import importlib

    from dcomp.models.vision import import_torchvision

    import_torchvision()
    module, attr = _TORCHVISION_FUNCS[name]
    return getattr(importlib.import_module(module), attr)


def _function_name(fn: Any) -> str | None:
    """The table name of a function a traced graph calls, or None when it is not on the lists."""
    name = _FUNCTION_NAMES.get(id(fn))
    if name is None and _qualname(fn) in _TORCHVISION_FUNCS and _torchvision_function(_qualname(fn)) is fn:
        name = _qualname(fn)
    return name


# ---- names -------------------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ATOM = re.compile(r"[A-Za-z0-9_]+\Z")


def _is_ident(s: Any) -> bool:
    return isinstance(s, str) and len(s) <= 200 and bool(_IDENT.match(s)) and not keyword.iskeyword(s) \
        and not s.startswith("__")


def _is_path(s: Any) -> bool:
    return isinstance(s, str) and 0 < len(s) <= 1000 and all(
        _ATOM.match(a) and not a.startswith("__") for a in s.split("."))


# ---- constants as data -------------------------------------------------------------------------

def _enc(v: Any, node_names: dict[fx.Node, str], where: str, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise DescribeError(f"{where}: arguments nested too deeply")
    if isinstance(v, fx.Node):
        return {"node": node_names[v]}
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, torch.Size):
        return {"tuple": [int(x) for x in v]}
    if isinstance(v, tuple):
        return {"tuple": [_enc(x, node_names, where, depth + 1) for x in v]}
    if isinstance(v, list):
        return [_enc(x, node_names, where, depth + 1) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise DescribeError(f"{where}: a dict argument with non-string keys")
        return {"dict": [[k, _enc(x, node_names, where, depth + 1)] for k, x in v.items()]}
    if isinstance(v, slice):
        return {"slice": [_enc(x, node_names, where, depth + 1) for x in (v.start, v.stop, v.step)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, torch.dtype) and v in _DTYPE_NAMES:
        return {"dtype": _DTYPE_NAMES[v]}
    if isinstance(v, torch.memory_format) and v in _MEMORY_FORMAT_NAMES:
        return {"memory_format": _MEMORY_FORMAT_NAMES[v]}
    if isinstance(v, torch.device):
        return {"device": "cpu"}  # rebuilt models live on the CPU first; .to() moves them
    raise DescribeError(f"{where}: an argument of type {type(v).__name__} cannot be stored as data")


def _dec(v: Any, nodes: dict[str, fx.Node] | None, where: str, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise GraphFormatError(f"{where}: arguments nested too deeply")
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v
    if isinstance(v, list):
        return [_dec(x, nodes, where, depth + 1) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        if tag == "node" and nodes is not None:
            if not isinstance(x, str) or x not in nodes:
                raise GraphFormatError(f"{where}: refers to node {x!r}, which is not defined before it")
            return nodes[x]
        if tag == "float" and x in ("inf", "-inf", "nan"):
            return float(x)
        if tag == "tuple" and isinstance(x, list):
            return tuple(_dec(y, nodes, where, depth + 1) for y in x)
        if tag == "dict" and isinstance(x, list):
            out = {}
            for kv in x:
                if not (isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], str)):
                    raise GraphFormatError(f"{where}: a bad dict entry")
                out[kv[0]] = _dec(kv[1], nodes, where, depth + 1)
            return out
        if tag == "slice" and isinstance(x, list) and len(x) == 3:
            return slice(*(_dec(y, nodes, where, depth + 1) for y in x))
        if tag == "ellipsis" and x is True:
            return Ellipsis
        if tag == "dtype" and x in _DTYPES:
            return _DTYPES[x]
        if tag == "memory_format" and x in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[x]
        if tag == "device" and x == "cpu":
            return torch.device("cpu")
    raise GraphFormatError(f"{where}: a value that is not plain data dcomp knows ({str(v)[:60]})")


# ---- describe ----------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    # buffers read in forward become graph inputs (get_attr), not constants frozen at trace time
    proxy_buffer_attributes = True


def _module_args(m: nn.Module, name: str) -> dict[str, Any]:
    """Constructor arguments of a whitelisted leaf, read from the attributes of the same name."""
    params = inspect.signature(type(m).__init__).parameters
    args: dict[str, Any] = {}
    for p in list(params.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in _SKIP_ARGS:
            continue
        if p.name == "bias" and p.default is True:  # stored as a parameter (or None)
            args["bias"] = getattr(m, "bias", None) is not None
            continue
        if p.name in ("affine", "elementwise_affine") and not hasattr(m, p.name):
            continue
        if hasattr(m, p.name):
            val = getattr(m, p.name)
        elif p.name == "num_parameters" and isinstance(m, nn.PReLU):
            val = m.weight.numel()
        elif p.default is not p.empty:
            continue
        else:
            raise DescribeError(f"module {name} ({type(m).__name__}): cannot read its argument {p.name}")
        args[p.name] = _enc(val, {}, f"module {name} argument {p.name}")
    return args


def describe(model: nn.Module, example_input: torch.Tensor) -> dict[str, Any]:
    """The architecture of ``model`` as plain data (see the module docstring).

    Raises DescribeError when the model cannot be traced or uses a module type, function or
    method outside the whitelists, or when the rebuilt model does not reproduce the original's
    state_dict keys and outputs on ``example_input``."""
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds for untraceable code
        raise DescribeError(f"torch.fx cannot trace it ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})") from None

    modules: list[dict[str, Any]] = []
    leaves: set[str] = set()
    leaf_prefixes: list[str] = []
    for name, m in model.named_modules():
        if not name:
            continue
        if any(name.startswith(p) for p in leaf_prefixes):
            continue  # created by its leaf's constructor
        if not _is_path(name):
            raise DescribeError(f"module name {name!r} is not a plain dotted name")
        if isinstance(m, _CONTAINER_TYPES) or not type(m).__module__.startswith("torch.nn"):
            modules.append({"name": name, "type": "container"})
            continue
        if type(m) not in _LEAF_TYPES:
            raise DescribeError(f"module {name} is a {type(m).__name__}, which the graph description does not support")
        modules.append({"name": name, "type": type(m).__name__, "args": _module_args(m, name)})
        leaves.add(name)
        leaf_prefixes.append(name + ".")

    tensors: list[dict[str, Any]] = []
    containers = [""] + [d["name"] for d in modules if d["type"] == "container"]
    for owner in containers:
        m = model.get_submodule(owner) if owner else model
        for kind, items in (("parameter", m._parameters.items()), ("buffer", m._buffers.items())):
            for n, t in items:
                if t is None:
                    continue
                full = f"{owner}.{n}" if owner else n
                if not _is_ident(n):
                    raise DescribeError(f"tensor name {full!r} is not a plain name")
                if t.dtype not in _DTYPE_NAMES:
                    raise DescribeError(f"tensor {full} has dtype {t.dtype}, which the graph description does not support")
                if kind == "buffer" and n in m._non_persistent_buffers_set:
                    raise DescribeError(f"buffer {full} is not saved in the state_dict, so it cannot be rebuilt from it")
                entry = {"name": full, "kind": kind, "shape": [int(s) for s in t.shape], "dtype": _DTYPE_NAMES[t.dtype]}
                if kind == "parameter" and not t.requires_grad:
                    entry["requires_grad"] = False
                tensors.append(entry)

    state_names = set(model.state_dict())
    names: dict[fx.Node, str] = {n: n.name for n in gm.graph.nodes}
    nodes: list[dict[str, Any]] = []
    for n in gm.graph.nodes:
        where = f"node {n.name}"
        entry: dict[str, Any] = {"name": n.name, "op": n.op}
        if n.op == "call_function":
            target = _function_name(n.target)
            if target is None:
                raise DescribeError(f"{where} calls {_qualname(n.target)}, which is not on dcomp's list of safe functions")
            if target == "builtins.getattr" and not (len(n.args) == 2 and n.args[1] in GETATTR_NAMES):
                raise DescribeError(f"{where} reads attribute {n.args[1:]!r}, which is not on dcomp's list")
        elif n.op == "call_method":
            target = n.target
            if target not in TENSOR_METHODS:
                raise DescribeError(f"{where} calls method .{target}(), which is not on dcomp's list of tensor methods")
        elif n.op == "call_module":
            target = n.target
            if target not in leaves:
                raise DescribeError(f"{where} calls module {target}, which is not a supported leaf module")
        elif n.op == "get_attr":
            target = n.target
            if target not in state_names:
                raise DescribeError(f"{where} reads {target}, a tensor that is not a saved parameter or buffer "
                                    f"(a constant made in forward?)")
        elif n.op in ("placeholder", "output"):
            target = n.target
        else:
            raise DescribeError(f"{where}: fx op {n.op} is not supported")
        entry["target"] = target
        entry["args"] = _enc(list(n.args), names, where)
        entry["kwargs"] = _enc(dict(n.kwargs), names, where)["dict"]
        nodes.append(entry)

    desc = {"format": FORMAT, "version": VERSION, "modules": modules, "tensors": tensors, "nodes": nodes}
    _self_check(model, desc, example_input)
    return desc


def _qualname(fn: Any) -> str:
    mod = getattr(fn, "__module__", None) or ""
    return f"{mod}.{getattr(fn, '__qualname__', getattr(fn, '__name__', repr(fn)))}".lstrip(".")


def _self_check(model: nn.Module, desc: dict[str, Any], x: torch.Tensor) -> None:
    import json

    try:
        rebuilt = rebuild(json.loads(json.dumps(desc)))
    except (GraphFormatError, ValueError, TypeError) as e:
        raise DescribeError(f"the description does not rebuild ({e})") from None
    want = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    got = [(k, tuple(v.shape)) for k, v in rebuilt.state_dict().items()]
    if want != got:
        missing = sorted({k for k, _ in want} ^ {k for k, _ in got})[:3]
        raise DescribeError(f"the rebuilt model's weights differ from the original's ({', '.join(missing) or 'order'})")
    rebuilt.load_state_dict(model.state_dict())
    was = model.training
    try:
        model.eval()
        rebuilt.eval()
        with torch.no_grad():
            a, b = model(x), rebuilt(x)
    except Exception as e:  # noqa: BLE001 - running either model may fail on a bad example input
        raise DescribeError(f"running the rebuilt model failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})") from None
    finally:
        model.train(was)
    if not _same(a, b):
        raise DescribeError("the rebuilt model computes different outputs from the original")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


# ---- rebuild -----------------------------------------------------------------------------------

def _fail(msg: str) -> GraphFormatError:
    return GraphFormatError(f"graph architecture: {msg}")


def rebuild(desc: Any) -> fx.GraphModule:
    """Build the model a description (possibly from an untrusted file) describes, with freshly
    initialised weights of the described shapes. Raises GraphFormatError for anything that is
    not a well-formed description within the whitelists."""
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise _fail("not a dcomp graph description")
    if desc.get("version") != VERSION:
        raise _fail(f"version {desc.get('version')!r} is not one this dcomp reads ({VERSION})")
    modules, tensors, nodes = desc.get("modules"), desc.get("tensors"), desc.get("nodes")
    if not (isinstance(modules, list) and isinstance(tensors, list) and isinstance(nodes, list)):
        raise _fail("modules, tensors and nodes must be lists")
    if len(modules) > MAX_MODULES or len(tensors) > MAX_MODULES or len(nodes) > MAX_NODES:
        raise _fail("too many modules, tensors or nodes")
    try:
        root, leaves = _build_tree(modules, tensors)
        graph = _build_graph(nodes, root, leaves)
        gm = fx.GraphModule(root, graph)
    except GraphFormatError:
        raise
    except RecursionError:
        raise _fail("nested too deeply") from None
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise _fail(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}") from None
    # GraphModule copies only what the graph uses, in graph order: install the described tree
    # instead, so state_dict keys and their order are the original's
    gm._modules.clear()
    gm._parameters.clear()
    gm._buffers.clear()
    for n, c in root._modules.items():
        gm._modules[n] = c
    for n, p in root._parameters.items():
        gm._parameters[n] = p
    for n, b in root._buffers.items():
        gm._buffers[n] = b
    return gm


def _build_tree(modules: list, tensors: list) -> tuple[nn.Module, set[str]]:
    root = nn.Module()
    by_name: dict[str, nn.Module] = {"": root}
    leaves: set[str] = set()
    specs = []
    elements = 0
    for i, d in enumerate(modules):
        if not isinstance(d, dict) or not _is_path(d.get("name")):
            raise _fail(f"module entry {i} has no valid name")
        name, typ = d["name"], d.get("type")
        parent, _, child = name.rpartition(".")
        if parent not in by_name or parent in leaves:
            raise _fail(f"module {name}: its parent {parent or '(root)'} is not a container defined before it")
        if name in by_name:
            raise _fail(f"module {name} is defined twice")
        if typ == "container":
            m = nn.Module()
        elif typ in LEAF_TYPES:
            raw = d.get("args", {})
            if not isinstance(raw, dict) or not all(_is_ident(k) for k in raw):
                raise _fail(f"module {name}: bad constructor arguments")
            args = {k: _dec(v, None, f"module {name} argument {k}") for k, v in raw.items()}
            args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
            cls = LEAF_TYPES[typ]
            try:
                with torch.device("meta"):  # count what it would allocate before allocating it
                    probe = cls(**args)
                elements += sum(t.numel() for t in probe.state_dict().values())
                if elements > MAX_ELEMENTS:
                    raise _fail(f"more than {MAX_ELEMENTS} weights: not a model dcomp rebuilds")
                m = cls(**args)
            except GraphFormatError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of a torch constructor on bad args
                raise _fail(f"module {name} ({typ}{args}): {(str(e).splitlines() or [''])[0][:120]}") from None
            leaves.add(name)
        else:
            raise _fail(f"module {name} has type {str(typ)[:40]!r}, which is not one dcomp rebuilds")
        by_name[parent].add_module(child, m)  # refuses names that clash with attributes
        by_name[name] = m
        specs.append(name)
    for i, t in enumerate(tensors):
        if not isinstance(t, dict) or not _is_path(t.get("name")):
            raise _fail(f"tensor entry {i} has no valid name")
        name = t["name"]
        owner, _, attr = name.rpartition(".")
        if owner not in by_name or owner in leaves or not _is_ident(attr):
            raise _fail(f"tensor {name}: its owner is not a container")
        shape, dtype, kind = t.get("shape"), t.get("dtype"), t.get("kind")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)):
            raise _fail(f"tensor {name}: bad shape")
        if dtype not in _DTYPES or kind not in ("parameter", "buffer"):
            raise _fail(f"tensor {name}: bad dtype or kind")
        elements += math.prod(shape)
        if elements > MAX_ELEMENTS:
            raise _fail(f"more than {MAX_ELEMENTS} weights: not a model dcomp rebuilds")
        value = torch.zeros(shape, dtype=_DTYPES[dtype])
        if kind == "parameter":
            by_name[owner].register_parameter(attr, nn.Parameter(value, requires_grad=t.get("requires_grad", True) is not False
                                                                 and value.is_floating_point()))
        else:
            by_name[owner].register_buffer(attr, value)
    return root, leaves


def _build_graph(nodes: list, root: nn.Module, leaves: set[str]) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    attrs = {n for n, _ in root.named_parameters()} | {n for n, _ in root.named_buffers()}
    seen_output = False
    for i, d in enumerate(nodes):
        if not isinstance(d, dict) or not _is_ident(d.get("name")):
            raise _fail(f"node {i} has no valid name")
        name, op, target = d["name"], d.get("op"), d.get("target")
        where = f"node {name}"
        if name in env:
            raise _fail(f"{where} is defined twice")
        if seen_output:
            raise _fail(f"{where} comes after the output")
        raw_args, raw_kwargs = d.get("args", []), d.get("kwargs", [])
        if not isinstance(raw_args, list) or not isinstance(raw_kwargs, list):
            raise _fail(f"{where}: args must be a list")
        args = tuple(_dec(raw_args, env, where))
        kwargs = _dec({"dict": raw_kwargs}, env, where)
        if not all(_is_ident(k) for k in kwargs):
            raise _fail(f"{where}: bad keyword argument name")
        if op == "placeholder":
            if not _is_ident(target):
                raise _fail(f"{where}: bad input name")
            fn: Any = target
        elif op == "get_attr":
            if target not in attrs:
                raise _fail(f"{where} reads {str(target)[:60]!r}, which is not a described parameter or buffer")
            fn = target
        elif op == "call_module":
            if target not in leaves:
                raise _fail(f"{where} calls {str(target)[:60]!r}, which is not a described leaf module")
            fn = target
        elif op == "call_function":
            if target not in FUNCTIONS and target not in _TORCHVISION_FUNCS:
                raise _fail(f"{where} calls {str(target)[:60]!r}, which is not on dcomp's list of safe functions")
            if target == "builtins.getattr" and not (len(args) == 2 and isinstance(args[0], fx.Node)
                                                     and args[1] in GETATTR_NAMES and not kwargs):
                raise _fail(f"{where} reads an attribute that is not on dcomp's list")
            fn = FUNCTIONS[target] if target in FUNCTIONS else _torchvision_function(target)
        elif op == "call_method":
            if target not in TENSOR_METHODS:
                raise _fail(f"{where} calls method {str(target)[:60]!r}, which is not on dcomp's list of tensor methods")
            if not args or not isinstance(args[0], fx.Node):
                raise _fail(f"{where}: a method must be called on a computed value")
            fn = target
        elif op == "output":
            if len(args) != 1 or kwargs:
                raise _fail(f"{where}: the output takes one value")
            seen_output = True
            fn = "output"
        else:
            raise _fail(f"{where} has an unknown op {str(op)[:40]!r}")
        env[name] = graph.create_node(op, fn, args, kwargs, name=name)
    if not seen_output:
        raise _fail("the graph has no output")
    graph.lint()
    return graph


__all__ = ["describe", "rebuild", "DescribeError", "GraphFormatError", "LEAF_TYPES", "FUNCTIONS", "TENSOR_METHODS"]
