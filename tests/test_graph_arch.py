"""graph_arch: an architecture stored as plain data rebuilds to the same computation, and a
tampered description is refused with one line instead of running anything."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from dcomp.models import ZOO, build_zoo
from dcomp.models.graph_arch import DescribeError, GraphFormatError, describe, rebuild


def _round_trip(model: nn.Module, x: torch.Tensor) -> dict:
    model.eval()
    desc = describe(model, x)
    back = rebuild(json.loads(json.dumps(desc)))  # through JSON, as a .dcz header holds it
    assert list(back.state_dict()) == list(model.state_dict())  # same keys, same order
    back.load_state_dict(model.state_dict())
    back.eval()
    with torch.no_grad():
        assert torch.equal(model(x), back(x))
    return desc


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_models_round_trip(name):
    torch.manual_seed(0)
    _round_trip(build_zoo(name, (1, 28, 28), 10), torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize("factory", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_round_trip(factory):
    from dcomp.models.vision import vision_models

    torch.manual_seed(0)
    model = getattr(vision_models(), factory)(num_classes=10)
    _round_trip(model, torch.randn(1, 3, 32, 32))


class Custom(nn.Module):
    """Functional calls, methods, a parameter on a container, getattr of .shape, constants."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(4))
        self.register_buffer("shift", torch.zeros(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 10))

    def forward(self, x):
        y = torch.nn.functional.relu(self.conv(x))
        y = y * self.scale.view(1, -1, 1, 1) + self.shift[None, :, None, None]
        y = torch.nn.functional.adaptive_avg_pool2d(y, (4, 4))
        n = y.shape[0]
        return self.head(y.reshape(n, 4, 4, 4)).clamp(min=-float("inf"), max=1e6)


def test_custom_forward_with_functions_methods_and_constants_round_trips():
    torch.manual_seed(0)
    desc = _round_trip(Custom(), torch.randn(2, 1, 8, 8))
    assert {"name": "scale", "kind": "parameter", "shape": [4], "dtype": "float32"} in desc["tensors"]


def test_what_the_description_cannot_hold_is_a_describe_error():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else self.fc(-x)

    class Unlisted(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 2)

        def forward(self, x):
            return self.rnn(x)[0]

    class StrangeFunction(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real

    with pytest.raises(DescribeError, match="cannot trace"):
        describe(Dynamic(), torch.randn(1, 4))
    with pytest.raises(DescribeError, match="GRU"):
        describe(Unlisted(), torch.randn(3, 1, 4))
    with pytest.raises(DescribeError, match="fft"):
        describe(StrangeFunction(), torch.randn(1, 4))


def _lenet_desc() -> dict:
    return describe(build_zoo("lenet-300-100", (1, 8, 8), 10), torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("tamper, msg", [
    (lambda d: d["nodes"][2].update(op="call_function", target="os.system"), "os.system"),
    (lambda d: d["nodes"][2].update(op="call_function", target="builtins.eval"), "builtins.eval"),
    (lambda d: d["nodes"][2].update(op="call_function", target="builtins.getattr",
                                    args=[{"node": "x"}, "__class__"]), "attribute"),
    (lambda d: d["nodes"][2].update(op="call_method", target="__reduce_ex__"), "__reduce_ex__"),
    (lambda d: d["nodes"][2].update(op="call_method", target="view", args=["abc"]), "computed value"),
    (lambda d: d["nodes"][2].update(op="get_attr", target="__dict__"), "__dict__"),
    (lambda d: d["modules"].__setitem__(0, {"name": "flatten", "type": "Popen"}), "Popen"),
    (lambda d: d["modules"][1].update(name="fc1.__class__"), "valid name"),
    (lambda d: d["modules"][1].update(name="training"), "training"),
    (lambda d: d["nodes"][1].update(name="x = __import__('os')"), "valid name"),
    (lambda d: d["nodes"][2]["args"].__setitem__(0, {"node": "later"}), "not defined before"),
    (lambda d: d["nodes"][2]["args"].__setitem__(0, {"code": "print(1)"}), "not plain data"),
    (lambda d: d["modules"][1]["args"].update(in_features=1 << 40), "weights"),
    (lambda d: d["modules"][1]["args"].update(bogus=1), "bogus"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d["nodes"].pop(), "no output"),
])
def test_tampered_descriptions_are_refused(tamper, msg):
    d = copy.deepcopy(_lenet_desc())
    tamper(d)
    with pytest.raises(GraphFormatError, match=msg) as e:
        rebuild(d)
    assert "\n" not in str(e.value)


def test_a_checkpoint_with_a_graph_arch_rebuilds_at_shrunk_shapes():
    """Structured pruning stores smaller weights; the graph is built at the original shapes and
    conform_to_state_dict resizes it (the same order as for zoo and factory architectures)."""
    from dcomp.formats.checkpoint import Checkpoint, read_checkpoint

    m = build_zoo("lenet-300-100", (1, 8, 8), 10, hidden=(40, 20)).eval()
    arch = {"kind": "graph", "graph": describe(m, torch.zeros(1, 1, 8, 8))}
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["fc1.weight"], sd["fc1.bias"], sd["fc2.weight"] = sd["fc1.weight"][:30], sd["fc1.bias"][:30], sd["fc2.weight"][:, :30]
    ck = Checkpoint(arch=arch, state_dict=sd, input_shape=[1, 8, 8], num_classes=10)
    back = read_checkpoint(ck.to_bytes())
    model = back.build_model()
    assert model.fc1.out_features == 30 and model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_a_graph_arch_survives_a_dcz_round_trip():
    from dcomp.formats import dcz
    from dcomp.formats.checkpoint import Checkpoint

    m = build_zoo("resnet-small", (1, 8, 8), 10).eval()
    ck = Checkpoint(arch={"kind": "graph", "graph": describe(m, torch.zeros(1, 1, 8, 8))}, state_dict={},
                    input_shape=[1, 8, 8], num_classes=10)
    ck.update_from_model(m)
    back = dcz.read_bytes(dcz.pack(ck)[0])
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(back.build_model()(x), m(x))


def test_a_graph_arch_convnext_shrinks_and_rebuilds_in_a_fresh_process(tmp_path):
    """torchvision's LayerNorm2d is traced into F.layer_norm(x, (C,), w, b): in a graph description (C,) is
    a literal. Structured pruning must shrink it with the weight, and the checkpoint must rebuild in a new
    process from plain data (weights_only load, no pickle, no factory)."""
    import subprocess
    import sys

    from dcomp.compressors.graph import analyse, shrink_checkpoint
    from dcomp.formats.checkpoint import Checkpoint
    from tests.test_graph import _half, convnext_like

    torch.manual_seed(0)
    shape = (3, 16, 16)
    orig = convnext_like().eval()
    ck = Checkpoint(arch={"kind": "graph", "graph": describe(orig, torch.zeros(1, *shape))}, state_dict={},
                    input_shape=list(shape), num_classes=10)
    ck.update_from_model(orig)
    model = ck.build_model()
    graph = analyse(model, shape)
    out, small = shrink_checkpoint(ck, model=model, graph=graph, removed=_half(graph))
    assert out.arch["kind"] == "graph" and out.param_count() < 0.5 * ck.param_count()
    ln = [n for n in small.graph.nodes if n.op == "call_function" and "layer_norm" in str(n.target)]
    assert ln and all(n.args[1][0] < 16 for n in ln)   # the literals shrank with the weights
    out.save(tmp_path / "s.pt")
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; from dcomp.formats.checkpoint import Checkpoint\n"
            "m = Checkpoint.from_dict(torch.load(sys.argv[1], weights_only=True)).build_model()\n"
            "torch.save(m(torch.load(sys.argv[2])), sys.argv[3])\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.pt"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), small.eval()(x))
