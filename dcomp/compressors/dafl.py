"""Data-free distillation: DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019).

A generator G turns noise z into inputs for the fixed teacher T; the student S is distilled on
those generated batches, so no real training sample is ever read. Per iteration (one step of
the one training loop, ``dcomp.train.fit``):

    x = G(z), z ~ N(0, I)                         (batch source ``GeneratedBatches``)
    t = T(x), f_T = T's features before its classifier (a forward pre-hook, no model change)
    L_G = oh * CE(t, argmax t)                    one-hot: outputs the teacher is sure about
        + ie * sum_c p_c log p_c, p = mean_batch softmax(t)
                                                  negative entropy of the mean prediction:
                                                  minimising it balances the classes
        - a * mean |f_T|                          activation: strongly firing features
    L_S = KL(softmax(t) || softmax(S(x)))         on x detached: S's loss never reaches G
    G and S step on L_G + L_S in the same iteration (their parameters are disjoint; the
    teacher's are frozen).

The ``DAFL`` callback owns G, its Adam optimizer and the teacher hook; ``GeneratedBatches`` is
the batch source that asks it for each batch. The paper's MNIST settings are the defaults
(``PAPER_TRAIN``: 200 epochs x 120 iterations of 512, student Adam 2e-3; ``DAFLConfig``:
latent 100, oh 1, ie 5, a 0.1, generator Adam 0.2). The authors' code computes the entropy term
with log10, so its ie 5 equals about 2.17 with the natural log used here.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dcomp.config.dafl import PAPER_TRAIN, DAFLConfig, DataFreeConfig, DistillStudentConfig, paper_train_config  # noqa: F401 - re-exported
from dcomp.errors import DcompError, UsageError
from dcomp.train import BatchSource, Callback, evaluate

# ---- the generator -------------------------------------------------------------------------------

class Generator(nn.Module):
    """DCGAN-style generator of the paper, sized from the teacher's input shape.

    Images (C, H, W): linear -> (128, ceil(H/4), ceil(W/4)) -> BN -> upsample x2 -> conv 128 ->
    BN -> LeakyReLU 0.2 -> upsample to H x W -> conv 64 -> BN -> LeakyReLU
    -> conv C -> tanh -> BN without affine -> x * input_std + input_mean.
    Flat inputs (D,): linear 256 -> BN -> LeakyReLU -> linear 512 -> BN -> LeakyReLU -> linear D
    -> tanh -> BN without affine -> the same affine map.
    ``width`` replaces the 128 (and 64 = width / 2): the paper's size is the default."""

    def __init__(self, input_shape: Sequence[int], latent_dim: int = 100, mean: Sequence[float] = (0.0,),
                 std: Sequence[float] = (1.0,), width: int = 128):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.latent_dim = int(latent_dim)
        channels = self.input_shape[0]
        if len(mean) not in (1, channels) or len(std) not in (1, channels):
            raise UsageError(f"input_mean/input_std need 1 or {channels} values (one per input channel), "
                             f"got {len(mean)} and {len(std)}")
        if len(self.input_shape) == 3:
            c, h, w = self.input_shape
            self.init_hw = (max(1, math.ceil(h / 4)), max(1, math.ceil(w / 4)))
            w1, w2 = int(width), max(1, int(width) // 2)
            self.width = w1
            self.l1 = nn.Linear(latent_dim, w1 * self.init_hw[0] * self.init_hw[1])
            self.body = nn.Sequential(
                nn.BatchNorm2d(w1),
                nn.Upsample(scale_factor=2),
                nn.Conv2d(w1, w1, 3, padding=1),
                nn.BatchNorm2d(w1),
                nn.LeakyReLU(0.2),
                nn.Upsample(size=(h, w)),
                nn.Conv2d(w1, w2, 3, padding=1),
                nn.BatchNorm2d(w2),
                nn.LeakyReLU(0.2),
                nn.Conv2d(w2, c, 3, padding=1),
                nn.Tanh(),
                nn.BatchNorm2d(c, affine=False),
            )
            view = (1, -1, 1, 1)
        elif len(self.input_shape) == 1:
            d = self.input_shape[0]
            self.init_hw = None
            self.l1 = nn.Linear(latent_dim, 256)
            self.body = nn.Sequential(
                nn.BatchNorm1d(256), nn.LeakyReLU(0.2),
                nn.Linear(256, 512), nn.BatchNorm1d(512), nn.LeakyReLU(0.2),
                nn.Linear(512, d), nn.Tanh(), nn.BatchNorm1d(d, affine=False),
            )
            view = (1, -1) if len(mean) == d else (1, 1)
        else:
            raise UsageError(f"the generator makes images (C, H, W) or flat vectors (D,); the teacher takes "
                             f"{list(self.input_shape)}")
        self.register_buffer("out_mean", torch.tensor(list(mean), dtype=torch.float32).reshape(view))
        self.register_buffer("out_std", torch.tensor(list(std), dtype=torch.float32).reshape(view))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.l1(z)
        if self.init_hw is not None:
            h = h.view(z.shape[0], self.width, *self.init_hw)
        return self.body(h) * self.out_std + self.out_mean


# ---- the three generator losses and the student's ---------------------------------------------------

def one_hot_loss(t_logits: torch.Tensor) -> torch.Tensor:
    """CE of the teacher's outputs against their own argmax: small when the teacher is sure."""
    return F.cross_entropy(t_logits, t_logits.argmax(1))


def information_entropy_loss(t_logits: torch.Tensor) -> torch.Tensor:
    """sum_c p_c log p_c of the batch-mean softmax: the negative entropy, lowest (-log K) when
    the generated batch is spread evenly over the K classes."""
    p = F.softmax(t_logits, dim=1).mean(0)
    return (p * torch.log(p.clamp_min(1e-12))).sum()


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """-mean |f_T|: lower when the teacher's features fire strongly."""
    return -features.abs().mean()


def student_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean (t is not differentiated)."""
    T = temperature
    return F.kl_div(F.log_softmax(s_logits / T, dim=1), F.log_softmax(t_logits.detach() / T, dim=1),
                    reduction="batchmean", log_target=True) * T * T


def generator_loss(t_logits: torch.Tensor, features: torch.Tensor, cfg: DAFLConfig) -> tuple[torch.Tensor, dict]:
    """oh * one-hot + ie * information entropy + a * activation; also the three terms as floats."""
    oh, ie, act = one_hot_loss(t_logits), information_entropy_loss(t_logits), activation_loss(features)
    loss = cfg.oh * oh + cfg.ie * ie + cfg.a * act
    return loss, {"oh": float(oh.detach()), "ie": float(ie.detach()), "a": float(act.detach())}


class FeatureTap:
    """The input of the teacher's last Linear/Conv call (its classifier): the features f_T,
    captured by forward pre-hooks; the model itself is not changed. ``remove()`` drops the hooks."""

    def __init__(self, model: nn.Module):
        self.features: torch.Tensor | None = None
        self.handles = [model.register_forward_pre_hook(self._reset)]
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                self.handles.append(m.register_forward_pre_hook(self._keep))

    def _reset(self, module, args):
        self.features = None

    def _keep(self, module, args):
        self.features = args[0]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ---- the callback and the batch source -------------------------------------------------------------

class DAFL(Callback):
    """Owns the generator, its optimizer and the teacher hook. ``generate()`` makes the next batch
    (called by ``GeneratedBatches``); ``compute_loss`` swaps the loop's CE for KL(teacher ||
    student) and adds the generator's loss; ``after_step`` steps the generator.

    ``eval_data``: (x_test, y_test) of real data, used only to report the student's top-1 after
    each epoch (never for training)."""

    def __init__(self, teacher: nn.Module, input_shape: Sequence[int], cfg: DAFLConfig, seed: int = 0,
                 eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
                 generator: Generator | None = None):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.input_shape = tuple(input_shape)
        torch.manual_seed(seed + 7919)  # the generator's initial weights: seeded, apart from the student's
        if generator is None and cfg.generator is not None:
            generator = load_generator(cfg.generator, input_shape)
        self.generator = generator if generator is not None else Generator(
            input_shape, cfg.latent_dim, cfg.input_mean, cfg.input_std, cfg.generator_width)
        self.latent_dim = self.generator.latent_dim
        self.z_gen = torch.Generator().manual_seed(seed * 1000003 + 17)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_g)
        self.eval_data = eval_data
        self.tap: FeatureTap | None = None
        self.pending: dict | None = None
        self.last: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, float] = {}
        self._n = 0
        self.device = torch.device("cpu")

    # the batch source calls this
    def generate(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if batch_size < 2:
            raise UsageError("data-free distillation needs batches of at least 2 (the generator uses BatchNorm)")
        self.generator.train()
        self.optimizer.zero_grad(set_to_none=True)
        z = torch.randn(batch_size, self.latent_dim, generator=self.z_gen).to(self.device)
        x = self.generator(z)
        t_logits = self.teacher(x)
        if self.tap.features is None:
            raise DcompError("data-free distillation: the teacher called no Linear/Conv layer to take features from")
        self.pending = {"x": x, "t": t_logits, "f": self.tap.features}
        return x.detach(), t_logits.detach().argmax(1)

    def on_train_begin(self, ctx):
        if ctx.world_size > 1:
            raise DcompError("data-free distillation runs in one process (each rank would train its own "
                             "generator); run it without torchrun")
        self.device = next(iter(ctx.model.parameters())).device
        self.teacher.to(self.device)
        self.generator.to(self.device)
        self.tap = FeatureTap(self.teacher)

    def compute_loss(self, ctx, x, out, y, loss):
        if self.pending is None:
            raise DcompError("data-free distillation: the loop's batches did not come from GeneratedBatches")
        p, self.pending = self.pending, None
        t = p["t"]
        if t.shape != out.shape:
            raise DcompError(f"teacher outputs {list(t.shape[1:])} per sample but the student "
                             f"{list(out.shape[1:])}; distil into a student with the same outputs")
        kd = student_loss(out, t, self.cfg.temperature)
        g_loss, parts = generator_loss(t, p["f"], self.cfg)
        self.last = {"loss_g": float(g_loss.detach()), "loss_s": float(kd.detach()), **parts}
        for k, v in self.last.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._n += 1
        return loss - F.cross_entropy(out, y) + kd + g_loss

    def after_step(self, ctx):
        self.optimizer.step()

    def on_epoch_end(self, ctx):
        rec = {k: v / max(self._n, 1) for k, v in self._sums.items()}
        rec["epoch"] = ctx.epoch + 1
        if self.eval_data is not None:
            x, y = self.eval_data
            rec["test_top1"] = evaluate(ctx.model, x, y)["top1"]
        self.history.append(rec)
        self._sums, self._n = {}, 0

    def on_train_end(self, ctx):
        if self.tap is not None:
            self.tap.remove()
        self.generator.to("cpu").eval()
        self.teacher.to("cpu")

    def summary(self) -> dict:
        out: dict = {"dafl_epochs": len(self.history)}
        if self.history:
            last = self.history[-1]
            out.update({f"dafl_{k}": v for k, v in last.items() if k != "epoch"})
        return out

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """n generated inputs (generator in eval mode) and the teacher's labels for them."""
        self.generator.eval()
        self.teacher.eval()
        z = torch.randn(n, self.latent_dim, generator=torch.Generator().manual_seed(seed))
        x = self.generator(z)
        return x, self.teacher(x).argmax(1)


GENERATOR_FORMAT = "dcomp-dafl-generator"


def save_generator(g: Generator, path) -> None:
    """Plain data and tensors only (loads with weights_only=True), written atomically."""
    import io

    from dcomp.formats.checkpoint import atomic_write

    buf = io.BytesIO()
    torch.save({"format": GENERATOR_FORMAT, "version": 1, "input_shape": list(g.input_shape),
                "latent_dim": g.latent_dim, "width": getattr(g, "width", 128),
                "mean": g.out_mean.flatten().tolist(), "std": g.out_std.flatten().tolist(),
                "state_dict": {k: v.detach().cpu() for k, v in g.state_dict().items()}}, buf)
    from pathlib import Path

    atomic_write(Path(path), buf.getvalue())


def load_generator(path, input_shape) -> Generator:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"generator {path}: no such file (write one with `dcomp distill --save-generator`)")
    try:
        d = torch.load(p, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise DcompError(f"generator {path}: not a readable generator file ({type(e).__name__})") from None
    if not isinstance(d, dict) or d.get("format") != GENERATOR_FORMAT:
        raise DcompError(f"generator {path}: not a dcomp DAFL generator (write one with `dcomp distill --save-generator`)")
    if list(d["input_shape"]) != list(input_shape):
        raise UsageError(f"generator {path} makes inputs {d['input_shape']} but the teacher takes {list(input_shape)}")
    mean, std = d["mean"], d["std"]
    g = Generator(input_shape, d["latent_dim"], mean, std, d["width"])
    try:
        g.load_state_dict(d["state_dict"])
    except RuntimeError as e:
        raise DcompError(f"generator {path}: weights do not fit ({(str(e).splitlines() or [''])[0]})") from None
    return g


class GeneratedBatches(BatchSource):
    """The batch source of data-free training: ``iterations`` batches per epoch, each made by the
    DAFL callback's generator and labelled with the teacher's argmax (the labels only feed the
    loop's agreement figure; the student learns from the teacher's soft outputs)."""

    def __init__(self, dafl: DAFL):
        self.dafl = dafl

    def steps_per_epoch(self, batch_size, world):
        return self.dafl.cfg.iterations

    def batches(self, epoch, batch_size, rank, world, seed):
        for _ in range(self.dafl.cfg.iterations):
            yield self.dafl.generate(batch_size)


# ---- students ----------------------------------------------------------------------------------------

def reset_parameters(model: nn.Module) -> None:
    """Fresh initial weights for every layer that knows how to make them."""
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def width_scaled(ckpt, width: float, seed: int = 0, trust_pickle: bool = False):
    """A copy of ``ckpt``'s architecture with round(width * n) units in every Linear/Conv layer
    whose size is free to change (not the classifier's outputs, not the input), freshly
    initialised: e.g. LeNet-5-half for width 0.5. Coupled layers (residual additions) shrink
    together. Returns a checkpoint without masks."""
    from dcomp.compressors.graph import shrink_checkpoint, trace_dependencies

    if not 0 < width <= 1:
        raise UsageError(f"--width must be in (0, 1], got {width}")
    base = ckpt.copy()
    base.masks, base.quant = {}, {}
    model = base.build_model(trust_pickle=trust_pickle)
    graph = trace_dependencies(model, base.input_shape)
    keep = {}
    for g in graph.groups:
        if g.blocked is None:
            keep[g.producers[0]] = torch.arange(max(1, round(width * g.channels)))
    out, small = shrink_checkpoint(base, keep, model=model, graph=graph, trust_pickle=trust_pickle)
    torch.manual_seed(seed)
    reset_parameters(small)
    out.update_from_model(small)
    out.masks = {}
    out.provenance = list(ckpt.provenance)
    return out


def make_student(teacher_ckpt, student: str | None, width: float | None, seed: int = 0,
                 trust_pickle: bool = False):
    """The student checkpoint: a zoo name (fresh weights at the teacher's input shape and
    classes), a model file (its weights and masks kept: a pruned or shrunk checkpoint), or the
    teacher's own architecture (student None); ``width`` scales a zoo or teacher architecture."""
    from pathlib import Path

    from dcomp.formats.checkpoint import Checkpoint
    from dcomp.models import ZOO, build_zoo

    if student is None and width is None:
        raise UsageError("which student? give --student (a zoo name or a model file) and/or --width "
                         "(a narrower copy of the teacher, e.g. --width 0.5)")
    if student is not None and student in ZOO:
        torch.manual_seed(seed)
        model = build_zoo(student, teacher_ckpt.input_shape, teacher_ckpt.num_classes)
        ckpt = Checkpoint(arch={"kind": "zoo", "name": student, "kwargs": {}}, state_dict={},
                          input_shape=list(teacher_ckpt.input_shape), num_classes=int(teacher_ckpt.num_classes),
                          data=dict(teacher_ckpt.data))
        ckpt.update_from_model(model)
    elif student is not None:
        p = Path(student)
        if not p.is_file():
            from dcomp.models import zoo_names

            raise UsageError(f"--student {student}: neither a zoo model ({', '.join(zoo_names())}) nor a file")
        if width is not None:
            raise UsageError("--width makes a fresh narrower copy; it does not apply to a --student file "
                             "(which is trained from its own weights)")
        from dcomp.compressors.distill import load_teacher

        ckpt = load_teacher(str(p), trust_pickle)
        if ckpt.quant:
            raise UsageError(f"--student {student} is quantized; distil into it before `dcomp quantize`, "
                             f"or fine-tune it with `dcomp retrain --data-free`")
        return ckpt
    else:
        ckpt = teacher_ckpt.copy()
        ckpt.masks, ckpt.quant = {}, {}
    if width is not None:
        return width_scaled(ckpt, width, seed, trust_pickle)
    if student is None:  # the teacher's architecture at full width: fresh weights
        model = ckpt.build_model(trust_pickle=trust_pickle)
        torch.manual_seed(seed)
        reset_parameters(model)
        ckpt.update_from_model(model)
    return ckpt


def sample_grid(dafl: DAFL, path, per_class: int = 8, pool: int = 1024, seed: int = 0) -> dict[int, int]:
    """Save a PNG: one row per class of generated samples the teacher assigns to that class (up to
    ``per_class`` of ``pool`` samples). Returns how many of the pool fell in each class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, labels = dafl.sample(pool, seed)
    classes = int(dafl.teacher(x[:2]).shape[1]) if len(x) else 0
    counts = {c: int((labels == c).sum()) for c in range(classes)}
    flat = x.dim() == 2
    fig, axes = plt.subplots(classes, per_class, figsize=(per_class * 0.8, classes * 0.8), squeeze=False)
    for c in range(classes):
        idx = (labels == c).nonzero().flatten()[:per_class]
        for j in range(per_class):
            ax = axes[c][j]
            ax.axis("off")
            if j < len(idx):
                img = x[idx[j]]
                if flat:
                    side = math.isqrt(img.numel())
                    img = img[: side * side].reshape(1, side, side)
                img = (img - img.min()) / (img.max() - img.min() + 1e-8)
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img[:3].permute(1, 2, 0).numpy())
        axes[c][0].set_title(f"{c} ({counts[c]})", fontsize=6, loc="left")
    fig.suptitle(f"generated samples per teacher class (of {pool})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return counts


# ---- the stage: teacher in, student out --------------------------------------------------------------


def apply_distill(teacher_ckpt, cfg: DistillStudentConfig, ctx, progress=None, samples: str | None = None,
                  save_generator_to: str | None = None):
    """Distil ``teacher_ckpt`` into the student ``cfg`` names. Data-free: ``ctx.data`` is optional
    and only its test split is read (to report accuracy). ``samples``: write a PNG grid of
    generated samples per class there. Returns a StageResult with the student checkpoint."""
    import time

    from dcomp.stages import StageResult
    from dcomp.train import fit

    if not cfg.data_free and ctx.data is None:
        raise UsageError("distillation on real data needs --data (or use --data-free)")
    t0 = time.process_time()
    student = make_student(teacher_ckpt, cfg.student, cfg.width, ctx.seed, ctx.trust_pickle)
    from dcomp.compressors.distill import check_teacher

    check_teacher(teacher_ckpt, student, "the teacher")
    teacher = teacher_ckpt.build_model(trust_pickle=ctx.trust_pickle)
    model = student.build_model(trust_pickle=ctx.trust_pickle)
    metrics: dict = {"data_free": cfg.data_free, "teacher_params": teacher_ckpt.param_count(),
                     "student_params": student.param_count(),
                     "student_arch": student.arch.get("name") or student.arch.get("kind")}
    if ctx.data is not None:
        metrics["teacher_top1"] = evaluate(teacher, ctx.data.x_test, ctx.data.y_test)["top1"]
    torch.manual_seed(ctx.seed)
    if cfg.data_free:
        test = (ctx.data.x_test, ctx.data.y_test) if ctx.data is not None else None
        dafl = DAFL(teacher, teacher_ckpt.input_shape, cfg.dafl, seed=ctx.seed, eval_data=test)
        if progress is None and ctx.console is not None:
            from dcomp.cli.ui import DAFLProgress

            progress = DAFLProgress(ctx.console, "distill (data-free)", dafl)
        result = fit(model, GeneratedBatches(dafl), cfg.train, masks=student.masks, callbacks=[dafl],
                     seed=ctx.seed, progress=progress)
        metrics.update(dafl.summary())
        metrics["test_top1_by_epoch"] = [h["test_top1"] for h in dafl.history if "test_top1" in h]
        if samples:
            metrics["sample_classes"] = sample_grid(dafl, samples, seed=ctx.seed)
            metrics["samples"] = str(samples)
        if save_generator_to:
            save_generator(dafl.generator, save_generator_to)
            metrics["generator"] = str(save_generator_to)
    else:
        from dcomp.compressors.distill import DistillConfig, Distiller

        if progress is None and ctx.console is not None:
            from dcomp.cli.ui import TrainProgress

            progress = TrainProgress(ctx.console, "distill (KD)")
        kd = Distiller(teacher, DistillConfig(teacher="input", temperature=cfg.kd_temperature, alpha=cfg.kd_alpha))
        result = fit(model, ctx.data, cfg.train, masks=student.masks, callbacks=[kd], seed=ctx.seed,
                     progress=progress)
    out = student.copy()
    out.update_from_model(model)
    out.masks = {k: v.clone() for k, v in result.masks.items()}
    if ctx.data is not None:
        metrics["top1"] = evaluate(model, ctx.data.x_test, ctx.data.y_test)["top1"]
    nonzero = out.nonzero_count()
    metrics.update({"params": out.param_count(), "nonzero": nonzero, "cpu_seconds": time.process_time() - t0})
    out.add_provenance("distill", {"data": "none (data-free)" if cfg.data_free else ctx.data.spec,
                                   "test_data": ctx.data.spec if ctx.data is not None else None,
                                   "seed": ctx.seed, **cfg.model_dump(exclude_none=True)}, metrics)
    return StageResult(out, metrics)


class TestSplitOnly:
    """A dataset of which only the test split can be read: data-free runs get this, so any
    attempt to touch a real training sample fails loudly instead of silently using it."""

    def __init__(self, ds):
        self.spec = ds.spec
        self.x_test, self.y_test, self.num_classes = ds.x_test, ds.y_test, ds.num_classes

    @property
    def input_shape(self):
        return tuple(self.x_test.shape[1:])

    def _refuse(self, *_a, **_k):
        raise DcompError("data-free mode read a real training sample; this is a bug, please report it")

    x_train = property(_refuse)
    y_train = property(_refuse)
    split_validation = _refuse

    def describe(self) -> dict:
        return {"spec": self.spec, "train": "not read (data-free)", "test": len(self.x_test),
                "input_shape": list(self.input_shape), "num_classes": self.num_classes}
