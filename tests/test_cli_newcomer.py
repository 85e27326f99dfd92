"""What a newcomer trips over (issue 19 items 3, 4, 7): shape mismatches as one line, start-up
without torch, and consistent spellings (old ones kept working)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import one_error_line

ROOT = Path(__file__).resolve().parents[1]

TINYNET = '''
import torch
from torch import nn

class TinyNet(nn.Module):
    """Wants 3-channel images."""
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 16, num_classes)
    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))

class MLP784(nn.Module):
    """Wants 28x28 images, flattened."""
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 32)
        self.fc2 = nn.Linear(32, 10)
    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))
'''


@pytest.fixture()
def user_models(tmp_path, monkeypatch):
    (tmp_path / "usernets.py").write_text(TINYNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usernets", None)
    import usernets

    tiny, mlp = tmp_path / "tiny.pt", tmp_path / "mlp.pt"
    torch.save(usernets.TinyNet().state_dict(), tiny)
    torch.save(usernets.MLP784().state_dict(), mlp)
    return tiny, mlp


@pytest.mark.parametrize("args", [
    ["eval"],
    ["prune", "--method", "filter", "--sparsity", "0.5", "--data", "digits"],
    ["quantize", "--bits", "4"],
    ["retrain", "--epochs", "1"],
    ["bench", "--no-sweep"],
])
def test_shape_mismatch_is_one_line_naming_both_shapes(cli, user_models, tmp_path, args):
    tiny, _ = user_models
    cmd, *rest = args
    out = ["-o", tmp_path / "o.pt"] if cmd in ("prune", "quantize", "retrain") else []
    r = cli(cmd, tiny, "--arch", "usernets:TinyNet", *rest, *out)
    line = one_error_line(r)
    assert r.exit_code == 2
    assert "model expects input (3, H, W); --data digits gives (1, 8, 8): use --resize or other data" in line
    assert not (tmp_path / "o.pt").exists()


def test_flat_model_gets_a_resize_hint(cli, user_models):
    _, mlp = user_models
    r = cli("eval", mlp, "--arch", "usernets:MLP784")
    assert r.exit_code == 2 and "784 features" in one_error_line(r) and "--resize 28" in r.stderr
    r = cli("eval", mlp, "--arch", "usernets:MLP784", "--resize", "28", "--json")
    assert r.exit_code == 0, r.stderr


def test_train_checks_the_shape_before_training(cli, user_models, tmp_path):
    r = cli("train", "--arch", "usernets:TinyNet", "--epochs", "50", "-o", tmp_path / "t.pt")
    assert r.exit_code == 2 and "model expects input (3, H, W)" in one_error_line(r) and "epoch" not in r.stderr


def test_arch_on_a_dcomp_checkpoint_is_not_silently_ignored(cli, lenet_path, tmp_path):
    r = cli("prune", lenet_path, "--arch", "vgg-small", "--sparsity", "0.5", "-o", tmp_path / "p.pt")
    assert r.exit_code == 2 and "records its own architecture" in one_error_line(r)
    r = cli("prune", lenet_path, "--arch", "lenet-300-100", "--sparsity", "0.5", "-o", tmp_path / "p.pt", "-q")
    assert r.exit_code == 0  # the same architecture: nothing to say


@pytest.mark.parametrize("command", ["train", "eval", "prune", "retrain", "quantize", "pack", "inspect", "bench",
                                     "run", "zoo", "export"])
def test_global_options_are_in_every_commands_help(cli, command):
    r = cli(command, "--help")
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    for opt in ("--json", "-q/--quiet", "--threads", "--seed", "130 interrupted"):
        assert opt in text, (command, opt)


def test_zoo_table_goes_to_stdout(cli):
    r = cli("zoo")
    assert r.exit_code == 0 and "lenet-300-100" in r.stdout and "lenet-300-100" not in r.stderr


def test_old_spellings_still_work(cli, lenet_path, tmp_path):
    # retrain: --method agp is the spelling now (like dns/iht/dsd); --schedule agp still works
    for flags in (["--method", "agp"], ["--schedule", "agp"]):
        r = cli("retrain", lenet_path, *flags, "--final-sparsity", "0.5", "--epochs", "2", "--every", "0.5", "-o",
                tmp_path / "a.pt",
                "--json")
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["sparsity"] > 0.4
    assert "--schedule " not in cli("retrain", "--help").stdout  # hidden (--schedule-unit is another option)
    # run: -m (which means --method in prune) still gives the model
    rec = tmp_path / "r.yaml"
    rec.write_text("name: x\nstages:\n  - stage: prune\n    sparsity: 0.5\n")
    r = cli("run", rec, "-m", lenet_path, "-o", tmp_path / "o.pt", "--workdir", tmp_path / "w", "--json")
    assert r.exit_code == 0, r.stderr
    assert " -m " not in cli("run", "--help").stdout
    # recipes: the command's flag name --epochs-per-round is understood as retrain.epochs
    rec.write_text("name: x\nstages:\n  - stage: prune\n    sparsity: 0.5\n    rounds: 2\n    epochs_per_round: 1\n")
    r = cli("recipe", "validate", rec, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["stages"][0]["params"]["retrain"]["epochs"] == 1


def test_set_does_not_leave_a_note_that_restates_the_old_value(cli):
    recipe = ROOT / "configs" / "deep-compression.yaml"
    plain = json.loads(cli("recipe", "validate", recipe, "--json").stdout)["stages"][2]
    assert "5 bits" in plain["note"]
    r = cli("recipe", "validate", recipe, "--set", "stages.2.fc_bits=4", "--json")
    stage = json.loads(r.stdout)["stages"][2]
    assert stage["params"]["fc_bits"] == 4 and "5 bits" not in stage["note"] and "fc_bits" in stage["note"]


def test_tables_wrap_instead_of_cutting_at_80_columns(cli, lenet_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    r = cli("info", lenet_path)
    assert r.exit_code == 0 and "…" not in r.stderr
    r = cli("recipe", "validate", ROOT / "configs" / "deep-compression.yaml")
    assert r.exit_code == 0 and "…" not in r.stderr


def _imports_torch(*args, env=None) -> bool:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "dcomp", *map(str, args)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    return any(line.split("|")[-1].strip() == "torch" for line in r.stderr.splitlines())


def test_version_help_and_zoo_start_without_torch(tmp_path):
    assert not _imports_torch("--version")
    assert not _imports_torch("--help")
    assert not _imports_torch("prune", "--help")
    env = {"DCOMP_CACHE_DIR": str(tmp_path)}
    assert _imports_torch("zoo", env=env)      # the first time builds the models
    assert not _imports_torch("zoo", env=env)  # then the cached table


def test_recipe_validate_starts_without_torch(tmp_path):
    """Every stage's options are torch-free (dcomp/config/): validating a recipe loads no torch."""
    recipe = tmp_path / "all.yaml"
    recipe.write_text(textwrap.dedent("""\
        name: all-stages
        stages:
          - {stage: sweep, grid: [0.5, 0.9]}
          - {stage: prune, sparsity: 0.9}
          - {stage: retrain, train: {epochs: 1}, agp: {final_sparsity: 0.95}, l1: {lam: 1.0e-5}}
          - {stage: distill, train: {epochs: 1}, distill: {teacher: input}}
          - {stage: factorize, rank: 8}
          - {stage: dafl, width: 0.5}
          - {stage: search, max_macs: 0.5x}
          - {stage: quantize, bits: 5}
          - {stage: finetune}
          - {stage: eval}
          - {stage: bench, batches: [1]}
          - {stage: pack, coder: auto}
        """))
    assert not _imports_torch("recipe", "validate", recipe)
    for shipped in sorted((ROOT / "configs").glob("*.yaml")):
        assert not _imports_torch("recipe", "validate", shipped), shipped.name


def test_inspect_starts_without_torch(lenet_ckpt, tmp_path):
    from dcomp.formats import dcz

    path = tmp_path / "m.dcz"
    path.write_bytes(dcz.pack(lenet_ckpt)[0])
    assert not _imports_torch("inspect", path)


def test_weights_that_do_not_fit_name_the_file(cli, lenet_ckpt, tmp_path):
    """A checkpoint whose tensors no longer fit its architecture: the error says which file."""
    bad = lenet_ckpt.copy()
    bad.state_dict["fc1.weight"] = bad.state_dict["fc1.weight"][:, :10].clone()
    bad.save(tmp_path / "edited.pt")
    r = cli("eval", tmp_path / "edited.pt")
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "edited.pt: " in line and "do not fit" in line
