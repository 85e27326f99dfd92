"""Structured pruning: dependency tracing, physical shrinking, refusals, checkpoint round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcomp.compressors.structured import remove_units, shrink_checkpoint, trace_dependencies
from dcomp.errors import DcompError
from dcomp.formats.checkpoint import Checkpoint
from dcomp.models import build_zoo

ZOO_CASES = [("lenet-300-100", (1, 8, 8)), ("lenet-5", (1, 20, 20)), ("vgg-small", (1, 8, 8)),
             ("resnet-small", (1, 8, 8))]


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@pytest.mark.parametrize("name,shape", ZOO_CASES)
@torch.no_grad()
def test_removed_units_that_nobody_reads_leave_the_function_unchanged(name, shape):
    """If every consumer ignores the dropped units, the shrunk model computes exactly the same function:
    this checks every dependency (next layer, BatchNorm, Flatten grouping, residual additions)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_zoo(name, shape, 10).eval()
    _randomise_bn(model, gen)
    graph = trace_dependencies(model, shape)
    keep = {}
    for g in graph.groups:
        if g.blocked:
            continue
        idx = torch.sort(torch.randperm(g.channels, generator=gen)[: max(1, g.channels // 2)]).values
        keep[g.producers[0]] = idx
        dropped = torch.ones(g.channels, dtype=torch.bool)
        dropped[idx] = False
        for c, f in g.consumers:
            w = model.get_submodule(c).weight
            cols = dropped.repeat_interleave(f)
            w[:, cols] = 0
    assert keep, "every zoo model has something to shrink"
    x = torch.randn(5, *shape, generator=gen)
    small = remove_units(model, keep, shape).eval()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_residual_groups_couple_added_outputs():
    model = build_zoo("resnet-small", (1, 8, 8), 10)
    graph = trace_dependencies(model, (1, 8, 8))
    g = graph.group("conv1")
    assert set(g.producers) == {"conv1", "layer1.0.conv2"}
    assert graph.group("layer2.0.conv2") is graph.group("layer2.0.downsample.0")
    assert graph.group("fc").blocked  # the classifier's outputs stay


def test_coupled_layers_with_different_units_are_refused():
    model = build_zoo("resnet-small", (1, 8, 8), 10)
    keep = {"conv1": torch.arange(8), "layer1.0.conv2": torch.arange(8, 16)}
    with pytest.raises(DcompError, match="conv1.*layer1.0.conv2|layer1.0.conv2.*conv1"):
        remove_units(model, keep, (1, 8, 8))


def test_one_member_of_a_coupled_group_shrinks_the_whole_group():
    model = build_zoo("resnet-small", (1, 8, 8), 10)
    small = remove_units(model, {"layer1.0.conv2": torch.arange(0, 16, 2)}, (1, 8, 8))
    assert small.conv1.out_channels == 8 and small.layer1[0].conv2.out_channels == 8
    assert small.bn1.num_features == 8 and small.layer2[0].downsample[0].in_channels == 8
    assert small(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_classifier_outputs_are_never_removed():
    model = build_zoo("lenet-300-100", (1, 8, 8), 10)
    with pytest.raises(DcompError, match="fc3.*model output"):
        remove_units(model, {"fc3": torch.arange(5)}, (1, 8, 8))


def test_bad_keep_requests_are_refused():
    model = build_zoo("lenet-300-100", (1, 8, 8), 10)
    with pytest.raises(DcompError, match="no layer 'nope'"):
        remove_units(model, {"nope": torch.arange(3)}, (1, 8, 8))
    with pytest.raises(DcompError, match="at least one"):
        remove_units(model, {"fc1": torch.tensor([], dtype=torch.long)}, (1, 8, 8))
    with pytest.raises(DcompError, match=r"\[0, 300\)"):
        remove_units(model, {"fc1": torch.tensor([0, 300])}, (1, 8, 8))
    with pytest.raises(DcompError, match="Linear and Conv2d"):
        remove_units(model, {"relu": torch.arange(3)}, (1, 8, 8))


class _Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(8, 6)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.fc(x)
        return -self.fc(x)


def test_unknown_ops_block_only_the_layers_that_reach_them():
    model = _Cat()
    graph = trace_dependencies(model, (8,))
    assert graph.group("a").blocked and "cat" in graph.group("a").blocked
    with pytest.raises(DcompError, match="cannot remove units of 'a'.*cat"):
        remove_units(model, {"a": torch.arange(3)}, (8,))


def test_untraceable_models_are_refused_clearly():
    with pytest.raises(DcompError, match="torch.fx.*unstructured"):
        trace_dependencies(_Branchy(), (8,))


def _ckpt(name, shape, model=None):
    torch.manual_seed(0)
    model = model or build_zoo(name, shape, 10)
    ck = Checkpoint(arch={"kind": "zoo", "name": name, "kwargs": {}}, state_dict={}, input_shape=list(shape),
                    num_classes=10)
    ck.update_from_model(model)
    return ck


def test_shrunk_checkpoint_rebuilds_and_masks_are_sliced():
    ck = _ckpt("vgg-small", (1, 8, 8))
    w = ck.state_dict["features.3.weight"]
    ck.masks["features.3.weight"] = w.abs() > w.abs().median()
    ck.state_dict["features.3.weight"] = w * ck.masks["features.3.weight"]
    out, small = shrink_checkpoint(ck, {"features.0": torch.arange(0, 32, 2), "features.3": torch.arange(10)})
    rebuilt = out.build_model()
    assert rebuilt.features[3].weight.shape == (10, 16, 3, 3)
    assert out.masks["features.3.weight"].shape == (10, 16, 3, 3)
    assert torch.equal(out.masks["features.3.weight"], ck.masks["features.3.weight"][:10][:, ::2])
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(rebuilt(x), small.eval()(x))


def test_torchscript_checkpoints_refuse_structured_pruning():
    ck = _ckpt("lenet-300-100", (1, 8, 8))
    ck.arch = {"kind": "torchscript", "archive": torch.zeros(1, dtype=torch.uint8)}
    with pytest.raises(DcompError, match="structured pruning changes layer shapes"):
        shrink_checkpoint(ck, {"fc1": torch.arange(3)})


@torch.no_grad()
def test_batchnorm_recalibration_matches_the_data_statistics():
    from dcomp.compressors.structured import recalibrate_batchnorm

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4)
    model = nn.Sequential(conv, bn).eval()
    x = torch.randn(64, 1, 6, 6) * 3 + 1
    assert recalibrate_batchnorm(model, x, batch_size=16)
    h = conv(x)
    torch.testing.assert_close(bn.running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, h.var(dim=(0, 2, 3)), rtol=0.05, atol=1e-4)
    assert not model.training and bn.momentum == 0.1
    assert not recalibrate_batchnorm(nn.Linear(3, 3), torch.randn(4, 3))
