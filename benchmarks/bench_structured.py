"""Structured pruning sweep over every torchvision classifier: writes docs/bench/structured.md.

    python benchmarks/bench_structured.py                      # all models (long: run in the background)
    python benchmarks/bench_structured.py --models resnet18,vit_b_16 --out /tmp/s.md

For each classification model of the installed torchvision (random weights, 10 classes), at a stated
input size: 50% of the units of every prunable group are removed (``dcomp prune --method group
--sparsity 0.5``, L1 importance), then the model must

1. have the asked width in every pruned group (n - round(n/2), at least 1; equal splits may round per part),
2. run,
3. rebuild from its checkpoint in a new Python process (weights_only load, no pickle) and give the
   same outputs,
4. export to ONNX, with onnxruntime agreeing with PyTorch (max |diff| / max |output| <= 1e-4),
   before and after pruning.

Params and MACs (batch 1) before/after, and onnxruntime latency at batch 1 (1 thread, median of
repeated runs, before and after interleaved, under ``flock /tmp/dcomp-timing.lock``, with the load
average) are recorded. Each model runs in its own subprocess (a crash or a memory blow-up costs
one row, not the sweep).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Input sizes: small enough for a shared 2-core machine; the architecture is what is under test.
SIZE = {"inception_v3": 299, "maxvit_t": 224, "alexnet": 224}   # alexnet/vgg pool to 6x6/7x7: ONNX needs a factor;
# inception_v3: its auxiliary head (traced: it reads channels in training) needs ~299 px; maxvit_t: 7x7 windows at every stage
for _vgg in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"):
    SIZE[_vgg] = 224
BIG = {"vit_h_14": 56, "regnet_y_128gf": 64}
# Originals over ONNX's 2 GB protobuf limit: exported to a file with external data (ONNX_DIR/<name>.big/),
# which onnxruntime reads from the path.
EXTERNAL_DATA = {"vit_h_14", "regnet_y_128gf"}
DEFAULT_SIZE = 64
ONNX_DIR = Path("/tmp/dcomp-bench-structured-onnx")


def size_of(name: str) -> int:
    return BIG.get(name) or SIZE.get(name) or DEFAULT_SIZE


# One model per mechanism first (and the two Torch-Pruning fails), then the rest: a sweep cut short by
# time still covers every mechanism.
FIRST = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "densenet121", "googlenet",
         "efficientnet_b0", "resnext50_32x4d", "convnext_tiny", "vit_b_16", "swin_t", "swin_v2_t", "regnet_y_400mf",
         "regnet_x_400mf", "mnasnet0_5", "squeezenet1_0", "inception_v3", "maxvit_t", "alexnet", "vgg11_bn",
         "wide_resnet50_2", "efficientnet_v2_s"]


def model_names() -> list[str]:
    from dcomp.models.vision import vision_models

    tm = vision_models()
    names = sorted(tm.list_models(module=tm))
    return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


def _latency(onnx_a: bytes, onnx_b: bytes, x, seconds: float = 2.0) -> tuple[float, float, str]:
    import numpy as np

    from dcomp.runtime.runner import OrtRunner

    ra, rb = OrtRunner(onnx_a, 1), OrtRunner(onnx_b, 1)
    with open("/tmp/dcomp-timing.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        load = os.getloadavg()[0]
        for r in (ra, rb):
            r.run(x)
        ta, tb = [], []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(ta) < 5:
            for r, acc in ((ra, ta), (rb, tb)):
                t0 = time.perf_counter()
                r.run(x)
                acc.append(time.perf_counter() - t0)
    return float(np.median(ta)) * 1e3, float(np.median(tb)) * 1e3, f"{load:.2f}"


def _export_external(model, input_shape, name: str) -> str:
    """Export ``model`` to ONNX_DIR/<name>.big/model.onnx with its weights as external data (past 2 GB one
    protobuf cannot hold them); returns the path, which onnxruntime loads like bytes."""
    import shutil

    import onnx
    import torch

    from dcomp.formats.onnx_export import INPUT_NAME, IR_VERSION, OPSET, OUTPUT_NAME

    d = ONNX_DIR / f"{name}.big"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    path = str(d / "model.onnx")
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(model.eval(), (torch.zeros(2, *input_shape),), path, dynamo=False, opset_version=OPSET,
                              do_constant_folding=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    proto = onnx.load(path, load_external_data=False)
    proto.ir_version = min(proto.ir_version, IR_VERSION) if proto.ir_version else IR_VERSION
    onnx.save(proto, path)
    return path


def run_one(name: str, timing: bool) -> dict:
    import torch

    from dcomp.compressors.graph.macs import count_macs
    from dcomp.compressors.masks import prune_count
    from dcomp.compressors.pruning import PruneConfig, apply_prune
    from dcomp.formats.checkpoint import Checkpoint
    from dcomp.formats.onnx_export import compare_with_torch, export_module
    from dcomp.stages import StageContext

    s = size_of(name)
    kwargs = {"num_classes": 10}
    if name.startswith("vit_"):
        kwargs["image_size"] = s
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False
    res: dict = {"model": name, "input": f"3x{s}x{s}", "status": "fail"}
    torch.manual_seed(0)
    ck = Checkpoint(arch={"kind": "import", "target": f"torchvision.models:{name}", "kwargs": kwargs},
                    state_dict={}, input_shape=[3, s, s], num_classes=10)
    from dcomp.models import build_from_factory

    model = build_from_factory(ck.arch["target"], kwargs).eval()
    ck.update_from_model(model)
    res["params_before"] = sum(p.numel() for p in model.parameters())
    res["macs_before"] = count_macs(model, ck.input_shape)[0]
    t0 = time.time()
    step = "prune"
    try:
        out = apply_prune(ck, PruneConfig(method="group", sparsity=0.5, min_weights=0),
                          StageContext())
        res["prune_s"] = round(time.time() - t0, 1)
        m = out.metrics
        rows = m["layers"]
        bad = [r for r in rows if not r["note"] and r["units_after"] != max(1, r["units_before"] - prune_count(r["units_before"], 0.5))
               and "kept" not in r["note"]]
        res["groups_pruned"] = sum(1 for r in rows if r["units_after"] < r["units_before"])
        res["layers"] = len(rows)
        res["kept_whole"] = sorted({r["note"].removeprefix("kept: ") for r in rows if r["note"].startswith("kept")})
        res["not_followed"] = m["overall"].get("not_followed", [])
        res["width_mismatch"] = [f"{r['layer']} {r['units_before']}->{r['units_after']}" for r in bad][:5]
        step = "run"
        small = out.checkpoint.build_model()
        res["params_after"] = sum(p.numel() for p in small.parameters())
        res["macs_after"] = count_macs(small, ck.input_shape)[0]
        x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y = small(x)
        step = "reload"
        path = Path(f"/tmp/bench_structured_{os.getpid()}.pt")
        out.checkpoint.save(path)
        code = ("import sys, torch\n"
                "from dcomp.formats.checkpoint import Checkpoint\n"
                "d = torch.load(sys.argv[1], weights_only=True)\n"
                "m = Checkpoint.from_dict(d).build_model()\n"
                "x = torch.randn(2, 3, %d, %d, generator=torch.Generator().manual_seed(1))\n"
                "with torch.no_grad(): torch.save(m(x), sys.argv[2])\n" % (s, s))
        yout = path.with_suffix(".out")
        p = subprocess.run([sys.executable, "-c", code, str(path), str(yout)], capture_output=True, text=True,
                           timeout=1200, env=os.environ)
        if p.returncode != 0:
            raise RuntimeError("fresh-process reload failed: " + (p.stderr.strip().splitlines() or [""])[-1])
        y2 = torch.load(yout, weights_only=True)
        path.unlink(missing_ok=True)
        yout.unlink(missing_ok=True)
        res["reload_diff"] = float((y2 - y).abs().max() / y.abs().max().clamp(min=1e-12))
        if res["reload_diff"] > 1e-5:
            raise RuntimeError(f"reloaded model differs by {res['reload_diff']:.2e}")
        step = "export"
        onnx_b = export_module(small, ck.input_shape)
        res["onnx_rel_after"] = compare_with_torch(onnx_b, small, ck.input_shape, rtol=1e-4)
        if name in EXTERNAL_DATA:
            onnx_a = _export_external(model, ck.input_shape, name)   # a path: onnxruntime takes either
            res["original_onnx"] = "external data (over 2 GB)"
        else:
            onnx_a = export_module(model, ck.input_shape)
        res["onnx_rel_before"] = compare_with_torch(onnx_a, model, ck.input_shape, rtol=1e-4)
        if timing:
            step = "timing"
            res["ms_before"], res["ms_after"], res["load"] = _latency(onnx_a, onnx_b, x[:1].numpy())
        elif isinstance(onnx_a, bytes):   # timed later in one pass (--time)
            ONNX_DIR.mkdir(parents=True, exist_ok=True)
            (ONNX_DIR / f"{name}.before.onnx").write_bytes(onnx_a)
            (ONNX_DIR / f"{name}.after.onnx").write_bytes(onnx_b)
        if name in EXTERNAL_DATA:
            import shutil

            shutil.rmtree(ONNX_DIR / f"{name}.big", ignore_errors=True)
        res["status"] = "pass" if not bad else "fail"
        if bad:
            res["reason"] = "width: " + "; ".join(res["width_mismatch"])
    except Exception as e:  # noqa: BLE001 - every failure is a row of the table
        res["reason"] = f"{step}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    return res


def time_saved(raw: Path, out: Path, models: str | None) -> None:
    """Latency of every saved before/after ONNX pair (the timing lock is taken per model)."""
    import numpy as np

    rows = [json.loads(line) for line in raw.read_text().splitlines()]
    want = set(models.split(",")) if models else None
    for r in rows:
        a, b = ONNX_DIR / f"{r['model']}.before.onnx", ONNX_DIR / f"{r['model']}.after.onnx"
        if r["status"] != "pass" or not a.exists() or (want and r["model"] not in want):
            continue
        s = size_of(r["model"])
        x = np.random.default_rng(0).standard_normal((1, 3, s, s)).astype(np.float32)
        r["ms_before"], r["ms_after"], r["load"] = _latency(a.read_bytes(), b.read_bytes(), x)
        print(f"{r['model']}: {r['ms_before']:.2f} -> {r['ms_after']:.2f} ms (load {r['load']})", file=sys.stderr, flush=True)
        raw.write_text("".join(json.dumps(x) + "\n" for x in rows))
    write_md(rows, out, "python benchmarks/bench_structured.py --no-timing --json RAW; "
                        "python benchmarks/bench_structured.py --time --json RAW")


def _fmt(n) -> str:
    if n is None:
        return ""
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def write_md(results: list[dict], path: Path, command: str) -> None:
    passed = sum(r["status"] == "pass" for r in results)
    ran = sum(r["status"] != "not run" for r in results)
    lines = [
        "# Structured pruning of every torchvision classifier",
        "",
        f"Command: `{command}` (torchvision 0.28.0, torch 2.13.0 CPU, random weights, 10 classes).",
        "",
        "Each model loses 50% of the units of every prunable group (`dcomp prune --method group --sparsity 0.5`, "
        "L1 importance). Pass = every pruned group has the asked width (n - round(n/2), at least one), the model runs, "
        "rebuilds from its checkpoint in a new process (weights_only load) with identical outputs, and exports to ONNX "
        "with onnxruntime within 1e-4 of PyTorch (max |diff| / max |output|), before and after. MACs at batch 1 "
        "(convolutions and matrix products). Latency: onnxruntime, batch 1, 1 thread, median over ~2 s with "
        "before/after interleaved, under `flock /tmp/dcomp-timing.lock`; `load` is the 1-minute load average when "
        "the timing started (the machine has 2 cores and was shared with other jobs: numbers above 2 mean it was loaded, "
        "so compare before/after within a row, not across rows). Input sizes are small (stated per row) to fit the "
        "sweep on this machine.",
        "",
        (f"**{passed} of the {ran} models run pass; {len(results) - ran} of {len(results)} were not run**"
         if ran < len(results) else f"**{passed} of {ran} models pass.**"),
        "",
        "| model | input | result | params before -> after | MACs before -> after | ms before -> after (load) | groups pruned | kept whole / not followed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ms = f"{r['ms_before']:.2f} -> {r['ms_after']:.2f} ({r['load']})" if "ms_before" in r else ""
        kept_l = [k for k in r.get("kept_whole", []) if "model output" not in k]
        kept = (f"{len(kept_l)} reasons to keep groups whole, e.g. {kept_l[0]}" if len(kept_l) > 1
                else "; ".join(kept_l))
        ops: dict[str, list[str]] = {}
        for d in r.get("not_followed", []):
            ops.setdefault(d["op"], []).append(d["module"])
        nf = "; ".join(f"{op} at {len(set(mods))} module(s), e.g. {mods[0]}" for op, mods in ops.items())
        note = "; ".join(x for x in (kept[:160], nf[:240]) if x)
        res = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        def arrow(k):
            return f"{_fmt(r.get(k + '_before'))} -> {_fmt(r.get(k + '_after'))}" if r.get(k + "_after") else ""

        groups = f"{r['groups_pruned']}/{r['layers']}" if "layers" in r else ""
        lines.append(f"| {r['model']} | {r['input']} | {res} | {arrow('params')} | {arrow('macs')} | {ms} | {groups} | {note} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated names (default: every classifier)")
    ap.add_argument("--out", default="docs/bench/structured.md")
    ap.add_argument("--json", default=None, help="also write the raw results here (appended as each model finishes)")
    ap.add_argument("--no-timing", action="store_true", help="save the ONNX pairs instead; time them with --time")
    ap.add_argument("--time", action="store_true", help="time the saved ONNX pairs of the passed models in --json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=1800)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, not a.no_timing)), flush=True)
        return
    if a.time:
        time_saved(Path(a.json), Path(a.out), a.models)
        return
    names = a.models.split(",") if a.models else model_names()
    results = []
    raw = Path(a.json) if a.json else None
    done = {}
    if raw and raw.exists():
        for line in raw.read_text().splitlines():
            r = json.loads(line)
            done[r["model"]] = r
    for name in names:
        if name in done:
            results.append(done[name])
            continue
        t0 = time.time()
        cmd = [sys.executable, __file__, "--one", name] + (["--no-timing"] if a.no_timing else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            line = (p.stdout.strip().splitlines() or [""])[-1]
            r = json.loads(line) if line.startswith("{") else {
                "model": name, "status": "fail", "input": f"3x{size_of(name)}x{size_of(name)}",
                "reason": f"crashed (exit {p.returncode}): {(p.stderr.strip().splitlines() or [''])[-1][:200]}"}
        except subprocess.TimeoutExpired:
            r = {"model": name, "status": "fail", "input": "", "reason": f"timed out after {a.timeout} s"}
        r["seconds"] = round(time.time() - t0, 1)
        print(f"{name}: {r['status']} {r.get('reason', '')} ({r['seconds']} s)", file=sys.stderr, flush=True)
        results.append(r)
        if raw:
            with raw.open("a") as f:
                f.write(json.dumps(r) + "\n")
        write_md(results, Path(a.out), "python benchmarks/bench_structured.py --no-timing --json RAW"
                 + (f" --models {a.models}" if a.models else "") + "; python benchmarks/bench_structured.py --time --json RAW")


if __name__ == "__main__":
    main()
