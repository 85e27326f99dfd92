"""`pack --provenance full|brief|none`: what the header keeps, and that `info` still shows it."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from dcomp.cli.app import app
from dcomp.formats import dcz
from dcomp.formats.checkpoint import Checkpoint

runner = CliRunner()


def _ckpt() -> Checkpoint:
    g = torch.Generator().manual_seed(0)
    ck = Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}},
                    state_dict={"fc1.weight": torch.randn(30, 64, generator=g), "fc1.bias": torch.randn(30, generator=g)},
                    input_shape=[1, 8, 8], num_classes=10)
    ck.add_provenance("train", {"epochs": 3, "lr": 0.1, "arch": "lenet-300-100"}, {"top1": 97.25, "loss": 0.1})
    ck.add_provenance("prune", {"sparsity": 0.9, "layers": {"fc1": 0.9}, "note": "x" * 200},
                      {"top1": 96.5, "loss": float("nan")})
    return ck


def test_full_round_trips_every_entry():
    ck = _ckpt()
    back = dcz.read_bytes(dcz.write_bytes(ck, dcz.PackConfig(provenance="full")))
    assert json.dumps(back.provenance) == json.dumps(ck.provenance)   # NaN == NaN as text


def test_brief_keeps_stage_names_and_scalar_params_only():
    ck = _ckpt()
    back = dcz.read_bytes(dcz.write_bytes(ck, dcz.PackConfig(provenance="brief")))
    assert back.provenance == [
        {"stage": "train", "params": {"epochs": 3, "lr": 0.1, "arch": "lenet-300-100"}},
        {"stage": "prune", "params": {"sparsity": 0.9}},
    ]
    assert dcz.PackConfig().provenance == "brief"   # the default


def test_none_keeps_nothing_and_each_mode_is_smaller():
    ck = _ckpt()
    sizes = {m: len(dcz.write_bytes(ck, dcz.PackConfig(provenance=m))) for m in ("full", "brief", "none")}
    assert dcz.read_bytes(dcz.write_bytes(ck, dcz.PackConfig(provenance="none"))).provenance == []
    assert sizes["full"] > sizes["brief"] > sizes["none"]


def test_cli_flag_and_info_reads_what_is_present(tmp_path):
    src = tmp_path / "m.pt"
    _ckpt().save(src)
    for mode in ("full", "brief", "none"):
        out = tmp_path / f"{mode}.dcz"
        r = runner.invoke(app, ["pack", str(src), "-o", str(out), "--provenance", mode])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["info", str(out), "--json"])
        assert r.exit_code == 0, r.output
        prov = json.loads(r.stdout)["provenance"]
        assert [p["stage"] for p in prov] == ([] if mode == "none" else ["train", "prune"])
        assert ("metrics" in prov[0]) == (mode == "full") if prov else True
    r = runner.invoke(app, ["pack", str(src), "-o", str(tmp_path / "x.dcz"), "--provenance", "some"])
    assert r.exit_code == 2 and "provenance" in r.output
