"""Dynamic Network Surgery: pruned weights keep learning and are spliced back past b."""

from __future__ import annotations

import pytest
import torch

from dcomp.compressors.surgery import DNS, DNSConfig, dns_mask_update, dns_thresholds
from dcomp.formats.checkpoint import read_checkpoint
from dcomp.retrain import retrain
from dcomp.train import TrainConfig


def test_mask_rule_prunes_below_a_splices_at_b_keeps_between():
    w = torch.tensor([0.05, 0.05, 0.5, 0.5, 1.0, 1.0])
    t = torch.tensor([True, False, True, False, True, False])
    new = dns_mask_update(w, t, a=0.1, b=0.9)
    assert new.tolist() == [False, False, True, False, True, True]


def test_thresholds_are_0_9_and_1_1_of_mean_plus_c_std():
    w = torch.tensor([1.0, -2.0, 3.0, -4.0])
    mag = w.abs()
    t = float(mag.mean() + 0.5 * mag.std())
    a, b = dns_thresholds(w, 0.5)
    assert abs(a - 0.9 * t) < 1e-6 and abs(b - 1.1 * t) < 1e-6
    assert dns_thresholds(w, -10.0) == (0.0, 0.0)  # max(., 0)


def test_surgery_splices_back_and_ends_with_w_times_t(lenet_ckpt, digits):
    dns = DNS(DNSConfig(c=0.5, gamma=0.0, power=1.0))  # probability 1: the mask is updated every step
    out, result = retrain(lenet_ckpt, digits, TrainConfig(epochs=2, lr=0.1, weight_decay=0.0), [dns])
    assert dns.spliced > 0, "no pruned weight grew back"
    for it, layer, idx, mag, b in dns.splice_log:
        assert mag >= b  # spliced exactly because |w| grew past b while pruned
        assert it > 0
    assert set(out.masks) == set(dns.T)
    for name, m in out.masks.items():
        assert torch.equal(m, dns.T[name])
        w = out.state_dict[name]
        assert torch.all(w[~m] == 0)
        assert torch.equal(w, dns.dense[name] * m)
    assert 0.3 < 1 - sum(int(m.sum()) for m in out.masks.values()) / sum(m.numel() for m in out.masks.values()) < 0.95


def test_pruned_weights_receive_gradient(lenet_ckpt, digits):
    """The dense W changes where T = 0 (the MaskKeeper does not freeze them), unlike plain retraining."""
    ck = lenet_ckpt.copy()
    ck.masks = {"fc1.weight": ck.state_dict["fc1.weight"].abs() > ck.state_dict["fc1.weight"].abs().median()}
    dns = DNS(DNSConfig(c=0.0, gamma=0.0, stop=0))  # stop=0: T stays the input mask
    retrain(ck, digits, TrainConfig(epochs=1, lr=0.05, weight_decay=0.0), [dns])
    pruned = ~ck.masks["fc1.weight"]
    assert torch.equal(dns.T["fc1.weight"], ck.masks["fc1.weight"])
    moved = (dns.dense["fc1.weight"][pruned] - ck.state_dict["fc1.weight"][pruned]).abs()
    assert float(moved.max()) > 0


def test_cli_dns(cli, lenet_path, tmp_path):
    out = tmp_path / "dns.pt"
    r = cli("retrain", lenet_path, "--method", "dns", "--dns-c", "0.5", "--dns-gamma", "0.001", "--epochs", "1",
            "--lr", "0.05", "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    ck = read_checkpoint(out.read_bytes())
    assert ck.masks and all(torch.all(ck.state_dict[n][~m] == 0) for n, m in ck.masks.items())
    assert ck.provenance[-1]["params"]["dns"]["c"] == 0.5
    assert "dns_spliced" in ck.provenance[-1]["metrics"]


def test_cli_dns_bad_gamma(cli, lenet_path, tmp_path):
    r = cli("retrain", lenet_path, "--method", "dns", "--dns-gamma", "-1", "-o", tmp_path / "o.pt")
    assert r.exit_code == 2 and "--dns-gamma" in r.stderr
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.slow
def test_dns_masks_identical_under_torchrun(tmp_path, lenet_path):
    """Two ranks draw the same mask-update coin flips and see the same weights: fit checks the checksums."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    exe = shutil.which("torchrun")
    cmd = ([exe] if exe else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", "--nproc_per_node", "2", "-m", "dcomp", "retrain", str(lenet_path), "--method", "dns",
        "--dns-c", "1.5", "--epochs", "1", "-o", "out.pt", "--json", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert 0.5 < summary["masked_sparsity"] < 1.0
    ck = read_checkpoint((tmp_path / "out.pt").read_bytes())
    assert all(torch.all(ck.state_dict[n][~m] == 0) for n, m in ck.masks.items())
