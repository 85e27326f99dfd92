"""The built-in model zoo and the rules for rebuilding any model from a checkpoint.

Zoo factories take ``input_shape`` (from the dataset) and ``num_classes``; every layer
size that depends on them is computed, never hard-coded, so a structurally shrunk
checkpoint rebuilds by resizing modules to the stored shapes (see ``conform_to_state_dict``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dcomp.errors import UsageError
from dcomp.models import zoo
from dcomp.models.arch import build_from_factory, import_factory  # noqa: F401 - moved there, names kept

ZOO: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "lenet-300-100": (zoo.LeNet300100, "MLP 784-300-100-10 of Han et al. (any input size, flattened)"),
    "lenet-5": (zoo.LeNet5, "Caffe LeNet-5: conv 20-50 5x5, fc 500 (inputs >= 16x16; --resize 28 for digits)"),
    "vgg-small": (zoo.VGGSmall, "VGG-style convnet with BatchNorm, 3 stages (widths configurable)"),
    "resnet-small": (zoo.ResNetSmall, "ResNet-style net, basic residual blocks, 3 stages with projections"),
}


def zoo_names() -> list[str]:
    return list(ZOO)


def build_zoo(name: str, input_shape, num_classes: int, **kwargs) -> nn.Module:
    if name not in ZOO:
        raise UsageError(f"unknown architecture {name!r}: zoo models are {', '.join(ZOO)} (or use package.module:factory)")
    try:
        return ZOO[name][0](input_shape=tuple(input_shape), num_classes=int(num_classes), **kwargs)
    except TypeError as e:
        raise UsageError(f"bad --arch-kwargs for {name}: {e}") from None


def conform_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], resized: dict | None = None) -> list[str]:
    """Resize ``model`` in place so its parameters and buffers match ``state_dict`` shapes.

    This is how a structurally pruned checkpoint rebuilds: the builder makes the original
    architecture, ``resized`` (the checkpoint's plain-data ``arch["resized"]``: attention heads,
    sizes a forward uses as literals) is applied, then every tensor stored at another shape is
    replaced by one of the stored shape and the module's attributes follow (in/out features and
    channels, depthwise groups, normalized_shape, num_features, embed_dim); see
    ``dcomp.compressors.graph.resize``. Returns the names of the resized modules.
    """
    from dcomp.compressors.graph.resize import conform

    return conform(model, state_dict, resized)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights of Linear and Conv layers and the q/k/v projections of nn.MultiheadAttention: the ones
    magnitude pruning and quantization act on.

    Biases and normalisation parameters are never in this set.
    """
    out: dict[str, nn.Parameter] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.weight is not None:
            out[f"{name}.weight" if name else "weight"] = m.weight
        elif isinstance(m, nn.MultiheadAttention):
            # the q/k/v projections are matrices like any Linear (the out_proj is an nn.Linear already)
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                p = getattr(m, attr, None)
                if p is not None:
                    out[f"{name}.{attr}" if name else attr] = p
    if not out and isinstance(model, torch.jit.ScriptModule):
        # TorchScript hides module types: fall back to the >=2-D parameters named *weight.
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() >= 2:
                out[name] = p
    return out
