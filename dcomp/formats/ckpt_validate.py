"""The dcomp checkpoint dict checked before use, and its tensor digest.

``validate_dict`` runs on whatever ``torch.load(weights_only=True)`` returned, before any tensor is
used: every field's type, range and consistency, in a fixed order, one FormatError line naming the
file and the field (docs/RELIABILITY.md, "Checkpoints"). ``tensor_digest`` is a CRC32 of every
tensor (dtype, shape and bytes), stored under "digest" when a checkpoint is written and
compared on load, so flipped bits in tensor data are an error naming the tensor instead of
silently different weights. Checkpoints written before the digest existed carry none and load
as before.

Order of checks: format, version, arch (kind, and the fields of the built-in kinds), input_shape,
num_classes (both against dcomp.formats.limits), data, state_dict, masks, quant, provenance,
digest (structure, then every tensor).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch

from dcomp.errors import FormatError
from dcomp.formats import limits as _limits

DIGEST_ALGORITHM = "crc32"
MAX_DIMS = 32
# dtypes a checkpoint tensor may have (what the rest of dcomp and the .dcz format handle)
TENSOR_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                 torch.int16, torch.int8, torch.uint8, torch.bool}


class CheckpointFieldError(FormatError):
    """A field of the checkpoint dict has the wrong type, range or shape."""


class DigestMismatch(FormatError):
    """A tensor's bytes differ from the digest stored when the checkpoint was written."""


def _kind(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {str(v.dtype).replace('torch.', '')} tensor of shape {list(v.shape)}"
    return {type(None): "None", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", tuple: "a tuple", dict: "a dict", bytes: "bytes"}.get(type(v), type(v).__name__)


def _tensor_ok(t: Any) -> str | None:
    """Why ``t`` is not a plain dense CPU tensor of a supported dtype (None if it is)."""
    if not isinstance(t, torch.Tensor):
        return f"expected a tensor, got {_kind(t)}"
    if t.layout != torch.strided:
        return f"expected a dense tensor, got layout {t.layout}"
    if t.is_quantized or t.dtype not in TENSOR_DTYPES:
        return f"dtype {t.dtype} is not supported (use one of float32/16/64, bfloat16, int8-64, uint8, bool)"
    if t.device.type != "cpu":
        return f"tensor on device {t.device}"
    if t.dim() > MAX_DIMS:
        return f"{t.dim()} dimensions, more than {MAX_DIMS}"
    return None


def validate_dict(d: Any, source: str, fmt_name: str, max_version: int,
                  lim: _limits.Limits | None = None) -> None:
    """Raise one FormatError line for the first thing wrong with a checkpoint dict."""
    lim = lim or _limits.current()

    def bad(field: str, why: str) -> FormatError:
        return CheckpointFieldError(f"{source}: checkpoint field {field}: {why}")

    if not isinstance(d, dict) or d.get("format") != fmt_name:
        raise CheckpointFieldError(f"{source}: not a dcomp checkpoint (no format: {fmt_name!r})")
    for k in d:
        if not isinstance(k, str):
            raise bad(repr(k)[:40], "keys must be strings")
    v = d.get("version")
    if not isinstance(v, int) or isinstance(v, bool):
        raise FormatError(f"{source}: checkpoint has no format version")
    if v > max_version:
        raise FormatError(f"{source}: checkpoint format version {v} is newer than this dcomp reads ({max_version}); "
                          "upgrade dcomp")
    if v < 1:
        raise FormatError(f"{source}: unknown checkpoint format version {v}")

    # arch: how to rebuild (Checkpoint.build_model dispatches on kind; unknown kinds are refused there)
    arch = d.get("arch")
    if not isinstance(arch, dict):
        raise bad("arch", f"expected a dict, got {_kind(arch)}")
    kind = arch.get("kind")
    if not isinstance(kind, str):
        raise bad("arch.kind", f"expected a string, got {_kind(kind)}")
    if kind == "zoo" and not isinstance(arch.get("name"), str):
        raise bad("arch.name", f"expected a zoo model name, got {_kind(arch.get('name'))}")
    if kind == "import" and not isinstance(arch.get("target"), str):
        raise bad("arch.target", f"expected 'package.module:factory', got {_kind(arch.get('target'))}")
    if kind in ("zoo", "import") and not isinstance(arch.get("kwargs", {}), dict):
        raise bad("arch.kwargs", f"expected a dict, got {_kind(arch.get('kwargs'))}")
    if kind in ("torchscript", "pickle"):
        a = arch.get("archive")
        why = _tensor_ok(a)
        if why is None and (a.dtype != torch.uint8 or a.dim() != 1):
            why = f"expected a 1-D uint8 tensor, got {_kind(a)}"
        if why:
            raise bad("arch.archive", why)

    shape = d.get("input_shape")
    if not isinstance(shape, (list, tuple, torch.Size)) or len(shape) > MAX_DIMS \
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        shown = [x if type(x) is int else _kind(x) for x in list(shape)[:8]] \
            if isinstance(shape, (list, tuple, torch.Size)) else _kind(shape)
        raise bad("input_shape", f"expected a list of positive integers, got {shown}")
    if math.prod(shape) > lim.max_input:
        raise FormatError(f"{source}: checkpoint field input_shape {list(shape)[:8]} claims {math.prod(shape):,} "
                          f"elements per sample, over the limit of {lim.max_input:,} ({_limits.hint('max_input')})")
    nc = d.get("num_classes")
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
        raise bad("num_classes", f"expected a positive integer, got {_kind(nc)}")
    if nc > lim.max_classes:
        raise FormatError(f"{source}: checkpoint field num_classes {nc:,} is over the limit of {lim.max_classes:,} "
                          f"({_limits.hint('max_classes')})")
    for key in ("data",):
        if not isinstance(d.get(key, {}), dict):
            raise bad(key, f"expected a dict, got {_kind(d.get(key))}")

    sd = d.get("state_dict")
    if not isinstance(sd, dict):
        raise bad("state_dict", f"expected a dict of tensors, got {_kind(sd)}")
    for name, t in sd.items():
        if not isinstance(name, str):
            raise bad("state_dict", f"key {repr(name)[:40]} is not a string")
        why = _tensor_ok(t)
        if why:
            raise bad(f"state_dict[{name!r}]", why)

    masks = d.get("masks", {})
    if not isinstance(masks, dict):
        raise bad("masks", f"expected a dict of bool tensors, got {_kind(masks)}")
    for name, m in masks.items():
        f = f"masks[{name!r}]" if isinstance(name, str) else "masks"
        if not isinstance(name, str) or name not in sd:
            raise bad(f, "names no tensor of the state_dict")
        why = _tensor_ok(m)
        if why is None and m.dtype != torch.bool:
            why = f"expected a bool tensor, got {_kind(m)}"
        if why is None and m.shape != sd[name].shape:
            why = f"shape {list(m.shape)} differs from the weight's {list(sd[name].shape)}"
        if why:
            raise bad(f, why)

    quant = d.get("quant", {})
    if not isinstance(quant, dict):
        raise bad("quant", f"expected a dict, got {_kind(quant)}")
    for name, q in quant.items():
        f = f"quant[{name!r}]" if isinstance(name, str) else "quant"
        if not isinstance(name, str) or name not in sd:
            raise bad(f, "names no tensor of the state_dict")
        if not isinstance(q, dict) or not all(isinstance(k, str) for k in q):
            raise bad(f, f"expected a dict with string keys, got {_kind(q)}")
        for k, t in q.items():
            if isinstance(t, torch.Tensor) and _tensor_ok(t):
                raise bad(f"{f}.{k}", _tensor_ok(t))
        bits, cb, a = q.get("bits"), q.get("codebook"), q.get("assignments")
        if "bits" in q and (not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16):
            raise bad(f"{f}.bits", f"expected an integer 1..16, got {_kind(bits)}")
        if isinstance(cb, torch.Tensor):
            if not cb.dtype.is_floating_point or cb.dim() != 1 or cb.numel() < 1 \
                    or (isinstance(bits, int) and "bits" in q and cb.numel() > 1 << bits):
                raise bad(f"{f}.codebook", f"expected 1..2^bits floats, got {_kind(cb)}")
        if isinstance(a, torch.Tensor):
            if a.dtype.is_floating_point or a.dtype == torch.bool or a.shape != sd[name].shape:
                raise bad(f"{f}.assignments", f"expected integers shaped like the weight {list(sd[name].shape)}, "
                                              f"got {_kind(a)}")
            if isinstance(cb, torch.Tensor) and a.numel() and (int(a.min()) < 0 or int(a.max()) >= cb.numel()):
                raise bad(f"{f}.assignments", f"indices outside the codebook's {cb.numel()} entries")

    prov = d.get("provenance", [])
    if not isinstance(prov, (list, tuple)) or not all(isinstance(p, dict) for p in prov):
        raise bad("provenance", f"expected a list of dicts, got {_kind(prov)}")

    if "digest" in d:
        check_digest(d, source)


def _tensors(d: dict):
    """(key, tensor) of every tensor a checkpoint dict holds, in a fixed order."""
    for name, t in d.get("state_dict", {}).items():
        yield f"state_dict/{name}", t
    for name, t in d.get("masks", {}).items():
        yield f"masks/{name}", t
    for name, q in d.get("quant", {}).items():
        if isinstance(q, dict):
            for k, t in q.items():
                if isinstance(t, torch.Tensor):
                    yield f"quant/{name}/{k}", t
    arch = d.get("arch", {})
    if isinstance(arch, dict):
        for k, t in arch.items():
            if isinstance(t, torch.Tensor):
                yield f"arch/{k}", t


def digest_of(t: torch.Tensor) -> str:
    """CRC32 (zlib/IEEE, as the .dcz sections) of a tensor's dtype, shape and little-endian element
    bytes (C order), as 8 hex digits. A check against corruption, not against forgery: anyone who
    can rewrite the file can rewrite the digest (sign or hash the whole file for that)."""
    crc = zlib.crc32(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}".encode())
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        crc = zlib.crc32(memoryview(flat.view(torch.uint8).numpy()), crc)
    return f"{crc:08x}"


def tensor_digest(d: dict) -> dict:
    return {"algorithm": DIGEST_ALGORITHM, "tensors": {k: digest_of(t) for k, t in _tensors(d)}}


def check_digest(d: dict, source: str) -> None:
    dg = d["digest"]
    if not isinstance(dg, dict) or not isinstance(dg.get("tensors"), dict) \
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in dg["tensors"].items()):
        raise CheckpointFieldError(f"{source}: checkpoint field digest: expected "
                                   "{'algorithm': ..., 'tensors': {name: hex}}")
    if dg.get("algorithm") != DIGEST_ALGORITHM:
        raise CheckpointFieldError(f"{source}: checkpoint digest algorithm {str(dg.get('algorithm'))[:40]!r} is "
                                   f"unknown (this dcomp writes {DIGEST_ALGORITHM}); upgrade dcomp")
    want = dg["tensors"]
    seen = set()
    for key, t in _tensors(d):
        seen.add(key)
        if key not in want:
            raise DigestMismatch(f"{source}: tensor {key} is not in the checkpoint's digest (added after it was "
                                 "written, or a corrupt file)")
        if digest_of(t) != want[key]:
            raise DigestMismatch(f"{source}: tensor {key} does not match the checkpoint's digest (its bytes "
                                 "changed after it was written: corrupt file)")
    missing = [k for k in want if k not in seen]
    if missing:
        raise DigestMismatch(f"{source}: tensor {missing[0][:80]} listed in the checkpoint's digest is missing "
                             "(corrupt file)")
