"""The checkpoint dict checked before use, and the per-tensor digest (issues 18, 21)."""

from __future__ import annotations

import io

import pytest
import torch

from dcomp.errors import FormatError
from dcomp.formats.checkpoint import Checkpoint, read_checkpoint
from dcomp.formats.ckpt_validate import CheckpointFieldError, DigestMismatch


def saved(d: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(d, buf)
    return buf.getvalue()


@pytest.fixture()
def ck():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 30, generator=g)
    m = w.abs() > 0.5
    cb = torch.randn(8, generator=g)
    a = torch.randint(0, 8, (20, 30), generator=g).to(torch.uint8)
    return Checkpoint(arch={"kind": "zoo", "name": "lenet-300-100", "kwargs": {}},
                      state_dict={"fc.weight": w * m, "fc.bias": torch.randn(20, generator=g)}, input_shape=[1, 8, 8],
                      num_classes=10, masks={"fc.weight": m}, quant={"fc.weight": {"bits": 3, "codebook": cb, "assignments": a}})


def test_flipped_bit_in_tensor_data_names_the_tensor(ck):
    data = bytearray(ck.to_bytes())
    at = bytes(data).find(ck.state_dict["fc.bias"].numpy().tobytes()[:32])
    assert at > 0
    data[at + 5] ^= 0x10
    with pytest.raises(DigestMismatch, match=r"m\.pt: tensor state_dict/fc\.bias does not match the checkpoint's digest"):
        read_checkpoint(bytes(data), "m.pt")


def test_checkpoint_without_digest_still_loads(ck):
    d = ck.to_dict()
    del d["digest"]                       # as written by dcomp before the digest existed
    back = read_checkpoint(saved(d), "old.pt")
    assert torch.equal(back.state_dict["fc.weight"], ck.state_dict["fc.weight"])
    assert "digest" in back.to_dict()     # saving it again adds one


def test_tensor_added_or_removed_after_writing_is_named(ck):
    d = ck.to_dict()
    d["state_dict"]["extra"] = torch.zeros(3)
    with pytest.raises(DigestMismatch, match="tensor state_dict/extra is not in the checkpoint's digest"):
        read_checkpoint(saved(d), "x.pt")
    d = ck.to_dict()
    del d["state_dict"]["fc.bias"]
    with pytest.raises(DigestMismatch, match="state_dict/fc.bias listed in the checkpoint's digest is missing"):
        read_checkpoint(saved(d), "x.pt")


CASES = {
    "arch": (lambda d: d.update(arch=[1, 2]), "checkpoint field arch: expected a dict, got a list"),
    "kind": (lambda d: d["arch"].update(kind=3), "checkpoint field arch.kind: expected a string"),
    "input_shape": (lambda d: d.update(input_shape=[1, -8, 8]), "checkpoint field input_shape: expected a list of positive"),
    "num_classes": (lambda d: d.update(num_classes="10"), "checkpoint field num_classes: expected a positive integer, got a string"),
    "state_dict": (lambda d: d["state_dict"].update({"fc.bias": [1.0]}), "state_dict['fc.bias']: expected a tensor, got a list"),
    "complex": (lambda d: d["state_dict"].update({"z": torch.zeros(2, dtype=torch.complex64)}), "dtype torch.complex64 is not supported"),
    "mask shape": (lambda d: d["masks"].update({"fc.weight": torch.ones(3, dtype=torch.bool)}), "masks['fc.weight']: shape [3] differs"),
    "mask dtype": (lambda d: d["masks"].update({"fc.weight": torch.ones(20, 30)}), "expected a bool tensor"),
    "mask name": (lambda d: d["masks"].update({"nope": torch.ones(3, dtype=torch.bool)}), "masks['nope']: names no tensor"),
    "quant bits": (lambda d: d["quant"]["fc.weight"].update(bits=99), "quant['fc.weight'].bits: expected an integer 1..16"),
    "quant index": (lambda d: d["quant"]["fc.weight"].update(assignments=torch.full((20, 30), 9, dtype=torch.uint8)),
                    "indices outside the codebook's 8 entries"),
    "provenance": (lambda d: d.update(provenance=["x"]), "checkpoint field provenance: expected a list of dicts"),
    "digest": (lambda d: d.update(digest="abc"), "checkpoint field digest: expected"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_schema_one_line_per_field(ck, case):
    change, message = CASES[case]
    d = ck.to_dict()
    change(d)
    with pytest.raises(FormatError) as e:
        read_checkpoint(saved(d), "bad.pt")
    assert message in str(e.value) and str(e.value).startswith("bad.pt: ") and "\n" not in str(e.value)


def test_schema_errors_are_named(ck):
    d = ck.to_dict()
    d["num_classes"] = None
    with pytest.raises(CheckpointFieldError):
        read_checkpoint(saved(d), "bad.pt")


def test_cli_reports_a_corrupt_checkpoint_in_one_line(cli, tmp_path, ck):
    from conftest import one_error_line

    data = bytearray(ck.to_bytes())
    at = bytes(data).find(ck.state_dict["fc.bias"].numpy().tobytes()[:32])
    data[at] ^= 1
    p = tmp_path / "m.pt"
    p.write_bytes(bytes(data))
    r = cli("info", p)
    assert r.exit_code == 1
    assert "tensor state_dict/fc.bias does not match" in one_error_line(r)
