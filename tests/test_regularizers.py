"""L1 and group lasso: whole groups reach exactly zero, and removing them shrinks the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcomp.compressors.regularizers import (GroupLassoConfig, L1Config, Regularizer, group_norms, group_shrink,
                                            remove_groups)
from dcomp.formats.checkpoint import read_checkpoint
from dcomp.retrain import retrain
from dcomp.train import TrainConfig
from tests.conftest import one_error_line


def test_group_norms_match_definitions():
    conv = nn.Conv2d(3, 4, 2)
    w, b = conv.weight, conv.bias
    assert torch.allclose(group_norms(conv, "filter"), torch.cat([w.reshape(4, -1), b[:, None]], 1).norm(dim=1))
    assert torch.allclose(group_norms(conv, "channel"), torch.stack([w[:, i].norm() for i in range(3)]))
    assert torch.allclose(group_norms(conv, "shape"), w.reshape(4, -1).norm(dim=0))
    lin = nn.Linear(5, 3)
    assert torch.allclose(group_norms(lin, "row"), torch.cat([lin.weight, lin.bias[:, None]], 1).norm(dim=1))
    assert torch.allclose(group_norms(lin, "column"), lin.weight.norm(dim=0))
    assert torch.allclose(group_norms(lin, "filter"), group_norms(lin, "row"))


def test_group_shrink_is_the_proximal_step():
    lin = nn.Linear(4, 3)
    before = group_norms(lin, "row").detach().clone()
    group_shrink(lin, "row", float(before.min()) + 1e-3)  # the smallest group is wiped out
    after = group_norms(lin, "row").detach()
    assert float(after[before.argmin()]) == 0.0
    others = before > before.min()
    assert torch.allclose(after[others], before[others] - float(before.min()) - 1e-3, atol=1e-5)


def test_group_lasso_zeroes_whole_groups_and_removal_shrinks(lenet_ckpt, digits):
    reg = Regularizer(group_lasso=GroupLassoConfig(lam=1.0, groups=["row"]))
    out, _ = retrain(lenet_ckpt, digits, TrainConfig(epochs=1, lr=0.05, weight_decay=0.0), [reg])
    model = out.build_model()
    rows = group_norms(model.fc1, "row")
    dead = int((rows == 0).sum())
    assert dead > 0, "no fc1 unit reached exactly zero"
    assert torch.count_nonzero(group_norms(model.fc3, "row")) == 10  # the classes are never penalised
    x = digits.x_test[:64]
    with torch.no_grad():
        ref = model(x)
    small, info = remove_groups(model, out.input_shape, 1e-12, ["row"])
    assert small.fc1.out_features == 300 - dead
    assert small.fc2.in_features == 300 - dead
    with torch.no_grad():
        assert torch.allclose(small(x), ref, atol=1e-5)  # zero groups: removal is exact


def test_l1_proximal_makes_exact_zeros(lenet_ckpt, digits):
    reg = Regularizer(l1=L1Config(lam=0.05))
    out, _ = retrain(lenet_ckpt, digits, TrainConfig(epochs=1, lr=0.05, weight_decay=0.0), [reg])
    zeros_before = int((lenet_ckpt.state_dict["fc1.weight"] == 0).sum())
    zeros_after = int((out.state_dict["fc1.weight"] == 0).sum())
    assert zeros_after > zeros_before + 1000


def test_cli_group_lasso_removes_units(cli, lenet_path, tmp_path):
    out = tmp_path / "gl.pt"
    r = cli("retrain", lenet_path, "--group-lasso", "1", "--groups", "filter,column", "--remove-below", "1e-6",
            "--epochs", "1", "--lr", "0.05", "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    ck = read_checkpoint(out.read_bytes())
    m = ck.provenance[-1]["metrics"]
    assert m["units_removed"].get("fc1", 0) > 0
    assert ck.state_dict["fc1.weight"].shape[0] < 300
    assert ck.build_model().fc2.in_features == ck.state_dict["fc1.weight"].shape[0]
    assert abs(m["top1_after"] - m["top1_before_removal"]) < 1.0


@pytest.mark.parametrize("args, needle", [
    (["--l1", "-0.1"], "--l1: lambda must be >= 0"),
    (["--group-lasso", "-1"], "--group-lasso: lambda must be >= 0"),
    (["--group-lasso", "0.1", "--groups", "rows"], "--groups"),
    (["--remove-below", "0.1"], "only applies with --group-lasso"),
])
def test_cli_bad_regulariser(cli, lenet_path, tmp_path, args, needle):
    out = tmp_path / "o.pt"
    r = cli("retrain", lenet_path, *args, "--epochs", "1", "-o", out)
    assert r.exit_code == 2, r.output
    assert needle in one_error_line(r)
    assert not out.exists()


def test_config_rejects_negative_lambda():
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        GroupLassoConfig(lam=-1e-3)
