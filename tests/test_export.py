"""ONNX export: every zoo model and variant loads in onnxruntime and matches PyTorch; sparse files
are smaller; shrunk checkpoints export at their smaller shapes; bad input fails cleanly."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from dcomp.cli.app import app
from dcomp.errors import DcompError
from dcomp.formats.checkpoint import Checkpoint
from dcomp.formats.onnx_export import (VARIANTS, ExportConfig, compare_with_torch, export_checkpoint,
                                      export_module, shrunk_layers)
from dcomp.models import build_zoo

ZOO_SHAPES = {"lenet-300-100": [1, 8, 8], "lenet-5": [1, 16, 16], "vgg-small": [1, 8, 8], "resnet-small": [1, 8, 8]}


def make_ckpt(name: str, sparsity: float = 0.0, seed: int = 0, **kwargs) -> Checkpoint:
    torch.manual_seed(seed)
    shape = ZOO_SHAPES[name]
    m = build_zoo(name, shape, 10, **kwargs)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):  # non-trivial statistics, so BN folding is tested
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1, 0.2)
                mod.bias.normal_(0, 0.2)
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        masks = {}
        for k, v in sd.items():
            if sparsity and k.endswith("weight") and v.dim() >= 2:
                keep = torch.rand(v.shape) >= sparsity
                v.mul_(keep)
                masks[k] = keep
    return Checkpoint(arch={"kind": "zoo", "name": name, "kwargs": kwargs}, state_dict=sd, input_shape=shape,
                      num_classes=10, masks=masks)


def run_ort(data: bytes, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name", list(ZOO_SHAPES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_zoo_model_and_variant_matches_pytorch(name, variant):
    ckpt = make_ckpt(name, sparsity=0.9)
    res = export_checkpoint(ckpt, ExportConfig(variant=variant))
    proto = onnx.load_from_string(res.onnx_bytes)
    onnx.checker.check_model(proto)
    assert proto.ir_version <= 13  # onnxruntime 1.31 loads IR <= 13
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    model = ckpt.build_model()
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, *ckpt.input_shape, generator=torch.Generator().manual_seed(batch))
        got = run_ort(res.onnx_bytes, x.numpy())
        with torch.no_grad():
            ref = model(x).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    assert res.info["max_rel_diff"] <= 1e-5
    if variant == "sparse":
        assert len(proto.graph.sparse_initializer) > 0


def test_sparse_variant_is_smaller_and_dense_is_not_sparse():
    ckpt = make_ckpt("lenet-300-100", sparsity=0.9)
    dense = export_checkpoint(ckpt, ExportConfig(variant="dense"))
    sparse = export_checkpoint(ckpt, ExportConfig(variant="sparse"))
    assert len(onnx.load_from_string(dense.onnx_bytes).graph.sparse_initializer) == 0
    assert len(sparse.onnx_bytes) < 0.45 * len(dense.onnx_bytes)
    names = {s["name"] for s in sparse.info["sparse_initializers"]}
    assert len(names) == 3 and all(s["sparsity"] >= 0.85 for s in sparse.info["sparse_initializers"])


def test_sparse_variant_of_a_dense_model_says_nothing_was_stored_sparse():
    res = export_checkpoint(make_ckpt("lenet-300-100"), ExportConfig(variant="sparse"))
    assert res.info["sparse_initializers"] == []
    assert "same as 'dense'" in res.info["note"]


def test_shrunk_checkpoint_exports_at_its_smaller_shapes():
    # a checkpoint whose layers were physically removed: default architecture, half-width weights
    small = make_ckpt("vgg-small", widths=[16, 16, "M", 32, 32, "M", 64, 64, "M"])
    shrunk = Checkpoint(arch={"kind": "zoo", "name": "vgg-small", "kwargs": {}}, state_dict=small.state_dict,
                        input_shape=small.input_shape, num_classes=10)
    layers = shrunk_layers(shrunk)
    assert {"name": "features.0.weight", "built": [32, 1, 3, 3], "stored": [16, 1, 3, 3]} in layers
    res = export_checkpoint(shrunk, ExportConfig(variant="shrunk"))
    assert res.info["shrunk_layers"] == layers and "note" not in res.info
    full = export_checkpoint(make_ckpt("vgg-small"), ExportConfig(variant="dense"))
    assert len(res.onnx_bytes) < 0.3 * len(full.onnx_bytes)
    conv_out = [onnx.numpy_helper.to_array(i).shape[0] for i in onnx.load_from_string(res.onnx_bytes).graph.initializer
                if len(i.dims) == 4]
    assert max(conv_out) == 64


def test_shrunk_on_an_unshrunk_model_says_so():
    res = export_checkpoint(make_ckpt("lenet-300-100"), ExportConfig(variant="shrunk"))
    assert res.info["shrunk_layers"] == [] and "prune --method filter" in res.info["note"]


def test_unexportable_layer_is_named():
    class FFT(torch.nn.Module):
        def forward(self, x):
            return torch.fft.rfft(x, dim=-1).abs()

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.ReLU(), FFT()))
    with pytest.raises(DcompError, match=r"cannot export layer '1\.1' \(FFT\).*aten::fft_rfft"):
        export_module(model, [8])


def test_mismatch_with_pytorch_is_an_error():
    model = torch.nn.Linear(4, 3)
    data = export_module(model, [4])
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(DcompError, match="differs from PyTorch"):
        compare_with_torch(data, model, [4])


# ---- CLI ----------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_export_writes_a_checked_file(tmp_path):
    src = tmp_path / "m.pt"
    make_ckpt("lenet-300-100", sparsity=0.9).save(src)
    out = tmp_path / "m.onnx"
    r = runner.invoke(app, ["export", str(src), "-o", str(out), "--variant", "sparse", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["variant"] == "sparse" and summary["file_bytes"] == out.stat().st_size
    onnx.checker.check_model(onnx.load(str(out)))


def test_cli_export_from_a_dcz(tmp_path):
    src, dcz, out = tmp_path / "m.pt", tmp_path / "m.dcz", tmp_path / "m.onnx"
    ckpt = make_ckpt("lenet-300-100", sparsity=0.9)
    ckpt.save(src)
    r = runner.invoke(app, ["pack", str(src), "-o", str(dcz)])
    if r.exit_code != 0 or not dcz.exists():
        pytest.skip(f"dcomp pack is not available here: {r.output.strip()[:120]}")
    r = runner.invoke(app, ["export", str(dcz), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        ref = ckpt.build_model()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_ort(out.read_bytes(), x), ref, rtol=1e-5, atol=1e-5)


def test_cli_export_bad_variant_and_opset_write_nothing(tmp_path):
    src = tmp_path / "m.pt"
    make_ckpt("lenet-300-100").save(src)
    out = tmp_path / "m.onnx"
    r = runner.invoke(app, ["export", str(src), "-o", str(out), "--variant", "tiny"])
    assert r.exit_code == 2 and "--variant: must be dense, shrunk or sparse" in r.output
    r = runner.invoke(app, ["export", str(src), "-o", str(out), "--opset", "9"])
    assert r.exit_code == 2 and "--opset" in r.output
    assert not out.exists()


def test_cli_export_names_the_layer_that_cannot_be_exported(tmp_path, monkeypatch):
    (tmp_path / "fftnet.py").write_text(textwrap.dedent("""
        import torch
        class FFT(torch.nn.Module):
            def forward(self, x):
                return torch.fft.rfft(x, dim=-1).abs()
        def make():
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), FFT())
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = Checkpoint(arch={"kind": "import", "target": "fftnet:make", "kwargs": {}},
                      state_dict={k: v for k, v in __import__("fftnet").make().state_dict().items()},
                      input_shape=[1, 8, 8], num_classes=6)
    src, out = tmp_path / "f.pt", tmp_path / "f.onnx"
    ckpt.save(src)
    r = runner.invoke(app, ["export", str(src), "-o", str(out), "--trust-pickle"])  # a factory function named by a file
    assert r.exit_code == 1
    assert "cannot export layer '2' (FFT)" in r.output and "Torch IR graph" not in r.output
    assert not out.exists()


def test_cli_export_refuses_to_overwrite_its_input(tmp_path):
    src = tmp_path / "m.pt"
    make_ckpt("lenet-300-100").save(src)
    before = src.read_bytes()
    r = runner.invoke(app, ["export", str(src), "-o", str(src)])
    assert r.exit_code == 2 and "overwrite the input" in r.output
    assert src.read_bytes() == before
