"""IHT / DSD: alternating sparse and dense phases, ending sparse at the exact target."""

from __future__ import annotations

import pytest
import torch

from dcomp.compressors.dsd import IHT, IHTConfig, iht_phases
from dcomp.compressors.masks import prune_count
from dcomp.formats.checkpoint import read_checkpoint
from dcomp.retrain import retrain
from dcomp.train import Callback, TrainConfig


@pytest.mark.parametrize("total, s, d, dense_first", [(23, 5, 3, False), (23, 5, 3, True), (10, 4, 4, False),
                                                      (7, 5, 5, True), (3, 5, 5, True), (30, 2, 9, False)])
def test_phases_cover_training_alternate_and_end_sparse(total, s, d, dense_first):
    ph = iht_phases(total, s, d, dense_first)
    assert ph[0][1] == 0 and ph[-1][2] == total and ph[-1][0] == "sparse"
    for (k1, _, e1), (k2, b2, _) in zip(ph, ph[1:]):
        assert e1 == b2 and k1 != k2
    if len(ph) > 1:
        assert ph[0][0] == ("dense" if dense_first else "sparse")


class WeightProbe(Callback):
    """Records, at every step, how many of each layer's weights are non-zero."""

    def __init__(self):
        self.nonzero = []

    def after_step(self, ctx):
        self.nonzero.append(int(torch.count_nonzero(ctx.params["fc1.weight"])))


def test_iht_ends_at_target_after_a_dense_phase(lenet_ckpt, digits):
    iht = IHT(IHTConfig(mode="iht", sparsity=0.8, sparse_len=6, dense_len=6, unit="steps"))
    probe = WeightProbe()
    out, _ = retrain(lenet_ckpt, digits, TrainConfig(epochs=1, lr=0.05, weight_decay=0.0), [iht, probe])
    kinds = [k for _, k, _ in iht.log]
    assert kinds[0] == "sparse" and "dense" in kinds and kinds[-1] == "sparse"
    n = out.state_dict["fc1.weight"].numel()
    kept = n - prune_count(n, 0.8)
    dense_steps = [e for k, b, e in iht.phases if k == "dense"]
    # in the dense phase the pruned weights are released and grow from 0
    assert max(probe.nonzero) > kept
    assert probe.nonzero[dense_steps[0] - 2] > kept  # entry i is after step i+1; the last dense step
    for name, m in out.masks.items():
        assert int((~m).sum()) == prune_count(m.numel(), 0.8)
        assert torch.all(out.state_dict[name][~m] == 0)


def test_dsd_keeps_input_sparsity_by_default(lenet_ckpt, digits):
    from dcomp.compressors.masks import magnitude_mask

    ck = lenet_ckpt.copy()
    ck.masks = {n: magnitude_mask(ck.state_dict[n], 0.6) for n in ("fc1.weight", "fc2.weight", "fc3.weight")}
    iht = IHT(IHTConfig(mode="dsd", sparse_len=5, dense_len=5, unit="steps"))
    out, _ = retrain(ck, digits, TrainConfig(epochs=1, lr=0.05), [iht])
    assert iht.log[0][1] == "dense"
    for name, m in out.masks.items():
        assert int((~m).sum()) == prune_count(m.numel(), 0.6)


def test_cli_iht_and_missing_sparsity(cli, lenet_path, tmp_path):
    out = tmp_path / "iht.pt"
    r = cli("retrain", lenet_path, "--method", "iht", "--epochs", "1", "-o", out)
    assert r.exit_code == 1 and "--sparsity" in r.stderr and not out.exists()
    r = cli("retrain", lenet_path, "--method", "dsd", "--sparsity", "0.7", "--sparse-len", "0.5", "--dense-len", "0.25",
            "--epochs", "2", "-o", out, "--quiet")
    assert r.exit_code == 0, r.output
    ck = read_checkpoint(out.read_bytes())
    assert all(int((~m).sum()) == prune_count(m.numel(), 0.7) for m in ck.masks.values())
