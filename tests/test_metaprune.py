"""MetaPruning (dcomp search): PruningNet shapes, the search's window, determinism and resume, CLI errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dcomp.compressors.graph.macs import count_macs
from dcomp.compressors.metaprune import SearchConfig, parse_grid
from dcomp.compressors.metaprune.budget import parse_budget
from dcomp.compressors.metaprune.pruningnet import PruningNet
from dcomp.compressors.metaprune.space import build_space, paper_grid
from dcomp.errors import UsageError
from dcomp.train import TrainConfig
from tests.conftest import one_error_line


class Branchy(nn.Module):
    """Not a zoo net: a depthwise conv (its groups follow the width) and a concatenation of two branches."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12), nn.ReLU())
        self.a = nn.Conv2d(12, 8, 1)
        self.b = nn.Conv2d(12, 6, 3, padding=1)
        self.head = nn.Linear(14, num_classes)

    def forward(self, x):
        x = self.dw(self.stem(x))
        x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.head(x.mean(dim=(2, 3)))


def _models():
    from dcomp.models import build_zoo

    return [("vgg-small", build_zoo("vgg-small", (1, 16, 16), 10), (1, 16, 16)),
            ("resnet-small", build_zoo("resnet-small", (1, 16, 16), 10), (1, 16, 16)),
            ("lenet-300-100", build_zoo("lenet-300-100", (1, 8, 8), 10), (1, 8, 8)),
            ("branchy", Branchy(), (1, 8, 8))]


@pytest.mark.parametrize("which", range(4), ids=["vgg-small", "resnet-small", "lenet-300-100", "branchy"])
def test_pruningnet_generates_the_candidate_shapes(which):
    name, model, shape = _models()[which]
    torch.manual_seed(0)
    space = build_space(model, shape, paper_grid())
    net = PruningNet(space, hidden=8, seed=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        genes = space.random_genes(gen)
        small, _ = net.candidate_model(genes)
        want = {k: tuple(v.shape) for k, v in small.named_parameters()}
        got = {k: tuple(v.shape) for k, v in net.generated(genes).items()}
        assert all(got[k] == want[k] for k in got), name
        bn = {f"{n}.{a}" for n, m in small.named_modules() if isinstance(m, nn.BatchNorm2d) for a in ("weight", "bias")}
        assert set(got) == set(want) - bn   # BatchNorm is non-affine in the PruningNet
        # exact costs without building the candidate
        cost = space.cost(genes)
        assert cost.macs == count_macs(small, shape)[0]
        assert cost.params == sum(p.numel() for p in small.parameters())
        # the forward runs the candidate and trains the generators
        net.set_candidate(genes)
        net.train()
        out = net(torch.randn(4, *shape))
        assert out.shape == (4, 10)
        out.square().mean().backward()
        assert all(g.fc2.weight.grad is not None for g in net.generators.values())
        net.zero_grad()
    assert len(space.groups) >= 2


def test_model_without_prunable_group_is_named():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(UsageError, match="no prunable group"):
        build_space(model, (1, 8, 8), paper_grid())


def test_budget_parsing():
    assert parse_budget("0.5x", "--max-macs") == ("fraction", 0.5)
    assert parse_budget("12M", "--max-macs") == ("absolute", 12e6)
    assert parse_budget("250k", "--max-params") == ("absolute", 250e3)
    assert parse_budget(3.5, "--max-latency-ms") == ("absolute", 3.5)
    with pytest.raises(UsageError, match="0.5x"):
        parse_budget("half", "--max-macs")
    assert parse_grid("0.1:1:31") == paper_grid()
    assert parse_grid("0.5,1") == [0.5, 1.0]
    with pytest.raises(ValueError, match="budget"):
        SearchConfig()


@pytest.fixture(scope="module")
def vgg8(digits):
    """vgg-small trained one epoch on 8x8 digits."""
    from dcomp.formats.checkpoint import Checkpoint
    from dcomp.models import build_zoo
    from dcomp.train import fit

    torch.manual_seed(0)
    model = build_zoo("vgg-small", digits.input_shape, 10)
    fit(model, digits, TrainConfig(epochs=1))
    ckpt = Checkpoint(arch={"kind": "zoo", "name": "vgg-small", "kwargs": {}}, state_dict={},
                      input_shape=list(digits.input_shape), num_classes=10, data={"spec": "digits", "resize": None})
    ckpt.update_from_model(model)
    return ckpt


TINY = dict(population=6, parents=2, mutations=3, crossovers=3, iterations=3, hidden=8, recal_samples=64,
            val_samples=100, train=TrainConfig(epochs=1, lr=0.01, weight_decay=0.0, batch_size=128))


def _search(ckpt, digits, cache=None, on_record=None, **kw):
    from dcomp.compressors.metaprune.apply import apply_search
    from dcomp.stages import StageContext

    cfg = SearchConfig(**{**TINY, **kw})
    return apply_search(ckpt, cfg, StageContext(data=digits, seed=3), cache=cache, on_record=on_record)


def test_tiny_search_respects_window_and_is_deterministic(vgg8, digits):
    a = _search(vgg8, digits, max_macs="0.5x", min_fraction=0.8)
    b = _search(vgg8, digits, max_macs="0.5x", min_fraction=0.8)
    lo, hi = a.metrics["window"]["macs"]
    full = a.metrics["model"]["macs"]
    assert hi == pytest.approx(0.5 * full) and lo == pytest.approx(0.4 * full)
    assert a.metrics["evaluated"] >= 6
    for rec in a.metrics["candidates"]:
        assert lo <= rec["macs"] <= hi
    assert [r["genes"] for r in a.metrics["candidates"]] == [r["genes"] for r in b.metrics["candidates"]]
    assert a.metrics["winner"] == b.metrics["winner"]
    # the output is physically smaller, at the winner's widths, and rebuilds without pickle
    out = a.checkpoint
    model = out.build_model()
    assert count_macs(model, out.input_shape)[0] == a.metrics["winner"]["macs"] <= hi
    w = a.metrics["winner"]["widths"]["features.0"]["units"]
    assert out.state_dict["features.0.weight"].shape[0] == w
    assert out.provenance[-1]["stage"] == "search"


def test_params_budget_and_generated_init(vgg8, digits):
    r = _search(vgg8, digits, max_params="0.3x", init="generated", iterations=1)
    lo, hi = r.metrics["window"]["params"]
    assert all(lo <= c["params"] <= hi for c in r.metrics["candidates"])
    assert r.checkpoint.param_count() == r.metrics["winner"]["params"]


def test_interrupted_search_resumes_from_its_log(vgg8, digits):
    full = _search(vgg8, digits, max_macs="0.5x")
    log: list[dict] = []

    def stop_after_five(rec):
        log.append(rec)
        if len(log) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _search(vgg8, digits, on_record=stop_after_five, max_macs="0.5x")
    cache = {f"{r['key']}:{','.join(map(str, r['genes']))}": r for r in log}
    again = _search(vgg8, digits, cache=cache, max_macs="0.5x")
    assert again.metrics["reused"] == 5
    assert again.metrics["winner"] == full.metrics["winner"]
    assert [r["genes"] for r in again.metrics["candidates"]] == [r["genes"] for r in full.metrics["candidates"]]


def test_search_figure(tmp_path):
    from PIL import Image

    from dcomp.plots import figure_pixels, search_figure

    doc = {"model": {"macs": 100}, "window": {"macs": [40, 50]},
           "candidates": [{"macs": 45, "top1": 90.0, "iteration": 0}, {"macs": 48, "top1": 93.0, "iteration": 1}],
           "winner": {"macs": 48, "val_top1": 93.0}, "uniform": {"macs": 49, "top1": 91.0, "ratio": 0.7}}
    p = search_figure(doc, tmp_path / "s.png")
    assert Image.open(p).size == figure_pixels(1, 1)


# ---- the command ------------------------------------------------------------------------------------

@pytest.fixture()
def vgg8_path(vgg8, tmp_path):
    p = tmp_path / "base.pt"
    vgg8.save(p)
    return p


TINY_ARGS = ["--population", "4", "--parents", "2", "--mutations", "2", "--crossovers", "2", "--iterations", "2",
             "--epochs", "1", "--hidden", "8", "--recal-samples", "64", "--val-samples", "100", "--batch-size", "128"]


def test_cli_search_then_rerun_reuses_log(cli, vgg8_path, tmp_path):
    out = tmp_path / "s.pt"
    r = cli("search", vgg8_path, "--data", "digits", "--max-macs", "0.5x", *TINY_ARGS, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["reused"] == 0 and doc["pruningnet_trained"]
    assert (tmp_path / "s.png").is_file() and (tmp_path / "s.search.jsonl").is_file()
    lines = (tmp_path / "s.search.jsonl").read_text().splitlines()
    assert doc["evaluated"] <= len(lines) <= doc["evaluated"] + 1   # + the uniform baseline unless met
    # an interrupted run leaves a partial log (here: a torn last line); the rerun scores only what is missing
    (tmp_path / "s.search.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    r2 = cli("search", vgg8_path, "--data", "digits", "--max-macs", "0.5x", *TINY_ARGS, "-o", out, "--json")
    assert r2.exit_code == 0, r2.output
    doc2 = json.loads(r2.stdout)
    assert doc2["reused"] == 3 and not doc2["pruningnet_trained"]
    assert doc2["winner"] == doc["winner"]


def test_cli_impossible_budget_names_smallest_value(cli, vgg8_path, tmp_path):
    out = tmp_path / "s.pt"
    r = cli("search", vgg8_path, "--data", "digits", "--max-macs", "0.001x", *TINY_ARGS, "-o", out)
    assert r.exit_code == 2
    line = one_error_line(r)
    assert "smallest reachable value" in line and "0.0" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.pt"]   # nothing written, nothing trained


def test_cli_no_prunable_group(cli, tmp_path):
    src = tmp_path / "flat.py"
    src.write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).state_dict(), tmp_path / "flat.pt")
    r = cli("search", tmp_path / "flat.pt", "--arch", f"{src}:make", "--data", "digits", "--max-macs", "0.5x",
            "-o", tmp_path / "s.pt")
    assert r.exit_code == 2
    assert "no prunable group" in one_error_line(r)
    assert not (tmp_path / "s.pt").exists()


def test_cli_needs_budget_and_data(cli, vgg8_path, tmp_path):
    r = cli("search", vgg8_path, "--data", "digits", "-o", tmp_path / "s.pt")
    assert r.exit_code == 2 and "budget" in one_error_line(r)
    r = cli("search", vgg8_path, "--max-macs", "0.5x", "-o", tmp_path / "s.pt")
    assert r.exit_code == 2 and "--data" in one_error_line(r)


def test_recipe_stage_search(cli, vgg8_path, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: s\nstages:\n  - stage: search\n    max_macs: 0.5x\n    population: 4\n    parents: 2\n"
                      "    mutations: 2\n    crossovers: 2\n    iterations: 1\n    hidden: 8\n    recal_samples: 64\n"
                      "    train: {epochs: 1, batch_size: 128}\n  - stage: retrain\n    train: {epochs: 1}\n")
    out = tmp_path / "o.pt"
    r = cli("run", recipe, "--model", vgg8_path, "--data", "digits", "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    from dcomp.formats.checkpoint import read_checkpoint

    ck = read_checkpoint(out.read_bytes())
    assert [p["stage"] for p in ck.provenance][-2:] == ["search", "retrain"]
    assert ck.param_count() < read_checkpoint(vgg8_path.read_bytes()).param_count()
    # the stage keeps its scored candidates and PruningNet in the work directory: a rerun of the
    # stage (here: its output lost) scores nothing again and trains no PruningNet again
    work = tmp_path / "o.pt.work"
    log = work / "00-search.jsonl"
    first = [json.loads(line) for line in log.read_text().splitlines()]
    assert first and (work / "00-pruningnet.pt").is_file()
    (work / "00-search.pt").unlink()
    r = cli("run", recipe, "--model", vgg8_path, "--data", "digits", "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert len(log.read_text().splitlines()) == len(first)  # nothing new scored
    stage = next(st for st in json.loads(r.stdout)["stages"] if st["stage"] == "search")
    assert stage["metrics"]["reused"] >= stage["metrics"]["evaluated"] > 0  # every lookup a hit
    assert not stage["metrics"]["pruningnet_trained"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\nstages:\n  - stage: search\n    max_macs: 0.5x\n    populaton: 4\n")
    r = cli("run", bad, "--model", vgg8_path, "--data", "digits", "-o", out)
    assert r.exit_code == 2 and "populaton" in r.output


@pytest.mark.slow
def test_search_under_torchrun_spreads_candidates(tmp_path, lenet_path):
    """Two ranks (gloo): the PruningNet trains data-parallel, candidates are scored across the ranks,
    rank 0 alone writes the checkpoint and the log."""
    import os
    import shutil
    import subprocess
    import sys

    exe = shutil.which("torchrun")
    cmd = ([exe] if exe else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", "--nproc_per_node", "2", "-m", "dcomp", "search", str(lenet_path), "--data", "digits",
        "--max-params", "0.5x", *TINY_ARGS, "-o", "s.pt", "--json", "--quiet", "--no-plot"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["ranks"] == 2
    lo, hi = doc["window"]["params"]
    lines = [json.loads(x) for x in (tmp_path / "s.search.jsonl").read_text().splitlines()]
    # every candidate logged once (+ the uniform baseline unless the search met it)
    assert doc["evaluated"] <= len(lines) <= doc["evaluated"] + 1
    assert len({tuple(x["genes"]) for x in lines}) == len(lines)
    assert sum(lo <= x["params"] <= hi for x in lines) >= doc["evaluated"]
    assert (tmp_path / "s.pt").is_file() and not list(tmp_path.glob(".s.pt.*"))


@pytest.mark.slow
def test_pruningnet_on_torchvision_mobilenet_v2():
    """A torchvision net (depthwise convs, inverted residuals): exact costs and a forward through the
    candidate's shrunk copy."""
    from dcomp.models.vision import vision_models

    model = vision_models().mobilenet_v2(num_classes=10).eval()
    space = build_space(model, (3, 32, 32), paper_grid())
    assert len(space.groups) > 10
    net = PruningNet(space, hidden=2)
    genes = space.random_genes(torch.Generator().manual_seed(0))
    small, _ = net.candidate_model(genes)
    assert space.cost(genes).macs == count_macs(small, (3, 32, 32))[0]
    assert space.cost(genes).params == sum(p.numel() for p in small.parameters())
    net.set_candidate(genes)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_latency_budget_measures_candidates_in_onnxruntime(lenet_ckpt, digits):
    """--max-latency-ms: every scored candidate carries its measured onnxruntime latency inside the window
    (a budget above the model's own latency: a tighter one would make the test depend on timing noise)."""
    from dcomp.compressors.metaprune.apply import apply_search
    from dcomp.stages import StageContext

    cfg = SearchConfig(max_latency_ms="10x", min_fraction=0.01, grid=[0.25, 0.5, 0.75, 1.0], latency_batch=4,
                       **{**TINY, "iterations": 1, "population": 3})
    r = apply_search(lenet_ckpt, cfg, StageContext(data=digits, seed=0, threads=1))
    lo, hi = r.metrics["window"]["latency_ms"]
    assert 0 < lo < hi
    assert r.metrics["candidates"] and all(lo <= c["latency_ms"] <= hi for c in r.metrics["candidates"])
    assert r.metrics["winner"]["latency_ms"] <= hi
