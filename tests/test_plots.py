"""dcomp plot: every kind writes a decodable picture of the documented pixel size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import one_error_line


def _png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()
        return im.size


@pytest.fixture(scope="module")
def packed(tmp_path_factory, lenet_ckpt):
    """base.pt, pruned+quantized q.pt and its q.dcz."""
    from dcomp.compressors.pruning import PruneConfig, apply_prune
    from dcomp.compressors.quantization import QuantizeConfig, apply_quantize
    from dcomp.formats.dcz import PackConfig, write_bytes
    from dcomp.stages import StageContext

    d = tmp_path_factory.mktemp("plots")
    lenet_ckpt.save(d / "base.pt")
    pruned = apply_prune(lenet_ckpt, PruneConfig(sparsity=0.9)).checkpoint
    q = apply_quantize(pruned, QuantizeConfig(fc_bits=5), StageContext()).checkpoint
    q.save(d / "q.pt")
    (d / "q.dcz").write_bytes(write_bytes(q, PackConfig(coder="huffman")))   # Huffman streams: code lengths compared below
    return d


def test_plot_weights_with_before_and_centroids(cli, packed, tmp_path):
    from dcomp.plots import figure_pixels

    r = cli("plot", "weights", packed / "q.pt", "--before", packed / "base.pt", "-o", tmp_path / "w.png")
    assert r.exit_code == 0, r.output
    assert _png_size(tmp_path / "w.png") == figure_pixels(3)  # fc1, fc2, fc3
    r = cli("plot", "weights", packed / "q.dcz", "-o", tmp_path / "w.svg")  # a .dcz reads as a model too
    assert r.exit_code == 0, r.output
    assert "<svg" in (tmp_path / "w.svg").read_text()


def test_plot_streams_reproduces_the_packed_code_lengths(cli, packed, tmp_path):
    from dcomp.formats.dcz import read_header
    from dcomp.plots import dcz_streams, figure_pixels

    data = (packed / "q.dcz").read_bytes()
    recs = {r["name"]: r for r in dcz_streams(data)}
    hdr = {t["name"]: t for t in read_header(data).h["tensors"]}
    checked = 0
    for name, r in recs.items():
        for kind, srec in (("gaps", hdr[name].get("gaps")), ("indices", hdr[name]["values"].get("indices"))):
            s = r[kind]
            if s is None:
                continue
            assert int(s["counts"].sum()) == srec["count"]
            if srec["coding"] == "huffman":  # the same code the packer wrote: same total bits, Kraft-complete
                assert int((s["counts"] * s["lens"]).sum()) == srec["bits"]
                used = s["lens"][s["lens"] > 0].astype(float)
                assert np.isclose((2.0 ** -used).sum(), 1.0)
                checked += 1
    assert checked >= 2
    r = cli("plot", "streams", packed / "q.dcz", "-o", tmp_path / "s.png")
    assert r.exit_code == 0, r.output
    panels = sum(rec[k] is not None for rec in recs.values() for k in ("gaps", "indices"))
    assert _png_size(tmp_path / "s.png") == figure_pixels(panels, cols=2)


def test_plot_bytes_from_dcz_and_from_inspect_json(cli, packed, tmp_path):
    from dcomp.formats.dcz import inspect_bytes
    from dcomp.plots import DPI, PANEL, byte_breakdown

    report = inspect_bytes((packed / "q.dcz").read_bytes())
    layers, parts, header = byte_breakdown(report)
    assert layers == ["fc1", "fc2", "fc3"] and header > 0
    assert sum(map(sum, parts.values())) + header == report["file_bytes"]
    assert sum(parts["biases"]) == sum(r["total_bytes"] for r in report["layers"] if r["name"].endswith(".bias"))
    r = cli("plot", "bytes", packed / "q.dcz", "-o", tmp_path / "b.png")
    assert r.exit_code == 0, r.output
    assert _png_size(tmp_path / "b.png") == (int(PANEL[0] * 2 * DPI), int(PANEL[1] * 1.5 * DPI))
    r = cli("inspect", packed / "q.dcz", "--json")
    (tmp_path / "i.json").write_text(r.stdout)
    r = cli("plot", "bytes", tmp_path / "i.json", "--format", "svg")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "i-bytes.svg").read_text().count("<svg") == 1


def test_plot_bench_latency_vs_batch(cli, tmp_path):
    from dcomp.plots import DPI, PANEL

    summary = {"load_average": [3.5, 2.0, 1.0], "targets": [
        {"name": "baseline dense", "role": "reference", "results": [{"batch": b, "p50_ms": 0.1 * b} for b in (1, 8, 64)]},
        {"name": "shrunk", "role": "model", "results": [{"batch": b, "p50_ms": 0.05 * b} for b in (1, 8, 64)]}]}
    (tmp_path / "bench.json").write_text(json.dumps(summary))
    r = cli("plot", "bench", tmp_path / "bench.json", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)["picture"]
    assert _png_size(out) == (int(PANEL[0] * 1.5 * DPI), int(PANEL[1] * 1.5 * DPI))


@pytest.mark.parametrize("args, words, code", [
    (("histogram", "q.pt"), "unknown picture kind", 2),
    (("streams", "q.pt"), "reads a .dcz", 2),
    (("weights", "q.pt", "--format", "jpg"), "png or svg", 2),
    (("bench", "q.pt"), "not JSON", 2),
    (("sweep", "q.pt"), "not a sweep JSON", 2),
    (("weights", "nothing.pt"), "no such file", 1),
])
def test_plot_bad_input(cli, packed, tmp_path, args, words, code):
    before = set(packed.iterdir())
    r = cli("plot", args[0], packed / args[1], *args[2:])
    assert r.exit_code == code, r.output
    assert words in one_error_line(r)
    assert set(packed.iterdir()) == before
