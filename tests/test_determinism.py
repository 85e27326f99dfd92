"""Determinism (issue 18, 21): the same inputs and seed give byte-identical checkpoints and .dcz
files, in separate processes, so CI can compare artefacts by hash; unpack -> pack is byte-identical;
no wall-clock time lands in either file unless asked (SOURCE_DATE_EPOCH gives a fixed one)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from dcomp.formats import dcz
from dcomp.formats.checkpoint import read_checkpoint


def dcomp_process(*args, cwd, env=None):
    """The CLI in a fresh process (nothing shared with this one but the files)."""
    e = {k: v for k, v in os.environ.items() if k not in ("DCOMP_PROVENANCE_TIME", "SOURCE_DATE_EPOCH")}
    e.update({"OMP_NUM_THREADS": "1", **(env or {})})
    r = subprocess.run([sys.executable, "-m", "dcomp", "--quiet", "--seed", "3", *map(str, args)], cwd=cwd, env=e,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture()
def run(cli, monkeypatch):
    monkeypatch.delenv("DCOMP_PROVENANCE_TIME", raising=False)
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)

    def go(*args):
        r = cli("--quiet", "--seed", "3", *args)
        assert r.exit_code == 0, r.output
        return r

    return go


def sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_same_seed_same_bytes_across_processes(tmp_path, run):
    """train in two processes, then prune -> quantize -> pack twice: identical checkpoints and .dcz."""
    for tag in "ab":
        dcomp_process("train", "--data", "synthetic:300", "--epochs", "1", "-o", f"{tag}-t.pt", cwd=tmp_path)
    assert sha(tmp_path / "a-t.pt") == sha(tmp_path / "b-t.pt")
    for tag in "ab":
        run("prune", tmp_path / f"{tag}-t.pt", "--sparsity", "0.8", "-o", tmp_path / f"{tag}-p.pt")
        run("quantize", tmp_path / f"{tag}-p.pt", "--bits", "4", "-o", tmp_path / f"{tag}-q.pt")
        run("pack", tmp_path / f"{tag}-q.pt", "-o", tmp_path / f"{tag}.dcz")
    for ext in ("-p.pt", "-q.pt", ".dcz"):
        assert sha(tmp_path / f"a{ext}") == sha(tmp_path / f"b{ext}"), ext
    ck = read_checkpoint((tmp_path / "a-q.pt").read_bytes(), "a-q.pt")
    assert all("time" not in p for p in ck.provenance) and len(ck.provenance) == 3


def test_source_date_epoch_is_recorded_and_stays_reproducible(tmp_path, run, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    run("train", "--data", "synthetic:200", "--epochs", "1", "-o", tmp_path / "x.pt")
    run("train", "--data", "synthetic:200", "--epochs", "1", "-o", tmp_path / "y.pt")
    assert (tmp_path / "x.pt").read_bytes() == (tmp_path / "y.pt").read_bytes()
    ck = read_checkpoint((tmp_path / "x.pt").read_bytes(), "x.pt")
    assert ck.provenance[-1]["time"] == "2023-11-14T22:13:20+00:00"


def test_wall_clock_time_only_when_asked_and_never_in_the_packed_file(tmp_path, run, monkeypatch):
    monkeypatch.setenv("DCOMP_PROVENANCE_TIME", "1")
    run("train", "--data", "synthetic:200", "--epochs", "1", "-o", tmp_path / "x.pt")
    ck = read_checkpoint((tmp_path / "x.pt").read_bytes(), "x.pt")
    assert ck.provenance[-1]["time"]
    data = dcz.write_bytes(ck)
    assert all("time" not in p for p in dcz.read_bytes(data).provenance)
    kept = dcz.read_bytes(dcz.write_bytes(ck, dcz.PackConfig(keep_times=True)))
    assert kept.provenance[-1]["time"] == ck.provenance[-1]["time"]
    run("pack", tmp_path / "x.pt", "-o", tmp_path / "x.dcz")
    run("pack", tmp_path / "x.pt", "-o", tmp_path / "k.dcz", "--keep-times")
    assert b'"time"' not in zlib_header(tmp_path / "x.dcz") and b'"time"' in zlib_header(tmp_path / "k.dcz")


def zlib_header(p) -> bytes:
    import json
    import sys as _s
    from dcomp.formats import dcz
    return json.dumps(dcz.read_header(p.read_bytes()).h).encode()   # the logical header (JSON or 1.5 binary)


def test_unpack_then_pack_is_byte_identical(tmp_path, run, lenet_ckpt):
    ck = lenet_ckpt.copy()
    w = ck.state_dict["fc1.weight"]
    ck.masks["fc1.weight"] = w.abs() > w.abs().quantile(0.9)
    ck.state_dict["fc1.weight"] = w * ck.masks["fc1.weight"]
    first = dcz.write_bytes(ck)
    (tmp_path / "m.dcz").write_bytes(first)
    run("unpack", tmp_path / "m.dcz", "-o", tmp_path / "u.pt")
    run("unpack", tmp_path / "m.dcz", "-o", tmp_path / "u2.pt")
    assert (tmp_path / "u.pt").read_bytes() == (tmp_path / "u2.pt").read_bytes()
    run("pack", tmp_path / "u.pt", "-o", tmp_path / "again.dcz")
    assert (tmp_path / "again.dcz").read_bytes() == first
    back = read_checkpoint((tmp_path / "u.pt").read_bytes(), "u.pt")
    assert dcz.write_bytes(back) == first
    assert torch.equal(back.state_dict["fc1.weight"], ck.state_dict["fc1.weight"])
