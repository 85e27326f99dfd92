"""Opening a .dcz or a dcomp checkpoint never runs code from it unless --trust-pickle (issue 20),
while a model the user types on the command line works through a whole pipe with no flag
(issue 19 item 2). The attacks are built here: a TorchScript module whose __setstate__ writes a
marker file, and a checkpoint naming a module (in the current folder) that writes one on import."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Tuple

import pytest
import torch
from torch import nn

from tests.conftest import one_error_line

ROOT = Path(__file__).resolve().parents[1]


# ---- the attacks -----------------------------------------------------------------------------------

class Payload(nn.Module):
    """Writes a file when TorchScript unpickles it (torch.jit.load runs __setstate__)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.buf = torch.zeros(1, dtype=torch.uint8)

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.buf = torch.from_file(self.path, shared=True, size=1, dtype=torch.uint8)
        self.buf.fill_(33)


class EvilNet(nn.Module):
    def __init__(self, marker: str):
        super().__init__()
        self.p = Payload(marker)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.p(x).flatten(1))


def _torchscript_attack(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(EvilNet(str(marker))), buf)
    assert not marker.exists()
    return buf.getvalue()


def _checkpoint(arch: dict, state: dict):
    from dcomp.formats.checkpoint import Checkpoint

    ck = Checkpoint(arch=arch, state_dict=state, input_shape=[1, 8, 8], num_classes=10,
                    data={"spec": "digits", "resize": None})
    ck.add_provenance("train", {})
    return ck


EVILMOD = """
import pathlib
pathlib.Path(__file__).with_name("MARKER").write_text("imported")
from torch import nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
    def forward(self, x):
        return self.fc(x.flatten(1))
"""


@pytest.fixture()
def attacks(tmp_path, monkeypatch):
    """{name: (path of the attack file, marker path)}: TorchScript in a checkpoint and in a .dcz,
    a factory named by a checkpoint and by a .dcz (its module in the current folder, importable)."""
    from dcomp.formats import dcz

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m dcomp` would make it importable
    ts_marker = tmp_path / "ts_marker"
    ts = _torchscript_attack(ts_marker)
    model = torch.jit.load(io.BytesIO(ts))
    ts_marker.unlink()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ck_ts = _checkpoint({"kind": "torchscript", "archive": torch.frombuffer(bytearray(ts), dtype=torch.uint8).clone()}, state)

    mod = f"evilmod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{mod}.py").write_text(EVILMOD)
    lin = nn.Linear(64, 10)
    ck_imp = _checkpoint({"kind": "factory", "target": f"{mod}:Net", "kwargs": {}},
                         {"fc.weight": lin.weight.detach().clone(), "fc.bias": lin.bias.detach().clone()})
    out = {}
    for name, ck, marker in (("ts", ck_ts, ts_marker), ("import", ck_imp, tmp_path / "MARKER")):
        ck.save(tmp_path / f"{name}.pt")
        (tmp_path / f"{name}.dcz").write_bytes(dcz.pack(ck)[0])
        out[f"{name}-ckpt"] = (tmp_path / f"{name}.pt", marker)
        out[f"{name}-dcz"] = (tmp_path / f"{name}.dcz", marker)
    yield out
    sys.modules.pop(mod, None)


def _last_error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and sum(ln.startswith("error") for ln in lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[-1]


RECIPE = "name: tiny\ndefaults: {data: digits}\nstages:\n  - stage: prune\n    sparsity: 0.5\n"

# commands that build the model: without the flag each refuses before anything runs
BUILDING = {
    "eval": lambda f, o: ["eval", f],
    "prune": lambda f, o: ["prune", f, "--sparsity", "0.5", "-o", o / "out.pt"],
    "quantize": lambda f, o: ["quantize", f, "--data", "digits", "-o", o / "out.pt"],
    "retrain": lambda f, o: ["retrain", f, "--epochs", "1", "-o", o / "out.pt"],
    "export": lambda f, o: ["export", f, "-o", o / "out.onnx"],
    "bench": lambda f, o: ["bench", f, "--batch", "1", "--iters", "1", "--warmup", "0", "--variants", "dense"],
    "run": lambda f, o: ["run", o / "r.yaml", "--model", f, "-o", o / "out.pt", "--workdir", o / "w"],
}
# commands that only read or move the data: they never build the model, flag or not
DATA_ONLY = {
    "info": lambda f, o: ["info", f],
    "pack": lambda f, o: ["pack", f, "-o", o / "out.dcz"],
    "quantize": lambda f, o: ["quantize", f, "-o", o / "q.pt"],  # without data it needs no model
}


@pytest.mark.parametrize("attack", ["ts-ckpt", "ts-dcz", "import-ckpt", "import-dcz"])
def test_no_command_runs_code_from_a_file_without_the_flag(cli, attacks, tmp_path, attack):
    path, marker = attacks[attack]
    (tmp_path / "r.yaml").write_text(RECIPE)
    for name, args in BUILDING.items():
        r = cli(*args(path, tmp_path))
        assert r.exit_code == 1, (name, r.output)
        line = one_error_line(r) if name != "run" else _last_error_line(r)  # run names its stage first
        assert "--trust-pickle" in line, (name, line)
        assert ("TorchScript" in line) if attack.startswith("ts") else ("evilmod_" in line and "factory" in line), line
        assert not marker.exists(), f"{name} ran code from {attack}"
        assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.onnx").exists()
    for name, args in {**DATA_ONLY, **({"unpack": lambda f, o: ["unpack", f, "-o", o / "u.pt"],
                                        "inspect": lambda f, o: ["inspect", f, "--verify"]}
                                       if attack.endswith("dcz") else {})}.items():
        for flag in ([], ["--trust-pickle"]):
            r = cli(*flag, *args(path, tmp_path))
            assert r.exit_code == 0, (name, flag, r.output)
            assert not marker.exists(), f"{name} {flag} ran code from {attack}"


def test_info_says_what_building_would_need_and_builds_nothing(cli, attacks):
    import json

    for attack in ("ts-dcz", "import-ckpt"):
        path, marker = attacks[attack]
        r = cli("info", path, "--json", "--trust-pickle")
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stdout)
        assert "--trust-pickle" in summary["arch_needs_trust"]
        assert [x["name"] for x in summary["layers"]] == ["fc.weight", "fc.bias"]
        assert not marker.exists()


def test_info_reads_torchscript_as_data_and_never_unpickles(cli, tmp_path):
    import json

    marker = tmp_path / "m"
    (tmp_path / "ts.pt").write_bytes(_torchscript_attack(marker))
    r = cli("--trust-pickle", "info", tmp_path / "ts.pt", "--json")
    assert r.exit_code == 0, r.output
    assert [x["name"] for x in json.loads(r.stdout)["layers"]] == ["fc.weight", "fc.bias"]
    assert not marker.exists()
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")
    r = cli("--trust-pickle", "info", tmp_path / "pickled.pt")
    assert r.exit_code == 1 and "never unpickles" in one_error_line(r)


@pytest.mark.parametrize("attack", ["ts-ckpt", "ts-dcz", "import-ckpt", "import-dcz"])
def test_with_the_flag_they_load(cli, attacks, tmp_path, attack):
    path, marker = attacks[attack]
    r = cli("--trust-pickle", "eval", path)
    assert r.exit_code == 0, r.output
    assert marker.exists()


def test_every_building_command_loads_with_the_flag(cli, attacks, tmp_path):
    path, marker = attacks["ts-dcz"]
    (tmp_path / "r.yaml").write_text(RECIPE)
    for name, args in BUILDING.items():
        if marker.exists():
            marker.unlink()
        cli("--trust-pickle", *args(path, tmp_path))
        assert marker.exists(), f"{name} --trust-pickle did not load the model"


def test_typing_the_same_factory_trusts_it(cli, attacks):
    """--arch X on the command line vouches for X, also when a file names it."""
    path, marker = attacks["import-ckpt"]
    target = next(iter(torch.load(path, weights_only=True)["arch"]["target"].split(":")[:1]))
    r = cli("eval", path, "--arch", f"{target}:Net")
    assert r.exit_code == 0, r.output
    assert marker.exists()


def test_refused_before_importing_even_a_module_already_importable(tmp_path):
    """Under `python -m dcomp` the current folder is on sys.path: the refusal still comes first
    (a real subprocess, cwd holding the module)."""
    mod = "evilmod_cwd"
    (tmp_path / f"{mod}.py").write_text(EVILMOD)
    lin = nn.Linear(64, 10)
    ck = _checkpoint({"kind": "import", "target": f"{mod}:Net", "kwargs": {}},
                     {"fc.weight": lin.weight.detach(), "fc.bias": lin.bias.detach()})
    ck.save(tmp_path / "evil.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "dcomp", "eval", "evil.pt"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and f"{mod}:Net" in r.stderr and "--trust-pickle" in r.stderr
    assert not (tmp_path / "MARKER").exists()


# ---- the user's own model through a pipe ------------------------------------------------------------

MYNET = """
import pathlib
with open(pathlib.Path(__file__).with_name("imports.log"), "a") as f:
    f.write("mynet imported\\n")
from torch import nn
class TinyNet(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)
    def forward(self, x):
        return self.fc2(self.fc1(x.flatten(1)).relu())
"""


def _tiny_state(tmp_path: Path) -> Path:
    import importlib.util

    (tmp_path / "mynet.py").write_text(MYNET)
    spec = importlib.util.spec_from_file_location("mynet_for_test", tmp_path / "mynet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "imports.log").unlink()
    torch.manual_seed(0)
    torch.save(mod.TinyNet().state_dict(), tmp_path / "sd.pt")
    return tmp_path / "sd.pt"


def test_own_model_from_the_current_folder_through_a_pipeline(tmp_path):
    """--arch mynet:TinyNet (mynet.py in the current folder) -> prune -> quantize -> pack -> eval,
    separate processes: no flag after the first, and mynet is imported only by the first."""
    _tiny_state(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def dcomp(*args):
        r = subprocess.run([sys.executable, "-m", "dcomp", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (args, r.stderr)
        return r

    dcomp("prune", "sd.pt", "--arch", "mynet:TinyNet", "--sparsity", "0.5", "-o", "p.pt")
    assert torch.load(tmp_path / "p.pt", weights_only=True)["arch"]["kind"] == "graph"
    dcomp("quantize", "p.pt", "-o", "q.pt")
    dcomp("pack", "q.pt", "-o", "m.dcz")
    r = dcomp("eval", "m.dcz", "--json")
    assert '"top1"' in r.stdout
    assert (tmp_path / "imports.log").read_text().count("imported") == 1


def test_arch_as_a_file_path_and_as_a_module_in_the_current_folder(cli, tmp_path, monkeypatch):
    sd = _tiny_state(tmp_path)
    monkeypatch.chdir(tmp_path)
    for target in ("./mynet.py:TinyNet", f"{tmp_path}/mynet.py:TinyNet", "mynet:TinyNet"):
        r = cli("eval", sd, "--arch", target, "--arch-kwargs", "hidden=32")
        assert r.exit_code == 0, (target, r.output)
    r = cli("eval", sd, "--arch", "./nothere.py:TinyNet")
    assert r.exit_code == 1 and "nothere.py is not a file" in one_error_line(r)
    sys.modules.pop("mynet", None)


def test_a_factory_that_cannot_become_a_graph_is_kept_as_a_reference(cli, tmp_path, monkeypatch):
    """Data-dependent control flow defeats torch.fx: the reference is stored, the command says
    what later commands need, and they work once the same --arch is typed again."""
    (tmp_path / "dynnet.py").write_text(textwrap.dedent("""
        from torch import nn
        class DynNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(64, 10)
            def forward(self, x):
                if x.sum() > 0:
                    return self.fc(x.flatten(1))
                return -self.fc(x.flatten(1))
    """))
    monkeypatch.chdir(tmp_path)
    fc = nn.Linear(64, 10)
    torch.save({"fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()}, tmp_path / "sd.pt")
    r = cli("prune", "sd.pt", "--arch", "dynnet:DynNet", "--sparsity", "0.5", "-o", "p.pt")
    assert r.exit_code == 0, r.output
    assert "later commands on the output need --arch dynnet:DynNet" in r.stderr
    assert torch.load(tmp_path / "p.pt", weights_only=True)["arch"]["kind"] == "factory"
    r = cli("eval", "p.pt")
    assert r.exit_code == 1 and "--arch dynnet:DynNet or pass --trust-pickle" in one_error_line(r)
    assert cli("eval", "p.pt", "--arch", "dynnet:DynNet").exit_code == 0
    sys.modules.pop("dynnet", None)


def test_torchscript_given_directly_is_the_users_choice(cli, tmp_path, digits):
    """A TorchScript input loads (and its pipe output needs the flag later, since it holds TorchScript)."""
    from dcomp.models import build_zoo

    m = build_zoo("lenet-300-100", digits.input_shape, 10)
    torch.jit.save(torch.jit.script(m), tmp_path / "m.ts")
    r = cli("prune", tmp_path / "m.ts", "--sparsity", "0.5", "-o", tmp_path / "p.pt")
    assert r.exit_code == 0, r.output
    r = cli("eval", tmp_path / "p.pt")
    assert r.exit_code == 1 and "TorchScript" in one_error_line(r)
    assert cli("--trust-pickle", "eval", tmp_path / "p.pt").exit_code == 0


def test_trusted_library_factory_needs_no_flag(cli, tmp_path):
    from dcomp.formats.checkpoint import Checkpoint
    from dcomp.models.arch import build_architecture, is_trusted_library_factory

    assert is_trusted_library_factory("torchvision.models:resnet18")
    assert not is_trusted_library_factory("torchvision.models:nms")
    assert not is_trusted_library_factory("torchvision.ops:nms")
    arch = {"kind": "factory", "target": "torchvision.models:resnet18", "kwargs": {"num_classes": 10}}
    m = build_architecture(arch, [3, 32, 32], 10)
    ck = Checkpoint(arch=arch, state_dict={}, input_shape=[3, 32, 32], num_classes=10)
    ck.update_from_model(m)
    ck.save(tmp_path / "r.pt")
    assert cli("info", tmp_path / "r.pt").exit_code == 0
    bad = Checkpoint(arch={**arch, "kwargs": {"weights": "DEFAULT"}}, state_dict={}, input_shape=[3, 32, 32], num_classes=10)
    with pytest.raises(Exception, match="download weights"):
        bad.build_model()


def test_train_with_a_typed_factory_writes_a_graph_and_info_imports_nothing(cli, tmp_path, monkeypatch):
    sd = _tiny_state(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = cli("train", "--arch", "./mynet.py:TinyNet", "--epochs", "1", "-o", "t.pt")
    assert r.exit_code == 0, r.output
    assert torch.load(tmp_path / "t.pt", weights_only=True)["arch"]["kind"] == "graph"
    (tmp_path / "imports.log").unlink()
    r = cli("info", sd, "--arch", "mynet:TinyNet")  # info never imports, even a typed module
    assert r.exit_code == 0, r.output
    assert "mynet:TinyNet" in r.stderr and not (tmp_path / "imports.log").exists()
    assert cli("eval", "t.pt").exit_code == 0 and not (tmp_path / "imports.log").exists()


def test_a_recipe_on_the_users_torchscript_packs_and_evaluates_without_the_flag(cli, tmp_path, digits):
    """The .dcz a run writes holds the user's own TorchScript: read back in the same run, it is
    still theirs (a later command on that file would need --trust-pickle)."""
    from dcomp.models import build_zoo

    torch.jit.save(torch.jit.script(build_zoo("lenet-300-100", digits.input_shape, 10)), tmp_path / "m.ts")
    (tmp_path / "r.yaml").write_text("name: t\ndefaults: {data: digits}\nstages:\n  - stage: prune\n    sparsity: 0.5\n"
                                     "  - stage: pack\n  - stage: eval\n")
    r = cli("run", tmp_path / "r.yaml", "--model", tmp_path / "m.ts", "-o", tmp_path / "m.dcz")
    assert r.exit_code == 0, r.output
    r = cli("eval", tmp_path / "m.dcz")
    assert r.exit_code == 1 and "TorchScript" in one_error_line(r)
