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


@pytest.fixture(scope="module")
def lenet_sweep(tmp_path_factory, lenet_ckpt):
    """A per-layer magnitude sweep of the shared LeNet, written by the CLI."""
    from typer.testing import CliRunner

    from dcomp.cli.app import app

    d = tmp_path_factory.mktemp("sweep")
    lenet_ckpt.save(d / "base.pt")
    r = CliRunner().invoke(app, ["sweep", str(d / "base.pt"), "--data", "digits", "-m", "magnitude", "-m", "neuron",
                                 "--grid", "0,0.3,0.5,0.7,0.8,0.9,0.95", "-o", str(d / "s.json"), "--no-plot"])
    assert r.exit_code == 0, r.output
    return d


@pytest.mark.parametrize("method, bound", [("magnitude", 1.0), ("magnitude", 0.0), ("neuron", 2.0)])
def test_prune_max_drop_respects_its_bound(cli, lenet_sweep, tmp_path, method, bound):
    from dcomp.compressors.sensitivity import choose_budget, read_sweep

    doc = read_sweep(str(lenet_sweep / "s.json"))
    r = cli("prune", lenet_sweep / "base.pt", "--max-drop", bound, "--sweep", lenet_sweep / "s.json", "-m", method,
            "--data", "digits", "-o", tmp_path / "p.pt", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    b = res["budget"]
    assert res["top1_before"] - res["top1_after"] <= bound + 1e-9   # on the sweep's split (test)
    assert b["measured_drop"] <= bound + 1e-9 and b["predicted_drop"] <= bound + 1e-9
    if len(b["attempts"]) == 1 and b["sparsity"]:  # accepted at once: the knapsack's own choice
        assert b["sparsity"] == choose_budget(doc, method, bound)["sparsity"]
    for a in b["attempts"][:-1]:  # every rejected attempt was over the bound
        assert a["measured_drop"] > bound
    if method == "magnitude":
        got = {row["layer"].removesuffix(".weight"): row["sparsity"] for row in res["layers"]}
        assert all(abs(got[k] - v) < 1e-3 for k, v in b["sparsity"].items())
    if bound >= 1.0:
        assert res["overall"]["pruned" if method == "magnitude" else "params_before"] > 0
        assert any(v > 0 for v in b["sparsity"].values())


def test_prune_max_drop_backs_off_when_the_layers_add_up(cli, lenet_sweep, tmp_path):
    """Curves that promise no loss at 95% everywhere: the combined prune loses far more, so the
    choice backs off (lower sparsities) until the measured drop is within the bound."""
    doc = json.loads((lenet_sweep / "s.json").read_text())
    base = doc["baseline_top1"]
    for p in doc["points"]:
        p["top1"] = base
    (tmp_path / "liar.json").write_text(json.dumps(doc))
    r = cli("prune", lenet_sweep / "base.pt", "--max-drop", "0.5", "--sweep", tmp_path / "liar.json",
            "--data", "digits", "-o", tmp_path / "p.pt", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    b = res["budget"]
    assert len(b["attempts"]) > 1 and b["attempts"][0]["measured_drop"] > 0.5
    assert b["measured_drop"] <= 0.5 and res["top1_before"] - res["top1_after"] <= 0.5
    highest = [max(a["sparsity"].values()) for a in b["attempts"]]
    assert highest[-1] < highest[0] == 0.95


@pytest.mark.parametrize("extra, words", [
    (("--max-drop", "1", "-s", "0.5"), "leave out --sparsity"),
    (("--max-drop", "1", "-m", "global"), "magnitude, neuron or filter"),
    (("--sweep", "x.json", "-s", "0.5"), "give --max-drop"),
    (("--max-drop", "1", "--sweep", "missing.json"), "no such file"),
])
def test_prune_max_drop_bad_input(cli, lenet_sweep, tmp_path, extra, words):
    r = cli("prune", lenet_sweep / "base.pt", *extra, "--data", "digits", "-o", tmp_path / "p.pt")
    assert r.exit_code == 2, r.output
    assert words in one_error_line(r)
    assert not (tmp_path / "p.pt").exists()


def test_prune_max_drop_refuses_a_sweep_of_another_model(cli, lenet_sweep, tmp_path, lenet_ckpt):
    other = lenet_ckpt.copy()
    other.state_dict["fc3.bias"] = other.state_dict["fc3.bias"] + 1.0
    other.save(tmp_path / "other.pt")
    r = cli("prune", tmp_path / "other.pt", "--max-drop", "1", "--sweep", lenet_sweep / "s.json", "--data", "digits",
            "-o", tmp_path / "p.pt")
    assert r.exit_code == 2 and "another model" in one_error_line(r)


def test_recipe_sweep_stage_feeds_prune_and_resumes(cli, lenet_sweep, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""name: budget
defaults: {data: digits}
stages:
  - stage: sweep
    methods: [magnitude]
    whole: false
    grid: [0, 0.5, 0.8, 0.9]
  - stage: prune
    method: magnitude
    max_drop: 1.0
""")
    r = cli("run", recipe, "-m", lenet_sweep / "base.pt", "-o", tmp_path / "out.pt", "--json")
    assert r.exit_code == 0, r.output
    stages = json.loads(r.stdout)["stages"]
    assert stages[1]["metrics"]["budget"]["sweep"] == "given"
    chosen = stages[1]["metrics"]["budget"]["sparsity"]
    assert set(chosen) == {"fc1", "fc2", "fc3"} and set(chosen.values()) <= {0.0, 0.5, 0.8, 0.9}
    # change the bound: the sweep is resumed from the log, prune reruns with its curves
    r = cli("run", recipe, "-m", lenet_sweep / "base.pt", "-o", tmp_path / "out.pt", "--set", "stages.1.max_drop=3", "--json")
    assert r.exit_code == 0, r.output
    stages = json.loads(r.stdout)["stages"]
    assert stages[0]["resumed"] and not stages[1]["resumed"]
    assert stages[1]["metrics"]["budget"]["sweep"] == "given"


def test_model_digest_of_a_batchnorm_model_names_a_change():
    # BatchNorm's num_batches_tracked is a 0-dim tensor: the digest must hash it, not fail on it
    from dcomp.compressors.sensitivity import model_digest
    from dcomp.formats.checkpoint import Checkpoint
    from dcomp.models import build_zoo

    model = build_zoo("vgg-small", input_shape=(1, 8, 8), num_classes=10)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(t.dim() == 0 for t in sd.values())
    a = Checkpoint(arch={"kind": "zoo", "name": "vgg-small", "kwargs": {}}, state_dict=sd, input_shape=(1, 8, 8), num_classes=10)
    before = model_digest(a)
    assert model_digest(a) == before  # deterministic
    sd[next(k for k, t in sd.items() if t.dim() == 0)] += 1
    assert model_digest(a) != before  # the 0-dim tensor counts
