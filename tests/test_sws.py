"""Soft weight-sharing (retrain --method sws): masks stay exact, and the labels of the quantized
result need fewer bits than after plain retraining of the same length."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from dcomp.compressors.kmeans import label_entropy
from dcomp.compressors.quantization import QuantizeConfig, apply_quantize, check_quantized
from dcomp.config.retrain import SWSConfig
from dcomp.formats.checkpoint import read_checkpoint
from dcomp.retrain import RetrainConfig, apply_retrain
from dcomp.stages import StageContext
from dcomp.train import TrainConfig

TRAIN = TrainConfig(epochs=5, lr=0.01, weight_decay=0.0)


def _entropy(ck, name):
    return label_entropy(ck.quant[name]["assignments"][ck.masks[name]])


def test_sws_keeps_masks_and_lowers_label_entropy(pruned, digits):
    ctx = StageContext(data=digits)
    plain = apply_retrain(pruned, RetrainConfig(train=TRAIN), ctx).checkpoint
    res = apply_retrain(pruned, RetrainConfig(train=TRAIN, sws=SWSConfig(components=8, tau=2.0, lr=0.003)), ctx)
    sws = res.checkpoint
    for n, m in pruned.masks.items():
        assert torch.equal(sws.masks[n], m)
        assert bool((sws.state_dict[n][~m] == 0).all())  # pruned weights exactly zero
    layers = res.metrics["sws_layers"]
    assert set(layers) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert all(0 <= lay["label_entropy_bits"] <= 3.0 for lay in layers.values())
    # the same quantization of both: 3 bits, light rate-distortion rounding (merges coincident clusters)
    q = QuantizeConfig(bits=3, rd_lambda=0.02)
    qp = apply_quantize(plain, q, StageContext()).checkpoint
    qs = apply_quantize(sws, q, StageContext()).checkpoint
    check_quantized(qs)
    bits = lambda ck: sum(_entropy(ck, n) * int(ck.masks[n].sum()) for n in ck.quant)  # noqa: E731
    assert bits(qs) < 0.8 * bits(qp)
    assert res.metrics["top1_after"] > 80.0  # still a working classifier after 5 epochs under the prior


def test_config_checks_and_refusals(pruned, digits):
    with pytest.raises(ValidationError):
        SWSConfig(components=1)
    with pytest.raises(ValidationError, match="min_std"):
        SWSConfig(init_std=0.1, min_std=0.2)
    q = apply_quantize(pruned, QuantizeConfig(bits=3), StageContext()).checkpoint
    from dcomp.errors import UsageError

    with pytest.raises(UsageError, match="quantized"):
        apply_retrain(q, RetrainConfig(train=TRAIN, sws=SWSConfig()), StageContext(data=digits))


def test_cli_method_sws(cli, pruned, tmp_path):
    src = tmp_path / "p.pt"
    pruned.save(src)
    out = tmp_path / "s.pt"
    r = cli("retrain", src, "--data", "digits", "--epochs", "1", "--method", "sws", "--sws-components", "4",
            "--sws-tau", "1", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert len(summary["sws_layers"]["fc1.weight"]["means"]) == 4
    back = read_checkpoint(out.read_bytes())
    assert back.provenance[-1]["params"]["sws"]["components"] == 4
    for n, m in pruned.masks.items():
        assert torch.equal(back.masks[n], m)
    r = cli("retrain", src, "--data", "digits", "--sws-tau", "1", "-o", tmp_path / "x.pt")
    assert r.exit_code == 2 and "--method sws" in r.stderr
