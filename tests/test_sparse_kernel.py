"""The compiled sparse-codebook kernel against dense references, and the hybrid runner's per-layer
choice: outputs equal dense onnxruntime, and a layer whose sparse cost is higher runs dense."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dcomp.formats.onnx_export import export_module
from dcomp.models import build_zoo
from dcomp.runtime.kernels import Compressed, LinearChain, MaxPool, SparseConv2d, SparseLinear, mm_source, row_bounds
from dcomp.runtime.runner import OrtRunner
from dcomp.runtime.sparse import HybridRunner, choose_layers, choose_plan, nearest_batch


def sparse_weight(rng, shape, sparsity: float, levels: int | None) -> np.ndarray:
    """Random weight with ``sparsity`` zeros; ``levels`` distinct non-zero values (a codebook) or
    None for unshared float values."""
    w = rng.standard_normal(shape).astype(np.float32)
    if levels is not None:
        book = rng.standard_normal(levels).astype(np.float32)
        book[book == 0] = 1.0
        w = book[rng.integers(0, levels, shape)]
    w[rng.random(shape) < sparsity] = 0
    return w


def close(out, ref):
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("seed", range(6))
def test_linear_kernel_equals_dense_product(seed):
    rng = np.random.default_rng(seed)
    for trial in range(6):
        out_f, in_f = (int(v) for v in rng.integers(1, 300, 2))
        sparsity = float(rng.choice([0.0, 0.5, 0.9, 0.99, 1.0]))
        levels = [2, 32, 256, None][trial % 4]
        w = sparse_weight(rng, (out_f, in_f), sparsity, levels)
        w[rng.random(out_f) < 0.2] = 0  # empty rows
        bias = rng.standard_normal(out_f).astype(np.float32)
        relu = bool(trial % 2)
        for threads in (1, 2):
            layer = SparseLinear(w, bias, threads=threads, relu=relu)
            distinct = np.unique(w[w != 0]).size  # a codebook whenever <= 255 distinct values, else raw
            assert (layer.w.pk.dtype == np.uint32) == (0 < distinct <= 255)
            np.testing.assert_array_equal(layer.w.to_dense(), w)
            for batch in (1, 2, 7, 8, 9, 16, 33, 64, 100):
                x = rng.standard_normal((batch, in_f)).astype(np.float32)
                ref = x.astype(np.float64) @ w.T.astype(np.float64) + bias
                close(layer(x), np.maximum(ref, 0) if relu else ref)


def test_linear_kernel_large_layer_uses_the_pool_and_is_exact():
    rng = np.random.default_rng(0)
    w = sparse_weight(rng, (1024, 2048), 0.9, 32)
    layer = SparseLinear(w, None, threads=2)
    assert row_bounds(layer.w.rowptr, layer.work_per_sample, 2).size > 2  # enough work to be shared
    for batch in (1, 8, 64):
        x = rng.standard_normal((batch, 2048)).astype(np.float32)
        close(layer(x), x.astype(np.float64) @ w.T.astype(np.float64))


@pytest.mark.parametrize("threads", [1, 2])
def test_linear_chain_equals_the_layers_one_by_one(threads):
    rng = np.random.default_rng(3)
    sizes = [700, 300, 1, 129]  # includes a one-wide layer and odd widths
    ws = [sparse_weight(rng, (o, i), s, lv) for o, i, s, lv in
          zip(sizes[1:], sizes[:-1], [0.9, 0.0, 1.0], [32, None, 4])]
    bs = [rng.standard_normal(w.shape[0]).astype(np.float32) for w in ws]
    relus = [True, False, True]
    chain = LinearChain([SparseLinear(w, b, threads=threads) for w, b in zip(ws, bs)], relus)
    for batch in (1, 5, 8, 17, 64):
        x = rng.standard_normal((batch, sizes[0])).astype(np.float32)
        ref = x.astype(np.float64)
        for w, b, r in zip(ws, bs, relus):
            ref = ref @ w.T.astype(np.float64) + b
            ref = np.maximum(ref, 0) if r else ref
        close(chain(x), ref)
        close(chain(x), ref)  # buffers reused: same answer on the second call


@pytest.mark.parametrize("threads,levels", [(2, 32), (3, 32), (2, None)])
def test_threaded_chain_at_batch_1_is_exact_call_after_call(threads, levels):
    # large layers run as one compiled job on every thread, meeting between layers; a small last
    # layer is one chunk; calls come back to back (helpers awake) and after pauses (helpers asleep)
    import time

    rng = np.random.default_rng(7)
    ws = [sparse_weight(rng, (1024, 1024), 0.8, levels), sparse_weight(rng, (1024, 1024), 0.8, levels),
          sparse_weight(rng, (10, 1024), 0.5, levels)]  # codebook layers, or all raw float values
    bs = [rng.standard_normal(w.shape[0]).astype(np.float32) for w in ws]
    relus = [True, True, False]
    chain = LinearChain([SparseLinear(w, b, threads=threads) for w, b in zip(ws, bs)], relus)
    assert all(row_bounds(l.w.rowptr, l.work_per_sample, threads).size > 2 for l in chain.layers[:2])  # shared
    for call in range(60):
        if call % 20 == 19:
            time.sleep(0.005)  # longer than a helper watches for work: it sleeps, then is woken
        x = rng.standard_normal((1, 1024)).astype(np.float32)
        ref = x.astype(np.float64)
        for w, b, r in zip(ws, bs, relus):
            ref = ref @ w.T.astype(np.float64) + b
            ref = np.maximum(ref, 0) if r else ref
        close(chain(x), ref)


def test_pool_atomics_count_exactly_across_threads():
    from dcomp.runtime._atomics import atomic_add, enter_job, leave_job
    from dcomp.runtime.kernels import chunk_pool
    from numba import njit

    @njit(nogil=True)
    def job(counts, ctl, signal):
        if not enter_job(ctl, signal):
            return
        while atomic_add(ctl, 2, 1) < 20000:  # 20,000 tickets shared by every thread
            atomic_add(counts, 0, 1)
        leave_job(ctl)

    pool = chunk_pool(2)
    counts, ctl = np.zeros(1, np.int64), np.zeros(4, np.int64)
    args = (counts, ctl, pool.signal_for(True))
    for _ in range(20):  # the counters are zeroed between calls: each call hands out 20,000 again
        pool.run_compiled(job, args, ctl, lambda: job(*args))
    assert counts[0] == 20 * 20000 and ctl[1] == 0  # every ticket once; no thread left inside


def test_generated_batch_kernels_are_current():
    from pathlib import Path

    import dcomp.runtime.kernels as k

    assert (Path(k.__file__).parent / "_mm_kernels.py").read_text() == mm_source(), \
        "regenerate: python -c 'import dcomp.runtime.kernels as k; print(k.mm_source(), end=\"\")' > dcomp/runtime/_mm_kernels.py"


def test_kernel_reuses_its_buffers_and_checks_the_input_size():
    w = sparse_weight(np.random.default_rng(1), (8, 16), 0.5, 4)
    layer = SparseLinear(w, None)
    x = np.ones((3, 16), np.float32)
    assert layer(x) is layer(x)  # no allocation per call: the same output buffer
    with pytest.raises(ValueError, match="expected 16 input values"):
        layer(np.ones((3, 15), np.float32))


def test_compressed_layout_is_narrow_and_round_trips():
    rng = np.random.default_rng(2)
    w = sparse_weight(rng, (64, 300), 0.95, 32)
    c = Compressed(w)
    assert c.cols.dtype == np.uint16 and c.codes.dtype == np.uint8 and c.codebook.size <= 32
    assert c.nbytes < w.nbytes / 10
    np.testing.assert_array_equal(c.to_dense(), w)
    raw = Compressed(sparse_weight(rng, (64, 300), 0.5, None))
    assert raw.codes is None and raw.vals.dtype == np.float32


@pytest.mark.parametrize("seed", range(4))
def test_conv_kernel_equals_torch_conv(seed):
    rng = np.random.default_rng(seed)
    for trial in range(5):
        cin, cout = (int(v) for v in rng.integers(1, 9, 2))
        k = int(rng.choice([1, 3, 5]))
        stride, pad, dil = int(rng.choice([1, 2])), int(rng.choice([0, 1, 2])), int(rng.choice([1, 2]))
        h = int(rng.integers(max(k * dil, 6), 14))
        w = sparse_weight(rng, (cout, cin, k, k), float(rng.choice([0.0, 0.7, 1.0])), [8, None][trial % 2])
        bias = rng.standard_normal(cout).astype(np.float32)
        conv = nn.Conv2d(cin, cout, k, stride, pad, dil)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(w))
            conv.bias.copy_(torch.from_numpy(bias))
        layer = SparseConv2d(w, bias, (h, h + 1), stride, pad, dil, threads=2, relu=bool(trial % 2))
        for batch in (1, 3):
            x = rng.standard_normal((batch, cin, h, h + 1)).astype(np.float32)
            with torch.no_grad():
                ref = conv(torch.from_numpy(x)).numpy()
            close(layer(x), np.maximum(ref, 0) if layer.relu else ref)
            if stride == 1 and min(ref.shape[2:]) >= 2:  # ReLU and 2x2 max-pooling fused into the write-out
                pooled = nn.functional.max_pool2d(torch.relu(torch.from_numpy(ref)), 2).numpy()
                close(layer(x, True, 2), pooled)


def test_maxpool_with_fused_relu():
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 8)).astype(np.float32)
    ref = torch.relu(nn.functional.max_pool2d(torch.from_numpy(x), 2)).numpy()
    np.testing.assert_array_equal(MaxPool(2, (3, 9, 8), relu=True)(x), ref)


def pruned(model: nn.Module, sparsity: float = 0.9, seed: int = 0, levels: int = 16) -> nn.Module:
    """Prune every Linear/Conv2d weight at random and share its values (a codebook)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight
                book = torch.linspace(float(w.min()), float(w.max()), levels)
                shared = book[(w.reshape(-1, 1) - book).abs().argmin(1)].reshape(w.shape)
                w.copy_(shared * (torch.rand(w.shape, generator=g) >= sparsity))
    return model.eval()


ZOO = [("lenet-300-100", (1, 8, 8)), ("lenet-5", (1, 16, 16)), ("vgg-small", (1, 8, 8)), ("resnet-small", (1, 8, 8))]


@pytest.mark.parametrize("name,shape", ZOO)
def test_hybrid_equals_dense_onnxruntime_on_the_zoo(name, shape):
    torch.manual_seed(0)
    model = pruned(build_zoo(name, shape, 10))
    dense = OrtRunner(export_module(model, shape), 1)
    # every candidate sparse, and a mix (injected costs: every other layer cheaper sparse)
    everything = HybridRunner(model, shape, threads=2, calibrate=None)
    names = everything.plan.sparse_layers
    costs = {n: {1: (1.0, 2.0) if i % 2 == 0 else (2.0, 1.0)} for i, n in enumerate(names)}
    mixed = HybridRunner(model, shape, threads=2, costs=costs)
    assert mixed.choice[1] == {n: ("sparse" if i % 2 == 0 else "dense") for i, n in enumerate(names)}
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
        ref = dense.run(x)
        close(everything.run(x), ref)
        close(mixed.run(x), ref)


def test_layer_costing_more_sparse_runs_dense():
    costs = {"fc1": {1: (0.1e-3, 1.0e-3), 64: (5.0e-3, 2.0e-3)},
             "fc2": {1: (0.5e-3, 0.52e-3), 64: (0.1e-3, 1.0e-3)}}
    choice = choose_layers(costs, margin=1.1)
    assert choice[1] == {"fc1": "sparse", "fc2": "dense"}  # fc2: 4% faster sparse is within the margin
    assert choice[64] == {"fc1": "dense", "fc2": "sparse"}
    assert choose_plan(hybrid_s=1.0, dense_s=2.0) == "hybrid"
    assert choose_plan(hybrid_s=2.0, dense_s=1.0) == "dense"
    assert nearest_batch(1, [1, 8, 64]) == 1 and nearest_batch(2, [1, 8, 64]) == 1
    assert nearest_batch(6, [1, 8, 64]) == 8 and nearest_batch(1000, [1, 8, 64]) == 64


def test_hybrid_runner_with_injected_costs_falls_back_to_dense():
    torch.manual_seed(0)
    shape = (1, 8, 8)
    model = pruned(build_zoo("lenet-300-100", shape, 10))
    all_dense = {n: {1: (2e-3, 1e-3), 8: (2e-3, 1e-3)} for n in ("fc1", "fc2", "fc3")}
    h = HybridRunner(model, shape, threads=1, costs=all_dense)
    assert h.plans == {1: None, 8: None}  # nothing cheaper sparse: the whole model runs dense
    d = h.describe()
    assert d["plans"] == {"1": "dense", "8": "dense"}
    assert all(lay["choice"] == {"1": "dense (whole model)", "8": "dense (whole model)"} for lay in d["layers"])
    assert d["layers"][0]["sparse_ms"]["1"] == 2.0 and d["layers"][0]["dense_ms"]["1"] == 1.0
    x = np.random.default_rng(0).standard_normal((8, *shape), dtype=np.float32)
    close(h.run(x), OrtRunner(export_module(model, shape), 1).run(x))
    split = {"fc1": {1: (1e-3, 2e-3)}, "fc2": {1: (2e-3, 1e-3)}, "fc3": {1: (1e-3, 2e-3)}}
    h = HybridRunner(model, shape, threads=1, costs=split)
    assert h.describe()["plans"]["1"] == "flatten > sparse:fc1 > onnx > sparse:fc3"  # fc2 and its ReLUs: onnxruntime


def test_calibrated_runner_reports_its_choice():
    torch.manual_seed(0)
    shape = (1, 8, 8)
    model = pruned(build_zoo("lenet-300-100", shape, 10), sparsity=0.95)
    h = HybridRunner(model, shape, threads=1, calibrate=[1, 4], calib_seconds=0.01)
    d = h.describe()
    assert set(d["plans"]) == {"1", "4"}
    for lay in d["layers"]:
        assert set(lay["choice"]) == {"1", "4"} and lay["sparse_ms"]["1"] > 0 and lay["dense_ms"]["1"] > 0
    x = np.random.default_rng(0).standard_normal((4, *shape), dtype=np.float32)
    close(h.run(x), OrtRunner(export_module(model, shape), 1).run(x))


def test_cli_bench_shows_the_per_layer_choice(tmp_path):
    import json

    from typer.testing import CliRunner

    from dcomp.cli.app import app
    from dcomp.formats.checkpoint import Checkpoint

    torch.manual_seed(0)
    shape = (1, 8, 8)
    model = pruned(build_zoo("lenet-300-100", shape, 10), sparsity=0.95)
    p = tmp_path / "m.pt"
    Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}}, state_dict=model.state_dict(),
               input_shape=list(shape), num_classes=10).save(p)
    args = ["bench", str(p), "--batch", "1,2", "--threads", "1", "--iters", "2", "--warmup", "0", "--seconds", "0.01",
            "--no-sweep", "--no-eager", "--variants", "dense,hybrid", "--data", "none"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "per-layer choice" in r.output and "fc1" in r.output
    s = json.loads(CliRunner().invoke(app, ["--json", *args]).stdout)
    hy = next(t for t in s["targets"] if t["name"] == "hybrid")
    for lay in hy["info"]["layers"]:
        assert set(lay["choice"]) == {"1", "2"}
        assert all(v.startswith("sparse") or v.startswith("dense") for v in lay["choice"].values())


def test_batchnorm_is_folded_into_the_sparse_convolution():
    from dcomp.runtime.sparse import fold_batchnorm

    torch.manual_seed(0)
    shape = (1, 16, 16)
    model = build_zoo("vgg-small", shape, 10)
    with torch.no_grad():  # BatchNorm that does something: random statistics and affine terms
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    model = pruned(model, sparsity=0.9)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the caller's model is untouched
    h = HybridRunner(model, shape, threads=2, calibrate=None)
    plan = h.describe()["plans"]["1"]
    assert plan.startswith("sparse:features.0+relu > sparse:features.3+relu+pool2")  # no onnxruntime step for BN
    x = np.random.default_rng(0).standard_normal((3, *shape), dtype=np.float32)
    close(h.run(x), OrtRunner(export_module(model, shape), 1).run(x))


def test_global_average_pool_runs_natively_and_relu_after_it_is_not_hoisted():
    torch.manual_seed(0)
    shape = (2, 6, 6)
    before = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    after = nn.Sequential(nn.Conv2d(2, 8, 3), nn.AdaptiveAvgPool2d(1), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4))
    for model, native in ((before, True), (after, False)):
        model = pruned(model, sparsity=0.5)
        with torch.no_grad():
            model[0].bias.copy_(torch.linspace(-1, 1, 8))  # some channel means negative: ReLU placement matters
        h = HybridRunner(model, shape, threads=1, calibrate=None)
        assert ("gap" in h.describe()["plans"]["1"]) == native
        x = np.random.default_rng(0).standard_normal((3, *shape), dtype=np.float32)
        close(h.run(x), OrtRunner(export_module(model, shape), 1).run(x))
