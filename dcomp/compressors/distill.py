"""Distillation while retraining: Hinton et al.'s knowledge distillation and Peng et al.'s
correlation congruence (CCKD, ICCV 2019).

    KD      loss = (1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))
            (KL averaged over the batch; T^2 keeps the soft gradients' scale independent of T)
    CC      + w_cc * mean_ij (K_t[i, j] - K_s[i, j])^2
            K[i, j] = exp(-2 gamma) * sum_{p=0}^{P} (2 gamma)^p / p! * (f_i . f_j)^p
            the P-order Taylor expansion of the Gaussian RBF exp(-gamma ||f_i - f_j||^2) on
            L2-normalised features f (the input of the classifier layer, captured by hooks).
            K is batch x batch, so teacher and student feature widths may differ.

The teacher runs in eval mode without gradients on the same batch as the student. The callback
replaces the CE term the loop computed (loss - alpha*CE + alpha*T^2*KL), so other callbacks'
penalties added before or after are kept as they are.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from dcomp.compressors.regularizers import LayerTap
from dcomp.config.retrain import DistillConfig
from dcomp.errors import DcompError, UsageError
from dcomp.train import Callback


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, temperature: float,
            alpha: float) -> torch.Tensor:
    """(1 - alpha) * CE + alpha * T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean."""
    T = temperature
    ce = F.cross_entropy(student, y)
    kl = F.kl_div(F.log_softmax(student / T, dim=1), F.log_softmax(teacher / T, dim=1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * T * T * kl


def correlation_matrix(features: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """Batch x batch Taylor-approximated Gaussian kernel of L2-normalised features."""
    f = F.normalize(features.reshape(features.shape[0], -1), dim=1)
    g = f @ f.t()
    k = torch.zeros_like(g)
    term = torch.ones_like(g)
    for p in range(order + 1):  # P + 1 terms, P is tiny: not a loop over weights
        if p > 0:
            term = term * (2.0 * gamma) * g / p
        k = k + term
    return math.exp(-2.0 * gamma) * k


def cc_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """MSE between teacher and student correlation matrices."""
    return F.mse_loss(correlation_matrix(student_feat, gamma, order),
                      correlation_matrix(teacher_feat, gamma, order))


def load_teacher(path: str, trust_pickle: bool = False):
    """The teacher checkpoint from a file (any model format dcomp reads)."""
    from dcomp.formats.model_input import load_model

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--teacher {path}: no such file")
    return load_model(p.read_bytes(), str(path), trust_pickle=trust_pickle)


def check_teacher(teacher_ckpt, student_ckpt, source: str = "teacher") -> None:
    if int(teacher_ckpt.num_classes) != int(student_ckpt.num_classes):
        raise UsageError(f"{source} outputs {teacher_ckpt.num_classes} classes but the student outputs "
                         f"{student_ckpt.num_classes}; distil from a teacher trained on the same labels")
    if list(teacher_ckpt.input_shape) != list(student_ckpt.input_shape):
        raise UsageError(f"{source} takes inputs {list(teacher_ckpt.input_shape)} but the student takes "
                         f"{list(student_ckpt.input_shape)}; use a teacher trained on the same data and --resize")


class Distiller(Callback):
    """KD (+ optional CC) against a frozen teacher ``nn.Module``."""

    def __init__(self, teacher: torch.nn.Module, cfg: DistillConfig):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.last = {}

    def on_train_begin(self, ctx):
        self.s_tap = self.t_tap = None
        if self.cfg.cc_weight > 0:
            self.s_tap = LayerTap(ctx.model, keep_inputs=True)
            self.t_tap = LayerTap(self.teacher, keep_inputs=True)

    def compute_loss(self, ctx, x, out, y, loss):
        cfg = self.cfg
        with torch.no_grad():
            t_out = self.teacher(x)
        if t_out.shape != out.shape:
            raise DcompError(f"teacher outputs {list(t_out.shape[1:])} per sample but the student "
                             f"{list(out.shape[1:])}; distil from a teacher with the same outputs")
        ce = F.cross_entropy(out, y)
        kd = kd_loss(out, t_out, y, cfg.temperature, cfg.alpha)
        loss = loss - ce + kd
        self.last = {"kd": float(kd.detach())}
        if cfg.cc_weight > 0:
            fs, ft = self.s_tap.last_input, self.t_tap.last_input
            if fs is None or ft is None:
                raise DcompError("correlation congruence: found no Linear/Conv layer feeding the output to take features from")
            cc = cc_loss(fs, ft.detach(), cfg.cc_gamma, cfg.cc_order)
            loss = loss + cfg.cc_weight * cc
            self.last["cc"] = float(cc.detach())
        return loss

    def on_train_end(self, ctx):
        for tap in (self.s_tap, self.t_tap):
            if tap is not None:
                tap.remove()
