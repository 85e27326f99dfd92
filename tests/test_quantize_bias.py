"""quantize --bias-bits: biases (and BatchNorm weight/bias) share 2^N values per tensor, the
checkpoint stays consistent, and pack stores them smaller."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from dcomp.cli.app import app
from dcomp.compressors.quantization import QuantizeConfig, apply_quantize, check_quantized
from dcomp.formats import dcz
from dcomp.stages import StageContext

runner = CliRunner()


def test_bias_bits_quantizes_biases_and_packs_smaller(lenet_ckpt):
    plain = apply_quantize(lenet_ckpt, QuantizeConfig(bits=5, float16=True), StageContext()).checkpoint
    res = apply_quantize(lenet_ckpt, QuantizeConfig(bits=5, bias_bits=4, float16=True), StageContext())
    out = res.checkpoint
    check_quantized(out)
    for name in ("fc1.bias", "fc2.bias", "fc3.bias"):
        assert name in out.quant and out.quant[name]["bits"] == 4
        assert len(torch.unique(out.state_dict[name])) <= 16
    assert set(res.metrics["biases"]) == {"fc1.bias", "fc2.bias", "fc3.bias"}
    a, rep_a = dcz.pack(plain)
    b, rep_b = dcz.pack(out)
    rows = {r["name"]: r for r in rep_b["layers"]}
    assert rows["fc1.bias"]["encoding"] == "codebook"
    assert len(b) < len(a)
    back = dcz.read_bytes(b)
    assert torch.equal(back.state_dict["fc1.bias"], out.state_dict["fc1.bias"])


def test_bias_bits_off_by_default_and_measured_with_data(lenet_ckpt, digits):
    res = apply_quantize(lenet_ckpt, QuantizeConfig(bits=5), StageContext())
    assert "fc1.bias" not in res.checkpoint.quant and "biases" not in res.metrics
    res = apply_quantize(lenet_ckpt, QuantizeConfig(bits=5, bias_bits=3, exclude=["fc3"]), StageContext(data=digits))
    assert "fc3.bias" not in res.checkpoint.quant and "fc2.bias" in res.checkpoint.quant
    assert res.metrics["top1_after"] == res.metrics["top1_biases"]


def test_cli_flag_and_validation(lenet_path, tmp_path):
    out = tmp_path / "q.pt"
    r = runner.invoke(app, ["quantize", str(lenet_path), "--bits", "5", "--bias-bits", "4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["quantize", str(lenet_path), "--bits", "5", "--bias-bits", "0", "-o", str(out)])
    assert r.exit_code == 2 and "bias" in r.output
