"""dcomp prune: exact sparsity per method, per-layer control, iterative rounds, CLI errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dcomp.cli.app import app
from dcomp.compressors.nm import nm_holds
from dcomp.compressors.pruning import PruneConfig, apply_prune
from dcomp.data import load_dataset
from dcomp.errors import DcompError, UsageError
from dcomp.formats.checkpoint import Checkpoint, read_checkpoint
from dcomp.models import build_zoo
from dcomp.stages import StageContext
from dcomp.train import TrainConfig, fit

LAYERS = ("fc1.weight", "fc2.weight", "fc3.weight")


def _ckpt(name="lenet-300-100", shape=(1, 8, 8), model=None, data=None):
    torch.manual_seed(0)
    model = model or build_zoo(name, shape, 10)
    ck = Checkpoint(arch={"kind": "zoo", "name": name, "kwargs": {}}, state_dict={}, input_shape=list(shape),
                    num_classes=10, data=data or {})
    ck.update_from_model(model)
    return ck


@pytest.fixture(scope="module")
def trained():
    """LeNet-300-100 trained 3 epochs on digits (a few seconds)."""
    ds = load_dataset("digits")
    torch.manual_seed(0)
    model = build_zoo("lenet-300-100", ds.input_shape, ds.num_classes)
    fit(model, ds, TrainConfig(epochs=3), seed=0)
    return _ckpt(model=model, data={"spec": "digits", "resize": None}), ds


def test_layerwise_magnitude_is_exact_and_zeros_match_masks():
    ck = _ckpt()
    out = apply_prune(ck, PruneConfig(sparsity=0.9)).checkpoint
    for name in LAYERS:
        w, m = out.state_dict[name], out.masks[name]
        assert int((~m).sum()) == round(0.9 * w.numel())
        assert torch.all(w[~m] == 0) and torch.equal(w[m], ck.state_dict[name][m])
        # the smallest magnitudes went
        assert w[m].abs().min() >= ck.state_dict[name][~m].abs().max()
    for b in ("fc1.bias", "fc2.bias", "fc3.bias"):
        assert torch.equal(out.state_dict[b], ck.state_dict[b]) and b not in out.masks
    assert out.provenance[-1]["stage"] == "prune"
    assert ck.masks == {}  # the input checkpoint is untouched


def test_global_reaches_the_overall_target_with_uneven_layers():
    ck = _ckpt()
    res = apply_prune(ck, PruneConfig(method="global", sparsity=0.8))
    total = sum(ck.state_dict[n].numel() for n in LAYERS)
    pruned = sum(int((~res.checkpoint.masks[n]).sum()) for n in LAYERS)
    assert pruned == round(0.8 * total)
    per_layer = {r["layer"]: r["sparsity"] for r in res.metrics["layers"]}
    assert len({round(v, 3) for v in per_layer.values()}) > 1


def test_std_threshold_follows_han():
    ck = _ckpt()
    out = apply_prune(ck, PruneConfig(method="std", quality=0.5)).checkpoint
    for name in LAYERS:
        w = ck.state_dict[name]
        assert torch.equal(out.masks[name], w.abs() > 0.5 * w.std())


def test_nm_holds_in_every_group_and_skips_layers_it_cannot_tile():
    ck = _ckpt()
    out = apply_prune(ck, PruneConfig(method="nm", nm="2:4")).checkpoint
    for name in LAYERS:
        assert nm_holds(out.state_dict[name], 2, 4)
        assert int(out.masks[name].sum()) == out.state_dict[name].numel() // 2
    conv = _ckpt("vgg-small")
    res = apply_prune(conv, PruneConfig(method="nm", nm="1:4"))
    rows = {r["layer"]: r for r in res.metrics["layers"]}
    assert "not a multiple of 4" in rows["features.0.weight"]["note"]  # 1x3x3 = 9 inputs per filter
    w = res.checkpoint.state_dict["features.3.weight"]
    assert nm_holds(w, 1, 4) and int(res.checkpoint.masks["features.3.weight"].sum()) == w.numel() // 4


def test_layer_overrides_exclude_and_tiny_layers():
    ck = _ckpt()
    out = apply_prune(ck, PruneConfig(sparsity=0.9, layers={"fc3": "0.5"}, exclude=["^fc1$"])).checkpoint
    assert "fc1.weight" not in out.masks and torch.equal(out.state_dict["fc1.weight"], ck.state_dict["fc1.weight"])
    assert int((~out.masks["fc2.weight"]).sum()) == 27000
    assert int((~out.masks["fc3.weight"]).sum()) == 500
    out = apply_prune(ck, PruneConfig(sparsity=0.9, min_weights=5000)).checkpoint
    assert "fc3.weight" not in out.masks  # 1000 weights < 5000: left dense
    out = apply_prune(ck, PruneConfig(sparsity=0.9, min_weights=5000, layers={"fc3": "0.2"})).checkpoint
    assert int((~out.masks["fc3.weight"]).sum()) == 200  # an explicit --layer beats --min-weights


def test_pruning_again_only_adds_to_the_pruned_set():
    ck = _ckpt()
    first = apply_prune(ck, PruneConfig(sparsity=0.5)).checkpoint
    second = apply_prune(first, PruneConfig(sparsity=0.8)).checkpoint
    for name in LAYERS:
        assert not torch.any(~first.masks[name] & second.masks[name])
        assert int((~second.masks[name]).sum()) == round(0.8 * second.masks[name].numel())


def test_a_few_million_weight_layer_is_exact():
    """The benchmark runs 50M; here 4M (above nothing special, but the same code path)."""
    ck = Checkpoint(arch={"kind": "import", "target": "torch.nn:Linear", "kwargs": {"in_features": 2048, "out_features": 2048}},
                    state_dict={"weight": torch.randn(2048, 2048), "bias": torch.zeros(2048)}, input_shape=[2048],
                    num_classes=2048)
    for cfg in (PruneConfig(sparsity=0.9), PruneConfig(method="global", sparsity=0.95)):
        m = apply_prune(ck, cfg).checkpoint.masks["weight"]
        assert int((~m).sum()) == round(cfg.sparsity * m.numel())


def test_config_errors_say_what_to_do():
    from pydantic import ValidationError

    for kwargs, msg in [({"sparsity": 1.0}, r"\[0, 1\)"), ({"sparsity": -0.1}, r"\[0, 1\)"),
                        ({"method": "nm", "nm": "4:4"}, "0 < N < M"), ({"method": "std"}, "--quality"),
                        ({}, "needs --sparsity"), ({"sparsity": 0.9, "rounds": 3}, "--epochs-per-round"),
                        ({"sparsity": 0.9, "layers": {"fc1": "1.5"}}, r"fc1=1.5.*\[0, 1\)")]:
        with pytest.raises(ValidationError, match=msg):
            PruneConfig(**kwargs)
    with pytest.raises(UsageError, match="matches no prunable layer"):
        apply_prune(_ckpt(), PruneConfig(sparsity=0.9, layers={"conv": "0.5"}))
    ck = _ckpt()
    ck.quant = {"fc1.weight": {}}
    with pytest.raises(DcompError, match="prune before quantizing"):
        apply_prune(ck, PruneConfig(sparsity=0.9))


def test_iterative_rounds_reach_the_target_and_retrain(trained):
    ck, ds = trained
    res = apply_prune(ck, PruneConfig(sparsity=0.8, rounds=2, schedule="linear",
                                      retrain=TrainConfig(epochs=1, lr=0.01, weight_decay=0.0)),
                      StageContext(data=ds))
    hist = res.metrics["history"]
    assert [round(h["target"], 6) for h in hist] == [0.4, 0.8]
    assert all("top1_retrained" in h for h in hist)
    out = res.checkpoint
    for name in LAYERS:
        assert int((~out.masks[name]).sum()) == round(0.8 * out.masks[name].numel())
        assert torch.all(out.state_dict[name][~out.masks[name]] == 0)  # retraining kept the zeros
    assert res.metrics["top1_after"] >= res.metrics["top1_before"] - 3.0


def test_filter_pruning_quarters_the_convs_and_retrains(trained):
    ck = _ckpt("vgg-small", data={"spec": "digits", "resize": None})
    ds = trained[1]
    res = apply_prune(ck, PruneConfig(method="filter", sparsity=0.5, retrain=TrainConfig(epochs=1, lr=0.01)),
                      StageContext(data=ds))
    o = res.metrics["overall"]
    assert 0.2 < o["conv_ratio"] < 0.3
    model = res.checkpoint.build_model()
    assert model.features[0].out_channels == 16 and model.classifier.out_features == 10
    assert "top1_pruned_stale_bn" in res.metrics["history"][0]  # BatchNorm statistics were re-estimated


# ---- CLI -------------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture()
def model_file(tmp_path):
    p = tmp_path / "lenet.pt"
    _ckpt(data={"spec": "digits", "resize": None}).save(p)
    return p


def test_cli_prunes_and_reports_json(model_file, tmp_path):
    out = tmp_path / "p.pt"
    r = runner.invoke(app, ["prune", str(model_file), "--sparsity", "0.9", "--layer", "fc3=0.5", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["overall"]["pruned"] == 17280 + 27000 + 500
    assert {row["layer"] for row in summary["layers"]} == set(LAYERS)
    ck = read_checkpoint(out.read_bytes())
    assert int((~ck.masks["fc2.weight"]).sum()) == 27000


def test_cli_structured_gives_a_smaller_model(model_file, tmp_path):
    out = tmp_path / "thin.pt"
    r = runner.invoke(app, ["prune", str(model_file), "--method", "neuron", "--sparsity", "0.5", "-o", str(out)])
    assert r.exit_code == 0, r.output
    model = read_checkpoint(out.read_bytes()).build_model()
    assert (model.fc1.out_features, model.fc2.out_features, model.fc3.out_features) == (150, 50, 10)


@pytest.mark.parametrize("args,msg", [
    (["--sparsity", "1.0"], "[0, 1)"),
    (["--sparsity", "-0.5"], "[0, 1)"),
    (["--sparsity", "0.9", "--layer", "conv.*=0.5"], "matches no prunable layer"),
    (["--sparsity", "0.9", "--exclude", "nothing"], "matches no prunable layer"),
    (["--method", "nm", "--nm", "4:4"], "0 < N < M"),
    (["--method", "nm", "--nm", "5:4"], "0 < N < M"),
    (["--sparsity", "0.9", "--layer", "fc1"], "REGEX=VALUE"),
    (["--sparsity", "0.9", "--rounds", "2"], "--epochs-per-round"),
    (["--method", "filter", "--sparsity", "0.5"], "no Conv2d layer"),
    (["--sparsity", "0.9", "--exclude", "fc"], "no layer is left"),
])
def test_cli_bad_input_fails_with_one_line_and_no_output(model_file, tmp_path, args, msg):
    out = tmp_path / "bad.pt"
    r = runner.invoke(app, ["prune", str(model_file), *args, "-o", str(out)])
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], r.output
    assert not out.exists()


def test_cli_model_without_prunable_layers(tmp_path):
    src = tmp_path / "bn.pt"
    Checkpoint(arch={"kind": "import", "target": "torch.nn:BatchNorm1d", "kwargs": {"num_features": 4}},
               state_dict=dict(torch.nn.BatchNorm1d(4).state_dict()), input_shape=[4], num_classes=4).save(src)
    out = tmp_path / "bad.pt"
    r = runner.invoke(app, ["prune", str(src), "--sparsity", "0.5", "-o", str(out)])
    assert r.exit_code == 1 and "no prunable layers" in r.output and not out.exists()
