"""dcomp quantize --mode ttq|binary: ternary / binary weights trained through the one loop."""

from __future__ import annotations

import json

import pytest
import torch

from dcomp.compressors.masks import magnitude_mask
from dcomp.compressors.quantization import QuantizeConfig, apply_quantize, check_quantized
from dcomp.formats import dcz
from dcomp.formats.checkpoint import read_checkpoint
from dcomp.stages import StageContext
from dcomp.train import TrainConfig
from tests.conftest import one_error_line

LAYERS = ("fc1.weight", "fc2.weight", "fc3.weight")


def _train(epochs=2):
    return TrainConfig(epochs=epochs, lr=0.02, weight_decay=0.0)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.view(torch.int32) if a.dtype == torch.float32 else a, b.view(torch.int32) if b.dtype == torch.float32 else b)


def _round_trip(ck):
    data, report = dcz.pack(ck)
    back = dcz.read_bytes(data)
    assert set(back.state_dict) == set(ck.state_dict)
    for k, v in ck.state_dict.items():
        assert _bits_equal(back.state_dict[k], v), k
    for k, q in ck.quant.items():
        assert back.quant[k]["bits"] == q["bits"]
        assert _bits_equal(back.quant[k]["codebook"], q["codebook"])
        assert torch.equal(back.quant[k]["assignments"], q["assignments"])
    return report


@pytest.fixture(scope="module")
def ttq(lenet_ckpt, digits):
    return apply_quantize(lenet_ckpt, QuantizeConfig(mode="ttq", keep_first_last=False, finetune=_train()),
                          StageContext(data=digits))


@pytest.fixture(scope="module")
def binary(lenet_ckpt, digits):
    return apply_quantize(lenet_ckpt, QuantizeConfig(mode="binary", keep_first_last=False, finetune=_train()),
                          StageContext(data=digits))


def test_ternary_takes_exactly_three_values_and_packs_bit_exactly(ttq, lenet_ckpt):
    ck = ttq.checkpoint
    check_quantized(ck)
    for name in LAYERS:
        w = ck.state_dict[name]
        values = torch.unique(w)
        assert values.numel() == 3 and float(values[1]) == 0.0 and values[0] < 0 < values[2], name
        q = ck.quant[name]
        assert q["bits"] == 2 and q["codebook"].numel() == 3 and torch.equal(torch.unique(q["codebook"]), values)
        assert not torch.equal(w, lenet_ckpt.state_dict[name])
    assert ttq.metrics["top1_after"] > 60  # 2 epochs: still a working classifier
    report = _round_trip(ck)
    for r in report["layers"]:
        if r["name"] in LAYERS:
            assert 8 * r["total_bytes"] / r["numel"] < 2.5  # about 2 bits per weight or less, tables included


def test_binary_takes_exactly_two_values_and_packs_bit_exactly(binary):
    ck = binary.checkpoint
    check_quantized(ck)
    for name in LAYERS:
        values = torch.unique(ck.state_dict[name])
        assert values.numel() == 2 and float(values[0]) == -float(values[1]), name
        assert ck.quant[name]["bits"] == 1
    assert binary.metrics["top1_after"] > 50
    report = _round_trip(ck)
    fc1 = next(r for r in report["layers"] if r["name"] == "fc1.weight")
    assert 8 * fc1["total_bytes"] / fc1["numel"] < 1.1


def test_training_moves_the_scales_and_keeps_latent_weights(lenet_ckpt, digits):
    """With no epochs the scales are the initial mean |w| (TWN / XNOR); training changes them."""
    ctx = StageContext(data=digits)
    init = apply_quantize(lenet_ckpt, QuantizeConfig(mode="ttq", keep_first_last=False), ctx).checkpoint
    trained = apply_quantize(lenet_ckpt, QuantizeConfig(mode="ttq", keep_first_last=False, finetune=_train(1)),
                             ctx).checkpoint
    w = lenet_ckpt.state_dict["fc2.weight"]
    delta = 0.05 * float(w.abs().max())
    assert torch.isclose(init.quant["fc2.weight"]["codebook"][2], w[w > delta].mean(), rtol=1e-5)
    assert not torch.equal(init.quant["fc2.weight"]["codebook"], trained.quant["fc2.weight"]["codebook"])
    # the sign pattern moved: latent full-precision weights were trained, not the ternary ones
    assert not torch.equal(init.quant["fc2.weight"]["assignments"], trained.quant["fc2.weight"]["assignments"])


def test_first_and_last_layer_kept_at_kmeans_precision_by_default(lenet_ckpt, digits):
    res = apply_quantize(lenet_ckpt, QuantizeConfig(mode="ttq", finetune=_train(1)), StageContext(data=digits))
    ck = res.checkpoint
    assert res.metrics["kept_layers"] == ["fc1.weight", "fc3.weight"]
    assert ck.quant["fc1.weight"]["bits"] == 5 and ck.quant["fc3.weight"]["bits"] == 5
    assert ck.quant["fc2.weight"]["bits"] == 2 and torch.unique(ck.state_dict["fc2.weight"]).numel() == 3
    check_quantized(ck)
    _round_trip(ck)


def test_pruned_then_ternary_keeps_the_mask_and_retrain_keeps_three_values(lenet_ckpt, digits):
    from dcomp.retrain import retrain

    pruned = lenet_ckpt.copy()
    for name in LAYERS:
        m = magnitude_mask(pruned.state_dict[name], 0.8)
        pruned.masks[name] = m
        pruned.state_dict[name] = torch.where(m, pruned.state_dict[name], torch.zeros(()))
    ck = apply_quantize(pruned, QuantizeConfig(mode="ttq", keep_first_last=False, finetune=_train(1)),
                        StageContext(data=digits)).checkpoint
    for name in LAYERS:
        assert torch.equal(ck.masks[name], pruned.masks[name])
        assert (ck.state_dict[name][~ck.masks[name]] == 0).all()
        assert torch.unique(ck.state_dict[name]).numel() <= 3
    _round_trip(ck)
    # retraining a ternary model trains the scales only (assignments fixed): still ternary
    again, _ = retrain(ck, digits, _train(1))
    check_quantized(again)
    for name in LAYERS:
        assert torch.unique(again.state_dict[name]).numel() <= 3
        assert torch.equal(again.quant[name]["assignments"], ck.quant[name]["assignments"])


def test_binary_per_channel_scales(lenet_ckpt):
    ck = apply_quantize(lenet_ckpt, QuantizeConfig(mode="binary", scale="channel", keep_first_last=False),
                        StageContext()).checkpoint
    w = ck.state_dict["fc2.weight"]
    for row in w:
        vals = torch.unique(row)
        assert vals.numel() == 2 and float(vals[0]) == -float(vals[1])
    check_quantized(ck)
    _round_trip(ck)


def test_cli_modes_and_bad_input(cli, lenet_path, tmp_path):
    out = tmp_path / "t.pt"
    r = cli("quantize", lenet_path, "--mode", "ttq", "--no-keep-first-last", "--finetune-epochs", "1",
            "--data", "digits", "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["mode"] == "ttq" and set(s["low_bit_layers"]) == set(LAYERS)
    ck = read_checkpoint(out.read_bytes())
    assert all(torch.unique(ck.state_dict[n]).numel() == 3 for n in LAYERS)
    r = cli("quantize", "--help")
    assert "first and last" in r.output.lower()
    bad = tmp_path / "bad.pt"
    for args, words in [(("--mode", "ternary"), "--mode"),
                        (("--mode", "ttq", "--threshold", "1.5"), "--threshold must be in [0, 1)"),
                        (("--mode", "binary", "--scale", "row"), "--scale"),
                        (("--mode", "ttq", "--finetune-epochs", "1", "--exclude", "fc2"), None)]:
        r = cli("quantize", lenet_path, *args, "-o", bad)
        if words is None:  # fc1 and fc3 kept, fc2 excluded: nothing left to make ternary
            assert r.exit_code == 2 and "no layer left" in one_error_line(r)
        else:
            assert r.exit_code == 2, (args, r.output)
            assert words in one_error_line(r)
        assert not bad.exists()
    r = cli("quantize", out, "--mode", "binary", "-o", bad)
    assert r.exit_code == 2 and "already quantized" in one_error_line(r) and not bad.exists()
