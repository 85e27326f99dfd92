"""Where `-o` writes (issue 21, issue 18): atomically for files, through for devices and FIFOs,
the target of a symlink, never a directory; a read-only folder or a full disk is one line before
any work; temporary files never stay behind; a recipe's name never escapes the folder; two runs
never share a work directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import pytest

from tests.conftest import one_error_line


def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _is_checkpoint(b: bytes) -> bool:
    return b[:2] == b"PK"  # torch.save's zip container


def test_output_into_a_fifo_is_written_through(cli, tmp_path, lenet_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = {}
    reader = threading.Thread(target=lambda: got.update(data=open(fifo, "rb").read()))
    reader.start()
    r = cli("prune", lenet_path, "--sparsity", "0.5", "-o", fifo, "--quiet")
    reader.join(timeout=60)
    assert r.exit_code == 0, r.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still a FIFO, not replaced by a regular file
    assert _is_checkpoint(got["data"]) and _temps(tmp_path) == []


def test_output_onto_a_character_device_is_written_through(cli, tmp_path, lenet_path):
    dev = tmp_path / "null"
    try:
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod not permitted here")
    for target in (dev, "/dev/null"):
        r = cli("prune", lenet_path, "--sparsity", "0.5", "-o", target, "--quiet")
        assert r.exit_code == 0, r.stderr
        assert stat.S_ISCHR(os.lstat(target).st_mode)
    assert _temps(tmp_path) == []


def test_output_to_dev_stdout_is_stdout(cli, lenet_path):
    r = cli("prune", lenet_path, "--sparsity", "0.5", "-o", "/dev/stdout", "--quiet")
    assert r.exit_code == 0 and _is_checkpoint(r.stdout_bytes)


def test_full_device_is_one_line(cli, lenet_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    r = cli("prune", lenet_path, "--sparsity", "0.5", "-o", "/dev/full")
    assert r.exit_code == 1 and "No space left" in one_error_line(r)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_symlink_keeps_the_link_and_replaces_its_target(cli, tmp_path, lenet_path):
    real = tmp_path / "real" / "model.pt"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "link.pt"
    link.symlink_to(real)
    r = cli("prune", lenet_path, "--sparsity", "0.5", "-o", link, "--quiet")
    assert r.exit_code == 0, r.stderr
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert _is_checkpoint(real.read_bytes())
    assert _temps(tmp_path) == [] and _temps(real.parent) == []


def test_directory_is_refused_before_any_work(cli, tmp_path):
    r = cli("train", "--epochs", "50", "-o", tmp_path)
    assert r.exit_code == 2 and "is a directory" in one_error_line(r)
    assert "epoch" not in r.stderr


@pytest.fixture()
def small_mount(tmp_path):
    """A tmpfs of 64 KiB (a full disk for a checkpoint), and one mounted read-only."""
    mounts = []

    def make(name, opts):
        d = tmp_path / name
        d.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        subprocess.run(["umount", str(d)], capture_output=True)


def test_full_disk_and_read_only_folder_fail_before_training(cli, small_mount, lenet_path):
    full = small_mount("full", "size=64k")
    r = cli("retrain", lenet_path, "--epochs", "30", "-o", full / "o.pt")
    assert r.exit_code == 1 and "not enough space" in one_error_line(r) and "epoch" not in r.stderr
    assert list(full.iterdir()) == []
    ro = small_mount("ro", "ro,size=1m")
    r = cli("train", "--epochs", "30", "-o", ro / "o.pt")
    assert r.exit_code == 1 and "Read-only file system" in one_error_line(r) and "epoch" not in r.stderr
    rec = full.parent / "r.yaml"
    rec.write_text("name: x\nstages:\n  - stage: prune\n    sparsity: 0.5\n")
    r = cli("run", rec, "--model", lenet_path, "-o", full.parent / "o.pt", "--workdir", ro / "work")
    assert r.exit_code == 1 and "cannot create the work directory" in one_error_line(r)
    assert not (full.parent / "o.pt").exists()


def test_stale_temp_files_of_dead_processes_are_removed(cli, tmp_path, lenet_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.pt.{dead.pid}.abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".out.pt.{os.getppid()}.efgh5678.tmp"  # a running process: maybe still writing
    live.write_bytes(b"in progress")
    other = tmp_path / f".other.pt.{dead.pid}.abcd1234.tmp"  # another output's: not ours to judge
    other.write_bytes(b"x")
    r = cli("prune", lenet_path, "--sparsity", "0.5", "-o", tmp_path / "out.pt", "--quiet")
    assert r.exit_code == 0
    assert not stale.exists() and live.exists() and other.exists()


def test_recipe_name_must_be_one_path_component(cli, tmp_path, lenet_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in ("../../x", "a/b", "..", ""):
        rec = tmp_path / "r.yaml"
        rec.write_text(f"name: '{bad}'\nstages:\n  - stage: prune\n    sparsity: 0.5\n")
        r = cli("recipe", "validate", rec)
        assert r.exit_code == 2 and "name" in one_error_line(r), bad
        r = cli("run", rec, "--model", lenet_path, "-o", "-")
        assert r.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.pt", "r.yaml"]
    assert not (tmp_path.parent / "x").exists()


def test_second_run_on_the_same_workdir_is_refused(cli, tmp_path, lenet_path):
    from dcomp.recipe import WorkdirLock

    rec = tmp_path / "r.yaml"
    rec.write_text("name: x\nstages:\n  - stage: prune\n    sparsity: 0.5\n")
    work = tmp_path / "work"
    work.mkdir()
    with WorkdirLock(work):  # another run holds it
        r = cli("run", rec, "--model", lenet_path, "-o", tmp_path / "o.pt", "--workdir", work)
        assert r.exit_code == 1 and "in use by another dcomp run" in one_error_line(r)
        assert not (work / "run.jsonl").exists() and not (tmp_path / "o.pt").exists()
    r = cli("run", rec, "--model", lenet_path, "-o", tmp_path / "o.pt", "--workdir", work, "--quiet")
    assert r.exit_code == 0, r.stderr
