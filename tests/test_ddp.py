"""DistributedDataParallel on CPU (gloo) under torchrun: two real processes."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from dcomp.formats.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow


def _torchrun(args, tmp_path):
    exe = shutil.which("torchrun") or None
    cmd = ([exe] if exe else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", "--nproc_per_node", "2"] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    if r.returncode != 0 and "exitcode: -6" in r.stderr:
        # a rank aborted (SIGABRT) inside torch's gloo/c10d layer: seen twice in about 10 full suites,
        # only while other tests loaded the machine, never alone (0 of 18 runs, idle or with two
        # busy processes); not root-caused. Run once more; a second failure is reported as it is.
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    return r


def test_torchrun_train_writes_one_checkpoint(tmp_path):
    r = _torchrun(["-m", "dcomp", "train", "--data", "synthetic:400", "--epochs", "2", "-o", "out.pt",
                   "--json", "--quiet"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)  # printed once, by rank 0
    assert summary["ranks"] == 2 and summary["masks_identical"] is True
    ckpt = read_checkpoint((tmp_path / "out.pt").read_bytes())
    assert ckpt.provenance[-1]["metrics"]["ranks"] == 2
    assert not list(tmp_path.glob(".out.pt.*"))  # no temporary files left by other ranks


def test_masks_stay_identical_and_exact_under_ddp(tmp_path, lenet_ckpt):
    from dcomp.compressors.masks import magnitude_mask

    ckpt = lenet_ckpt.copy()
    for name in ("fc1.weight", "fc2.weight"):
        m = magnitude_mask(ckpt.state_dict[name], 0.9)
        ckpt.masks[name] = m
        ckpt.state_dict[name] *= m
    ckpt.save(tmp_path / "pruned.pt")
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import json, sys, torch
        from dcomp.data import load_dataset
        from dcomp.formats.checkpoint import read_checkpoint
        from dcomp.retrain import retrain
        from dcomp.train import TrainConfig
        ckpt = read_checkpoint(open("pruned.pt", "rb").read())
        out, res = retrain(ckpt, load_dataset("digits"), TrainConfig(epochs=1, lr=0.05))
        rank = torch.distributed.get_rank()
        if rank == 0:
            out.save("retrained.pt")
            print(json.dumps({"identical": res.masks_identical}))
    """))
    r = _torchrun([str(script)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"identical": True}
    out = read_checkpoint((tmp_path / "retrained.pt").read_bytes())
    for name, m in ckpt.masks.items():
        w = out.state_dict[name]
        assert torch.all(w[~m] == 0) and not torch.equal(w, ckpt.state_dict[name])
