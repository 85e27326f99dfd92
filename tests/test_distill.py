"""Distillation: the KD loss equals Hinton's formula; CC compares batch x batch kernels."""

from __future__ import annotations

import math

import pytest
import torch

from dcomp.compressors.distill import DistillConfig, Distiller, cc_loss, correlation_matrix, kd_loss
from dcomp.formats.checkpoint import Checkpoint, read_checkpoint
from dcomp.models import build_zoo
from dcomp.retrain import retrain
from dcomp.train import TrainConfig


def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_kd_loss_hand_computed():
    s, t, y, T, alpha = [1.0, 2.0, 0.0], [0.5, 0.5, 3.0], 1, 2.0, 0.3
    ce = -math.log(_softmax(s)[y])
    ps, pt = _softmax([v / T for v in s]), _softmax([v / T for v in t])
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    expected = (1 - alpha) * ce + alpha * T * T * kl
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), T, alpha)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # the batch term is a mean over samples
    two = kd_loss(torch.tensor([s, s]), torch.tensor([t, t]), torch.tensor([y, y]), T, alpha)
    assert float(two) == pytest.approx(expected, rel=1e-6)


def test_kernel_converges_to_the_gaussian_rbf():
    torch.manual_seed(0)
    f = torch.randn(6, 5)
    fn = torch.nn.functional.normalize(f, dim=1)
    exact = torch.exp(-0.4 * torch.cdist(fn, fn) ** 2)
    assert torch.allclose(correlation_matrix(f, 0.4, 8), exact, atol=1e-5)
    p2 = correlation_matrix(f, 0.4, 2)
    g = fn @ fn.t()
    assert torch.allclose(p2, math.exp(-0.8) * (1 + 0.8 * g + 0.32 * g * g), atol=1e-6)


def test_cc_loss_takes_features_of_different_widths():
    torch.manual_seed(0)
    a, b = torch.randn(8, 20), torch.randn(8, 7)
    assert float(cc_loss(a, a, 0.4, 2)) == 0.0
    assert float(cc_loss(a, b, 0.4, 2)) > 0.0


def _ckpt(model, ds):
    ck = Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {"hidden": [32, 16]}}, state_dict={},
                    input_shape=list(ds.input_shape), num_classes=ds.num_classes, data={"spec": "digits", "resize": None})
    ck.update_from_model(model)
    return ck


def test_distiller_trains_a_small_student(lenet_ckpt, digits):
    torch.manual_seed(1)
    student = _ckpt(build_zoo("lenet-300-100", digits.input_shape, 10, hidden=[32, 16]), digits)
    teacher = lenet_ckpt.build_model()
    d = Distiller(teacher, DistillConfig(teacher="unused", temperature=3.0, alpha=0.7, cc_weight=1.0))
    out, res = retrain(student, digits, TrainConfig(epochs=2, lr=0.1), [d])
    assert "kd" in d.last and d.last["cc"] >= 0.0
    from dcomp.retrain import accuracy
    assert accuracy(out, digits) > 70.0


def test_cli_teacher_with_other_output_size(cli, lenet_path, tmp_path, digits):
    t = Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}}, state_dict={},
                   input_shape=list(digits.input_shape), num_classes=5)
    t.update_from_model(build_zoo("lenet-300-100", digits.input_shape, 5))
    t.save(tmp_path / "teacher5.pt")
    out = tmp_path / "o.pt"
    r = cli("retrain", lenet_path, "--teacher", tmp_path / "teacher5.pt", "--epochs", "1", "-o", out)
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "outputs 5 classes but the student outputs 10" in lines[0]
    assert not out.exists()


def test_cli_kd_with_cc(cli, lenet_path, tmp_path, digits):
    torch.manual_seed(2)
    student = _ckpt(build_zoo("lenet-300-100", digits.input_shape, 10, hidden=[32, 16]), digits)
    student.save(tmp_path / "s.pt")
    out = tmp_path / "kd.pt"
    r = cli("retrain", tmp_path / "s.pt", "--teacher", lenet_path, "--kd-temperature", "2", "--cc-weight", "0.5",
            "--epochs", "1", "--lr", "0.1", "-o", out, "--quiet")
    assert r.exit_code == 0, r.output
    p = read_checkpoint(out.read_bytes()).provenance[-1]["params"]["distill"]
    assert p["temperature"] == 2.0 and p["cc_weight"] == 0.5 and p["teacher"] == str(lenet_path)


def test_cli_bad_kd_alpha(cli, lenet_path, tmp_path):
    r = cli("retrain", lenet_path, "--teacher", lenet_path, "--kd-alpha", "1.5", "-o", tmp_path / "o.pt")
    assert r.exit_code == 2 and "--kd-alpha" in r.stderr
    assert not (tmp_path / "o.pt").exists()
