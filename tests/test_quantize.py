"""dcomp quantize: k-means weight sharing, the checkpoint invariant, centroid fine-tuning, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from dcomp.compressors.masks import magnitude_mask
from dcomp.compressors.quantization import (CentroidFinetune, QuantizeConfig, apply_quantize, check_quantized,
                                            index_dtype, plan_bits)
from dcomp.errors import FormatError, UsageError
from dcomp.formats.checkpoint import Checkpoint, read_checkpoint
from dcomp.stages import StageContext
from dcomp.train import TrainConfig, fit


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("bits", [1, 3, 5])
def test_quantize_invariants(pruned, bits):
    res = apply_quantize(pruned, QuantizeConfig(bits=bits), StageContext())
    out = res.checkpoint
    assert set(out.quant) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    for name, q in out.quant.items():
        w, m = out.state_dict[name], out.masks[name]
        nz = w[w != 0]
        assert torch.unique(nz).numel() <= 2 ** bits
        assert torch.equal(w != 0, m)  # zero pattern unchanged
        assert torch.equal(pruned.state_dict[name] != 0, w != 0)
        assert q["bits"] == bits and q["codebook"].dtype == torch.float32 and q["assignments"].dtype == torch.uint8
        assert q["assignments"].shape == w.shape and int(q["assignments"][~m].abs().sum()) == 0
        assert bits_equal(w, torch.where(m, q["codebook"][q["assignments"].long()], torch.zeros(())))
        assert res.metrics["layers"][name]["clusters"] <= 2 ** bits
    for name in ("fc1.bias", "fc2.bias", "fc3.bias"):  # biases never quantized
        assert torch.equal(out.state_dict[name], pruned.state_dict[name])
    assert not pruned.quant  # the input is untouched
    check_quantized(out)
    assert out.provenance[-1]["stage"] == "quantize"
    # a round trip through bytes (weights_only loading) keeps everything exact
    back = read_checkpoint(out.to_bytes())
    check_quantized(back)
    assert all(torch.equal(back.quant[n]["assignments"], out.quant[n]["assignments"]) for n in out.quant)


def test_more_bits_means_less_error(pruned):
    m3 = apply_quantize(pruned, QuantizeConfig(bits=3), StageContext()).metrics["layers"]["fc2.weight"]
    m6 = apply_quantize(pruned, QuantizeConfig(bits=6), StageContext()).metrics["layers"]["fc2.weight"]
    assert m6["mse"] < m3["mse"] and m6["sqnr_db"] > m3["sqnr_db"] > 5


def test_unmasked_zeros_are_values_and_few_distinct_values_are_exact(lenet_ckpt):
    ck = lenet_ckpt.copy()
    w = torch.tensor([0.0, 0.25, -0.5])[torch.arange(300 * 64) % 3].reshape(300, 64)
    ck.state_dict["fc1.weight"] = w
    res = apply_quantize(ck, QuantizeConfig(bits=4, exclude=["fc2", "fc3"]), StageContext())
    out = res.checkpoint
    assert bits_equal(out.state_dict["fc1.weight"], w)  # 3 distinct values < 16: exact, zeros kept
    m = res.metrics["layers"]["fc1.weight"]
    assert m["clusters"] == 3 and m["sqnr_db"] is None and "3 distinct" in m["note"]
    assert set(res.metrics["skipped"]) == {"fc2.weight", "fc3.weight"}
    check_quantized(out)


def test_fully_pruned_layer_does_not_crash(pruned):
    ck = pruned.copy()
    ck.masks["fc3.weight"] = torch.zeros_like(ck.masks["fc3.weight"])
    ck.state_dict["fc3.weight"] = torch.zeros_like(ck.state_dict["fc3.weight"])
    out = apply_quantize(ck, QuantizeConfig(bits=2), StageContext()).checkpoint
    assert int(torch.count_nonzero(out.state_dict["fc3.weight"])) == 0
    check_quantized(out)


def test_per_layer_bits_conv_fc_layer_and_exclude():
    from dcomp.models import build_zoo

    torch.manual_seed(0)
    model = build_zoo("vgg-small", (1, 8, 8), 10)
    ck = Checkpoint(arch={"kind": "zoo", "name": "vgg-small", "kwargs": {}}, state_dict={}, input_shape=[1, 8, 8],
                    num_classes=10)
    ck.update_from_model(model)
    convs = [n for n, t in ck.state_dict.items() if n.endswith("weight") and t.dim() == 4]
    fcs = [n for n, t in ck.state_dict.items() if n.endswith("weight") and t.dim() == 2]
    assert convs and fcs
    plan, _ = plan_bits(ck, QuantizeConfig())
    assert all(plan[n] == 8 for n in convs) and all(plan[n] == 5 for n in fcs)  # Han's defaults
    assert all(t.dim() >= 2 for n, t in ck.state_dict.items() if n in plan)  # no BatchNorm, no bias
    plan, _ = plan_bits(ck, QuantizeConfig(bits=6, fc_bits=3, layers={convs[0].split(".weight")[0]: 2}))
    assert plan[convs[0]] == 2 and all(plan[n] == 6 for n in convs[1:]) and all(plan[n] == 3 for n in fcs)
    plan, skipped = plan_bits(ck, QuantizeConfig(bits=4, exclude=[convs[-1]]))
    assert convs[-1] not in plan and skipped[convs[-1]] == "excluded"
    out = apply_quantize(ck, QuantizeConfig(conv_bits=9, fc_bits=4), StageContext()).checkpoint
    assert out.quant[convs[0]]["assignments"].dtype == torch.int16
    assert out.quant[fcs[0]]["assignments"].dtype == torch.uint8
    check_quantized(out)


def test_config_validation_messages():
    for kwargs in ({"bits": 0}, {"bits": 17}, {"conv_bits": -1}, {"layers": {"fc1": 20}}):
        with pytest.raises(ValidationError, match="between 1 and 16"):
            QuantizeConfig(**kwargs)
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        QuantizeConfig(exclude=["fc[1"])
    with pytest.raises(ValidationError):
        QuantizeConfig(bitz=3)
    assert index_dtype(8) == torch.uint8 and index_dtype(15) == torch.int16 and index_dtype(16) == torch.int32


def test_already_quantized_to_fewer_bits(pruned):
    q4 = apply_quantize(pruned, QuantizeConfig(bits=4), StageContext()).checkpoint
    with pytest.raises(UsageError, match="already quantized to 4 bits.*--requantize"):
        apply_quantize(q4, QuantizeConfig(bits=6), StageContext())
    again = apply_quantize(q4, QuantizeConfig(bits=6, requantize=True), StageContext()).checkpoint
    for n in q4.quant:  # at most 16 values each: kept exactly, under a 6-bit index
        assert bits_equal(again.state_dict[n], q4.state_dict[n]) and again.quant[n]["bits"] == 6
    fewer = apply_quantize(q4, QuantizeConfig(bits=2), StageContext()).checkpoint
    assert all(torch.unique(fewer.state_dict[n][fewer.masks[n]]).numel() <= 4 for n in fewer.quant)


def test_check_quantized_catches_inconsistency(pruned):
    out = apply_quantize(pruned, QuantizeConfig(bits=3), StageContext()).checkpoint
    bad = out.copy()
    bad.quant["fc2.weight"]["codebook"][0] += 1.0
    with pytest.raises(FormatError, match="fc2.weight"):
        check_quantized(bad)
    bad = out.copy()
    bad.state_dict["fc1.weight"][~bad.masks["fc1.weight"]] = -0.0  # -0.0 is not the +0.0 the packer expects
    with pytest.raises(FormatError, match="fc1.weight"):
        check_quantized(bad)


def _tiny_quantized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16, bias=False), nn.ReLU(), nn.Linear(16, 10, bias=False))
    ck = Checkpoint(arch={"kind": "import", "target": "torch.nn:Identity", "kwargs": {}}, state_dict={},
                    input_shape=[1, 8, 8], num_classes=10)
    ck.update_from_model(model)
    ck.masks["1.weight"] = magnitude_mask(ck.state_dict["1.weight"], 0.5)
    ck.state_dict["1.weight"] = torch.where(ck.masks["1.weight"], ck.state_dict["1.weight"], torch.zeros(()))
    model.load_state_dict(ck.state_dict)
    q = apply_quantize(ck, QuantizeConfig(bits=2), StageContext()).checkpoint
    model.load_state_dict(q.state_dict)
    return model, q


def test_centroid_update_is_lr_times_mean_gradient(digits):
    model, q = _tiny_quantized()
    cb = CentroidFinetune(q, model)
    assert cb.trainable_parameters() == []  # every weight is shared, there are no biases
    x, y = digits.x_train[:32], digits.y_train[:32]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    expected = {}
    for n, p in model.named_parameters():
        a = q.quant[n]["assignments"].long()
        m = q.masks.get(n, torch.ones_like(a, dtype=torch.bool))
        means = torch.stack([p.grad[(a == j) & m].mean() for j in range(q.quant[n]["codebook"].numel())])
        expected[n] = q.quant[n]["codebook"] - 0.1 * means

    class Ctx:
        masks = dict(q.masks)
        state = {}
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(0))], lr=0.1)

    cb.after_backward(Ctx)
    cb.after_step(Ctx)
    for n, p in model.named_parameters():
        torch.testing.assert_close(cb.codebooks[n], expected[n])
        a = q.quant[n]["assignments"].long()
        want = torch.where(q.masks[n], cb.codebooks[n][a], torch.zeros(())) if n in q.masks else cb.codebooks[n][a]
        assert bits_equal(p.detach(), want)


@pytest.mark.parametrize("bits", [1, 2])
def test_centroid_finetune_with_few_clusters_does_not_diverge(pruned, digits, bits):
    """2 or 4 clusters hold thousands of weights each: stepping a centroid by the summed gradient
    of its cluster diverged (loss NaN, accuracy at chance) at an ordinary rate; the mean does not."""
    from dcomp.retrain import accuracy, retrain

    q = apply_quantize(pruned, QuantizeConfig(bits=bits), StageContext()).checkpoint
    before = accuracy(q, digits)
    out, res = retrain(q, digits, TrainConfig(epochs=2, lr=0.05, weight_decay=0.0), seed=0)
    check_quantized(out)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    for n in q.quant:
        assert torch.isfinite(out.quant[n]["codebook"]).all()
        assert out.quant[n]["codebook"].abs().max() < 10 * q.quant[n]["codebook"].abs().max()
    assert accuracy(out, digits) >= before - 1.0


def test_finetune_with_empty_trainable_keeps_invariants(digits):
    model, q = _tiny_quantized()
    cb = CentroidFinetune(q, model)
    fit(model, digits, TrainConfig(epochs=1, lr=0.01, weight_decay=0.0), masks=q.masks, callbacks=[cb],
        trainable=cb.trainable_parameters())
    out = q.copy()
    out.update_from_model(model)
    cb.update_checkpoint(out)
    check_quantized(out)
    for n in q.quant:
        assert torch.equal(out.quant[n]["assignments"], q.quant[n]["assignments"])
        assert not torch.equal(out.quant[n]["codebook"], q.quant[n]["codebook"])  # the centroids moved
    assert torch.equal(out.state_dict["1.weight"] != 0, q.masks["1.weight"])


@pytest.mark.parametrize("select", ["last", "best"])
def test_retrain_on_quantized_checkpoint(pruned, digits, select):
    from dcomp.retrain import accuracy, retrain

    q = apply_quantize(pruned, QuantizeConfig(bits=4), StageContext()).checkpoint
    out, _ = retrain(q, digits, TrainConfig(epochs=1, lr=0.005, weight_decay=0.0, select=select), seed=0)
    check_quantized(out)
    for n in q.quant:
        assert torch.equal(out.quant[n]["assignments"], q.quant[n]["assignments"])
        assert torch.equal(out.state_dict[n] != 0, q.masks[n])
        assert torch.unique(out.state_dict[n][q.masks[n]]).numel() <= 16
    assert accuracy(out, digits) >= accuracy(q, digits) - 3.0


# ---- the command ------------------------------------------------------------------------------

@pytest.fixture()
def pruned_path(pruned, tmp_path):
    p = tmp_path / "pruned.pt"
    pruned.save(p)
    return p


def test_cli_quantize_finetune_json(cli, pruned_path, tmp_path):
    out = tmp_path / "q.pt"
    r = cli("quantize", pruned_path, "--bits", "5", "--finetune-epochs", "1", "--data", "digits", "--lr", "0.001",
            "-o", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert set(summary["layers"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert summary["layers"]["fc2.weight"]["clusters"] <= 32 and summary["layers"]["fc2.weight"]["sqnr_db"] > 10
    assert summary["top1_after"] >= summary["top1_before"] - 2.0
    ck = read_checkpoint(out.read_bytes())
    check_quantized(ck)
    assert ck.provenance[-1]["stage"] == "quantize"


def test_cli_table_and_layer_overrides(cli, pruned_path, tmp_path):
    out = tmp_path / "q.pt"
    r = cli("quantize", pruned_path, "--fc-bits", "4", "--layer", "fc3=2", "--exclude", "fc1", "--init", "density",
            "-o", out)
    assert r.exit_code == 0, r.output
    assert "fc2.weight" in r.stderr and "SQNR" in r.stderr and "excluded" in r.stderr
    ck = read_checkpoint(out.read_bytes())
    assert ck.quant["fc2.weight"]["bits"] == 4 and ck.quant["fc3.weight"]["bits"] == 2 and "fc1.weight" not in ck.quant


@pytest.mark.parametrize("args, message", [
    (["--bits", "0"], "between 1 and 16"),
    (["--bits", "17"], "between 1 and 16"),
    (["--layer", "fc1"], "REGEX=BITS"),
    (["--layer", "nothing=3"], "matches no quantized weight"),
    (["--init", "kmeans++"], "init"),
])
def test_cli_bad_options_write_nothing(cli, pruned_path, tmp_path, args, message):
    out = tmp_path / "q.pt"
    r = cli("quantize", pruned_path, *args, "-o", out)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_cli_refuses_requantizing_to_more_bits(cli, pruned_path, tmp_path):
    q = tmp_path / "q.pt"
    assert cli("quantize", pruned_path, "--bits", "3", "-o", q).exit_code == 0
    out = tmp_path / "q6.pt"
    r = cli("quantize", q, "--bits", "6", "-o", out)
    assert r.exit_code == 2 and "already quantized to 3 bits" in r.stderr and not out.exists()
    assert cli("quantize", q, "--bits", "6", "--requantize", "-o", out).exit_code == 0


def test_stage_finetune_with_fixed_centroid_lr(pruned, digits):
    cfg = QuantizeConfig(bits=3, finetune=TrainConfig(epochs=1, lr=0.01, weight_decay=0.0), centroid_lr=1e-30)
    res = apply_quantize(pruned, cfg, StageContext(data=digits))
    plain = apply_quantize(pruned, QuantizeConfig(bits=3), StageContext()).checkpoint
    for n in plain.quant:  # a negligible centroid rate: the codebooks stay where k-means put them
        assert torch.equal(res.checkpoint.quant[n]["codebook"], plain.quant[n]["codebook"])
    assert not torch.equal(res.checkpoint.state_dict["fc1.bias"], plain.state_dict["fc1.bias"])  # biases trained
    assert {"top1_before", "top1_quantized", "top1_finetuned", "top1_after"} <= set(res.metrics)
    with pytest.raises(UsageError, match="needs training data"):
        apply_quantize(pruned, cfg, StageContext())


def test_float16_rounds_codebooks_and_biases_exactly(lenet_ckpt):
    """--float16: codebooks and biases become float16 values (stored as float32), the
    codebook invariant still holds bit for bit, and accuracy is measured after rounding."""
    from dcomp.compressors.quantization import QuantizeConfig, apply_quantize, check_quantized
    from dcomp.data import load_dataset
    from dcomp.stages import StageContext

    res = apply_quantize(lenet_ckpt, QuantizeConfig(bits=5, float16=True), StageContext(data=load_dataset("digits")))
    out = res.checkpoint
    check_quantized(out)
    for name, q in out.quant.items():
        cb = q["codebook"]
        assert cb.dtype == torch.float32 and torch.equal(cb.half().float(), cb)
    for name in ("fc1.bias", "fc2.bias", "fc3.bias"):
        b = out.state_dict[name]
        assert torch.equal(b.half().float(), b) and not torch.equal(b, lenet_ckpt.state_dict[name])
    assert res.metrics["float16"]["rounded"] == 6 and res.metrics["float16"]["max_relative_change"] < 1e-3
    assert res.metrics["top1_after"] == res.metrics["top1_float16"] and res.metrics["top1_float16"] > 85
