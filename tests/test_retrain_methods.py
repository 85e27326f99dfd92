"""The retrain stage with methods: option combinations, the stage API, provenance."""

from __future__ import annotations

import json

import pytest
import torch

from dcomp.compressors.masks import magnitude_mask
from dcomp.compressors.schedules import AGPConfig
from dcomp.retrain import RetrainConfig, apply_retrain
from dcomp.stages import StageContext
from dcomp.train import TrainConfig
from tests.conftest import one_error_line


@pytest.mark.parametrize("args, needle", [
    (["--schedule", "agp", "--method", "dns"], "choose one"),
    (["--schedule", "gradual"], "--schedule"),
    (["--method", "lottery"], "--method"),
    (["--dns-c", "2"], "--dns-c only applies with --method dns"),
    (["--final-sparsity", "0.5"], "only applies with --method agp"),
    (["--sparse-len", "2", "--method", "dns"], "--sparse-len only applies"),
    (["--kd-alpha", "0.5"], "only applies with --teacher"),
    (["--schedule", "agp", "--select", "best"], "--select last"),
    (["--schedule-unit", "hours"], "--schedule-unit"),
])
def test_bad_combinations_fail_before_any_work(cli, lenet_path, tmp_path, args, needle):
    out = tmp_path / "o.pt"
    r = cli("retrain", lenet_path, *args, "--epochs", "1", "-o", out)
    assert r.exit_code == 2, r.output
    assert needle in one_error_line(r)
    assert not out.exists()


def test_quantized_checkpoint_refuses_mask_methods(lenet_ckpt, digits):
    ck = lenet_ckpt.copy()
    w = ck.state_dict["fc1.weight"]
    ck.quant = {"fc1.weight": {"bits": 1, "codebook": torch.tensor([-0.1, 0.1]), "assignments": (w > 0).long()}}
    with pytest.raises(Exception, match="quantized"):
        apply_retrain(ck, RetrainConfig(agp=AGPConfig()), StageContext(data=digits))


def test_stage_api_adds_provenance_and_keeps_input(lenet_ckpt, digits):
    ck = lenet_ckpt.copy()
    ck.masks = {"fc1.weight": magnitude_mask(ck.state_dict["fc1.weight"], 0.5)}
    before = {k: v.clone() for k, v in ck.state_dict.items()}
    cfg = RetrainConfig(train=TrainConfig(epochs=1, lr=0.01), agp=AGPConfig(final_sparsity=0.8, every=4, end=20, unit="steps"))
    res = apply_retrain(ck, cfg, StageContext(data=digits))
    assert all(torch.equal(before[k], ck.state_dict[k]) for k in before)  # input untouched
    prov = res.checkpoint.provenance[-1]
    assert prov["stage"] == "retrain" and prov["params"]["agp"]["final_sparsity"] == 0.8
    assert res.metrics["masked_sparsity"] == pytest.approx(0.8, abs=1e-3)
    # the input mask is kept: what was pruned stays pruned
    m = res.checkpoint.masks["fc1.weight"]
    assert not torch.any(m & ~ck.masks["fc1.weight"])


def test_config_round_trips_as_a_recipe_stage():
    cfg = RetrainConfig(train=TrainConfig(epochs=2), agp=AGPConfig(final_sparsity=0.7))
    again = RetrainConfig(**cfg.model_dump())
    assert again == cfg
    with pytest.raises(ValueError, match="choose one mask method"):
        RetrainConfig(agp=AGPConfig(), dns={"c": 1.0})


def test_json_summary(cli, lenet_path, tmp_path):
    r = cli("retrain", lenet_path, "--method", "iht", "--sparsity", "0.5", "--epochs", "1", "-o", tmp_path / "o.pt",
            "--json", "--quiet")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["masked_sparsity"] == pytest.approx(0.5, abs=1e-3) and "top1_after" in s and "iht_phases" in s
