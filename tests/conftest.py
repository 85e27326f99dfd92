"""Shared fixtures: small trained checkpoints made once per test session (no network)."""

from __future__ import annotations

import os

import pytest
import torch

# `pytest -n 2` runs two workers on a 2-core machine: one thread each, or they oversubscribe
# the cores (torch's default of 2 threads per process made the suite several times slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses the tests start
# caches (the zoo table) go to a fresh folder, not the user's ~/.cache
os.environ.setdefault("DCOMP_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="dcomp-test-cache-"))
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from dcomp.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def lenet_ckpt(digits):
    """LeNet-300-100 trained 5 epochs on digits (a few seconds)."""
    from dcomp.formats.checkpoint import Checkpoint
    from dcomp.models import build_zoo
    from dcomp.train import TrainConfig, fit

    torch.manual_seed(0)
    model = build_zoo("lenet-300-100", digits.input_shape, digits.num_classes)
    fit(model, digits, TrainConfig(epochs=5))
    ckpt = Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}}, state_dict={},
                      input_shape=list(digits.input_shape), num_classes=10, data={"spec": "digits", "resize": None})
    ckpt.update_from_model(model)
    ckpt.add_provenance("train", {"epochs": 5})
    return ckpt


@pytest.fixture()
def lenet_path(lenet_ckpt, tmp_path):
    p = tmp_path / "base.pt"
    lenet_ckpt.save(p)
    return p


def one_error_line(result) -> str:
    """A failed command printed exactly one line, `error: ...`, and no traceback; returns it."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture()
def cli():
    """Run the CLI in-process: cli("eval", path, "--json") -> click Result (stdout/stderr apart)."""
    from typer.testing import CliRunner

    from dcomp.cli.app import app

    runner = CliRunner()

    def run(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return run


@pytest.fixture(scope="module")
def pruned(lenet_ckpt):
    """The fixture LeNet-300-100 with exact 90% magnitude masks (not retrained: enough for invariants)."""
    from dcomp.compressors.masks import magnitude_mask

    ck = lenet_ckpt.copy()
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        m = magnitude_mask(ck.state_dict[name], 0.9)
        ck.masks[name] = m
        ck.state_dict[name] = torch.where(m, ck.state_dict[name], torch.zeros(()))
    return ck
