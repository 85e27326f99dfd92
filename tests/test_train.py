import torch

from dcomp.compressors.masks import magnitude_mask
from dcomp.data import load_dataset
from dcomp.models import build_zoo
from dcomp.train import TrainConfig, evaluate, fit


def _model(seed=0):
    torch.manual_seed(seed)
    return build_zoo("lenet-300-100", (1, 8, 8), 10)


def test_masks_are_kept_exactly_through_momentum_and_weight_decay(digits):
    model = _model()
    masks = {n: magnitude_mask(p, 0.8) for n, p in model.named_parameters() if n.endswith("weight")}
    fit(model, digits, TrainConfig(epochs=2, lr=0.1, momentum=0.9, weight_decay=1e-3, optimizer="sgd"), masks=masks)
    for n, p in model.named_parameters():
        if n in masks:
            assert torch.all(p[~masks[n]] == 0), n  # exactly zero, not small
            assert int(torch.count_nonzero(p)) <= int(masks[n].sum())


def test_training_is_deterministic_for_a_seed(digits):
    a, b = _model(), _model()
    fit(a, digits, TrainConfig(epochs=1), seed=3)
    fit(b, digits, TrainConfig(epochs=1), seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_training_learns_digits(digits):
    model = _model()
    before = evaluate(model, digits.x_test, digits.y_test)["top1"]
    res = fit(model, digits, TrainConfig(epochs=5))
    after = evaluate(model, digits.x_test, digits.y_test)
    assert after["top1"] > 90 > before and "top5" in after
    assert len(res.history) == 5 and res.history[-1]["loss"] < res.history[0]["loss"]


def test_select_best_keeps_the_best_validation_epoch():
    ds = load_dataset("synthetic:300")
    model = _model()
    res = fit(model, ds, TrainConfig(epochs=4, select="best"))
    vals = [h["val_top1"] for h in res.history]
    assert res.best_epoch == 1 + vals.index(max(vals))
