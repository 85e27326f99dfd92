"""AGP: the sparsity at every mask update equals Zhu & Gupta's cubic formula, with exact counts."""

from __future__ import annotations

import pytest
import torch

from dcomp.compressors.masks import prune_count
from dcomp.compressors.schedules import AGP, AGPConfig, agp_sparsity, agp_update_steps
from dcomp.formats.checkpoint import read_checkpoint
from dcomp.retrain import retrain
from dcomp.train import TrainConfig


def test_formula_endpoints_and_shape():
    assert agp_sparsity(0, 0.1, 0.9, t0=0, n=4, dt=10) == pytest.approx(0.1)
    assert agp_sparsity(40, 0.1, 0.9, t0=0, n=4, dt=10) == pytest.approx(0.9)
    assert agp_sparsity(99, 0.1, 0.9, t0=0, n=4, dt=10) == pytest.approx(0.9)
    assert agp_sparsity(20, 0.0, 0.8, t0=0, n=4, dt=10) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    assert agp_sparsity(3, 0.2, 0.8, t0=5, n=4, dt=10) == pytest.approx(0.2)  # before t0


def test_sparsity_at_each_update_equals_the_formula(lenet_ckpt, digits):
    cfg = AGPConfig(initial_sparsity=0.1, final_sparsity=0.8, start=3, end=15, every=4, unit="steps")
    agp = AGP(cfg)
    train = TrainConfig(epochs=1, lr=0.02, weight_decay=0.0)  # 23 steps of 64 on digits
    out, result = retrain(lenet_ckpt, digits, train, [agp])
    steps = [t for t, _, _ in agp.log]
    assert steps == [3, 7, 11, 15] == agp_update_steps(cfg, 23, 23)
    sizes = {n: out.state_dict[n].numel() for n in out.masks}
    for t, target, measured in agp.log:
        assert target == pytest.approx(0.8 + (0.1 - 0.8) * (1 - (t - 3) / 12) ** 3)
        expected = sum(prune_count(s, target) for s in sizes.values()) / sum(sizes.values())
        assert measured == pytest.approx(expected, abs=1e-12)
    for name, m in out.masks.items():  # final: exactly s_f per layer, and pruned weights are zero
        assert int((~m).sum()) == prune_count(m.numel(), 0.8)
        assert torch.all(out.state_dict[name][~m] == 0)


def test_masks_only_grow(lenet_ckpt, digits):
    seen = []

    class Probe(AGP):
        def _update(self, ctx, t):
            super()._update(ctx, t)
            seen.append({k: v.clone() for k, v in ctx.masks.items()})

    retrain(lenet_ckpt, digits, TrainConfig(epochs=1, lr=0.02), [Probe(AGPConfig(final_sparsity=0.7, every=5, end=20, unit="steps"))])
    for before, after in zip(seen, seen[1:]):
        for k in before:
            assert not torch.any(after[k] & ~before[k])  # a pruned weight never comes back


def test_cli_agp_in_epochs(cli, lenet_path, tmp_path):
    out = tmp_path / "agp.pt"
    r = cli("retrain", lenet_path, "--schedule", "agp", "--final-sparsity", "0.75", "--start", "0", "--end", "1",
            "--every", "0.5", "--epochs", "2", "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    ck = read_checkpoint(out.read_bytes())
    assert ck.provenance[-1]["params"]["agp"]["final_sparsity"] == 0.75
    for m in ck.masks.values():
        assert int((~m).sum()) == prune_count(m.numel(), 0.75)


@pytest.mark.parametrize("args, needle", [
    (["--start", "5", "--end", "3"], "--start"),
    (["--final-sparsity", "1.5"], "--final-sparsity"),
    (["--initial-sparsity", "0.5", "--final-sparsity", "0.3"], "below the initial"),
])
def test_cli_bad_schedule_is_one_line_and_writes_nothing(cli, lenet_path, tmp_path, args, needle):
    out = tmp_path / "o.pt"
    r = cli("retrain", lenet_path, "--schedule", "agp", *args, "--epochs", "1", "-o", out)
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert not out.exists()


def test_end_after_training_is_an_error(cli, lenet_path, tmp_path):
    out = tmp_path / "o.pt"
    r = cli("retrain", lenet_path, "--schedule", "agp", "--end", "5", "--epochs", "1", "-o", out)
    assert r.exit_code == 1 and "after the end of training" in r.stderr
    assert not out.exists()
