"""Soft weight-sharing (Ullrich, Meeds & Welling, ICLR 2017): retraining under a Gaussian-mixture
prior, so the weights gather into a few tight clusters and the popular clusters grow.

Per target layer a mixture of ``components`` Gaussians (means, variances, mixing proportions,
all learned) is fitted to the layer's live weights (those its mask keeps) while the network
trains; the loop's loss gains

    tau / N * sum over live weights w of  -log sum_j pi_j N(w; mu_j, sigma_j^2)

(N = training samples per epoch, so ``tau`` weighs the prior against the data term as in the
paper). For a weight close to one component that term is about ``-log pi_j + (w - mu_j)^2 /
(2 sigma_j^2)``: the code length of its cluster label (in nats) plus a distortion, i.e. the
rate-distortion objective of entropy-constrained quantization, made differentiable. Weights are
pulled to the means, and a weight between two components drifts to the more probable one, so
after ``quantize`` (k-means with k = components, or ``rd_lambda``) the cluster labels have low
entropy and little error, and the .dcz's entropy-coded index streams shrink.

How it sits in the one loop (dcomp.train.fit): ``compute_loss`` adds the prior term (its
gradient reaches the weights through the same backward pass), ``after_step`` takes an Adam step
on the mixture parameters (their own optimizer, as DAFL's generator has) and clears their
gradients. Masks are untouched: pruned weights are excluded from the prior and the loop's
MaskKeeper keeps them exactly zero. Means are kept in units of the layer's initial weight
std, variances as log std with a floor (``min_std``, same units), so one learning rate suits
every layer. Components are initialised by k-means of the layer's live weights.
"""

from __future__ import annotations

import math

import torch

from dcomp.compressors.schedules import target_layers
from dcomp.config.retrain import SWSConfig  # noqa: F401 - the options live in the torch-free config package
from dcomp.train import Callback


class SoftWeightSharing(Callback):
    """The mixture-prior callback. ``summary()`` reports, per layer, the entropy of the hard
    labels (each live weight to its most responsible component) in bits per weight."""

    def __init__(self, cfg: SWSConfig):
        self.cfg = cfg
        self.mix: dict[str, dict[str, torch.Tensor]] = {}
        self.scale: dict[str, float] = {}
        self.prior_history: list[float] = []

    def _live(self, ctx, name: str) -> torch.Tensor:
        p = ctx.params[name]
        m = ctx.masks.get(name)
        return p[m] if m is not None else p.reshape(-1)

    @torch.no_grad()
    def on_train_begin(self, ctx) -> None:
        from dcomp.compressors.kmeans import kmeans1d

        cfg = self.cfg
        self.owned = [n for n in target_layers(ctx, cfg.layers) if self._live(ctx, n).numel() > cfg.components]
        params = []
        for name in self.owned:
            w = self._live(ctx, name).detach().float().cpu()
            s = float(w.std()) or 1.0
            self.scale[name] = s
            km = kmeans1d(w / s, cfg.components, init="linear")
            means = torch.zeros(cfg.components)
            means[:km.codebook.numel()] = km.codebook
            counts = torch.bincount(km.labels, minlength=cfg.components).float() + 1.0
            dev = ctx.params[name].device
            mix = {"mu": means.to(dev).requires_grad_(),
                   "log_std": torch.full((cfg.components,), math.log(cfg.init_std), device=dev).requires_grad_(),
                   "logit": torch.log(counts / counts.sum()).to(dev).requires_grad_()}
            self.mix[name] = mix
            params += list(mix.values())
        self.n_train = max(1, ctx.steps_per_epoch * ctx.config.batch_size)
        self.opt = torch.optim.Adam(params, lr=cfg.lr) if params else None

    def _nll(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """-log p(w) per live weight (nats, in the layer's std units; constants dropped)."""
        mix = self.mix[name]
        x = (w / self.scale[name])[:, None]
        log_std = mix["log_std"].clamp(min=math.log(self.cfg.min_std))
        log_pi = torch.log_softmax(mix["logit"], 0)
        comp = log_pi - log_std - 0.5 * ((x - mix["mu"]) / log_std.exp()) ** 2
        return -torch.logsumexp(comp, dim=1)

    def compute_loss(self, ctx, x, out, y, loss):
        if not self.owned:
            return loss
        prior = sum(self._nll(n, self._live(ctx, n)).sum() for n in self.owned)
        self.last_prior = float(prior.detach())
        return loss + self.cfg.tau / self.n_train * prior

    def after_step(self, ctx) -> None:
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def on_epoch_end(self, ctx) -> None:
        if self.owned:
            self.prior_history.append(getattr(self, "last_prior", float("nan")))

    @torch.no_grad()
    def hard_labels(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Each weight's most responsible component (the label soft weight-sharing would store)."""
        mix = self.mix[name]
        x = (w.to(mix["mu"].device) / self.scale[name])[:, None]
        log_std = mix["log_std"].clamp(min=math.log(self.cfg.min_std))
        comp = torch.log_softmax(mix["logit"], 0) - log_std - 0.5 * ((x - mix["mu"]) / log_std.exp()) ** 2
        return comp.argmax(1)

    def summary(self) -> dict:
        from dcomp.compressors.kmeans import label_entropy

        out = {}
        for name in self.owned:
            mix = self.mix[name]
            pi = torch.softmax(mix["logit"].detach(), 0)
            out[name] = {"mixture_entropy_bits": float(-(pi * torch.log2(pi.clamp(min=1e-30))).sum()),
                         "means": [round(float(m) * self.scale[name], 6) for m in mix["mu"].detach()],
                         "stds": [round(float(s) * self.scale[name], 6) for s in
                                  mix["log_std"].detach().clamp(min=math.log(self.cfg.min_std)).exp()]}
            if hasattr(self, "_final"):
                out[name]["label_entropy_bits"] = label_entropy(self.hard_labels(name, self._final[name]))
        return {"sws_layers": out}

    @torch.no_grad()
    def on_train_end(self, ctx) -> None:
        self._final = {n: self._live(ctx, n).detach().float().cpu() for n in self.owned}
