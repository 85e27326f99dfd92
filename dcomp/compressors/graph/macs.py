"""Multiply-accumulates of one forward pass (batch 1), total and per layer.

Counted with ``torch.utils.flop_counter`` (matrix products and convolutions; MACs = FLOPs / 2;
element-wise ops, norms and activations are not counted, as is usual). Works for any model
that runs, traceable or not. Attention modules are run on their plain (non-fused) path so their
products are counted.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def count_macs(model: nn.Module, input_shape) -> tuple[int, dict[str, int]]:
    """(total MACs, {leaf module or attention module name: MACs}) for one input of ``input_shape``."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, *[int(s) for s in input_shape], dtype=dtype)
    was = model.training
    model.eval()
    mha = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    for m in mha:
        m.train()   # the fused eval path hides its products from the counter; its dropout is 0 or irrelevant here
    try:
        with FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was)
    counts = fc.get_flop_counts()
    total = sum(counts.get("Global", {}).values()) // 2
    root = type(model).__name__
    per: dict[str, int] = {}
    names = {n for n, m in model.named_modules() if n and (not list(m.children()) or isinstance(m, nn.MultiheadAttention)
                                                              or type(m).__name__.endswith("WindowAttention")
                                                              or "WindowAttention" in type(m).__name__)}
    for key, ops in counts.items():
        name = key[len(root) + 1:] if key.startswith(root + ".") else None
        if name in names:
            per[name] = sum(ops.values()) // 2
    # a module inside an attention module is counted in it
    for n in list(per):
        if any(n.startswith(o + ".") for o in per if o != n):
            del per[n]
    return int(total), per
