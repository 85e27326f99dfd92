"""Every kind of model file a user may hand to dcomp."""

import io

import pytest
import torch
from safetensors.torch import save as st_save

from dcomp.errors import FormatError, UsageError
from dcomp.formats.checkpoint import PickledObjectError
from dcomp.formats.checkpoint import read_checkpoint
from dcomp.formats.model_input import load_model, parse_arch_kwargs
from dcomp.models import build_zoo

SHAPE = lambda: ([1, 8, 8], 10)  # noqa: E731 - what --data digits gives


def _model():
    torch.manual_seed(0)
    return build_zoo("lenet-300-100", (1, 8, 8), 10).eval()


def _same_outputs(ckpt, model):
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(ckpt.build_model(trust_pickle=True)(x), model(x), atol=1e-6)


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_state_dict_with_zoo_arch():
    m = _model()
    ckpt = load_model(_saved(m.state_dict()), "sd.pt", arch="lenet-300-100", shape_of=SHAPE)
    assert ckpt.arch == {"kind": "zoo", "name": "lenet-300-100", "kwargs": {}}
    _same_outputs(ckpt, m)


def test_wrapped_state_dict_is_found():
    m = _model()
    ckpt = load_model(_saved({"state_dict": m.state_dict(), "epoch": 3}), "w.pt", arch="lenet-300-100", shape_of=SHAPE)
    _same_outputs(ckpt, m)


def test_state_dict_with_import_arch_and_kwargs():
    m = build_zoo("lenet-300-100", (1, 8, 8), 10, hidden=(40, 20)).eval()
    ckpt = load_model(_saved(m.state_dict()), "sd.pt", arch="dcomp.models.zoo:LeNet300100",
                      arch_kwargs={"input_shape": [1, 8, 8], "num_classes": 10, "hidden": [40, 20]}, shape_of=SHAPE)
    assert ckpt.arch["kind"] == "graph"  # typed factory, stored as data: later commands import nothing
    assert ckpt.provenance[-1]["params"]["arch"] == "dcomp.models.zoo:LeNet300100"
    _same_outputs(ckpt, m)


def test_safetensors_state_dict():
    m = _model()
    ckpt = load_model(st_save(m.state_dict()), "m.safetensors", arch="lenet-300-100", shape_of=SHAPE)
    _same_outputs(ckpt, m)


def test_torchscript_archive():
    m = _model()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(m), buf)
    ckpt = load_model(buf.getvalue(), "m.ts", shape_of=SHAPE)
    assert ckpt.arch["kind"] == "torchscript"
    _same_outputs(ckpt, m)


def test_pickled_module_needs_trust_and_then_becomes_a_graph():
    m = _model()
    data = _saved(m)
    with pytest.raises(PickledObjectError, match="runs code.*--trust-pickle"):
        load_model(data, "m.pt", shape_of=SHAPE)
    ckpt = load_model(data, "m.pt", trust_pickle=True, shape_of=SHAPE)
    assert ckpt.arch["kind"] == "graph"  # plain data: later stages need no trust
    back = read_checkpoint(ckpt.to_bytes())
    _same_outputs(back, m)


def test_state_dict_without_arch_says_pass_arch():
    with pytest.raises(UsageError, match="--arch"):
        load_model(_saved(_model().state_dict()), "sd.pt", shape_of=SHAPE)


def test_state_dict_that_does_not_fit_names_the_problem():
    sd = _model().state_dict()
    sd["fc3.weight"] = torch.zeros(10, 7)
    with pytest.raises(Exception, match="fc3"):
        load_model(_saved(sd), "sd.pt", arch="lenet-300-100", shape_of=SHAPE)


@pytest.mark.parametrize("data", [b"", b"random text, not a model", b"PK\x03\x04garbage", bytes(range(256))])
def test_foreign_or_broken_bytes_give_format_error(data):
    with pytest.raises((FormatError, UsageError)):
        load_model(data, "x", shape_of=SHAPE)


def test_arch_kwargs_parsing():
    assert parse_arch_kwargs('{"hidden": [500, 150]}') == {"hidden": [500, 150]}
    assert parse_arch_kwargs("blocks=2,widths=[8,16,32]") == {"blocks": 2, "widths": [8, 16, 32]}
    with pytest.raises(UsageError):
        parse_arch_kwargs("novalue")


def test_a_file_naming_a_function_as_architecture_is_not_called(tmp_path):
    """A checkpoint is plain data, but its arch may name a factory: a factory named by a file is
    never imported or called without --trust-pickle, or loading a file could run `os:system`."""
    from dcomp.errors import DcompError
    from dcomp.formats.checkpoint import Checkpoint, read_checkpoint

    marker = tmp_path / "pwned"
    ckpt = Checkpoint(arch={"kind": "import", "target": "os:system", "kwargs": {"command": f"touch {marker}"}},
                      state_dict={}, input_shape=[1, 8, 8], num_classes=10)
    back = read_checkpoint(ckpt.to_bytes())
    with pytest.raises(DcompError, match="os:system.*--arch os:system or pass --trust-pickle"):
        back.build_model()
    assert not marker.exists()
