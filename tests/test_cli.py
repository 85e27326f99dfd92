"""The command line as users drive it: pipes, --json, errors (one line, exit codes, no output)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dcomp.cli.app import hoist_global_options


def test_train_then_eval_json(cli, tmp_path):
    out = tmp_path / "base.pt"
    r = cli("train", "--arch", "lenet-300-100", "--data", "digits", "--epochs", "3", "-o", out, "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("eval", out, "--data", "digits", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["top1"] > 85 and res["params"] == 50610 and res["nonzero"] == 50610
    assert res["file_bytes"] == out.stat().st_size


def test_real_shell_pipe_gives_same_result_as_file(tmp_path):
    """`dcomp train ... | dcomp eval --data digits` in a real shell equals train -o file; eval file."""
    env = {**os.environ, "NO_COLOR": "1"}
    train = [sys.executable, "-m", "dcomp", "train", "--epochs", "2", "--quiet"]
    subprocess.run(train + ["-o", str(tmp_path / "m.pt")], check=True, env=env)
    piped = subprocess.run(" ".join(train) + f" | {sys.executable} -m dcomp eval --data digits --json",
                           shell=True, check=True, capture_output=True, env=env, text=True)
    from_file = subprocess.run([sys.executable, "-m", "dcomp", "eval", str(tmp_path / "m.pt"), "--json"],
                               check=True, capture_output=True, env=env, text=True)
    a, b = json.loads(piped.stdout), json.loads(from_file.stdout)
    assert a["top1"] == b["top1"] and a["loss"] == b["loss"]


def test_stdin_dash_and_info(cli, lenet_path):
    r = cli("info", "-", "--json", input=lenet_path.read_bytes())
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["arch"]["name"] == "lenet-300-100"
    assert [l["name"] for l in info["layers"]][:2] == ["fc1.weight", "fc1.bias"]
    assert info["provenance"][0]["stage"] == "train"


def test_retrain_keeps_masks_through_a_pipe(cli, lenet_ckpt):
    from dcomp.compressors.masks import magnitude_mask

    ckpt = lenet_ckpt.copy()
    m = magnitude_mask(ckpt.state_dict["fc1.weight"], 0.9)
    ckpt.masks = {"fc1.weight": m}
    ckpt.state_dict["fc1.weight"] *= m
    r = cli("retrain", "--epochs", "1", "--quiet", input=ckpt.to_bytes())
    assert r.exit_code == 0, r.output
    from dcomp.formats.checkpoint import read_checkpoint

    out = read_checkpoint(r.stdout_bytes)
    w = out.state_dict["fc1.weight"]
    assert torch.all(w[~m] == 0) and torch.equal(out.masks["fc1.weight"], m)
    assert out.provenance[-1]["stage"] == "retrain"


def test_global_options_may_follow_the_command():
    assert hoist_global_options(["eval", "m.pt", "--json", "--seed", "3"]) == ["--json", "--seed", "3", "eval", "m.pt"]
    assert hoist_global_options(["--quiet", "train", "--threads=2", "-o", "x"]) == ["--threads=2", "--quiet", "train", "-o", "x"]


def test_zoo_lists_all_models(cli):
    r = cli("zoo", "--json")
    names = [m["name"] for m in json.loads(r.stdout)["models"]]
    assert names == ["lenet-300-100", "lenet-5", "vgg-small", "resnet-small"]


# ---- errors: one line, exit code, nothing written ---------------------------------------------

from tests.conftest import one_error_line as _one_error_line  # noqa: E402


def test_missing_file(cli, tmp_path):
    r = cli("eval", tmp_path / "nope.pt")
    assert r.exit_code == 1 and "no such file" in _one_error_line(r)


def test_truncated_checkpoint(cli, lenet_path, tmp_path):
    bad = tmp_path / "half.pt"
    bad.write_bytes(lenet_path.read_bytes()[:5000])
    r = cli("eval", bad)
    assert r.exit_code == 1 and "truncated or corrupt" in _one_error_line(r)


def test_pickled_module_refused_without_trust(cli, tmp_path):
    from dcomp.models import build_zoo

    p = tmp_path / "module.pt"
    torch.save(build_zoo("lenet-300-100", (1, 8, 8), 10), p)
    r = cli("eval", p, "--data", "digits")
    assert r.exit_code == 1 and "--trust-pickle" in _one_error_line(r)
    r = cli("eval", p, "--data", "digits", "--trust-pickle", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["params"] == 50610


def test_usage_errors_exit_2_and_write_nothing(cli, tmp_path, lenet_path):
    out = tmp_path / "o.pt"
    r = cli("train", "--epochs", "1", "--optimizer", "rmsprop", "-o", out)
    assert r.exit_code == 2 and "optimizer" in _one_error_line(r) and not out.exists()
    r = cli("train", "--arch", "alexnet", "-o", out)
    assert r.exit_code == 2 and "zoo models are" in _one_error_line(r) and not out.exists()
    r = cli("train", "--nope")
    assert r.exit_code == 2 and "No such option" in _one_error_line(r)
    r = cli("retrain", lenet_path, "-o", lenet_path)
    assert r.exit_code == 2 and "overwrite the input" in _one_error_line(r)


def test_internal_errors_are_one_line_and_debug_shows_traceback(cli, tmp_path, monkeypatch):
    import dcomp.cli.zoo as zoo_mod

    def boom():
        raise RuntimeError("kaput")

    monkeypatch.setattr("dcomp.models.build_zoo", lambda *a, **k: boom())
    monkeypatch.setenv("DCOMP_CACHE_DIR", str(tmp_path))  # no cached zoo table: build the models
    r = cli("zoo")
    assert r.exit_code == 1 and "rerun with --debug" in _one_error_line(r)
    r = cli("zoo", "--debug")
    assert r.exit_code == 1 and "Traceback" in r.stderr


def test_outputs_never_overwrite_files_the_command_reads(cli, tmp_path, lenet_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nstages:\n  - stage: prune\n    sparsity: 0.5\n")
    before = recipe.read_bytes()
    r = cli("run", recipe, "--model", lenet_path, "-o", recipe)
    assert r.exit_code == 2 and "would overwrite" in r.stderr and recipe.read_bytes() == before
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(lenet_path.read_bytes())
    r = cli("retrain", lenet_path, "--teacher", teacher, "--epochs", "1", "-o", teacher)
    assert r.exit_code == 2 and "would overwrite" in r.stderr and teacher.read_bytes() == lenet_path.read_bytes()


def test_output_files_get_the_usual_permissions(cli, tmp_path, lenet_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "o.pt"
        assert cli("retrain", lenet_path, "--epochs", "1", "-o", out, "--quiet").exit_code == 0
        assert (out.stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(old)


def test_factory_that_fails_is_a_usage_error(cli, tmp_path):
    r = cli("train", "--arch", "os:getcwd", "-o", tmp_path / "x.pt")
    assert r.exit_code == 2 and "not a torch nn.Module" in _one_error_line(r)
