"""The dcomp checkpoint: what every stage reads and writes.

A checkpoint is a ``torch.save``-d dict of plain data and tensors only, so it loads with
``torch.load(weights_only=True)`` and loading never runs code. Layout (version 1):

    format        "dcomp-checkpoint"
    version       1
    arch          how to rebuild the model, one of
                    {"kind": "zoo", "name": str, "kwargs": dict}
                    {"kind": "graph", "graph": dict}   (plain data: dcomp.models.graph_arch)
                    {"kind": "factory", "target": "pkg.mod:factory", "kwargs": dict}
                                                   ("import": the older name of "factory")
                    {"kind": "torchscript", "archive": uint8 tensor}
                    {"kind": "pickle", "archive": uint8 tensor}
                  factory / torchscript / pickle run code: dcomp.models.arch decides when
    input_shape   list[int] without the batch dimension
    num_classes   int
    data          {"spec": str, "resize": int | None} the model was trained on, or {}
    state_dict    {name: tensor}: every parameter and buffer, at its current (maybe shrunk) shape
    masks         {param name: bool tensor}: False = pruned; the weight there is exactly 0
    quant         {param name: {"bits": int, "codebook": float32 (k,), "assignments": int tensor
                   shaped like the weight}}: weight == where(mask, codebook[assignments], 0)
    provenance    list of {"stage", "params", "metrics", "dcomp_version"[, "time"]}: no wall-clock
                  time unless SOURCE_DATE_EPOCH or DCOMP_PROVENANCE_TIME=1 (reproducible bytes)
    digest        {"algorithm": "crc32", "tensors": {"state_dict/NAME": hex, "masks/NAME": hex,
                   "quant/NAME/KEY": hex, "arch/KEY": hex}}: checked on load (absent in older files)

Shapes need no separate table: a structurally shrunk model rebuilds because the factory's
layers are resized to the stored weights (dcomp.models.conform_to_state_dict).
"""

from __future__ import annotations

import copy
import datetime as _dt
import io
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcomp import __version__
from dcomp.errors import DcompError, FormatError

FORMAT_NAME = "dcomp-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    arch: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    input_shape: list[int]
    num_classes: int
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    quant: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    # references the user vouched for in this process (typed --arch targets, the digest of a
    # TorchScript input): set by model_input.load_model, never read from or written to a file
    trusted_refs: frozenset = field(default_factory=frozenset, repr=False, compare=False)
    # the file this checkpoint (or the one it was derived from) was read from, for error messages
    source: str = field(default="", repr=False, compare=False)

    # ---- building and updating -------------------------------------------------------

    def build_model(self, trust_pickle: bool = False) -> nn.Module:
        """Rebuild the model at the stored shapes with the stored weights, in eval mode.

        What may run is decided by dcomp.models.arch (before anything is imported or loaded):
        ``trust_pickle`` (--trust-pickle) plus ``trusted_refs``, the references the user typed."""
        from dcomp.models import conform_to_state_dict
        from dcomp.models.arch import REBUILDABLE_KINDS, build_architecture, build_reference, trust_of

        where = f"{self.source}: " if self.source else ""
        kind = self.arch.get("kind")
        if kind in REBUILDABLE_KINDS:  # original shapes (low-rank factors applied), then stored shapes
            model = build_reference(self, trust_pickle)
            resized = conform_to_state_dict(model, self.state_dict, self.arch.get("resized"))
        else:
            model = build_architecture(self.arch, self.input_shape, self.num_classes, trust_of(self, trust_pickle))
            resized = []
        try:
            model.load_state_dict(_with_versions(self.state_dict, model), strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise DcompError(f"{where}weights do not fit the architecture: {' '.join(first[:2])}") from None
        model.eval()
        if resized:  # shapes came from the file: check they chain up before anyone trusts them
            try:
                with torch.no_grad():
                    model(torch.zeros(1, *self.input_shape))
            except Exception as e:  # noqa: BLE001 - any shape error from any layer
                raise DcompError(
                    f"{where}resized layers {', '.join(resized)} do not fit together at input {list(self.input_shape)}: "
                    f"{(str(e).splitlines() or [''])[0]}"
                ) from None
        return model

    def update_from_model(self, model: nn.Module) -> None:
        """Take the model's current weights (and shapes) into the checkpoint."""
        self.state_dict = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def add_provenance(self, stage: str, params: dict[str, Any] | None = None,
                       metrics: dict[str, Any] | None = None) -> None:
        self.provenance.append({
            "stage": stage,
            "params": _plain(params or {}),
            "metrics": _plain(metrics or {}),
            "dcomp_version": __version__,
            **provenance_time(),
        })

    def copy(self) -> "Checkpoint":
        return copy.deepcopy(self)

    # ---- numbers ---------------------------------------------------------------------

    def param_names(self) -> list[str]:
        """Names of the learnable parameters (state_dict entries that are not buffers)."""
        buffers = ("running_mean", "running_var", "num_batches_tracked")
        return [k for k in self.state_dict if not k.endswith(buffers)]

    def param_count(self) -> int:
        return sum(self.state_dict[k].numel() for k in self.param_names())

    def nonzero_count(self) -> int:
        return sum(int(torch.count_nonzero(self.state_dict[k])) for k in self.param_names())

    # ---- serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        from dcomp.formats.ckpt_validate import tensor_digest

        d = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "arch": self.arch,
            "input_shape": [int(s) for s in self.input_shape],
            "num_classes": int(self.num_classes),
            "data": self.data,
            "state_dict": self.state_dict,
            "masks": self.masks,
            "quant": self.quant,
            "provenance": self.provenance,
        }
        d["digest"] = tensor_digest(d)   # checked on load: flipped bits name their tensor
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "checkpoint") -> "Checkpoint":
        """Every field checked (dcomp.formats.ckpt_validate) before any tensor is used, then the digest."""
        from dcomp.formats.ckpt_validate import validate_dict

        if isinstance(d, dict) and "format" not in d:
            d = {**d, "format": FORMAT_NAME}   # callers that built the dict themselves
        validate_dict(d, source, FORMAT_NAME, FORMAT_VERSION)
        try:
            return cls(
                arch=d["arch"], state_dict=d["state_dict"], input_shape=list(d["input_shape"]),
                num_classes=int(d["num_classes"]), masks=d.get("masks", {}), quant=d.get("quant", {}),
                data=dict(d.get("data", {})), provenance=list(d.get("provenance", [])), source=source,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{source}: checkpoint is missing or has a bad field ({e})") from None

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.to_dict(), buf)
        return buf.getvalue()

    def save(self, path: str | os.PathLike) -> int:
        """Write atomically (temporary file in the same folder, then rename). Returns bytes written."""
        data = self.to_bytes()
        atomic_write(Path(path), data)
        return len(data)


def _with_versions(state_dict: dict, model: nn.Module) -> dict:
    """``state_dict`` carrying the module versions of the code that rebuilt ``model``.

    A checkpoint stores tensors only, not torch's ``_metadata`` (per-module ``_version``); some
    modules refuse a state_dict without it (torchvision's MNASNet: "version should be set to 1 or
    2"). The model was just rebuilt by the same code, so its own versions are the right ones."""
    from collections import OrderedDict

    meta = getattr(model.state_dict(), "_metadata", None)
    if meta is None:
        return state_dict
    out = OrderedDict(state_dict)
    out._metadata = meta  # type: ignore[attr-defined]
    return out


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one
    (temporary file + fsync + rename + folder fsync; symlinks, devices and FIFOs: see dcomp.atomic)."""
    from dcomp.atomic import atomic_write as _atomic_write

    _atomic_write(path, data)


def provenance_time() -> dict[str, str]:
    """The "time" of a provenance entry, or nothing. Checkpoints are reproducible by default (the
    same inputs and seed give the same bytes), so no wall-clock time is recorded unless asked:
    SOURCE_DATE_EPOCH (the reproducible-builds convention) gives a fixed time, and
    DCOMP_PROVENANCE_TIME=1 the current one."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch:
        try:
            when = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise DcompError(f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix time in seconds") from None
    elif os.environ.get("DCOMP_PROVENANCE_TIME", "").strip().lower() in ("1", "true", "yes", "on"):
        when = _dt.datetime.now(_dt.timezone.utc)
    else:
        return {}
    return {"time": when.isoformat(timespec="seconds")}


def _plain(obj: Any) -> Any:
    """Make provenance entries plain data (what weights_only loading accepts)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float):
        # 6 significant digits: metrics are for people, and in a small packed model the
        # provenance is a visible share of the file
        return float(f"{obj:.6g}")
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return _plain(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return _plain(obj.item())
    return str(obj)


# ---- reading any model file ----------------------------------------------------------------

def sniff(data: bytes) -> str:
    """Tell what a model file is from its bytes: dcz, torchscript, torch, safetensors or unknown."""
    from dcomp.formats import DCZ_MAGIC

    if data.startswith(DCZ_MAGIC):
        return "dcz"
    if data.startswith(b"PK\x03\x04"):
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except Exception:  # noqa: BLE001 - BadZipFile, bad names, unsupported zip versions: torch.load reports it
            return "torch"
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "torch"
    if len(data) >= 10 and data[8:9] == b"{":
        n = int.from_bytes(data[:8], "little")
        if 0 < n <= len(data) - 8:
            return "safetensors"
    if data[:1] == b"\x80":  # legacy (non-zip) torch.save / raw pickle
        return "torch"
    return "unknown"


def torch_load_plain(data: bytes, source: str) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors for corrupt and pickled files."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "GLOBAL" in msg or "weights_only" in msg.lower():
            raise PickledObjectError(source) from None
        raise FormatError(f"{source}: corrupt torch file ({msg.splitlines()[0] if msg else 'unpickling failed'})") from None
    except MemoryError:
        raise FormatError(f"{source}: corrupt torch file (claims more memory than is available)") from None
    except Exception as e:  # noqa: BLE001 - any failure of the unpickler on untrusted bytes is a bad file
        first = (str(e).splitlines() or ["unreadable"])[0][:200]
        raise FormatError(f"{source}: truncated or corrupt torch file ({type(e).__name__}: {first})") from None


class PickledObjectError(DcompError):
    def __init__(self, source: str):
        super().__init__(
            f"{source} holds a pickled Python object (such as a whole nn.Module); loading it runs code "
            f"stored in the file. If you trust the file pass --trust-pickle; better, save "
            f"model.state_dict() and pass --arch, or save TorchScript"
        )


def read_checkpoint(data: bytes, source: str = "input") -> Checkpoint:
    """Read a dcomp checkpoint or a .dcz file from bytes (other model files: model_input.load_model)."""
    kind = sniff(data)
    if kind == "dcz":
        from dcomp.formats import dcz

        ckpt = dcz.read_bytes(data, source=source)
        ckpt.source = source
        return ckpt
    if kind != "torch":
        raise FormatError(f"{source}: not a dcomp checkpoint or .dcz file")
    obj = torch_load_plain(data, source)
    if not is_checkpoint_dict(obj):
        raise FormatError(
            f"{source}: a torch file but not a dcomp checkpoint (a plain state_dict needs --arch)"
        )
    return Checkpoint.from_dict(obj, source)


def is_checkpoint_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("format"), str) and obj["format"] == FORMAT_NAME
