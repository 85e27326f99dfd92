"""dcomp run --target-size / --target-ratio: sizes parsed, plans that meet the size, the loop."""

from __future__ import annotations

import json

import pytest

from tests.conftest import one_error_line


def test_parse_size_and_ratio():
    from dcomp.compressors.size_target import parse_ratio, parse_size
    from dcomp.errors import UsageError

    assert parse_size("8KB") == 8000 and parse_size("8KiB") == 8192 and parse_size("9000") == 9000
    assert parse_size("1.5MB") == 1_500_000 and parse_size("2 kib") == 2048
    assert parse_ratio("60x") == 60.0 and parse_ratio("12.5") == 12.5
    for bad in ("8XB", "", "-3KB", "0"):
        with pytest.raises(UsageError):
            parse_size(bad)
    for bad in ("1x", "x60", "0.5x"):
        with pytest.raises(UsageError):
            parse_ratio(bad)


def _model():
    from dcomp.compressors.size_target import SizeModel

    m = SizeModel({"fc1.weight": 20000, "fc2.weight": 3000, "fc3.weight": 500}, other=800.0)
    for n in m.numel:
        for b in (4, 5):
            m.bits_per_nz[(n, b)] = [(0.5, b + 3.0), (0.9, b + 4.5), (0.99, b + 7.0)]
            m.fixed[(n, b)] = 2 ** b * 2
    return m


def _sweep():
    pts = [{"method": "magnitude", "scope": "*", "sparsity": 0.0, "top1": 90.0}]
    for layer, k in (("fc1", 2.0), ("fc2", 8.0), ("fc3", 30.0)):
        for s in (0.0, 0.5, 0.9, 0.99):
            pts.append({"method": "magnitude", "scope": layer, "sparsity": s, "top1": 90.0 - k * s ** 3})
    return {"baseline_top1": 90.0, "points": pts}


@pytest.mark.parametrize("target", [2500, 4000, 9000])
def test_plan_meets_the_target_and_spares_sensitive_layers(target):
    from dcomp.compressors.size_target import plan_for_size

    m = _model()
    qd = {(n, b): (0.5 if b == 4 else 0.0) for n in m.numel for b in (4, 5)}
    res = plan_for_size(m, target, _sweep(), qd, bits=(4, 5))
    assert abs(res["predicted_bytes"] - target) <= 0.002 * target
    plan = res["plan"]
    assert plan["fc1.weight"][0] >= plan["fc3.weight"][0]  # the big, insensitive layer is pruned hardest


def test_plan_refuses_an_impossible_target():
    from dcomp.compressors.size_target import plan_for_size
    from dcomp.errors import UsageError

    with pytest.raises(UsageError, match="header and biases"):
        plan_for_size(_model(), 700, _sweep(), {}, bits=(4, 5))
    with pytest.raises(UsageError, match="ask for more"):
        plan_for_size(_model(), 900, _sweep(), {}, bits=(4, 5))


RECIPE = """name: small
defaults: {data: digits}
stages:
  - stage: prune
    method: magnitude
    sparsity: 0.9
  - stage: quantize
    fc_bits: 5
  - stage: pack
"""


def test_run_target_size_lands_within_5_percent(cli, lenet_path, tmp_path, monkeypatch):
    from dcomp.compressors import size_target

    monkeypatch.setattr(size_target, "SIZE_GRID", (0.85, 0.95, 0.98))
    monkeypatch.setattr(size_target, "BITS", (4, 5))
    monkeypatch.setattr(size_target, "SENSITIVITY_GRID", (0.0, 0.5, 0.8, 0.9, 0.95))
    (tmp_path / "r.yaml").write_text(RECIPE)
    r = cli("run", tmp_path / "r.yaml", "-m", lenet_path, "-o", tmp_path / "m.dcz", "--target-size", "9KB", "--json")
    assert r.exit_code == 0, r.output
    t = json.loads(r.stdout)["target"]
    size = (tmp_path / "m.dcz").stat().st_size
    assert t["reached_bytes"] == size and t["target_bytes"] == 9000
    assert abs(size - 9000) <= 0.05 * 9000
    assert set(t["plan"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert all(b in (4, 5) for _, b in t["plan"].values())


@pytest.mark.parametrize("extra, recipe, words", [
    (("--target-size", "8XB"), RECIPE, "--target-size"),
    (("--target-ratio", "1x"), RECIPE, "--target-ratio"),
    (("--target-size", "8KB", "--target-ratio", "60x"), RECIPE, "not both"),
    (("--target-size", "8KB"), RECIPE.replace("  - stage: pack\n", ""), "a pack stage"),
])
def test_run_target_bad_input(cli, lenet_path, tmp_path, extra, recipe, words):
    (tmp_path / "r.yaml").write_text(recipe)
    r = cli("run", tmp_path / "r.yaml", "-m", lenet_path, "-o", tmp_path / "m.dcz", *extra)
    assert r.exit_code == 2, r.output
    assert words in one_error_line(r)
    assert not (tmp_path / "m.dcz").exists() and not (tmp_path / "m.dcz.work").exists()
