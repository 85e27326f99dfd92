"""Structured pruning (dcomp.compressors.graph): dependency tracing, physical shrinking, refusals,
checkpoint round trips, and one small model per mechanism of issue 11."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcomp.compressors.graph import remove_units, shrink_checkpoint, trace_dependencies
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
    removed = graph.removed_mask(keep)
    for s in graph.slots:
        if s.role == "in":
            gone = (s.labels >= 0) & removed[s.labels.clamp(min=0)]
            getattr(model.get_submodule(s.owner), s.attr).index_fill_(s.dim, torch.nonzero(gone).squeeze(1), 0)
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
    with pytest.raises(DcompError, match="no prunable layer 'relu'"):
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


class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(8, 6)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.cat([torch.special.erfcx(self.a(x)), self.b(x)], dim=1))


def test_concatenated_units_are_followed_with_offsets():
    model = _Cat().eval()
    small = remove_units(model, {"a": torch.tensor([0, 2]), "b": torch.tensor([1, 3, 5])}, (8,))
    assert small.head.weight.shape == (3, 5)
    torch.testing.assert_close(small.head.weight.detach(), model.head.weight.detach()[:, [0, 2, 7, 9, 11]])


def test_unknown_ops_block_only_the_layers_that_reach_them():
    model = _Unknown()
    graph = trace_dependencies(model, (8,))
    assert graph.group("a").blocked and "erfcx" in graph.group("a").blocked
    assert not graph.group("b").blocked
    assert any("erfcx" in op for _, op, _ in graph.unfollowed)
    with pytest.raises(DcompError, match="cannot remove units of 'a'.*erfcx"):
        remove_units(model, {"a": torch.arange(3)}, (8,))
    assert remove_units(model, {"b": torch.arange(3)}, (8,)).head.in_features == 9


def test_untraceable_models_are_refused_clearly():
    from dcomp.errors import UsageError

    with pytest.raises(UsageError, match="torch.fx cannot trace.*--exclude"):
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
    from dcomp.compressors.graph import recalibrate_batchnorm

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


# ---- mechanisms (issue 11): one small model per mechanism, built from torchvision's own blocks ------------
# Full torchvision models take 5-20 s each to trace on this machine, so the suite uses their building blocks
# at small sizes (same code paths); benchmarks/bench_structured.py runs every real classifier.

def _tv():
    from dcomp.models.vision import import_torchvision

    return import_torchvision()


class DenseNetLike(nn.Module):
    """Concatenation (DenseNet, Inception): consumers read each producer's channels at an offset."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
        self.b = nn.Sequential(nn.BatchNorm2d(14), nn.ReLU(), nn.Conv2d(14, 6, 3, padding=1))
        self.fc = nn.Linear(20, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.a(x)], 1)
        x = torch.cat([x, self.b(x)], 1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MobileLike(nn.Module):
    """Depthwise conv + squeeze-and-excitation (torchvision's own SqueezeExcitation) + residual."""

    def __init__(self):
        super().__init__()
        SE = _tv().ops.SqueezeExcitation
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.block = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.Hardswish(),
                                   nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.Hardswish(),
                                   SE(16, 8), nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        return self.fc(x.mean((2, 3)))


class ShuffleLike(nn.Module):
    """torchvision's ShuffleNetV2 blocks: chunk, concat and channel shuffle (view/transpose/view)."""

    def __init__(self):
        super().__init__()
        IR = _tv().models.shufflenetv2.InvertedResidual
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage = nn.Sequential(IR(8, 16, 2), IR(16, 16, 1), IR(16, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.stage(self.stem(x)).mean((2, 3)))


class GroupedLike(nn.Module):
    """ResNeXt bottleneck: a grouped conv keeps as many channels in every group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, 16, 1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))
        return self.fc(x.mean((2, 3)))


class InceptionLike(nn.Module):
    """torchvision's GoogLeNet Inception block: four branches concatenated."""

    def __init__(self):
        super().__init__()
        import importlib

        _tv()
        Inc = importlib.import_module("torchvision.models.googlenet").Inception
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.inc = Inc(16, 4, 4, 8, 2, 4, 4)
        self.fc = nn.Linear(20, 10)

    def forward(self, x):
        return self.fc(self.inc(self.stem(x)).mean((2, 3)))


def convnext_like():
    """torchvision's ConvNeXt with one tiny stage: depthwise conv, permute, LayerNorm, layer scale, LayerNorm2d."""
    cn = _tv().models.convnext
    return cn.ConvNeXt([cn.CNBlockConfig(8, 16, 1), cn.CNBlockConfig(16, None, 1)], num_classes=10)


def tiny_vit():
    """torchvision's VisionTransformer, tiny: class token, position embedding, MultiheadAttention, MLP."""
    return _tv().models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=16,
                                          mlp_dim=24, num_classes=10)


def tiny_swin(v2: bool = False):
    """torchvision's SwinTransformer (v1 or v2), tiny: shifted windows, relative position bias, patch merging."""
    sw = _tv().models.swin_transformer
    extra = {"block": sw.SwinTransformerBlockV2, "downsample_layer": sw.PatchMergingV2} if v2 else {}
    return sw.SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[2, 1], num_heads=[2, 4], window_size=[2, 2],
                              num_classes=10, **extra)


CONV_MECHANISMS = [DenseNetLike, MobileLike, ShuffleLike, GroupedLike, InceptionLike]


def _half(graph, scores=None):
    from dcomp.compressors.graph import choose

    free = {i: 0.5 for i, g in enumerate(graph.groups) if not g.blocked}
    scores = scores if scores is not None else torch.rand(graph.n_classes, generator=torch.Generator().manual_seed(0))
    return choose(graph, scores, free)[0]


@pytest.mark.parametrize("make", CONV_MECHANISMS, ids=lambda m: m.__name__)
@torch.no_grad()
def test_removing_units_nobody_reads_keeps_the_function(make):
    """Zero every weight that reads a removed unit: the shrunk model must then compute exactly the same
    function. This checks every tie (offsets into concatenations, shuffles, groups, gates, residuals)."""
    from dcomp.compressors.graph import analyse, shrink

    torch.manual_seed(0)
    model = make().eval()
    _randomise_bn(model, torch.Generator().manual_seed(1))
    graph = analyse(model, (3, 8, 8))
    removed = _half(graph)
    assert removed.any()
    for s in graph.slots:
        if s.role not in ("in", "grouped_in"):
            continue
        gone = (s.labels >= 0) & removed[s.labels.clamp(min=0)]
        w = getattr(model.get_submodule(s.owner), s.attr)
        if s.role == "grouped_in":
            g, per = s.groups, s.labels.numel() // s.groups
            rows = w.shape[0] // g
            for gi in range(g):
                w[gi * rows:(gi + 1) * rows][:, gone[gi * per:(gi + 1) * per]] = 0
        else:
            w.index_fill_(s.dim, torch.nonzero(gone).squeeze(1), 0)
    small, _ = shrink(model, graph, removed)
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(small.eval()(x), model(x), rtol=1e-5, atol=1e-5)


def test_each_pruned_group_has_the_asked_width():
    from dcomp.compressors.graph import analyse, shrink

    model = ShuffleLike().eval()
    graph = analyse(model, (3, 8, 8))
    removed = _half(graph)
    small, _ = shrink(model, graph, removed)
    for g in graph.groups:
        if g.blocked:
            continue
        kept = int((~removed[g.units]).sum())
        assert kept == g.channels - round(g.channels / 2) or g.bins, (g.name, g.channels, kept)
    assert small(torch.zeros(1, 3, 8, 8)).shape == (1, 10)
    # the grouped conv keeps as many inputs per group
    gm = GroupedLike().eval()
    gg = analyse(gm, (3, 8, 8))
    s2, _ = shrink(gm, gg, _half(gg))
    assert s2.c2.groups == 4 and s2.c2.in_channels % 4 == 0 and s2.c2.out_channels == 8


def _ckpt_of(factory: str, shape):
    from dcomp.models import build_from_factory

    torch.manual_seed(0)
    model = build_from_factory(factory, {})
    ck = Checkpoint(arch={"kind": "import", "target": factory, "kwargs": {}}, state_dict={}, input_shape=list(shape),
                    num_classes=10)
    ck.update_from_model(model)
    return ck, model.eval()


@pytest.mark.parametrize("factory,shape", [("tests.test_graph:convnext_like", (3, 16, 16)),
                                           ("tests.test_graph:tiny_vit", (3, 16, 16)),
                                           ("tests.test_graph:tiny_swin", (3, 16, 16))])
def test_layernorm_and_attention_models_shrink_and_rebuild(factory, shape):
    """ConvNeXt (LayerNorm, permute, layer scale), ViT (heads, class token, hidden_dim literal) and Swin
    (window attention heads, patch merging) lose half of every group and rebuild from the checkpoint."""
    from dcomp.compressors.graph import analyse, shrink_checkpoint

    ck, model = _ckpt_of(factory, shape)
    graph = analyse(model, shape)
    assert sum(not g.blocked for g in graph.groups) >= 3
    out, small = shrink_checkpoint(ck, model=model, graph=graph, removed=_half(graph))
    assert out.param_count() < 0.6 * ck.param_count(), [(g.name, g.blocked) for g in graph.groups]
    rebuilt = out.build_model(trust_pickle=True)
    x = torch.randn(2, *shape)
    torch.testing.assert_close(rebuilt(x), small.eval()(x))
    if "vit" in factory or "swin" in factory:
        assert any("num_heads" in v for v in out.arch["resized"].values())


@torch.no_grad()
def test_removed_heads_that_nobody_reads_keep_the_function():
    from dcomp.compressors.graph import analyse, shrink

    torch.manual_seed(0)
    model = tiny_vit().eval()
    graph = analyse(model, (3, 16, 16))
    heads = [g for g in graph.groups if g.what == "heads"]
    assert len(heads) == 2 and all(g.channels == 4 and not g.blocked for g in heads)
    removed = torch.zeros(graph.n_classes, dtype=torch.bool)
    for g in heads:
        removed[g.units[1::2]] = True
    for name, att in graph.attention.items():
        m = model.get_submodule(name)
        gone = removed[att.heads].repeat_interleave(att.head_dim)
        m.out_proj.weight[:, gone] = 0
    small, resized = shrink(model, graph, removed)
    assert all(v == {"num_heads": 2, "head_dim": 4} for v in resized.values())
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(small.eval()(x), model(x), rtol=1e-5, atol=1e-5)


def test_swin_v2_shrinks_and_rebuilds_in_a_fresh_process(tmp_path):
    """The checkpoint alone (weights_only load, no pickle) rebuilds the pruned Swin V2 in a new process."""
    import subprocess
    import sys

    from dcomp.compressors.graph import analyse, shrink_checkpoint

    torch.manual_seed(0)
    model = tiny_swin(v2=True).eval()
    ck = Checkpoint(arch={"kind": "import", "target": "tests.test_graph:tiny_swin", "kwargs": {"v2": True}},
                    state_dict={}, input_shape=[3, 16, 16], num_classes=10)
    ck.update_from_model(model)
    graph = analyse(model, (3, 16, 16))
    out, small = shrink_checkpoint(ck, model=model, graph=graph, removed=_half(graph))
    out.save(tmp_path / "s.pt")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; from dcomp.formats.checkpoint import Checkpoint\n"
            "m = Checkpoint.from_dict(torch.load(sys.argv[1], weights_only=True)).build_model(trust_pickle=True)\n"
            "torch.save(m(torch.load(sys.argv[2])), sys.argv[3])\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.pt"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), small.eval()(x))


def test_importance_callables_rank_units():
    from dcomp.compressors.graph import analyse, unit_scores

    model = MobileLike().eval()
    graph = analyse(model, (3, 8, 8))
    bn = model.block[1]
    with torch.no_grad():
        bn.weight.copy_(torch.arange(16, dtype=torch.float32))
    g = graph.group("block.0")
    s = unit_scores(model, graph, "bn")[g.units]
    assert torch.equal(torch.argsort(s), torch.arange(16))   # network slimming: |gamma| of the following BN
    l1 = unit_scores(model, graph, "l1")[g.units]
    assert set(g.producers) == {"block.0", "block.6.fc2"}   # the SE gate multiplies these channels
    expected = sum(model.get_submodule(p).weight.detach().abs().sum((1, 2, 3)).double() +
                   model.get_submodule(p).bias.detach().abs().double() for p in g.producers)
    torch.testing.assert_close(l1, expected)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    from dcomp.compressors.graph import taylor_gradients

    t = unit_scores(model, graph, "taylor", taylor_gradients(model, x, y))
    assert (t[g.units] > 0).all()
    with pytest.raises(ValueError, match="gradients"):
        unit_scores(model, graph, "taylor")


def test_global_ranking_prunes_groups_unequally():
    from dcomp.compressors.graph import analyse, choose

    model = DenseNetLike().eval()
    graph = analyse(model, (3, 8, 8))
    free = {i: 0.5 for i, g in enumerate(graph.groups) if not g.blocked}
    scores = torch.ones(graph.n_classes, dtype=torch.float64)
    uneven = graph.group("a.2")   # one strong unit, the rest weak (scores are normalised by each group's mean)
    scores[uneven.units] = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 100.0], dtype=torch.float64)
    removed, _ = choose(graph, scores, free, global_rank=True)
    total = sum(graph.groups[i].channels for i in free)
    assert int(removed.sum()) == round(0.5 * total)
    assert int(removed[uneven.units].sum()) == 5   # its weak units go first


def test_a_ratio_that_would_leave_nothing_keeps_one_unit():
    from dcomp.compressors.graph import analyse, choose

    graph = analyse(GroupedLike().eval(), (3, 8, 8))
    gi = graph.group_of["stem"]
    removed, notes = choose(graph, torch.rand(graph.n_classes), {gi: 0.99})
    assert int((~removed[graph.groups[gi].units]).sum()) == 1 and "keeps 1" in notes[gi]


def test_macs_count_convs_and_linears():
    from dcomp.compressors.graph.macs import count_macs

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    total, per = count_macs(model, (3, 8, 8))
    assert per["0"] == 4 * 8 * 8 * 3 * 9 and per["2"] == 256 * 10 and total == per["0"] + per["2"]


def test_torchvision_factories_import_through_dcomp_vision():
    from dcomp.models import build_from_factory

    m = build_from_factory("torchvision.models:squeezenet1_1", {"num_classes": 10})
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


_UNTRACEABLE = '''
import torch
from torch import nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(64, 48)
        self.fc1 = nn.Linear(48, 32)
        self.inner = Inner()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(self.inner(self.fc1(torch.relu(self.fc0(torch.flatten(x, 1))))))


class Inner(nn.Module):
    def forward(self, x):
        if x.sum() > 0:   # data-dependent control flow: torch.fx cannot trace it
            return torch.relu(x)
        return x
'''


def test_cli_untraceable_model_is_one_line_exit_2_and_exclude_makes_it_work(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "branchy_mod.py").write_text(_UNTRACEABLE)
    sys.path.insert(0, str(tmp_path))
    try:
        import branchy_mod

        torch.save(branchy_mod.Branchy().state_dict(), tmp_path / "sd.pt")
    finally:
        sys.path.remove(str(tmp_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    base = [sys.executable, "-m", "dcomp", "prune", str(tmp_path / "sd.pt"), "--arch", "branchy_mod:Branchy",
            "--data", "digits", "--method", "neuron", "-s", "0.5", "-o", str(tmp_path / "out.pt")]
    p = subprocess.run(base, capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "'inner'" in lines[0] and "--exclude" in lines[0]
    assert not (tmp_path / "out.pt").exists()
    p = subprocess.run(base + ["--exclude", "^inner$"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    out = Checkpoint.from_dict(torch.load(tmp_path / "out.pt", weights_only=True))
    assert out.state_dict["fc1.weight"].shape == (32, 24)   # fc1's units reach 'inner': kept whole; fc0 halved


def test_cli_group_pruning_and_info_report_macs_before_and_after(tmp_path, cli):
    import json

    from dcomp.models import build_zoo

    # a zoo net: info counts MACs only for architectures that run no code from the file
    torch.manual_seed(0)
    model = build_zoo("resnet-small", (3, 16, 16), 10)
    ck = Checkpoint(arch={"kind": "zoo", "name": "resnet-small", "kwargs": {}}, state_dict={},
                    input_shape=[3, 16, 16], num_classes=10)
    ck.update_from_model(model)
    ck.save(tmp_path / "c.pt")
    r = cli("--json", "prune", tmp_path / "c.pt", "--method", "group", "-s", "0.5",
            "-o", tmp_path / "p.pt")
    assert r.exit_code == 0, r.output
    o = json.loads(r.stdout)["overall"]
    assert o["macs_after"] < 0.5 * o["macs_before"]
    r = cli("--json", "info", tmp_path / "p.pt")
    assert r.exit_code == 0, r.output
    macs = json.loads(r.stdout)["macs"]
    assert macs["total"] == o["macs_after"] and macs["original"] == o["macs_before"]
    assert sum(macs["per_layer"].values()) == macs["total"]


def test_unstructured_pruning_reaches_attention_projections():
    """Issue 19 item 6: --sparsity 0.8 on a ViT used to leave MultiheadAttention.in_proj_weight dense."""
    from dcomp.compressors.pruning import PruneConfig, apply_prune

    ck, _ = _ckpt_of("tests.test_graph:tiny_vit", (3, 16, 16))
    from dcomp.stages import StageContext

    res = apply_prune(ck, PruneConfig(method="magnitude", sparsity=0.8, min_weights=0), StageContext(trust_pickle=True))
    rows = {r["layer"]: r for r in res.metrics["layers"]}
    name = "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"
    assert abs(rows[name]["sparsity"] - 0.8) < 0.01
    assert res.checkpoint.masks[name].float().mean() < 0.21


def test_export_check_runs_on_the_models_own_data(lenet_ckpt, monkeypatch):
    """Issue 19 item 6: after BatchNorm recalibration some channels have ~0 variance on the data; on Gaussian
    noise such a model blows up (1/sqrt(eps) per layer) and onnxruntime looked 3.4e-1 off PyTorch. The export
    check now feeds test images of the dataset the checkpoint records."""
    from dcomp.data import load_dataset
    from dcomp.formats import onnx_export

    seen = {}
    real = onnx_export.compare_with_torch

    def spy(data, model, shape, *a, x=None, **k):
        seen["x"] = x
        return real(data, model, shape, *a, x=x, **k)

    monkeypatch.setattr(onnx_export, "compare_with_torch", spy)
    onnx_export.export_checkpoint(lenet_ckpt)
    ds = load_dataset("digits")
    assert seen["x"] is not None and torch.equal(seen["x"], torch.as_tensor(ds.x_test[:3]).float())


class KindsLike(nn.Module):
    """ConvTranspose2d, GroupNorm, Conv1d, BatchNorm1d, Conv3d and LayerNorm in one chain."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.gn = nn.GroupNorm(2, 6)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(8)
        self.c3 = nn.Conv3d(8, 6, 3, padding=1)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        x = self.down(self.gn(self.up(torch.relu(self.bn(self.c(x))))))
        x = torch.relu(self.bn1(self.c1(x.flatten(2))))
        x = self.c3(x.view(x.size(0), x.size(1), 4, 4, 4))
        return self.fc(self.ln(x.mean((2, 3, 4))))


def test_other_layer_kinds_shrink_and_rebuild():
    from dcomp.compressors.graph import analyse, shrink_checkpoint

    ck, model = _ckpt_of("tests.test_graph:KindsLike", (3, 8, 8))
    graph = analyse(model, (3, 8, 8))
    out, small = shrink_checkpoint(ck, model=model, graph=graph, removed=_half(graph))
    assert (small.up.in_channels, small.up.out_channels, small.gn.num_channels) == (4, 4, 4)
    assert (small.c1.in_channels, small.c1.out_channels, small.bn1.num_features) == (4, 4, 4)
    assert (small.c3.in_channels, small.c3.out_channels, small.ln.normalized_shape) == (4, 3, (3,))
    rebuilt = out.build_model(trust_pickle=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(rebuilt(x), small.eval()(x))


def test_cli_typed_torchvision_factory_prunes_a_state_dict_and_reloads_in_a_new_process(tmp_path):
    """Issue 11: `--arch torchvision.models:NAME --arch-kwargs '{"num_classes": 10}'` with a plain state_dict:
    the user typed the factory, so no --trust-pickle; filter pruning shrinks it and the output rebuilds in a
    fresh process from the checkpoint alone (weights_only load)."""
    import os
    import subprocess
    import sys

    import numpy as np

    from dcomp.models import build_from_factory

    torch.manual_seed(0)
    model = build_from_factory("torchvision.models:squeezenet1_1", {"num_classes": 10}).eval()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", x=rng.random((40, 3, 32, 32), dtype=np.float32), y=np.arange(40) % 10)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "dcomp", "prune", str(tmp_path / "sd.pt"),
                        "--arch", "torchvision.models:squeezenet1_1", "--arch-kwargs", '{"num_classes": 10}',
                        "--data", f"npz:{tmp_path / 'rgb.npz'}", "--method", "filter", "-s", "0.5",
                        "-o", str(tmp_path / "thin.pt")], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "trust-pickle" not in p.stderr
    code = ("import sys, torch; from dcomp.formats.checkpoint import Checkpoint\n"
            "ck = Checkpoint.from_dict(torch.load(sys.argv[1], weights_only=True))\n"
            "m = ck.build_model()\n"
            "print(ck.arch['target'], m.features[0].out_channels, tuple(m(torch.zeros(2, 3, 32, 32)).shape))\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "thin.pt")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    target, stem, shape = p.stdout.split(maxsplit=2)
    assert target == "torchvision.models:squeezenet1_1" and int(stem) == model.features[0].out_channels // 2
    assert shape.strip() == "(2, 10)"


def test_cli_a_ratio_that_would_leave_no_filters_keeps_one_and_the_table_says_so(tmp_path, cli):
    import json

    _ckpt("vgg-small", (1, 8, 8)).save(tmp_path / "v.pt")
    r = cli("--json", "prune", tmp_path / "v.pt", "--method", "filter", "-s", "0.5", "--layer", "features.0=0.99",
            "--min-weights", "0", "-o", tmp_path / "p.pt")
    assert r.exit_code == 0, r.output
    row = next(x for x in json.loads(r.stdout)["layers"] if x["layer"] == "features.0")
    assert row["units_after"] == 1 and "keeps 1 unit" in row["note"]
    r = cli("prune", tmp_path / "v.pt", "--method", "filter", "-s", "0.5", "--layer", "features.0=0.99",
            "--min-weights", "0", "-o", tmp_path / "q.pt")
    assert r.exit_code == 0 and "keeps 1 unit" in r.output
    assert Checkpoint.from_dict(torch.load(tmp_path / "q.pt", weights_only=True)).build_model()(
        torch.zeros(2, 1, 8, 8)).shape == (2, 10)


class SizedByOther(nn.Module):
    """A reshape sized by another tensor's channel count (MaxViT's attention: ``out.reshape(B, G, P, D)`` with D
    read from its input): the counts must stay equal even when the units differ."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.proj = nn.Linear(8, 8)
        self.side = nn.Linear(6, 8)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        h = self.stem(x)
        b, d = h.shape
        u = torch.cumsum(self.proj(h), -1)          # an op no rule follows: proj's outputs stay whole
        s = self.side(x)
        return self.head(torch.cat([h, u.reshape(b, d), s.view(b, s.size(1))], -1))


def test_a_reshape_sized_by_another_tensor_keeps_both_whole():
    from dcomp.compressors.graph import analyse, shrink

    model = SizedByOther().eval()
    graph = analyse(model, (6,))
    assert "size of another tensor" in (graph.group("stem").blocked or "")
    assert not graph.group("side").blocked   # sized by its own shape: free
    small, _ = shrink(model, graph, _half(graph))
    assert small.side.out_features == 4 and small(torch.zeros(2, 6)).shape == (2, 10)


def test_deferred_checks_compare_by_identity():
    """The check list is edited with list.remove: checks holding label tensors of different shapes must not
    be compared element-wise (maxvit_t failed with 'size of tensor a (7) must match ... (2)')."""
    from dcomp.compressors.graph.trace import Check

    a = Check("size", torch.zeros(1, 7, 2), 1, "n1", "", value=7)
    b = Check("size", torch.zeros(1, 2), 1, "n2", "", value=2)
    checks = [a, b]
    checks.remove(b)
    assert checks == [a] and a != Check("size", a.labels, 1, "n1", "", value=7)


def tiny_maxvit():
    """torchvision's MaxVit, tiny: MBConv with SE, window and grid partitions, relative-position attention."""
    import importlib

    _tv()
    mv = importlib.import_module("torchvision.models.maxvit")
    return mv.MaxVit(input_size=(56, 56), stem_channels=8, partition_size=7, block_channels=[8, 16],
                     block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=10)


def test_maxvit_shrinks_and_rebuilds():
    """MaxViT's partitions reshape to sizes read from the input: its trunk stays whole (the einsum attention is
    named as not followed), the MBConv and MLP hidden units shrink, and the checkpoint rebuilds."""
    from dcomp.compressors.graph import analyse, shrink_checkpoint

    ck, model = _ckpt_of("tests.test_graph:tiny_maxvit", (3, 56, 56))
    graph = analyse(model, (3, 56, 56))
    assert any(op == "'einsum'" for _, op, _ in graph.unfollowed)
    out, small = shrink_checkpoint(ck, model=model, graph=graph, removed=_half(graph))
    assert out.param_count() < 0.8 * ck.param_count()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(out.build_model(trust_pickle=True)(x), small.eval()(x))


class WithAuxHead(nn.Module):
    """An auxiliary head that runs only in training (Inception v3's AuxLogits needs ~299 px)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.aux = nn.Sequential(nn.AvgPool2d(5, 3), nn.Conv2d(4, 4, 1))
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = self.conv(x)
        out = self.fc(h.mean((2, 3)))
        if self.training:
            return out, self.aux(h).mean((2, 3))
        return out


def test_an_aux_head_too_small_for_the_input_says_to_give_a_larger_one():
    from dcomp.compressors.graph import analyse

    with pytest.raises(DcompError, match="at 'aux.0'.*auxiliary heads.*larger input"):
        analyse(WithAuxHead(), (1, 6, 6))
    graph = analyse(WithAuxHead(), (1, 12, 12))   # large enough: the aux head reads conv's channels too
    assert not graph.group("conv").blocked
