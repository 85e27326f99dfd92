"""Small valid files that would cost gigabytes (issue 21): each bomb is built here, and refused
from its header, fast, with one error line and exit 1; the limits can be raised by flag or
environment; `inspect` shows the decoded size."""

from __future__ import annotations

import functools
import io
import json
import time
import zlib

import pytest
import torch

from conftest import one_error_line
from dcomp.errors import FormatError
from dcomp.formats import dcz, limits
from dcomp.formats.checkpoint import Checkpoint, read_checkpoint
from dcomp.formats.dcz import errors as E
from fuzzing.targets import frame

ARCH = {"kind": "zoo", "name": "lenet-300-100", "kwargs": {}}


def header(tensors, sections, **extra):
    return {"dcz": 1, "arch": ARCH, "input_shape": [1, 8, 8], "num_classes": 10, "data": {}, "provenance": [],
            "sections": sections, "tensors": tensors, "masks": {}, "quant": {}, **extra}


@functools.lru_cache(maxsize=None)
def zlib_bomb() -> bytes:
    """~130 KB file whose header JSON inflates to ~127 MiB (a provenance string of spaces)."""
    target = 127 << 20
    h = header([], [], provenance=[{"stage": "x", "note": "@"}])
    js = json.dumps(h, separators=(",", ":")).encode()
    head, tail = js.split(b"@")
    z = zlib.compressobj(9)
    parts = [z.compress(head)]
    chunk = b" " * (1 << 20)
    n = target - len(head) - len(tail)
    while n > 0:
        parts.append(z.compress(chunk[:min(n, len(chunk))]))
        n -= len(chunk)
    parts.append(z.compress(tail) + z.flush())
    stored = b"".join(parts)
    import struct
    from dcomp.formats import DCZ_MAGIC
    pre = DCZ_MAGIC + struct.pack("<HHIQII", 1, 2, 1, len(stored), zlib.crc32(stored), target)
    out = pre + stored
    return out + b"\0" * (-len(out) % 8)


@functools.lru_cache(maxsize=None)
def many_tables(n: int) -> bytes:
    """n codebook tensors, each with its own Huffman table of 15-bit codes (a 32768-entry lookup table
    for 5 bytes of section): about 16 bytes of file per table."""
    tensors, sections, area = [], [], bytearray()

    def add(b: bytes) -> int:
        sections.append([len(area), len(area) + len(b), 0])
        area.extend(b + b"\0" * (-len(b) % 8))
        return len(sections) - 1

    for i in range(n):
        cb = add(bytes(4))                       # one float32 codebook entry
        st = add(bytes([0xFF, 15, 0, 0, 0]))     # lengths 15,15 | block table [15] | 15 zero bits
        tensors.append({"name": f"t{i}", "dtype": "float32", "shape": [1], "encoding": "codebook",
                        "values": {"kind": "codebook", "bits": 1, "codebook": cb,
                                   "indices": {"section": st, "count": 1, "alphabet": 2, "coding": "huffman",
                                               "block": 1024, "bits": 15}}})
    last = sections[-1]
    return frame(header(tensors, sections), bytes(area[:last[1]]), 0, compress=True)


def filler_bomb(numel: int) -> bytes:
    """A sparse float32 tensor of ``numel`` zeros: all-filler 14-bit gaps, one Huffman symbol of 1 bit."""
    k = 14
    m = (1 << k) - 1
    count = numel // m
    nb = -(-count // 4096)
    table = bytes((1 << k) // 2 - 1) + b"\x01"  # only the filler symbol M is used, length 1
    blocks = b"".join(min(4096, count - 4096 * j).to_bytes(2, "little") for j in range(nb))
    gaps = table + blocks + bytes((count + 7) // 8)
    area = gaps + b"\0" * (-len(gaps) % 8)
    t = {"name": "w", "dtype": "float32", "shape": [numel], "encoding": "sparse", "index_bits": k, "nnz": 0,
         "gaps": {"section": 0, "count": count, "alphabet": 1 << k, "coding": "huffman", "block": 4096, "bits": count},
         "values": {"kind": "raw", "section": 1}}
    return frame(header([t], [[0, len(gaps), 0], [len(area), len(area), 0]]), area, 0, compress=True)


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    for env in limits.ENV.values():
        monkeypatch.delenv(env, raising=False)
    limits.set_overrides()
    yield
    limits.set_overrides()


def refused(cli, *args, match: str):
    t0 = time.perf_counter()
    r = cli(*args)
    took = time.perf_counter() - t0
    assert r.exit_code == 1, r.output
    line = one_error_line(r)
    assert match in line, line
    assert took < 10, f"took {took:.1f} s to refuse"   # seconds on a loaded machine; ~0.1-1 s idle
    return line


def test_zlib_header_bomb_refused_from_the_preamble(cli, tmp_path):
    data = zlib_bomb()
    assert len(data) < 200_000
    p = tmp_path / "bomb.dcz"
    p.write_bytes(data)
    line = refused(cli, "inspect", p, match="over the limit of 16,777,216")
    assert "bomb.dcz" in line and "--max-header" in line
    with pytest.raises(E.LimitExceeded):
        dcz.inspect_bytes(data, "bomb.dcz")


def test_twenty_thousand_huffman_tables_refused(cli, tmp_path):
    data = many_tables(20_000)
    assert len(data) < 700_000
    p = tmp_path / "tables.dcz"
    p.write_bytes(data)
    refused(cli, "inspect", p, "--verify", match="more than 16,384 Huffman tables")
    refused(cli, "unpack", p, "-o", tmp_path / "out.pt", match="--max-tables")
    assert not (tmp_path / "out.pt").exists()


def test_many_tables_decode_in_bounded_batches_when_allowed():
    """Raised limit: 3000 tables of 32768 entries each decode in batches (not 3000 tables at once)."""
    from dcomp.compressors import huffman as hf

    data = many_tables(3000)
    seen = []
    real = hf._batches

    def spy(huff):
        out = real(huff)
        seen.extend(len(b) for b in out)
        return out

    hf._batches, saved = spy, hf._batches
    try:
        ck = dcz.read_bytes(data, "t", limits=limits.Limits(max_tables=5000))
    finally:
        hf._batches = saved
    assert len(ck.state_dict) == 3000 and max(seen) * (1 << 15) <= hf.LUT_BUDGET


def test_filler_bomb_shows_its_decoded_size_and_is_refused(cli, tmp_path):
    """16 KB that would unpack to 2.7 GB of zeros: inspect says so; unpack refuses above --max-decoded."""
    n = 675_000_000 // 16383 * 16383
    data = filler_bomb(n)
    assert len(data) < 20_000
    p = tmp_path / "zeros.dcz"
    p.write_bytes(data)
    r = cli("--json", "inspect", p)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["decoded_bytes"] == n * 4  # 2.7 GB
    r = cli("inspect", p, "--max-decoded", "1G")
    assert f"decodes to {n * 4:,} bytes" in r.stderr and "unpack would refuse it" in r.stderr
    refused(cli, "unpack", p, "-o", tmp_path / "x.pt", "--max-decoded", "1G", match="would decode to more than 1,073,741,824")
    assert not (tmp_path / "x.pt").exists()
    # a claim beyond RAM is refused with the default limit, from the header
    huge = filler_bomb(1 << 40)
    q = tmp_path / "huge.dcz"
    q.write_bytes(huge)
    refused(cli, "unpack", q, "-o", tmp_path / "y.pt", match="would decode to more than")


def test_decoded_limit_from_environment(monkeypatch):
    data = filler_bomb(16383 * 600)
    monkeypatch.setenv("DCOMP_MAX_DECODED", "1M")
    with pytest.raises(E.LimitExceeded, match="DCOMP_MAX_DECODED"):
        dcz.read_bytes(data, "z")
    monkeypatch.setenv("DCOMP_MAX_DECODED", "100M")
    assert dcz.read_bytes(data, "z").state_dict["w"].count_nonzero() == 0


def test_huge_num_classes_refused_in_dcz_and_checkpoint(cli, tmp_path, lenet_ckpt):
    h = header([], [], num_classes=300_000_000)
    p = tmp_path / "classes.dcz"
    p.write_bytes(frame(h, b"", 0, compress=False))
    refused(cli, "unpack", p, "-o", tmp_path / "c.pt", match="num_classes 300,000,000 is over the limit")
    d = lenet_ckpt.to_dict()
    d["num_classes"] = 300_000_000
    buf = io.BytesIO()
    torch.save(d, buf)
    q = tmp_path / "classes.pt"
    q.write_bytes(buf.getvalue())
    refused(cli, "eval", q, "--data", "synthetic", match="num_classes 300,000,000 is over the limit")
    with limits.overridden(max_classes=1 << 30):
        assert read_checkpoint(buf.getvalue(), "x").num_classes == 300_000_000


def test_input_shape_claim_refused(lenet_ckpt):
    d = lenet_ckpt.to_dict()
    d["input_shape"] = [3, 100_000, 100_000]
    buf = io.BytesIO()
    torch.save(d, buf)
    with pytest.raises(FormatError, match="input_shape .* over the limit"):
        read_checkpoint(buf.getvalue(), "x.pt")


def test_bad_limit_values_are_usage_errors(cli, tmp_path):
    r = cli("inspect", tmp_path / "nothing.dcz", "--max-decoded", "lots")
    assert r.exit_code == 2 and "--max-decoded" in r.output


def test_limits_parse_sizes():
    assert limits.parse_size("512M") == 512 << 20 and limits.parse_size("1.5G") == 3 << 29
    assert limits.parse_size("4096") == 4096 and limits.parse_size("8GiB") == 8 << 30
    assert limits.Limits().decoded() >= 1 << 30
