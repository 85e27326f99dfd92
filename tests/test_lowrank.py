"""dcomp factorize: truncated SVD of Linear / Conv2d layers, rebuilding, composing, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from dcomp.compressors.lowrank import (FactorizeConfig, apply_factorize, factorize_module, full_rank,
                                       reconstruction_error, truncated, _matrix)
from dcomp.formats.checkpoint import Checkpoint, read_checkpoint
from dcomp.models import build_zoo
from dcomp.stages import StageContext
from tests.conftest import one_error_line


def _vgg_ckpt() -> Checkpoint:
    torch.manual_seed(0)
    m = build_zoo("vgg-small", (1, 8, 8), 10)
    # non-trivial BatchNorm statistics, so eval mode is not the identity
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    ck = Checkpoint(arch={"kind": "zoo", "name": "vgg-small", "kwargs": {}}, state_dict={}, input_shape=[1, 8, 8],
                    num_classes=10)
    ck.update_from_model(m)
    return ck


@pytest.mark.parametrize("kind,shape", [("linear", (30, 50)), ("conv-channel", (12, 5, 3, 3)),
                                        ("conv-spatial", (12, 5, 3, 5))])
def test_svd_error_decreases_with_rank_and_is_exact_at_full_rank(kind, shape):
    torch.manual_seed(1)
    w = torch.randn(*shape)
    full = full_rank(w, kind)
    errors = [reconstruction_error(w, kind, r) for r in range(1, full + 1)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors  # strictly better with every rank
    assert errors[-1] < 1e-7
    a, b = truncated(w, kind, full)
    assert torch.allclose(a @ b, _matrix(w, kind), atol=1e-10)
    # the factor layers themselves reproduce the truncated matrix
    for r in (1, full // 2, full):
        a, b = truncated(w, kind, r)
        err = float(torch.linalg.norm(_matrix(w, kind) - a @ b) / torch.linalg.norm(_matrix(w, kind)))
        assert abs(err - reconstruction_error(w, kind, r)) < 1e-9


@pytest.mark.parametrize("kind", ["conv-channel", "conv-spatial"])
def test_conv_factors_equal_the_conv_at_full_rank(kind):
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 9, (3, 5), stride=(2, 1), padding=(1, 2))
    seq = factorize_module(conv, kind, full_rank(conv.weight, kind))
    x = torch.randn(2, 6, 11, 13)
    assert torch.allclose(seq(x), conv(x), atol=1e-5)


def test_full_rank_factorized_model_equals_the_original(lenet_ckpt, digits):
    res = apply_factorize(lenet_ckpt, FactorizeConfig(energy=1.0, force=True), StageContext())
    ck = res.checkpoint
    assert set(ck.arch["factorized"]) == {"fc1", "fc2", "fc3"}
    x = digits.x_test[:64]
    with torch.no_grad():
        assert torch.allclose(ck.build_model()(x), lenet_ckpt.build_model()(x), atol=1e-5)
    vgg = _vgg_ckpt()
    for scheme in ("channel", "spatial"):
        f = apply_factorize(vgg, FactorizeConfig(energy=1.0, force=True, conv=scheme), StageContext()).checkpoint
        assert len(f.arch["factorized"]) == 7
        x = torch.randn(4, 1, 8, 8)
        with torch.no_grad():
            assert torch.allclose(f.build_model()(x), vgg.build_model()(x), atol=1e-5)


def test_rank_rules_and_layers_left_whole(lenet_ckpt):
    m = apply_factorize(lenet_ckpt, FactorizeConfig(rank=60), StageContext()).metrics  # digits: fc1 is 300x64
    rows = {r["layer"]: r for r in m["layers"]}
    assert rows["fc2"]["rank"] == 60 and rows["fc2"]["note"].startswith("factorized")
    assert "more parameters" in rows["fc1"]["note"]        # 60 x (64 + 300) > 64 x 300
    assert "full rank 10" in rows["fc3"]["note"]
    assert m["left_whole"] == ["fc1", "fc3"] and m["factorized"] == 1
    # energy: the smallest rank keeping the fraction
    m = apply_factorize(lenet_ckpt, FactorizeConfig(energy=0.8, force=True), StageContext()).metrics
    for r in m["layers"]:
        assert r["energy"] >= 0.8 - 1e-9
        w = lenet_ckpt.state_dict[f"{r['layer']}.weight"]
        assert 1 - reconstruction_error(w, "linear", r["rank"] - 1) ** 2 < 0.8
    # ratio: every factorized layer within its parameter budget
    m = apply_factorize(lenet_ckpt, FactorizeConfig(ratio=0.3), StageContext()).metrics
    for r in m["layers"]:
        if "params_after" in r and r["note"].startswith("factorized"):
            assert r["params_after"] <= 0.3 * r["params_before"]
    # --layer names one layer's rank
    m = apply_factorize(lenet_ckpt, FactorizeConfig(layers={"fc2": 20}), StageContext()).metrics
    assert [r["layer"] for r in m["layers"] if r.get("rank")] == ["fc2"]


def test_reload_in_a_fresh_process_without_pickle(lenet_ckpt, digits, tmp_path):
    ck = apply_factorize(lenet_ckpt, FactorizeConfig(rank=16), StageContext()).checkpoint
    path = tmp_path / "f.pt"
    ck.save(path)
    torch.save(digits.x_test[:8].clone(), tmp_path / "x.pt")
    code = ("import sys, torch\n"
            "from dcomp.formats.checkpoint import read_checkpoint\n"
            "obj = torch.load(sys.argv[1], weights_only=True)\n"  # plain data: no pickle needed
            "ck = read_checkpoint(open(sys.argv[1], 'rb').read())\n"
            "x = torch.load(sys.argv[2], weights_only=True)\n"
            "torch.save(ck.build_model()(x).detach(), sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], check=True)
    y = torch.load(tmp_path / "y.pt", weights_only=True)
    with torch.no_grad():
        assert torch.allclose(y, ck.build_model()(digits.x_test[:8]), atol=1e-6)


def test_composes_with_prune_quantize_pack_and_export(lenet_ckpt, digits):
    from dcomp.compressors.pruning import PruneConfig, apply_prune
    from dcomp.compressors.quantization import QuantizeConfig, apply_quantize
    from dcomp.formats import dcz
    from dcomp.formats.onnx_export import ExportConfig, export_checkpoint
    from dcomp.retrain import retrain
    from dcomp.train import TrainConfig

    ck = apply_factorize(lenet_ckpt, FactorizeConfig(rank=16), StageContext()).checkpoint
    ck, _ = retrain(ck, digits, TrainConfig(epochs=1, lr=0.01))           # the one loop trains the factors
    assert "fc1.0.weight" in ck.state_dict and ck.arch["factorized"]["fc1"] == {"kind": "linear", "rank": 16}
    pruned = apply_prune(ck, PruneConfig(sparsity=0.5, min_weights=0), StageContext()).checkpoint
    assert {"fc1.0.weight", "fc1.1.weight"} <= set(pruned.masks)          # factors are ordinary layers
    q = apply_quantize(pruned, QuantizeConfig(bits=5), StageContext()).checkpoint
    assert {"fc1.0.weight", "fc1.1.weight"} <= set(q.quant)
    back = dcz.read_bytes(dcz.write_bytes(q))
    for k, v in q.state_dict.items():
        assert torch.equal(back.state_dict[k].view(torch.int32), v.view(torch.int32))
    res = export_checkpoint(back, ExportConfig(variant="dense"))          # checked against PyTorch inside
    assert res.info["max_rel_diff"] < 1e-5
    import onnx

    ops = [n.op_type for n in onnx.load_from_string(res.onnx_bytes).graph.node]
    assert sum(op in ("Gemm", "MatMul") for op in ops) == 5               # fc1, fc2 as two layers each, fc3


def test_refuses_quantized_and_torchscript_and_skips_pruned(lenet_ckpt):
    from dcomp.compressors.quantization import QuantizeConfig, apply_quantize
    from dcomp.errors import UsageError

    q = apply_quantize(lenet_ckpt, QuantizeConfig(bits=4), StageContext()).checkpoint
    with pytest.raises(UsageError, match="factorize before quantizing"):
        apply_factorize(q, FactorizeConfig(rank=8), StageContext())
    pruned = lenet_ckpt.copy()
    pruned.masks["fc1.weight"] = pruned.state_dict["fc1.weight"] != 0
    m = apply_factorize(pruned, FactorizeConfig(rank=8), StageContext()).metrics
    assert "fc1" in m["left_whole"] and "factorize before pruning" in m["layers"][0]["note"]


def test_cli_factorize_and_bad_input(cli, lenet_path, tmp_path):
    out = tmp_path / "f.pt"
    r = cli("factorize", lenet_path, "--energy", "0.9", "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["weights_after"] < s["weights_before"] and out.exists()
    assert read_checkpoint(out.read_bytes()).arch["factorized"]
    bad = tmp_path / "bad.pt"
    for args, words in [(("--rank", "500"), "larger than any layer allows"),
                        (("--layer", "fc2=101"), "larger than layer fc2 allows"),
                        (("--energy", "0"), "--energy must be in (0, 1]"),
                        (("--energy", "1.5"), "--energy must be in (0, 1]"),
                        (("--ratio", "1.2"), "--ratio must be in (0, 1)"),
                        (("--rank", "4", "--energy", "0.5"), "one of --rank, --energy, --ratio"),
                        ((), "--rank R, --energy 0.9 or --ratio 0.5")]:
        r = cli("factorize", lenet_path, *args, "-o", bad)
        assert r.exit_code == 2, (args, r.output)
        assert words in one_error_line(r)
        assert not bad.exists()


def test_recipe_stage(cli, lenet_path, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: lowrank\ndefaults: {data: digits}\nstages:\n"
                      "  - stage: factorize\n    rank: 16\n    finetune: {epochs: 1}\n"
                      "  - stage: quantize\n    bits: 5\n  - stage: pack\n")
    out = tmp_path / "out.dcz"
    r = cli("run", recipe, "--model", lenet_path, "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    back = read_checkpoint(out.read_bytes())
    assert back.arch["factorized"]["fc1"]["rank"] == 16 and "fc1.0.weight" in back.quant
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - stage: quantize\n    bits: 5\n  - stage: factorize\n    rank: 4\n")
    r = cli("run", bad, "--model", lenet_path, "-o", tmp_path / "o.pt")
    assert r.exit_code == 2 and "factorize first" in one_error_line(r)


def test_bench_accepts_the_dense_original_as_baseline(lenet_ckpt):
    from dcomp.runtime.bench import check_same_architecture

    ck = apply_factorize(lenet_ckpt, FactorizeConfig(rank=16), StageContext()).checkpoint
    check_same_architecture(ck, lenet_ckpt)  # other layer names, same network: accepted
