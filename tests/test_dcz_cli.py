"""`dcomp pack` / `unpack` / `inspect` through the CLI: outputs, --json, errors, no partial files."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from dcomp.cli.app import app
from dcomp.formats import dcz
from dcomp.formats.checkpoint import Checkpoint, read_checkpoint

runner = CliRunner()


def _ckpt() -> Checkpoint:
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(32, generator=g)
    mask = torch.rand(100, 64, generator=g) < 0.1
    a = torch.where(mask, torch.randint(0, 32, (100, 64), generator=g), torch.zeros((), dtype=torch.int64)).to(torch.uint8)
    w = torch.where(mask, cb[a.long()], torch.zeros(()))
    ck = Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}},
                    state_dict={"fc1.weight": w, "fc1.bias": torch.randn(100, generator=g)},
                    input_shape=[1, 8, 8], num_classes=10, masks={"fc1.weight": mask},
                    quant={"fc1.weight": {"bits": 5, "codebook": cb, "assignments": a}})
    ck.add_provenance("quantize", {"bits": 5})
    return ck


def test_pack_inspect_unpack(tmp_path):
    src = tmp_path / "q.pt"
    ck = _ckpt()
    ck.save(src)
    out = tmp_path / "q.dcz"
    r = runner.invoke(app, ["pack", str(src), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["output"] == str(out) and summary["file_bytes"] == out.stat().st_size
    assert summary["layers"][0]["encoding"] == "sparse" and summary["layers"][0]["index_bits"] == 5

    r = runner.invoke(app, ["inspect", str(out), "--json", "--verify"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["verified"] and info["ratio"] == summary["ratio"]
    assert set(info["layers"][0]["bytes"]) == {"indices", "values", "codebook", "tables", "other"}

    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "fc1.weight" in r.output and "smaller" in r.output

    back = tmp_path / "r.pt"
    r = runner.invoke(app, ["unpack", str(out), "-o", str(back)])
    assert r.exit_code == 0, r.output
    restored = read_checkpoint(back.read_bytes())
    for k, v in ck.state_dict.items():
        assert torch.equal(v, restored.state_dict[k])
    assert torch.equal(restored.masks["fc1.weight"], ck.masks["fc1.weight"])
    assert [p["stage"] for p in restored.provenance] == [p["stage"] for p in ck.provenance]
    assert restored.provenance[-1]["params"] == {"bits": 5}   # default --provenance brief


def test_pack_options(tmp_path):
    src = tmp_path / "q.pt"
    _ckpt().save(src)
    out = tmp_path / "q.dcz"
    r = runner.invoke(app, ["pack", str(src), "-o", str(out), "--index-bits", "3", "--no-huffman", "--json"])
    assert r.exit_code == 0, r.output
    layer = json.loads(r.stdout)["layers"][0]
    assert layer["index_bits"] == 3 and layer["gaps"]["coding"] == "fixed"


def test_pack_errors_write_nothing(tmp_path):
    src = tmp_path / "q.pt"
    _ckpt().save(src)
    out = tmp_path / "q.dcz"
    r = runner.invoke(app, ["pack", str(src), "-o", str(out), "--index-bits", "17"])
    assert r.exit_code == 2 and "index bits must be between 1 and 16" in r.output and not out.exists()
    r = runner.invoke(app, ["pack", str(src), "-o", str(src)])
    assert r.exit_code == 2 and "overwrite the input" in r.output


def test_unpack_and_inspect_refuse_bad_files(tmp_path):
    src = tmp_path / "q.pt"
    _ckpt().save(src)
    out = tmp_path / "r.pt"
    r = runner.invoke(app, ["unpack", str(src), "-o", str(out)])
    assert r.exit_code == 2 and "not a .dcz file" in r.output and not out.exists()

    good = dcz.write_bytes(_ckpt())
    bad = tmp_path / "bad.dcz"
    bad.write_bytes(good[:-10])
    for cmd in (["unpack", str(bad), "-o", str(out)], ["inspect", str(bad), "--verify"], ["info", str(bad)]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 1, (cmd, r.output)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "truncated" in lines[0], r.output
    assert not out.exists()

    flipped = bytearray(good)
    flipped[-5] ^= 1
    bad.write_bytes(bytes(flipped))
    r = runner.invoke(app, ["unpack", str(bad), "-o", str(out)])
    assert r.exit_code == 1 and "checksum mismatch" in r.output and not out.exists()


def test_other_commands_read_dcz(tmp_path):
    p = tmp_path / "m.dcz"
    p.write_bytes(dcz.write_bytes(_ckpt()))
    r = runner.invoke(app, ["info", str(p), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["nonzero"] == int(_ckpt().masks["fc1.weight"].sum()) + 100
