"""The runtime: hybrid sparse path equals PyTorch, break-even arithmetic, bench summary shape,
and clear errors for bad batch sizes and a baseline of another architecture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dcomp.cli.app import app
from dcomp.errors import DcompError, UsageError
from dcomp.formats.checkpoint import Checkpoint
from dcomp.models import build_zoo
from dcomp.runtime.bench import BenchConfig, LinearStack, check_same_architecture, parse_int_list, run_bench
from dcomp.runtime.sparse import HybridRunner, SparseLinear, break_even, plan_hybrid, speed_words

runner = CliRunner()


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """run_bench and --threads set torch's thread count for the process; put it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def pruned(model: nn.Module, sparsity: float = 0.9, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= sparsity)
    return model.eval()


def ckpt_of(model: nn.Module, name: str, shape, classes=10) -> Checkpoint:
    return Checkpoint(arch={"kind": "zoo", "name": name, "kwargs": {}},
                      state_dict={k: v.clone() for k, v in model.state_dict().items()},
                      input_shape=list(shape), num_classes=classes)


@pytest.mark.parametrize("name,shape", [("lenet-300-100", (1, 8, 8)), ("lenet-5", (1, 16, 16)),
                                        ("vgg-small", (1, 8, 8)), ("resnet-small", (1, 8, 8))])
def test_hybrid_runner_equals_pytorch(name, shape):
    torch.manual_seed(0)
    model = pruned(build_zoo(name, shape, 10))
    h = HybridRunner(model, shape, threads=1, calibrate=None)  # no calibration: every candidate sparse
    assert h.plan.sparse_layers  # the classifier layers went sparse
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(h.run(x), ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


def test_mlp_becomes_a_chain_of_sparse_layers():
    h = HybridRunner(pruned(build_zoo("lenet-300-100", (1, 8, 8), 10)), (1, 8, 8), threads=1, calibrate=None)
    # no onnxruntime session left: flatten is a reshape, each ReLU runs inside the kernel before it
    assert h.describe()["plans"]["1"] == "flatten > sparse:fc1+relu > sparse:fc2+relu > sparse:fc3"


def test_numba_kernel_equals_torch_kernel():
    w = torch.randn(64, 96)
    w[torch.rand(64, 96) < 0.9] = 0
    b = torch.randn(64)
    a, n = SparseLinear(w, b, "torch"), SparseLinear(w, b, "numba")
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 96), dtype=np.float32)
        ref = x @ w.numpy().T + b.numpy()
        np.testing.assert_allclose(a(x), ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(n(x), ref, rtol=1e-5, atol=1e-5)
    assert a.nnz == int((w != 0).sum()) and abs(a.sparsity - 0.9) < 0.05


def test_linear_with_a_skip_connection_across_it_is_not_cut():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(self.fc1(x) + x)

    plan = plan_hybrid(pruned(Skip()), (16,))
    assert plan.sparse_layers == ["fc2"]
    assert plan.skipped[0]["layer"] == "fc1" and "skip connection" in plan.skipped[0]["why"]


def test_dense_model_has_nothing_to_run_sparse():
    with pytest.raises(DcompError, match="nothing to run sparse"):
        HybridRunner(build_zoo("lenet-300-100", (1, 8, 8), 10), (1, 8, 8), threads=1)


def test_break_even_interpolates_and_says_never():
    rows = [{"batch": 1, "sparsity": s, "speedup": v} for s, v in [(0.5, 0.2), (0.8, 0.5), (0.9, 1.5), (0.95, 3.0)]]
    assert break_even(rows, 1) == pytest.approx(0.85)
    assert break_even([{**r, "speedup": 0.5} for r in rows], 1) is None
    assert speed_words(0.6) == "slower: 0.60x" and speed_words(2.0) == "2.00x faster"
    assert speed_words(0.6, "dense") == "slower than dense: 0.60x" and speed_words(0.004) == "slower: 0.004x"


@pytest.mark.parametrize("text", ["0", "-1", "a", "1.5", "1,,8", ""])
def test_batch_sizes_must_be_positive_integers(text):
    with pytest.raises(UsageError, match="positive integers"):
        parse_int_list(text)
    assert parse_int_list("1, 8,64") == [1, 8, 64]


def test_baseline_of_another_architecture_is_refused():
    a = ckpt_of(build_zoo("lenet-300-100", (1, 8, 8), 10), "lenet-300-100", (1, 8, 8))
    b = ckpt_of(build_zoo("vgg-small", (1, 8, 8), 10), "vgg-small", (1, 8, 8))
    with pytest.raises(UsageError, match="different architecture"):
        check_same_architecture(a, b)
    c = ckpt_of(build_zoo("lenet-300-100", (1, 8, 8), 10, hidden=(50, 20)), "lenet-300-100", (1, 8, 8))
    check_same_architecture(a, c)  # same layers at other sizes (structured pruning): fine


def test_run_bench_summary_has_every_target():
    torch.manual_seed(0)
    base = build_zoo("lenet-300-100", (1, 8, 8), 10).eval()
    model = pruned(build_zoo("lenet-300-100", (1, 8, 8), 10))
    model.load_state_dict(base.state_dict())
    pruned(model)
    from dcomp.data import load_dataset

    ds = load_dataset("digits")
    cfg = BenchConfig(batches=[1, 4], warmup=1, iters=3, seconds=0.01, sweep_sparsities=[0.9], sweep_seconds=0.01)
    s = run_bench(ckpt_of(model, "lenet-300-100", (1, 8, 8)), cfg, threads=1,
                  baseline=ckpt_of(base, "lenet-300-100", (1, 8, 8)), data=ds)
    names = [t["name"] for t in s["targets"]]
    assert names == ["baseline dense", "dense", "sparse", "hybrid", "pytorch", "baseline pytorch"]
    assert s["reference"] == "baseline dense"
    by = {t["name"]: t for t in s["targets"]}
    for t in s["targets"]:
        assert [r["batch"] for r in t["results"]] == [1, 4]
        r = t["results"][0]
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput_per_s"] > 0
    # the same weights give the same accuracy in every engine
    assert by["dense"]["top1"] == by["sparse"]["top1"] == by["hybrid"]["top1"] == by["pytorch"]["top1"]
    assert by["sparse"]["model_bytes"] < by["dense"]["model_bytes"]
    assert by["hybrid"]["info"]["max_rel_diff_vs_pytorch"] < 1e-5
    assert any("shrunk: skipped" in n for n in s["notes"])
    assert set(s["sweep"]["break_even"]) == {"300x64", "100x300", "10x100"}


def test_linear_stack_factory_builds_square_layers():
    m = LinearStack(width=32, depth=3, out=5)
    assert [tuple(l.weight.shape) for l in m.layers if isinstance(l, nn.Linear)] == [(32, 32), (32, 32), (5, 32)]


# ---- CLI ----------------------------------------------------------------------------------------

def _save(tmp_path, name="m.pt", arch="lenet-300-100", shape=(1, 8, 8), sparsity=0.9):
    p = tmp_path / name
    ckpt_of(pruned(build_zoo(arch, shape, 10), sparsity), arch, shape).save(p)
    return p


def test_cli_bench_json(tmp_path):
    m = _save(tmp_path)
    r = runner.invoke(app, ["bench", str(m), "--batch", "1,2", "--threads", "1", "--iters", "2", "--warmup", "0",
                            "--seconds", "0.01", "--no-sweep", "--variants", "dense,hybrid", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert [t["name"] for t in s["targets"]] == ["dense", "hybrid", "pytorch"]
    assert s["threads"] == 1 and s["batches"] == [1, 2] and "sweep" not in s


def test_cli_bench_bad_batch(tmp_path):
    m = _save(tmp_path)
    r = runner.invoke(app, ["bench", str(m), "--batch", "1,0"])
    assert r.exit_code == 2 and "--batch takes positive integers" in r.output


def test_cli_bench_bad_variant(tmp_path):
    m = _save(tmp_path)
    r = runner.invoke(app, ["bench", str(m), "--variants", "dense,fast"])
    assert r.exit_code == 2 and "--variants" in r.output and "fast" in r.output


def test_cli_bench_baseline_of_another_architecture(tmp_path):
    m = _save(tmp_path)
    b = _save(tmp_path, "b.pt", arch="vgg-small")
    r = runner.invoke(app, ["bench", str(m), "--baseline", str(b), "--no-sweep"])
    assert r.exit_code == 2
    assert "--baseline is a different architecture (zoo/vgg-small)" in r.output


def test_row_chunks_cover_every_row_once_balanced_by_non_zeros():
    from dcomp.runtime.sparse import row_chunks

    rowptr = np.array([0, 10, 10, 20, 30, 40], np.int32)  # 5 rows, 40 non-zeros
    chunks = row_chunks(rowptr, 2)
    assert chunks[0][0] == 0 and chunks[-1][1] == 5 and all(a < b for a, b in chunks)
    assert all(c[1] == d[0] for c, d in zip(chunks, chunks[1:]))


# ---- labels: spread over interleaved rounds (issue 19 item 5) ---------------------------------------

class _Sleeper:
    def __init__(self, seconds):
        self.seconds = seconds

    def run(self, x):
        import time as _t

        _t.sleep(self.seconds)
        return x


class _Matmul:
    def __init__(self):
        import numpy as _np

        self.w = _np.random.default_rng(0).standard_normal((256, 256)).astype("float32")

    def run(self, x):
        return x @ self.w


def _results(runners, x):
    from dcomp.runtime.bench import compare, percentiles, spread, time_rounds

    lats, rounds = time_rounds(runners, x, warmup=2, iters=60, seconds=0.5)
    res = [{**percentiles(lat), **spread(rd)} for lat, rd in zip(lats, rounds)]
    return [compare(r, res[0]) | r for r in res]


def test_identical_computations_are_called_the_same():
    import numpy as _np

    from dcomp.runtime.bench import speed_label

    x = _np.ones((16, 256), _np.float32)
    m = _Matmul()
    ref, twin = _results([m, m], x)  # the very same computation, timed as two targets
    assert twin["verdict"] == "same", twin
    assert speed_label(twin).startswith("same (") and twin["rounds"] >= 3


def test_a_real_difference_is_called_with_its_interval():
    import numpy as _np

    from dcomp.runtime.bench import speed_label

    ref, fast, slow = _results([_Sleeper(0.004), _Sleeper(0.0005), _Sleeper(0.02)], _np.ones(1))
    assert fast["verdict"] == "faster" and fast["vs_reference_interval"][0] > 1
    assert slow["verdict"] == "slower" and slow["vs_reference_interval"][1] < 1
    assert "faster (" in speed_label(fast) and speed_label(slow).startswith("slower: ")


def test_load_above_the_thread_count_is_a_note(monkeypatch):
    from dcomp.runtime import bench as b

    monkeypatch.setattr(b.os, "getloadavg", lambda: (9.5, 8.0, 7.0))
    assert "load average 9.5 exceeds the 2 threads" in b.load_note(2)
    monkeypatch.setattr(b.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert b.load_note(2) is None
