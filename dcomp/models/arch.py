"""Building a model from a checkpoint's ``arch`` record, and deciding what that may run.

A checkpoint or .dcz names its architecture in one of these kinds (docs/FORMAT.md):

    zoo          {"kind": "zoo", "name": str, "kwargs": dict}         dcomp's own models
    graph        {"kind": "graph", "graph": dict}                     plain data (graph_arch)
    factory      {"kind": "factory", "target": "mod:fn", "kwargs": dict}   ("import": older name)
    torchscript  {"kind": "torchscript", "archive": uint8 tensor}
    pickle       {"kind": "pickle", "archive": uint8 tensor}

``zoo`` and ``graph`` never run code from the file. The others would, so :func:`build_architecture`
checks a :class:`Trust` *before* importing or loading anything:

- a ``factory`` is imported when the user typed that same target with ``--arch`` (``Trust.typed``),
  or passed ``--trust-pickle``, or it is a classification factory of ``torchvision.models``
  (a library dcomp trusts; imported through dcomp.models.vision) or a ``torch.nn`` layer class
  on graph_arch's list;
- ``torchscript`` held in a file is loaded only with ``--trust-pickle``, or when the user gave
  that very archive as the input model in this process (its digest is in ``Trust.typed``);
- ``pickle`` only with ``--trust-pickle``.

Targets the user types may name a module in the current folder (``mynet:TinyNet``, as
``python -m`` would find it) or a file (``./mynet.py:TinyNet``, ``path/to/file.py:make``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dcomp.errors import DcompError, FormatError, UsageError

# kinds whose model is built at the original shapes and then resized (conform_to_state_dict)
REBUILDABLE_KINDS = ("zoo", "factory", "import", "graph")
FACTORY_KINDS = ("factory", "import")
TRUSTED_LIBRARY_MODULE = "torchvision.models"
# keyword arguments a file may not pass to a trusted library factory (they download weights)
_LIBRARY_BLOCKED_KWARGS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


@dataclass(frozen=True)
class Trust:
    """What the user vouched for in this process.

    ``pickle``: --trust-pickle was given. ``typed``: references the user gave on the command
    line: ``--arch`` targets exactly as typed, and ``torchscript:<sha256>`` for a TorchScript
    archive given directly as the input model. Never read from or written to a file."""

    pickle: bool = False
    typed: frozenset[str] = frozenset()


def torchscript_ref(archive: bytes | torch.Tensor) -> str:
    data = archive.numpy().tobytes() if isinstance(archive, torch.Tensor) else archive
    return "torchscript:" + hashlib.sha256(data).hexdigest()


def trust_of(ckpt: Any, trust_pickle: bool = False) -> Trust:
    """The Trust for building ``ckpt``: --trust-pickle plus the references the user vouched for
    when this checkpoint object was loaded (``Checkpoint.trusted_refs``, never stored)."""
    return Trust(pickle=bool(trust_pickle), typed=frozenset(getattr(ckpt, "trusted_refs", ()) or ()))


# ---- which references may run ------------------------------------------------------------------

def is_trusted_library_factory(target: str) -> bool:
    """``torchvision.models:<name>`` where <name> is one of torchvision's classification models,
    or ``torch.nn:<Layer>`` for a layer type graph_arch rebuilds (a one-layer model)."""
    mod, _, attr = str(target).rpartition(":")
    if mod == "torch.nn":
        from dcomp.models.graph_arch import LEAF_TYPES

        return attr in LEAF_TYPES
    if mod != TRUSTED_LIBRARY_MODULE or not attr.isidentifier():
        return False
    try:
        from dcomp.models.vision import vision_models

        tm = vision_models()
        return attr in tm.list_models(module=tm)
    except Exception:  # noqa: BLE001 - torchvision missing or broken: not trusted
        return False


def check_allowed(arch: dict, trust: Trust) -> None:
    """Raise (before importing or loading anything) when building ``arch`` would run code the
    user has not vouched for. One line: the reference, the reason and the flag."""
    kind = arch.get("kind")
    if kind in FACTORY_KINDS:
        target = arch.get("target")
        if not isinstance(target, str) or not target:
            raise FormatError("the architecture record names no factory target")
        if trust.pickle or target in trust.typed:
            return
        if is_trusted_library_factory(target):
            bad = [k for k in _LIBRARY_BLOCKED_KWARGS if (arch.get("kwargs") or {}).get(k) not in (None, False)]
            if bad:
                raise DcompError(f"the file asks {target} for {bad[0]}=..., which would download weights; "
                                 f"pass --trust-pickle if you trust the file")
            return
        raise DcompError(
            f"the file names the Python factory {target} as its architecture; dcomp imports a module named "
            f"by a file only when you type the same --arch {target} or pass --trust-pickle (importing runs its code)"
        )
    if kind == "torchscript":
        if trust.pickle:
            return
        archive = arch.get("archive")
        if isinstance(archive, torch.Tensor) and torchscript_ref(archive) in trust.typed:
            return
        raise DcompError(
            "the file holds its architecture as TorchScript, which is code that runs when loaded; pass "
            "--trust-pickle if you trust where it came from (or convert it: a state_dict with --arch)"
        )
    if kind == "pickle":
        if trust.pickle:
            return
        raise DcompError(
            "this checkpoint's architecture is a pickled Python object; rebuilding it runs code "
            "from the file. Pass --trust-pickle if you trust where it came from"
        )


def needs_trust(arch: dict, trust: Trust = Trust()) -> str | None:
    """None when ``arch`` builds without running code the user has not vouched for, else why not."""
    try:
        check_allowed(arch, trust)
    except DcompError as e:
        return str(e)
    return None


# ---- building ------------------------------------------------------------------------------------

def build_architecture(arch: dict, input_shape, num_classes: int, trust: Trust = Trust()) -> nn.Module:
    """The model ``arch`` describes, at its original (unshrunk) shapes, with fresh weights.
    Trust is checked first: nothing is imported or loaded that ``trust`` does not allow."""
    if not isinstance(arch, dict):
        raise FormatError("the architecture record is not a dict")
    kind = arch.get("kind")
    check_allowed(arch, trust)
    kwargs = arch.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise FormatError(f"the architecture's kwargs must be a dict, got {type(kwargs).__name__}")
    if kind == "zoo":
        from dcomp.models import build_zoo

        return build_zoo(str(arch.get("name")), input_shape, num_classes, **kwargs)
    if kind in FACTORY_KINDS:
        return build_from_factory(arch["target"], kwargs)
    if kind == "graph":
        from dcomp.models.graph_arch import rebuild

        return rebuild(arch.get("graph"))
    if kind in ("torchscript", "pickle"):
        archive = arch.get("archive")
        if not isinstance(archive, torch.Tensor) or archive.dtype != torch.uint8:
            raise FormatError(f"the {kind} architecture has no archive bytes")
        data = io.BytesIO(archive.numpy().tobytes())
        if kind == "torchscript":
            try:
                return torch.jit.load(data, map_location="cpu")
            except Exception as e:  # noqa: BLE001 - corrupt archives raise RuntimeError and friends
                raise FormatError(f"corrupt TorchScript architecture ({(str(e).splitlines() or [''])[0]})") from None
        model = torch.load(data, map_location="cpu", weights_only=False)
        if not isinstance(model, nn.Module):
            raise FormatError(f"the pickled architecture is a {type(model).__name__}, not an nn.Module")
        return model
    raise FormatError(f"checkpoint has an unknown architecture kind {str(kind)[:40]!r}")


def build_reference(ckpt: Any, trust_pickle: bool = False) -> nn.Module | None:
    """The checkpoint's architecture at its original shapes (before structured pruning), or None
    for TorchScript / pickle architectures, which have no such reference."""
    if ckpt.arch.get("kind") not in REBUILDABLE_KINDS:
        return None
    return build_architecture(ckpt.arch, ckpt.input_shape, ckpt.num_classes, trust_of(ckpt, trust_pickle))


# ---- factories the user types ----------------------------------------------------------------------

def _split_target(target: str) -> tuple[str, str]:
    mod_name, sep, attr = str(target).rpartition(":")
    if not sep or not mod_name or not attr:
        raise UsageError(f"--arch {target!r}: expected a zoo name, package.module:factory or path/to/file.py:factory")
    return mod_name, attr


def _is_file_target(mod_name: str) -> bool:
    return mod_name.endswith(".py") or "/" in mod_name or os.sep in mod_name


def import_factory(target: str) -> Callable[..., nn.Module]:
    """Resolve ``package.module:factory`` or ``path/to/file.py:factory`` (the factory may be a
    class, or ``Class.method``). A module name is looked up in the current folder first, as
    ``python -m`` does. Callers check trust first: this imports, which runs the module's code."""
    mod_name, attr = _split_target(target)
    if _is_file_target(mod_name):
        mod = _load_file(target, Path(mod_name))
    else:
        mod = _import_module(target, mod_name)
    obj: Any = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise DcompError(f"--arch {target!r}: {mod_name} has no attribute {attr}")
    return obj


def _import_module(target: str, mod_name: str):
    if mod_name == "torchvision" or mod_name.startswith("torchvision."):
        from dcomp.models.vision import import_torchvision

        import_torchvision()  # plain `import torchvision` fails on this CPU-only torch
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        importlib.invalidate_caches()
        return importlib.import_module(mod_name)
    except ImportError as e:
        raise DcompError(f"--arch {target!r}: cannot import {mod_name} ({e}); give a module on the Python path, "
                         f"one in the current folder, or path/to/file.py:factory") from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _load_file(target: str, path: Path):
    if not path.is_file():
        raise DcompError(f"--arch {target!r}: {path} is not a file")
    resolved = path.resolve()
    name = f"_dcomp_user_{resolved.stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise DcompError(f"--arch {target!r}: cannot load {path} as Python")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # classes defined there must be findable by their module
    folder = str(resolved.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)  # its sibling modules import as they would for `python file.py`
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001 - user code: report as theirs
        del sys.modules[name]
        first = (str(e).splitlines() or [""])[0]
        raise UsageError(f"--arch {target}: running {path} failed ({type(e).__name__}: {first})") from None
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return mod


def build_from_factory(target: str, kwargs: dict | None = None, trusted: bool = True) -> nn.Module:
    """Call ``package.module:factory`` with ``kwargs``; a failing call or a result that is not an
    nn.Module is a usage error naming the target, not an internal error.

    ``trusted=False`` is for targets read from a file: they are refused (before importing) unless
    they are a trusted library factory; see :func:`check_allowed`."""
    if not trusted:
        check_allowed({"kind": "factory", "target": target, "kwargs": kwargs or {}}, Trust())
    factory = import_factory(target)
    try:
        model = factory(**(kwargs or {}))
    except Exception as e:  # noqa: BLE001 - user code: any failure is reported as theirs
        first = (str(e).splitlines() or [""])[0]
        raise UsageError(f"--arch {target}: calling it with {kwargs or {}} failed ({type(e).__name__}: {first})") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch {target} returned a {type(model).__name__}, not a torch nn.Module")
    return model


# ---- what a checkpoint written from the user's model stores ----------------------------------------

def arch_record(model: nn.Module, input_shape, target: str | None = None, kwargs: dict | None = None,
                ) -> tuple[dict, str | None]:
    """The arch record for a model the user gave (typed factory, pickled module): a ``graph``
    when graph_arch can describe it, so later commands import nothing; else the factory reference
    (``target``), which later commands import only when trusted. Returns (record, note): the
    note says why no graph was stored (None when one was)."""
    from dcomp.models.graph_arch import DescribeError, describe

    if target is not None and is_trusted_library_factory(target):
        return {"kind": "factory", "target": target, "kwargs": dict(kwargs or {})}, None
    try:
        desc = describe(model, torch.zeros(1, *[int(s) for s in input_shape]))
    except DescribeError as e:
        if target is None:
            raise
        return {"kind": "factory", "target": target, "kwargs": dict(kwargs or {})}, str(e)
    return {"kind": "graph", "graph": desc}, None


def describe_arch(arch: dict) -> str:
    """One line for people: what the record names (never builds anything)."""
    kind = arch.get("kind")
    kw = f" {arch['kwargs']}" if arch.get("kwargs") else ""
    if kind == "zoo":
        return f"zoo:{arch.get('name')}{kw}"
    if kind in FACTORY_KINDS:
        return f"factory {arch.get('target')}{kw}"
    if kind == "graph":
        g = arch.get("graph") if isinstance(arch.get("graph"), dict) else {}
        return f"graph ({len(g.get('modules') or [])} modules, {len(g.get('nodes') or [])} nodes)"
    if kind in ("torchscript", "pickle"):
        a = arch.get("archive")
        size = a.numel() if isinstance(a, torch.Tensor) else 0
        return f"{kind} archive ({size:,} bytes)"
    return str(kind)


__all__ = ["Trust", "REBUILDABLE_KINDS", "build_architecture", "build_reference", "build_from_factory",
           "import_factory", "check_allowed", "needs_trust", "is_trusted_library_factory", "arch_record",
           "trust_of", "torchscript_ref", "describe_arch"]
