import io

import pytest
import torch

from dcomp.errors import FormatError
from dcomp.formats.checkpoint import FORMAT_VERSION, Checkpoint, read_checkpoint


def test_round_trip_loads_with_weights_only(lenet_ckpt, tmp_path):
    ckpt = lenet_ckpt.copy()
    w = ckpt.state_dict["fc1.weight"]
    mask = w.abs() > w.abs().median()
    ckpt.masks = {"fc1.weight": mask}
    ckpt.state_dict["fc1.weight"] = w * mask
    path = tmp_path / "c.pt"
    ckpt.save(path)

    raw = torch.load(path, weights_only=True)  # plain data only: no code runs on load
    assert raw["format"] == "dcomp-checkpoint" and raw["version"] == FORMAT_VERSION

    back = read_checkpoint(path.read_bytes(), str(path))
    assert back.arch == ckpt.arch and back.input_shape == ckpt.input_shape
    assert back.provenance == ckpt.provenance
    for k, v in ckpt.state_dict.items():
        assert torch.equal(back.state_dict[k], v)
    assert torch.equal(back.masks["fc1.weight"], mask)
    model = back.build_model()
    assert torch.equal(model.fc1.weight, ckpt.state_dict["fc1.weight"])


def test_newer_version_is_refused_with_upgrade_hint(lenet_ckpt):
    d = lenet_ckpt.to_dict()
    d["version"] = FORMAT_VERSION + 1
    buf = io.BytesIO()
    torch.save(d, buf)
    with pytest.raises(FormatError, match="newer than this dcomp reads.*upgrade"):
        read_checkpoint(buf.getvalue(), "x.pt")


def test_truncated_and_foreign_files_give_format_errors(lenet_ckpt):
    data = lenet_ckpt.to_bytes()
    with pytest.raises(FormatError, match="truncated or corrupt"):
        read_checkpoint(data[: len(data) // 2], "half.pt")
    with pytest.raises(FormatError, match="not a dcomp checkpoint"):
        read_checkpoint(b"hello, I am a text file\n", "notes.txt")


def test_shrunk_checkpoint_rebuilds_at_stored_shapes(lenet_ckpt):
    """A structurally pruned checkpoint (smaller fc1/fc2) rebuilds from the zoo factory."""
    ckpt = lenet_ckpt.copy()
    sd = ckpt.state_dict
    keep = torch.arange(0, 300, 2)  # keep every second fc1 neuron
    sd["fc1.weight"], sd["fc1.bias"] = sd["fc1.weight"][keep], sd["fc1.bias"][keep]
    sd["fc2.weight"] = sd["fc2.weight"][:, keep]
    model = Checkpoint.from_dict(ckpt.to_dict()).build_model()
    assert model.fc1.out_features == 150 and model.fc2.in_features == 150
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_provenance_is_plain_data(lenet_ckpt):
    ckpt = lenet_ckpt.copy()
    ckpt.add_provenance("x", {"t": torch.tensor(3.0), "p": [1, 2]}, {"acc": 97.5})
    entry = ckpt.provenance[-1]
    assert entry["params"] == {"t": 3.0, "p": [1, 2]} and entry["metrics"] == {"acc": 97.5}
    assert entry["dcomp_version"] and "time" not in entry  # no wall-clock time by default: reproducible bytes


def test_provenance_time_only_when_asked(lenet_ckpt, monkeypatch):
    ckpt = lenet_ckpt.copy()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    ckpt.add_provenance("x")
    assert ckpt.provenance[-1]["time"] == "2023-11-14T22:13:20+00:00"
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    monkeypatch.setenv("DCOMP_PROVENANCE_TIME", "1")
    ckpt.add_provenance("y")
    assert ckpt.provenance[-1]["time"].startswith("20")


class _Versioned(torch.nn.Module):
    """Like torchvision's MNASNet: refuses a state_dict whose metadata lacks its version."""

    _version = 2

    def __init__(self, input_shape=(1, 8, 8), num_classes=10):
        super().__init__()
        self.fc = torch.nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError("version should be set to 1 or 2 instead of None")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_modules_that_check_their_version_rebuild_from_a_checkpoint(tmp_path):
    """A checkpoint stores tensors, not torch's _metadata: the rebuild supplies the module versions
    of the code that rebuilt it (torchvision's MNASNet failed with 'version should be set')."""
    from dcomp.formats.checkpoint import Checkpoint

    model = _Versioned().eval()
    ck = Checkpoint(arch={"kind": "factory", "target": "tests.test_checkpoint:_Versioned", "kwargs": {}},
                    state_dict={}, input_shape=[1, 8, 8], num_classes=10,
                    trusted_refs=frozenset({"tests.test_checkpoint:_Versioned"}))
    ck.update_from_model(model)
    ck.save(tmp_path / "v.pt")
    back = Checkpoint.from_dict(torch.load(tmp_path / "v.pt", weights_only=True))
    back.trusted_refs = ck.trusted_refs
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(back.build_model()(x), model(x))
