"""dcomp sweep: every asked point, monotone sparsity, resume, pictures, budgets, bad input."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

from tests.conftest import one_error_line


def _png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        im.verify()  # decodable
    with Image.open(path) as im:
        im.load()
        return im.size


def test_sweep_writes_every_asked_point_with_monotone_sparsity(cli, lenet_path, tmp_path):
    from dcomp.plots import figure_pixels

    out = tmp_path / "s.json"
    r = cli("sweep", lenet_path, "--data", "digits", "-m", "magnitude,neuron", "-m", "global",
            "--grid", "0,0.5,0.9", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    got = {(p["method"], p["scope"], p["sparsity"]) for p in doc["points"]}
    grid = [0.0, 0.5, 0.9]
    want = {("magnitude", s, g) for s in ("*", "fc1", "fc2", "fc3") for g in grid}
    want |= {("neuron", s, g) for s in ("*", "fc1", "fc2") for g in grid}  # fc3 feeds the output: no units removable
    want |= {("global", "*", g) for g in grid}
    assert got == want and len(doc["points"]) == len(want)
    for key in {(m, s) for m, s, _ in want}:
        sp = [p["sparsity"] for p in doc["points"] if (p["method"], p["scope"]) == key]
        assert sp == sorted(sp) == grid
        removed = [p["weights_removed"] for p in doc["points"] if (p["method"], p["scope"]) == key]
        assert removed == sorted(removed) and removed[0] == 0 < removed[-1]
    # the dense point is the model as given
    assert all(p["top1"] == doc["baseline_top1"] for p in doc["points"] if p["sparsity"] == 0.0)
    summary = json.loads(r.stdout)
    assert summary["measured"] == len(want) and summary["reused"] == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "s.csv").read_text())))
    assert len(rows) == len(want)
    # the picture: one panel for the whole model, one per layer with a curve
    assert _png_size(tmp_path / "s.png") == figure_pixels(4)
    assert not (tmp_path / "s.json.partial.jsonl").exists()


def test_sweep_resume_reuses_points_counting_evaluations(cli, lenet_path, tmp_path, monkeypatch):
    from dcomp.compressors import sensitivity

    calls = []
    real = sensitivity.measure_point

    def counting(*a, **k):
        calls.append(a[3:6])
        if fail_after[0] is not None and len(calls) > fail_after[0]:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    fail_after = [3]
    monkeypatch.setattr(sensitivity, "measure_point", counting)
    out = tmp_path / "s.json"
    args = ("sweep", lenet_path, "--data", "digits", "-m", "magnitude", "--grid", "0,0.3,0.6,0.9", "--no-per-layer", "-o", out)
    r = cli(*args)  # crashes at the 4th point: 3 logged
    assert r.exit_code == 1 and not out.exists()
    assert len((tmp_path / "s.json.partial.jsonl").read_text().splitlines()) == 3
    calls.clear()
    fail_after[0] = None
    r = cli(*args, "--json")
    assert r.exit_code == 0, r.output
    assert len(calls) == 1 and json.loads(r.stdout)["reused"] == 3
    calls.clear()
    r = cli(*args, "--json")  # everything from the JSON now
    assert r.exit_code == 0 and calls == [] and json.loads(r.stdout)["reused"] == 4
    r = cli(*args[:-2], "--grid", "0,0.3,0.6,0.9,0.95", "-o", out, "--json")  # one more point
    assert r.exit_code == 0 and len(calls) == 1
    calls.clear()
    r = cli(*args, "--seed", "1", "--json")  # another setting: another key, all measured again
    assert r.exit_code == 0 and len(calls) == 4


def test_sweep_with_retraining_records_both_accuracies(cli, lenet_path, tmp_path):
    out = tmp_path / "rt.json"
    r = cli("sweep", lenet_path, "--data", "digits", "-m", "magnitude", "--grid", "0,0.95", "--no-per-layer",
            "--retrain-epochs", "1", "-o", out, "--format", "svg")
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert all("top1_retrained" in p for p in doc["points"])
    high = next(p for p in doc["points"] if p["sparsity"] == 0.95)
    assert high["top1_retrained"] > high["top1"]  # one epoch recovers some of a 95% one-shot prune
    assert (tmp_path / "rt.svg").read_text().lstrip().startswith(("<?xml", "<svg"))


def _no_linear_model(tmp_path):
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(10))

        def forward(self, x):
            return x.flatten(1)[:, :10] * self.scale

    p = tmp_path / "scale.ts"
    torch.jit.save(torch.jit.script(Scale()), str(p))
    return p


@pytest.mark.parametrize("extra, words", [
    (("-m", "magnitud"), "unknown method 'magnitud'"),
    (("--grid", "0,0.5,1.0"), "[0, 1)"),
    (("--grid", "-0.1,0.5"), "[0, 1)"),
    (("--grid", "0:x"), "--grid"),
    (("-m", "filter"), "method filter cannot prune this model"),
    (("--no-whole", "-m", "global"), "global"),
])
def test_sweep_bad_input_one_line_exit_2_nothing_written(cli, lenet_path, tmp_path, extra, words):
    out = tmp_path / "out" 
    out.mkdir()
    r = cli("sweep", lenet_path, "--data", "digits", *extra, "-o", out / "s.json")
    assert r.exit_code == 2, r.output
    assert words in one_error_line(r)
    assert list(out.iterdir()) == []


def test_sweep_of_a_model_without_prunable_layers(cli, tmp_path):
    model = _no_linear_model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    r = cli("sweep", model, "--data", "digits", "-o", out / "s.json")
    assert r.exit_code == 2, r.output
    assert "no prunable layer" in one_error_line(r)
    assert list(out.iterdir()) == []


# ---- budgets ---------------------------------------------------------------------------------------

def _doc(curves, removed_per_point=None, base=90.0):
    """A sweep document with given per-layer curves: {layer: [(s, top1), ...]}."""
    pts = [{"method": "magnitude", "scope": "*", "sparsity": 0.0, "top1": base, "weights_removed": 0}]
    for layer, c in curves.items():
        for s, a in c:
            pts.append({"method": "magnitude", "scope": layer, "sparsity": s, "top1": a,
                        "weights_removed": int(s * (removed_per_point or {}).get(layer, 100))})
    return {"version": 1, "baseline_top1": base, "points": pts}


def test_choose_budget_respects_the_bound_and_maximises_removed_weights():
    from dcomp.compressors.sensitivity import choose_budget

    grid = [0.0, 0.5, 0.8, 0.9, 0.95]
    doc = _doc({"big": [(s, 90 - 4 * s ** 4) for s in grid],       # cheap to prune, many weights
                "small": [(s, 90 - 10 * s) for s in grid],         # costly, few weights
                "bumpy": [(0.0, 90), (0.5, 89.0), (0.8, 90.5), (0.9, 88.0), (0.95, 80.0)]},
               {"big": 1000, "small": 50, "bumpy": 200})
    for bound in (0.0, 0.3, 1.0, 2.0, 5.0):
        res = choose_budget(doc, "magnitude", bound)
        assert res["predicted_drop"] <= bound + 1e-9
        # brute force over the grid with the same conservative per-layer drops
        import itertools

        def drop(layer, s):
            c = [(x, a) for p in doc["points"] if p["scope"] == layer for x, a in [(p["sparsity"], p["top1"])]]
            return max(0.0, max(90 - a for x, a in c if x <= s))
        best = max((sum(int(s * n) for s, n in zip(combo, (1000, 50, 200))), combo)
                   for combo in itertools.product(grid, repeat=3)
                   if sum(drop(layer, s) for layer, s in zip(("big", "small", "bumpy"), combo)) <= bound + 1e-9)
        assert res["weights_removed"] == best[0]
    # bumpy's recovery at 0.8 does not hide the drop at 0.5
    assert choose_budget(doc, "magnitude", 0.5)["sparsity"]["bumpy"] == 0.0
