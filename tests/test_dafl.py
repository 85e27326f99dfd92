"""DAFL data-free distillation: generator shapes, the signs of the loss terms, a short run that
learns, and no real training sample read in data-free mode."""

import json

import pytest
import torch
from torch import nn

from dcomp.compressors import dafl as D
from dcomp.data import Dataset
from dcomp.errors import UsageError
from dcomp.stages import StageContext
from dcomp.train import TrainConfig

from tests.conftest import one_error_line


# ---- the generator ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch,shape", [
    ("lenet-300-100", (1, 8, 8)), ("lenet-300-100", (64,)), ("lenet-5", (1, 28, 28)), ("lenet-5", (1, 32, 32)),
    ("vgg-small", (3, 32, 32)), ("vgg-small", (3, 30, 30)), ("resnet-small", (1, 8, 8)), ("resnet-small", (3, 13, 17)),
])
def test_generator_makes_the_teachers_input_shape(arch, shape):
    from dcomp.models import build_zoo

    teacher = build_zoo(arch, shape, 10).eval()
    g = D.Generator(shape, latent_dim=100, width=16)
    x = g(torch.randn(6, 100))
    assert tuple(x.shape) == (6, *shape)
    assert tuple(teacher(x).shape) == (6, 10)


def test_generator_output_is_normalised_then_mapped_to_the_input_range():
    g = D.Generator((2, 8, 8), width=8, mean=[0.5, -1.0], std=[0.25, 2.0]).train()
    x = g(torch.randn(64, 100))
    per_channel = x.transpose(0, 1).reshape(2, -1)
    assert torch.allclose(per_channel.mean(1), torch.tensor([0.5, -1.0]), atol=1e-4)
    assert torch.allclose(per_channel.std(1), torch.tensor([0.25, 2.0]), rtol=0.02)


def test_generator_refuses_shapes_it_cannot_make():
    with pytest.raises(UsageError, match="images"):
        D.Generator((3, 4, 4, 4))
    with pytest.raises(UsageError, match="1 or 3 values"):
        D.Generator((3, 8, 8), mean=[0.1, 0.2])


# ---- the loss terms have the paper's signs -------------------------------------------------------

def _tiny_teacher():
    """Features = relu(x) (identity first layer), logits = features: the argmax is the largest input."""
    t = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    with torch.no_grad():
        for lin in (t[0], t[2]):
            lin.weight.copy_(torch.eye(3))
            lin.bias.zero_()
    return t.eval()


def test_one_hot_loss_is_lower_when_the_teacher_is_sure():
    t = _tiny_teacher()
    sure = t(torch.tensor([[5.0, 0.0, 0.0], [0.0, 6.0, 0.0]]))
    unsure = t(torch.tensor([[1.0, 0.9, 0.8], [0.5, 0.6, 0.55]]))
    assert D.one_hot_loss(sure) < D.one_hot_loss(unsure)
    assert torch.equal(sure.argmax(1), torch.tensor([0, 1]))


def test_information_entropy_loss_is_lowest_for_a_balanced_batch():
    t = _tiny_teacher()
    balanced = t(torch.eye(3) * 8)                       # one sample per class
    one_class = t(torch.tensor([[8.0, 0, 0]] * 3))       # every sample class 0
    assert D.information_entropy_loss(balanced) < D.information_entropy_loss(one_class)
    assert D.information_entropy_loss(balanced).item() == pytest.approx(-torch.log(torch.tensor(3.0)).item(), abs=0.01)


def test_activation_loss_is_lower_for_strongly_firing_features():
    t = _tiny_teacher()
    tap = D.FeatureTap(t)
    t(torch.tensor([[4.0, 3.0, 5.0]]))
    strong = tap.features.clone()
    t(torch.tensor([[0.1, 0.2, 0.0]]))
    weak = tap.features.clone()
    tap.remove()
    assert torch.equal(strong, torch.tensor([[4.0, 3.0, 5.0]]))  # the classifier's input, captured by the hook
    assert D.activation_loss(strong) < D.activation_loss(weak)


@pytest.mark.parametrize("term", ["oh", "ie", "a"])
def test_descending_each_term_moves_inputs_the_way_the_paper_intends(term):
    """Gradient steps on the inputs with one weight on: oh sharpens the teacher's predictions, ie
    spreads them over the classes, a strengthens the features."""
    t = _tiny_teacher()
    weights = {"oh": 0.0, "ie": 0.0, "a": 0.0, term: 1.0}
    cfg = D.DAFLConfig(**weights)
    tap = D.FeatureTap(t)
    x = torch.tensor([[1.0, 0.9, 0.8]] * 4 + [[0.8, 1.0, 0.9]] * 2, requires_grad=True)

    def measure():
        with torch.no_grad():
            p = torch.softmax(t(x), 1)
            mean = p.mean(0)
            return {"max_p": p.max(1).values.mean().item(), "balance": -(mean * mean.log()).sum().item(),
                    "feat": tap.features.abs().mean().item()}

    before = measure()
    opt = torch.optim.SGD([x], lr=0.5)
    for _ in range(20):
        loss, _ = D.generator_loss(t(x), tap.features, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = measure()
    tap.remove()
    if term == "oh":
        assert after["max_p"] > before["max_p"]
    elif term == "ie":
        assert after["balance"] > before["balance"]  # entropy of the batch-mean prediction
    else:
        assert after["feat"] > before["feat"]


def test_student_loss_is_kl_teacher_to_student():
    t = torch.tensor([[2.0, 0.0, -1.0]])
    assert D.student_loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    far = D.student_loss(torch.tensor([[-1.0, 0.0, 2.0]]), t)
    p = torch.softmax(t, 1)
    expect = (p * (torch.log_softmax(t, 1) - torch.log_softmax(torch.tensor([[-1.0, 0.0, 2.0]]), 1))).sum()
    assert far.item() == pytest.approx(expect.item(), rel=1e-5)


# ---- students ----------------------------------------------------------------------------------

def test_width_half_lenet5_halves_every_layer():
    from dcomp.formats.checkpoint import Checkpoint
    from dcomp.models import build_zoo

    m = build_zoo("lenet-5", (1, 32, 32), 10)
    ck = Checkpoint(arch={"kind": "zoo", "name": "lenet-5", "kwargs": {}}, state_dict={}, input_shape=[1, 32, 32],
                    num_classes=10)
    ck.update_from_model(m)
    half = D.make_student(ck, "lenet-5", 0.5)
    shapes = {k: tuple(v.shape) for k, v in half.state_dict.items() if k.endswith("weight")}
    assert shapes == {"conv1.weight": (10, 1, 5, 5), "conv2.weight": (25, 10, 5, 5),
                      "fc1.weight": (250, 25 * 5 * 5), "fc2.weight": (10, 250)}
    assert half.build_model()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


# ---- runs ----------------------------------------------------------------------------------------

class TrainSplitRaises(Dataset):
    """A dataset whose training split cannot be read."""

    def __init__(self, ds):
        object.__setattr__(self, "_ds", ds)
        self.spec, self.num_classes = ds.spec, ds.num_classes
        self.x_test, self.y_test = ds.x_test, ds.y_test

    @property
    def x_train(self):
        raise AssertionError("a real training sample was read in data-free mode")

    @x_train.setter
    def x_train(self, v):
        pass

    @property
    def y_train(self):
        raise AssertionError("a real training label was read in data-free mode")

    @y_train.setter
    def y_train(self, v):
        pass

    @property
    def input_shape(self):
        return tuple(self.x_test.shape[1:])

    def split_validation(self, fraction):
        raise AssertionError("a validation split of real data was made in data-free mode")


def _short(epochs=3, iterations=15):
    return D.DistillStudentConfig(width=0.5, train=D.paper_train_config(epochs=epochs, batch_size=128),
                                  dafl=D.DAFLConfig(iterations=iterations, generator_width=16,
                                                    input_mean=[0.3], input_std=[0.38]))


def test_short_data_free_run_beats_chance_without_reading_training_data(lenet_ckpt, digits, tmp_path):
    guarded = TrainSplitRaises(digits)
    with pytest.raises(AssertionError):
        guarded.x_train  # the guard works
    res = D.apply_distill(lenet_ckpt, _short(), StageContext(data=guarded, seed=0), samples=tmp_path / "g.png")
    m = res.metrics
    assert m["top1"] > 30, m  # 10 classes: chance is 10%
    assert m["student_params"] < m["teacher_params"] / 2
    assert len(m["test_top1_by_epoch"]) == 3
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(m["sample_classes"].values()) == 1024
    prov = res.checkpoint.provenance[-1]
    assert prov["stage"] == "distill" and prov["params"]["data"] == "none (data-free)"


def test_data_free_retrain_keeps_masks_and_reads_no_training_data(lenet_ckpt, digits):
    from dcomp.compressors.pruning import PruneConfig, apply_prune
    from dcomp.retrain import RetrainConfig, apply_retrain

    guarded = TrainSplitRaises(digits)
    pruned = apply_prune(lenet_ckpt, PruneConfig(sparsity=0.8, recalibrate_bn=False), StageContext()).checkpoint
    cfg = RetrainConfig(train=TrainConfig(epochs=1, batch_size=64, lr=1e-3, optimizer="adam"),
                        dafl=D.DataFreeConfig(teacher="unused", iterations=5, generator_width=16))
    res = apply_retrain(pruned, cfg, StageContext(data=guarded, seed=0), teacher_ckpt=lenet_ckpt)
    out = res.checkpoint
    for name, mask in pruned.masks.items():
        assert torch.equal(out.masks[name], mask)
        assert not out.state_dict[name][~mask].any()  # pruned weights stay exactly zero
    assert res.metrics["data_free"] and "top1_after" in res.metrics


def test_data_free_refuses_select_best():
    with pytest.raises(ValueError, match="select"):
        D.DistillStudentConfig(width=0.5, train=D.paper_train_config(select="best"))


# ---- the command ---------------------------------------------------------------------------------

def test_cli_distill_data_free(cli, lenet_path, tmp_path):
    out = tmp_path / "s.pt"
    r = cli("distill", lenet_path, "--data-free", "--width", "0.5", "--epochs", "1", "--iterations", "3",
            "--batch-size", "32", "--data", "digits", "-o", out, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["data_free"] is True and summary["output"] == str(out)
    assert "teacher_top1" in summary and "top1" in summary
    from dcomp.formats.checkpoint import read_checkpoint

    ck = read_checkpoint(out.read_bytes())
    assert ck.state_dict["fc1.weight"].shape[0] == 150


@pytest.mark.parametrize("args,message", [
    (["--data-free"], "which student"),
    (["--width", "0.5", "--oh", "2"], "--oh only applies with --data-free"),
    (["--width", "0.5"], "needs --data"),
    (["--data-free", "--student", "no-such-net"], "neither a zoo model"),
    (["--data-free", "--width", "0.5", "--input-std", "0"], "positive"),
])
def test_cli_distill_errors(cli, lenet_path, tmp_path, args, message):
    r = cli("distill", lenet_path, *args, "-o", tmp_path / "x.pt")
    assert r.exit_code == 2, r.output
    assert message in one_error_line(r)
    assert not (tmp_path / "x.pt").exists()


def test_cli_retrain_data_free_needs_a_teacher(cli, lenet_path, tmp_path):
    r = cli("retrain", lenet_path, "--data-free", "-o", tmp_path / "x.pt")
    assert r.exit_code == 2 and "--teacher" in one_error_line(r)


# ---- the recipe stage ------------------------------------------------------------------------------

def test_recipe_dafl_stage_starts_from_the_paper_preset(tmp_path):
    from dcomp.recipe import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text("name: x\nstages:\n  - stage: dafl\n    width: 0.5\n    train: {epochs: 3}\n"
                 "  - stage: retrain\n    dafl: {teacher: input, iterations: 4}\n  - stage: pack\n")
    rec = load_recipe(p)
    train = rec.stages[0].config.train
    assert (train.epochs, train.lr, train.optimizer, train.batch_size) == (3, 2e-3, "adam", 512)
    assert rec.stages[1].config.dafl.iterations == 4


def test_recipe_dafl_stage_without_a_student_names_the_line(tmp_path):
    from dcomp.recipe import RecipeError, load_recipe

    p = tmp_path / "r.yaml"
    p.write_text("name: x\nstages:\n  - stage: prune\n    sparsity: 0.5\n  - stage: dafl\n    data_free: true\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:5: stages\.1: .*which student"):
        load_recipe(p)


def test_saved_generator_loads_with_the_same_outputs_and_checks_shape(tmp_path):
    g = D.Generator((1, 8, 8), latent_dim=10, mean=[0.3], std=[0.4], width=8).eval()
    path = tmp_path / "g.gen"
    D.save_generator(g, path)
    back = D.load_generator(path, (1, 8, 8)).eval()
    z = torch.randn(3, 10)
    assert torch.equal(g(z), back(z))
    with pytest.raises(UsageError, match="makes inputs"):
        D.load_generator(path, (1, 28, 28))


def test_cli_distill_saves_a_generator_that_retrain_reuses(cli, lenet_path, tmp_path):
    gen, student, out = tmp_path / "g.gen", tmp_path / "s.pt", tmp_path / "r.pt"
    r = cli("distill", lenet_path, "--data-free", "--width", "0.5", "--epochs", "1", "--iterations", "2",
            "--batch-size", "16", "--generator-width", "8", "--save-generator", gen, "-o", student, "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("retrain", student, "--data-free", "--teacher", lenet_path, "--generator", gen, "--epochs", "1",
            "--iterations", "2", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["data_free"] is True
    from dcomp.formats.checkpoint import read_checkpoint

    prov = read_checkpoint(out.read_bytes()).provenance[-1]
    assert prov["params"]["dafl"]["generator"] == str(gen)


def test_prune_without_batchnorm_never_reads_the_training_split(lenet_ckpt):
    """A data-free recipe's prune stage used to touch x_train for BatchNorm re-estimation even on
    a model without BatchNorm (so it needed recalibrate_bn: false)."""
    from dcomp.compressors.pruning import PruneConfig, apply_prune
    from dcomp.data import load_dataset
    from dcomp.stages import StageContext

    class TestOnly:
        def __init__(self, ds):
            self._ds = ds

        def __getattr__(self, name):
            if name in ("x_train", "y_train"):
                raise AssertionError(f"the training split was read ({name})")
            return getattr(self._ds, name)

    out = apply_prune(lenet_ckpt, PruneConfig(sparsity=0.5), StageContext(data=TestOnly(load_dataset("digits"))))
    assert out.checkpoint.nonzero_count() < lenet_ckpt.nonzero_count()
