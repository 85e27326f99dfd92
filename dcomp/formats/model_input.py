"""Turn whatever model file a user has into a dcomp Checkpoint.

Accepted, detected from the bytes (never from the file name):
  - a dcomp checkpoint or a .dcz file
  - a TorchScript archive (torch.jit.save): code the user chose to run (it runs when loaded)
  - a state_dict saved with torch.save, or a .safetensors file, plus ``arch`` (a zoo name,
    ``package.module:factory`` or ``path/to/file.py:factory``, typed by the user) and optional
    ``arch_kwargs``. A factory's model is stored as a ``graph`` (plain data, dcomp.models.graph_arch)
    when it can be, so later stages need no trust; else as the factory reference.
  - a pickled nn.Module (torch.save(model)), only with ``trust_pickle``: unpickling runs code.
    It is stored as a graph when it can be, else as TorchScript, else as the pickle.
"""

from __future__ import annotations

import io
from typing import Any, Callable

import torch
from torch import nn

from dcomp.errors import DcompError, FormatError, UsageError
from dcomp.formats.checkpoint import (
    Checkpoint,
    PickledObjectError,
    is_checkpoint_dict,
    read_checkpoint,
    sniff,
    torch_load_plain,
)


def load_model(
    data: bytes,
    source: str = "input",
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    shape_of: Callable[[], tuple[list[int], int]] | None = None,
    typed: frozenset[str] | set[str] = frozenset(),
    execute: bool = True,
) -> Checkpoint:
    """Read any accepted model file. ``shape_of()`` gives (input shape, classes) from the
    dataset where the file does not say them; it is called only then (zoo models need them).

    ``arch`` and ``typed`` are references the *user* typed (``--arch``): only those, a trusted
    library factory, or ``trust_pickle`` let a factory named by a file be imported. The
    checkpoint returned carries them (``trusted_refs``) for this process only.
    ``execute=False`` (``dcomp info``): run nothing at all, whatever the flags: the model is
    not built, TorchScript and pickles are refused."""
    from dcomp.models import ZOO

    if not data:
        raise FormatError(f"{source}: empty input (expected a model file)")
    typed = frozenset(typed) | (frozenset([arch]) if arch and arch not in ZOO else frozenset())
    kind = sniff(data)
    if kind == "dcz":
        return _vouched(_agreeing(read_checkpoint(data, source), arch, source), typed, execute)
    if kind == "torchscript":
        if not execute:  # its tensors, read as data: the code in it is never loaded
            return _torchscript_as_data(data, source, shape_of)
        return _from_torchscript(data, source, shape_of)
    if kind == "safetensors":
        return _from_state_dict(_read_safetensors(data, source), source, arch, arch_kwargs, shape_of, typed, execute)
    if kind == "torch":
        try:
            obj = torch_load_plain(data, source)
        except PickledObjectError:
            if not trust_pickle or not execute:
                if not execute:
                    raise DcompError(f"{source} holds a pickled Python object; this command never unpickles "
                                     f"(that runs code), whatever the flags") from None
                raise
            return _from_pickle(data, source, shape_of)
        if is_checkpoint_dict(obj):
            return _vouched(_agreeing(Checkpoint.from_dict(obj, source), arch, source), typed, execute)
        state = _find_state_dict(obj)
        if state is None:
            raise FormatError(f"{source}: a torch file, but neither a dcomp checkpoint nor a state_dict of tensors")
        return _from_state_dict(state, source, arch, arch_kwargs, shape_of, typed, execute)
    raise FormatError(
        f"{source}: not a model file dcomp reads (expected a dcomp checkpoint, .dcz, TorchScript, "
        f"a torch.save'd state_dict or .safetensors)"
    )


def _agreeing(ckpt: Checkpoint, arch: str | None, source: str) -> Checkpoint:
    """--arch given for a file that records its own architecture: fine if it names the same one
    (typing a file's own factory vouches for it), else a usage error: it would be ignored."""
    recorded = ckpt.arch.get("name") or ckpt.arch.get("target")
    if arch is None or recorded == arch:
        return ckpt
    kind = ckpt.arch.get("kind")
    what = f"{kind} {recorded}" if recorded else f"a {kind} archive"
    raise UsageError(f"--arch {arch}: {source} records its own architecture ({what}), which is used; "
                     f"--arch is for plain state_dicts only (drop it)")


def _vouched(ckpt: Checkpoint, typed: frozenset[str], execute: bool) -> Checkpoint:
    """A checkpoint read from a file, with the references the user typed attached. When the file
    names one of them as a factory, store the architecture as a graph from now on (so the
    checkpoints this command writes need no flag later)."""
    from dcomp.models.arch import FACTORY_KINDS, arch_record, build_architecture, trust_of

    ckpt.trusted_refs = frozenset(typed)
    if execute and ckpt.arch.get("kind") in FACTORY_KINDS and ckpt.arch.get("target") in typed:
        model = build_architecture(ckpt.arch, ckpt.input_shape, ckpt.num_classes, trust_of(ckpt))
        record, _ = arch_record(model, ckpt.input_shape, ckpt.arch["target"], ckpt.arch.get("kwargs"))
        ckpt.arch = record
    return ckpt


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    if isinstance(obj, dict):  # common wrappers: {"state_dict": ...}, {"model": ...}
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj:
                found = _find_state_dict(obj[key])
                if found is not None:
                    return found
    return None


def _read_safetensors(data: bytes, source: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, OSError) as e:
        raise FormatError(f"{source}: corrupt safetensors file ({e})") from None


def _require_shape(source: str, shape_of) -> tuple[list[int], int]:
    if shape_of is None:
        raise UsageError(f"{source}: cannot tell the model's input shape; pass --data (and --resize if needed)")
    shape, classes = shape_of()
    return list(shape), int(classes)


def _from_state_dict(state, source, arch, arch_kwargs, shape_of, typed=frozenset(), execute=True) -> Checkpoint:
    from dcomp.models import ZOO
    from dcomp.models.arch import arch_record

    if not arch:
        raise UsageError(f"{source} is a plain state_dict: pass --arch (a zoo name such as lenet-300-100, "
                         f"package.module:factory or path/to/file.py:factory)")
    shape, classes = _require_shape(source, shape_of)
    if arch in ZOO:
        arch_d = {"kind": "zoo", "name": arch, "kwargs": dict(arch_kwargs or {})}
    elif ":" in arch:
        arch_d = {"kind": "factory", "target": arch, "kwargs": dict(arch_kwargs or {})}
    else:
        raise UsageError(f"unknown architecture {arch!r}: zoo models are {', '.join(ZOO)} (or use package.module:factory)")
    ckpt = Checkpoint(arch=arch_d, state_dict={k: v.detach().clone() for k, v in state.items()},
                      input_shape=shape, num_classes=classes, trusted_refs=frozenset(typed), source=source)
    params: dict[str, Any] = {"source": source, "arch": arch}
    if execute:
        model = ckpt.build_model()  # --arch was typed by the user; fail now if the weights do not fit
        if arch_d["kind"] == "factory":
            ckpt.arch, note = arch_record(model, shape, arch, arch_d["kwargs"])
            params["stored_as"] = ckpt.arch["kind"]
            if note:
                params["graph_note"] = note
    ckpt.add_provenance("import", params)
    return ckpt


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _from_torchscript(data: bytes, source: str, shape_of) -> Checkpoint:
    try:
        model = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch.jit raises RuntimeError and friends for corrupt archives
        raise FormatError(f"{source}: corrupt TorchScript archive ({str(e).splitlines()[0]})") from None
    shape, classes = _require_shape(source, shape_of)
    from dcomp.models.arch import torchscript_ref

    ckpt = Checkpoint(arch={"kind": "torchscript", "archive": _bytes_tensor(data)}, state_dict={},
                      input_shape=shape, num_classes=classes, trusted_refs=frozenset([torchscript_ref(data)]))
    ckpt.update_from_model(model)
    ckpt.add_provenance("import", {"source": source, "format": "torchscript"})
    return ckpt


_STORAGES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
             "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
             "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
             "BoolStorage": torch.bool}


def torchscript_tensors(data: bytes, source: str = "input") -> dict[str, torch.Tensor]:
    """The named tensors of a TorchScript archive, read without loading it: a restricted
    unpickler that knows tensors, storages and dicts and turns every TorchScript class into an
    inert placeholder (so no ``__setstate__`` or other code from the archive runs)."""
    import pickle
    import zipfile
    from collections import OrderedDict

    class _Obj:
        state: Any = None

        def __setstate__(self, state):
            self.state = state

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1)
    except (zipfile.BadZipFile, StopIteration):
        raise FormatError(f"{source}: not a readable TorchScript archive") from None
    prefix = pkl[: -len("data.pkl")]

    def rebuild_tensor(storage, offset, size, stride, *_):
        return storage.as_strided(tuple(size), tuple(stride), int(offset)).clone()

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch._utils" and name == "_rebuild_tensor_v2":
                return rebuild_tensor
            if module == "torch" and name in _STORAGES:
                return _STORAGES[name]
            if module == "collections" and name == "OrderedDict":
                return OrderedDict
            if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist",
                                                          "build_tensorlist", "build_complexlist"):
                return lambda x: x  # typed lists: the list itself
            if module == "torch.jit._pickle" and name == "restore_type_tag":
                return lambda value, _type: value
            if module == "__torch__" or module.startswith("__torch__."):
                return type("TorchScriptObject", (_Obj,), {})
            raise pickle.UnpicklingError(f"{module}.{name} is not something dcomp reads as data")

        def persistent_load(self, pid):
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
                raise pickle.UnpicklingError("unknown persistent id")
            raw = zf.read(f"{prefix}data/{pid[2]}")
            return torch.frombuffer(bytearray(raw), dtype=pid[1]) if raw else torch.empty(0, dtype=pid[1])

    try:
        root = _Unpickler(io.BytesIO(zf.read(pkl))).load()
    except Exception as e:  # noqa: BLE001 - any malformed archive
        raise FormatError(f"{source}: TorchScript archive not readable as data ({(str(e).splitlines() or [''])[0][:120]})") from None
    out: dict[str, torch.Tensor] = {}

    def walk(obj, prefix_: str, depth: int) -> None:
        if depth > 64:
            return
        state = obj.state if isinstance(obj, _Obj) else None
        if not isinstance(state, dict):
            return
        for k, v in state.items():
            if not isinstance(k, str):
                continue
            if isinstance(v, torch.Tensor):
                out[prefix_ + k] = v
            elif isinstance(v, _Obj):
                walk(v, f"{prefix_}{k}.", depth + 1)

    walk(root, "", 0)
    return out


def _torchscript_as_data(data: bytes, source: str, shape_of) -> Checkpoint:
    shape, classes = _require_shape(source, shape_of)
    ckpt = Checkpoint(arch={"kind": "torchscript", "archive": _bytes_tensor(data)},
                      state_dict=torchscript_tensors(data, source), input_shape=shape, num_classes=classes)
    ckpt.add_provenance("import", {"source": source, "format": "torchscript (read as data)"})
    return ckpt


def _from_pickle(data: bytes, source: str, shape_of) -> Checkpoint:
    try:
        model = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - arbitrary unpickling errors
        raise FormatError(f"{source}: could not unpickle ({str(e).splitlines()[0]})") from None
    if not isinstance(model, nn.Module):
        raise FormatError(f"{source}: the pickled object is a {type(model).__name__}, not an nn.Module")
    shape, classes = _require_shape(source, shape_of)
    from dcomp.models.arch import torchscript_ref
    from dcomp.models.graph_arch import DescribeError, describe

    refs: frozenset[str] = frozenset()
    try:  # as data first: then later commands need no flag
        arch = {"kind": "graph", "graph": describe(model, torch.zeros(1, *shape))}
        how = "pickle->graph"
    except DescribeError as e:
        note = str(e)
        try:
            scripted = torch.jit.script(model.eval())
            buf = io.BytesIO()
            torch.jit.save(scripted, buf)
            arch = {"kind": "torchscript", "archive": _bytes_tensor(buf.getvalue())}
            refs = frozenset([torchscript_ref(buf.getvalue())])
            how = "pickle->torchscript"
        except Exception:  # noqa: BLE001 - scripting fails for many dynamic models; keep the pickle
            arch = {"kind": "pickle", "archive": _bytes_tensor(data)}
            how = "pickle"
    ckpt = Checkpoint(arch=arch, state_dict={}, input_shape=shape, num_classes=classes, trusted_refs=refs)
    ckpt.update_from_model(model)
    params = {"source": source, "format": how}
    if how != "pickle->graph":
        params["graph_note"] = note
    ckpt.add_provenance("import", params)
    return ckpt


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """``--arch-kwargs`` as JSON (``'{"hidden": [500, 150]}'``) or ``k=v,k=v`` with JSON values."""
    import json

    if not text:
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            val = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--arch-kwargs is not valid JSON: {e}") from None
        if not isinstance(val, dict):
            raise UsageError("--arch-kwargs must be a JSON object")
        return val
    out: dict[str, Any] = {}
    for part in _split_top_level(text):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise UsageError(f"--arch-kwargs: expected key=value, got {part!r}")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: 'a=1,w=[8,16]' -> ['a=1', 'w=[8,16]']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


__all__ = ["load_model", "parse_arch_kwargs", "DcompError"]
