"""Turn whatever model file a user has into a dcomp Checkpoint.

Accepted, detected from the bytes (never from the file name):
  - a dcomp checkpoint or a .dcz file
  - a TorchScript archive (torch.jit.save)
  - a state_dict saved with torch.save, or a .safetensors file, plus ``arch``
    (a zoo name or ``package.module:factory``) and optional ``arch_kwargs``
  - a pickled nn.Module (torch.save(model)), only with ``trust_pickle``: unpickling runs code.
    It is converted to TorchScript when torch.jit.script can do so, so later stages need no trust.
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
) -> Checkpoint:
    """Read any accepted model file. ``shape_of()`` gives (shape_of) from the
    dataset where the file does not say them; it is called only then (zoo models need them)."""
    if not data:
        raise FormatError(f"{source}: empty input (expected a model file)")
    kind = sniff(data)
    if kind == "dcz":
        return read_checkpoint(data, source)
    if kind == "torchscript":
        return _from_torchscript(data, source, shape_of)
    if kind == "safetensors":
        return _from_state_dict(_read_safetensors(data, source), source, arch, arch_kwargs, shape_of)
    if kind == "torch":
        try:
            obj = torch_load_plain(data, source)
        except PickledObjectError:
            if not trust_pickle:
                raise
            return _from_pickle(data, source, shape_of)
        if is_checkpoint_dict(obj):
            return Checkpoint.from_dict(obj, source)
        state = _find_state_dict(obj)
        if state is None:
            raise FormatError(f"{source}: a torch file, but neither a dcomp checkpoint nor a state_dict of tensors")
        return _from_state_dict(state, source, arch, arch_kwargs, shape_of)
    raise FormatError(
        f"{source}: not a model file dcomp reads (expected a dcomp checkpoint, .dcz, TorchScript, "
        f"a torch.save'd state_dict or .safetensors)"
    )


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


def _from_state_dict(state, source, arch, arch_kwargs, shape_of) -> Checkpoint:
    from dcomp.models import ZOO

    if not arch:
        raise UsageError(f"{source} is a plain state_dict: pass --arch (a zoo name such as lenet-300-100, or package.module:factory)")
    shape, classes = _require_shape(source, shape_of)
    if arch in ZOO:
        arch_d = {"kind": "zoo", "name": arch, "kwargs": dict(arch_kwargs or {})}
    elif ":" in arch:
        arch_d = {"kind": "import", "target": arch, "kwargs": dict(arch_kwargs or {})}
    else:
        raise UsageError(f"unknown architecture {arch!r}: zoo models are {', '.join(ZOO)} (or use package.module:factory)")
    ckpt = Checkpoint(arch=arch_d, state_dict={k: v.detach().clone() for k, v in state.items()},
                      input_shape=shape, num_classes=classes)
    ckpt.build_model(trust_pickle=True)  # --arch was typed by the user; fail now if the weights do not fit
    ckpt.add_provenance("import", {"source": source, "arch": arch})
    return ckpt


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _from_torchscript(data: bytes, source: str, shape_of) -> Checkpoint:
    try:
        model = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch.jit raises RuntimeError and friends for corrupt archives
        raise FormatError(f"{source}: corrupt TorchScript archive ({str(e).splitlines()[0]})") from None
    shape, classes = _require_shape(source, shape_of)
    ckpt = Checkpoint(arch={"kind": "torchscript", "archive": _bytes_tensor(data)}, state_dict={},
                      input_shape=shape, num_classes=classes)
    ckpt.update_from_model(model)
    ckpt.add_provenance("import", {"source": source, "format": "torchscript"})
    return ckpt


def _from_pickle(data: bytes, source: str, shape_of) -> Checkpoint:
    try:
        model = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - arbitrary unpickling errors
        raise FormatError(f"{source}: could not unpickle ({str(e).splitlines()[0]})") from None
    if not isinstance(model, nn.Module):
        raise FormatError(f"{source}: the pickled object is a {type(model).__name__}, not an nn.Module")
    shape, classes = _require_shape(source, shape_of)
    try:
        scripted = torch.jit.script(model.eval())
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        arch = {"kind": "torchscript", "archive": _bytes_tensor(buf.getvalue())}
        how = "pickle->torchscript"
    except Exception:  # noqa: BLE001 - scripting fails for many dynamic models; keep the pickle
        arch = {"kind": "pickle", "archive": _bytes_tensor(data)}
        how = "pickle"
    ckpt = Checkpoint(arch=arch, state_dict={}, input_shape=shape, num_classes=classes)
    ckpt.update_from_model(model)
    ckpt.add_provenance("import", {"source": source, "format": how})
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
