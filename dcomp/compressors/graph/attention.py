"""Attention modules with whole heads removed (head_dim kept).

``nn.MultiheadAttention`` and torchvision's Swin window attention derive the head size from the
embedding width (``head_dim = embed_dim // num_heads``), so once heads are gone, or the residual
width changed, their stock forward no longer fits. The classes here keep every parameter and
buffer name of the original (a checkpoint's state_dict loads unchanged) and only replace
``forward`` with one that takes ``num_heads`` and ``head_dim`` as given. They are plain ops
(linear, matmul, softmax), so they export to ONNX as they are.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention whose inner width ``num_heads * head_dim`` may differ from ``embed_dim``."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        tgt, n, _ = query.shape
        src = key.shape[0]
        h, hd = self.num_heads, self.head_dim
        inner = h * hd
        w, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, w[:inner], None if b is None else b[:inner])
        k = F.linear(key, w[inner:2 * inner], None if b is None else b[inner:2 * inner])
        v = F.linear(value, w[2 * inner:], None if b is None else b[2 * inner:])
        q = q.reshape(tgt, n * h, hd).transpose(0, 1)
        k = k.reshape(src, n * h, hd).transpose(0, 1)
        v = v.reshape(src, n * h, hd).transpose(0, 1)
        scores = torch.bmm(q, k.transpose(1, 2)) * (1.0 / math.sqrt(hd))
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 3 else attn_mask.unsqueeze(0)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        elif is_causal:
            causal = torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(n, 1, 1, src).expand(n, h, 1, src).reshape(n * h, 1, src)
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        attn = F.softmax(scores, dim=-1)
        attn = F.dropout(attn, p=self.dropout, training=self.training)
        out = torch.bmm(attn, v).transpose(0, 1).reshape(tgt, n, inner)
        out = self.out_proj(out)
        if self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.reshape(n, h, tgt, src)
            weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, weights


def window_attention(input: Tensor, qkv_weight: Tensor, proj_weight: Tensor, relative_position_bias: Tensor,
                     window_size: list[int], num_heads: int, shift_size: list[int], attention_dropout: float = 0.0,
                     dropout: float = 0.0, qkv_bias: Optional[Tensor] = None, proj_bias: Optional[Tensor] = None,
                     logit_scale: Optional[Tensor] = None, training: bool = True, head_dim: int = 0) -> Tensor:
    """Swin (shifted) window attention with an explicit ``head_dim``: the attention width
    ``num_heads * head_dim`` need not equal the channel count of ``input``."""
    b, h, w, _ = input.shape
    wh, ww = window_size
    pad_r, pad_b = (ww - w % ww) % ww, (wh - h % wh) % wh
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, c = x.shape
    shift = list(shift_size)
    if wh >= ph:
        shift[0] = 0
    if ww >= pw:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nw = (ph // wh) * (pw // ww)
    x = x.view(b, ph // wh, wh, pw // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nw, wh * ww, c)
    if logit_scale is not None and qkv_bias is not None:
        third = qkv_bias.numel() // 3
        qkv_bias = torch.cat([qkv_bias[:third], torch.zeros_like(qkv_bias[third:2 * third]), qkv_bias[2 * third:]])
    inner = num_heads * head_dim
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(x.size(0), x.size(1), 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = x.new_zeros((ph, pw))
        hs = ((0, -wh), (-wh, -shift[0]), (-shift[0], None))
        ws = ((0, -ww), (-ww, -shift[1]), (-shift[1], None))
        count = 0
        for hh in hs:
            for w2 in ws:
                mask[hh[0]:hh[1], w2[0]:w2[1]] = count
                count += 1
        mask = mask.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(nw, wh * ww)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))
        attn = attn.view(x.size(0) // nw, nw, num_heads, x.size(1), x.size(1)) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), inner)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    c_out = x.shape[-1]
    x = x.view(b, ph // wh, pw // ww, wh, ww, c_out).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c_out)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


torch.fx.wrap("window_attention")


def _swin_forward(self, x: Tensor) -> Tensor:
    return window_attention(x, self.qkv.weight, self.proj.weight, self.get_relative_position_bias(), self.window_size,
                            self.num_heads, self.shift_size, self.attention_dropout, self.dropout, self.qkv.bias,
                            self.proj.bias, getattr(self, "logit_scale", None), self.training, self.head_dim)


_SWIN: dict[type, type] = {}


def is_window_attention(m: nn.Module) -> bool:
    return type(m).__name__.startswith(("ShiftedWindowAttention", "PrunedShiftedWindowAttention")) and \
        hasattr(m, "qkv") and hasattr(m, "proj") and hasattr(m, "get_relative_position_bias")


def set_attention(m: nn.Module, num_heads: int, head_dim: int) -> None:
    """Give attention module ``m`` ``num_heads`` heads of ``head_dim`` (its class becomes the pruned variant)."""
    if isinstance(m, nn.MultiheadAttention):
        if type(m) is nn.MultiheadAttention:
            m.__class__ = PrunedMultiheadAttention
    elif is_window_attention(m):
        cls = type(m)
        if not cls.__name__.startswith("Pruned"):
            if cls not in _SWIN:
                _SWIN[cls] = type("Pruned" + cls.__name__, (cls,), {"forward": _swin_forward})
            m.__class__ = _SWIN[cls]
    else:
        raise ValueError(f"{type(m).__name__} is not an attention module dcomp can resize")
    m.num_heads = int(num_heads)
    m.head_dim = int(head_dim)
