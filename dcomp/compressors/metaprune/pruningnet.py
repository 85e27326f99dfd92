"""The PruningNet (MetaPruning, Liu et al., ICCV 2019): one meta network that generates the
weights of any candidate of the search space.

Per conv/linear layer a small MLP (``LayerGenerator``: Linear(2, hidden) - ReLU - Linear(hidden,
numel)) maps the layer's encoding, the fraction of its input and of its output channels the candidate
keeps, to the full-size weight tensor, which is then cropped to the candidate's widths with the
dependency graph's own slicing (so every layer a group touches, residual adds included, is cut the
same way). Other parameters (biases, LayerNorm) are shared full-size tensors, cropped the same way.

BatchNorm is non-affine, as in the paper's code, where each width choice has its own BatchNorm
holding nothing but running statistics. Those statistics are never used here: in training every
BatchNorm normalises with the batch's statistics, and before a candidate is scored its statistics
are re-estimated on training batches (``recalibrate_batchnorm``), which is what the paper does with
its per-choice BatchNorms too. So one batch-statistics BatchNorm per layer is the same function.

Training goes through the one loop, ``dcomp.train.fit``: the PruningNet is an ordinary module whose
forward runs the current candidate (``set_candidate``), and the ``RandomCandidates`` callback draws
a new random candidate before every step (seeded by the step, so every rank under torchrun draws
the same one).

``init="input"`` starts each generator's output bias at the input model's weights (the MLP's other
weights small), so every candidate starts as the input's top-L1 units; ``init="random"`` starts
from a fresh initialisation, as the paper does.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
from torch import nn

from dcomp.compressors.metaprune.space import SearchSpace
from dcomp.train import Callback

_BN = nn.modules.batchnorm._BatchNorm


def _key(name: str) -> str:
    return name.replace(".", "__")


class LayerGenerator(nn.Module):
    def __init__(self, shape, hidden: int, start: torch.Tensor, spread: float):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        numel = int(math.prod(self.shape))
        self.fc1 = nn.Linear(2, hidden)
        self.fc2 = nn.Linear(hidden, numel)
        with torch.no_grad():
            self.fc2.bias.copy_(start.reshape(-1))
            self.fc2.weight.normal_(0.0, spread / math.sqrt(hidden * 0.25))

    def forward(self, enc: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(enc))).reshape(self.shape)


def strip_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm layers without affine parameters and without running statistics (batch statistics always)."""
    for m in model.modules():
        if isinstance(m, _BN):
            m.register_parameter("weight", None)
            m.register_parameter("bias", None)
            m.register_buffer("running_mean", None)
            m.register_buffer("running_var", None)
            m.register_buffer("num_batches_tracked", None)
            m.affine = False
            m.track_running_stats = False
    return model


def _plain(model: nn.Module, graph) -> bool:
    """True when cropping tensors is all a candidate needs: no module's forward reads a size attribute
    that changes (grouped convolutions, attention, literal reshapes) and no non-BatchNorm buffer is cut."""
    if graph.attr_fixes or graph.attention:
        return False
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1:
            return False
        if not isinstance(m, _BN) and any(b is not None for b in m._buffers.values()):
            return False
    return True


class PruningNet(nn.Module):
    def __init__(self, space: SearchSpace, hidden: int = 32, init: str = "input", seed: int = 0):
        super().__init__()
        if init not in ("input", "random"):
            raise ValueError(f"init must be input or random, not {init!r}")
        # the input model and the structure the forward runs are not submodules (not trained, not in DDP)
        self.__dict__["space"] = space
        model = space.model
        self.__dict__["plain"] = _plain(model, space.graph)
        self.__dict__["structure"] = strip_batchnorm(copy.deepcopy(model)) if self.plain else None
        self.__dict__["_skeletons"] = OrderedDict()
        gen = torch.Generator().manual_seed(int(seed))
        self.generators = nn.ModuleDict()
        self.shared = nn.ParameterDict()
        self.generated_names: list[str] = []
        self.shared_names: dict[str, str] = {}
        bn_params = {f"{n}.{a}" if n else a for n, m in model.named_modules() if isinstance(m, _BN)
                     for a in ("weight", "bias")}
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))  # the MLPs' own init, seeded
        for layer in space.weight_layers:
            mod = model.get_submodule(layer)
            w = mod.weight.detach()
            if init == "input":
                start = w.clone()
            else:
                fresh = copy.deepcopy(mod)
                fresh.reset_parameters()
                start = fresh.weight.detach().clone()
            spread = 0.1 * float(start.std()) if start.numel() > 1 else 0.01
            self.generators[_key(layer)] = LayerGenerator(w.shape, hidden, start, spread)
            self.generated_names.append(f"{layer}.weight")
        for pname, p in model.named_parameters():
            if pname in self.generated_names or pname in bn_params:
                continue
            self.shared[_key(pname)] = nn.Parameter(p.detach().clone())
            self.shared_names[_key(pname)] = pname
        self.genes = space.full_genes()

    # ---- candidates --------------------------------------------------------------------------------

    def set_candidate(self, genes) -> None:
        self.genes = tuple(int(g) for g in genes)

    def encodings(self, genes) -> dict[str, torch.Tensor]:
        """layer -> (fraction of input channels kept, fraction of output channels kept)."""
        shapes = self.space.shapes(genes)
        out = {}
        for name in self.generated_names:
            full = self.generators[_key(name.rpartition(".")[0])].shape
            s = shapes[name]
            fin = s[1] / full[1] if len(full) > 1 else 1.0
            out[name] = torch.tensor([fin, s[0] / full[0]], dtype=torch.float32)
        return out

    def generated(self, genes) -> dict[str, torch.Tensor]:
        """Every non-BatchNorm parameter of the candidate, cropped to its widths (differentiable)."""
        space = self.space
        removed = space.removed(genes)
        graph = space.graph
        enc = self.encodings(genes)
        graph.cuts(removed)
        out = {}
        for name in self.generated_names:
            layer = name.rpartition(".")[0]
            full = self.generators[_key(layer)](enc[name])
            out[name] = graph.cut_tensor(layer, "weight", full, removed)
        for key, p in self.shared.items():
            pname = self.shared_names[key]
            owner, _, attr = pname.rpartition(".")
            out[pname] = graph.cut_tensor(owner, attr, p, removed)
        return out

    def skeleton(self, genes) -> nn.Module:
        """The module the forward runs: the input's structure (plain models), else the candidate's shrunk copy."""
        if self.plain:
            return self.structure
        k = tuple(genes)
        sk = self._skeletons.get(k)
        if sk is None:
            from dcomp.compressors.graph import shrink

            sk, _ = shrink(self.space.model, self.space.graph, self.space.removed(k))
            sk = strip_batchnorm(sk)
            self._skeletons[k] = sk
            while len(self._skeletons) > 16:
                self._skeletons.popitem(last=False)
        sk.train(self.training)
        return sk

    def forward(self, x):
        from torch.func import functional_call

        sk = self.skeleton(self.genes)
        sk.train(self.training)
        return functional_call(sk, self.generated(self.genes), (x,), strict=False)

    # ---- a real candidate ---------------------------------------------------------------------------

    @torch.no_grad()
    def candidate_model(self, genes) -> tuple[nn.Module, dict]:
        """A physically smaller copy of the input model at ``genes`` holding the generated weights, with
        non-affine BatchNorm (weight 1, bias 0) and fresh running statistics (to be recalibrated)."""
        from dcomp.compressors.graph import shrink

        space = self.space
        small, resized = shrink(space.model, space.graph, space.removed(genes))
        params = dict(small.named_parameters())
        for name, t in self.generated(genes).items():
            params[name].copy_(t)
        for m in small.modules():
            if isinstance(m, _BN):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                if m.track_running_stats:
                    m.reset_running_stats()
        return small, resized


class RandomCandidates(Callback):
    """Before every step, a random candidate (uniform over the width grid per group), seeded by the step."""

    def __init__(self, net: PruningNet, seed: int = 0):
        self.net = net
        self.seed = int(seed)

    def before_batch(self, ctx):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.step)
        self.net.set_candidate(self.net.space.random_genes(gen))

    def on_train_end(self, ctx):
        self.net.set_candidate(self.net.space.full_genes())
