"""What every command shares: global options, the stderr console, reading model input from a
path or stdin, writing output to a path or stdout, --json summaries, and option types that
several commands declare (so each is defined once)."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from dcomp.errors import DcompError, UsageError


@dataclass
class GlobalOptions:
    json: bool = False
    quiet: bool = False
    debug: bool = False
    seed: int = 0
    seed_given: bool = False    # --seed was on the command line (recipes otherwise use their own)
    threads: int | None = None
    device: str = "cpu"
    trust_pickle: bool = False
    typed_archs: set[str] = field(default_factory=set)  # --arch targets typed in this process
    stdout_taken: bool = False  # a binary output went to stdout: JSON goes to stderr then


state = GlobalOptions()


def is_main_process() -> bool:
    """False on the ranks > 0 of a torchrun launch: only rank 0 writes output and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def console() -> Console:
    """Human output: stderr, so stdout stays free for checkpoints in pipes. NO_COLOR is respected."""
    return Console(stderr=True, quiet=state.quiet or not is_main_process(), highlight=False, soft_wrap=False)


def log(msg: str) -> None:
    console().print(msg)


_output_notes: list[str] = []


def note_for_output(msg: str) -> None:
    """A note about the file this command writes: printed once it is written, so a command that
    fails shows its one error line alone."""
    _output_notes.append(msg)


def _flush_output_notes() -> None:
    while _output_notes:
        log(_output_notes.pop(0))


# ---- input ---------------------------------------------------------------------------------

@dataclass
class Input:
    data: bytes
    source: str            # the path, or "<stdin>"
    path: Path | None      # None for stdin


def read_input(path: Optional[str], what: str = "a model file") -> Input:
    """Read from PATH, or stdin when PATH is '-' or omitted and stdin is not a terminal."""
    if path is None or path == "-":
        if path is None and sys.stdin.isatty():
            raise UsageError(f"no input: give {what} as an argument, or pipe one in")
        data = sys.stdin.buffer.read()
        if not data:
            raise UsageError(f"no input: stdin was empty (give {what} as an argument, or pipe one in)")
        return Input(data, "<stdin>", None)
    p = Path(path)
    if not p.exists():
        raise DcompError(f"{path}: no such file")
    if p.is_dir():
        raise DcompError(f"{path}: is a directory, expected {what}")
    return Input(p.read_bytes(), str(path), p)


# ---- output --------------------------------------------------------------------------------

@dataclass
class Sink:
    """Where a command's binary output goes; decided before any work so a bad -o fails fast.
    Files are written atomically (dcomp.atomic): an interrupted command leaves the old file or
    none, never a temporary file; devices, FIFOs and /dev paths are written through."""

    path: Path | None  # None = stdout

    def write(self, data: bytes) -> str:
        from dcomp.atomic import atomic_write
        from dcomp.cli import signals

        if not is_main_process():
            return "<rank 0 writes>"
        if self.path is None:
            try:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
            except BrokenPipeError:
                raise DcompError("stdout was closed before the output was written (the next command in the pipe "
                                 "stopped)") from None
            signals.committed()
            _flush_output_notes()
            return "<stdout>"
        atomic_write(self.path, data, on_commit=signals.committed)
        _flush_output_notes()
        return str(self.path)


def plan_output(output: Optional[str], inp: Input | None = None, what: str = "checkpoint",
                reads: tuple[Optional[str], ...] = (), expected_bytes: int | None = None) -> Sink:
    """Decide where output goes, and probe that it can be written (folder exists and is writable,
    room for about ``expected_bytes``, default the input's size) before any work. ``reads``: other
    files the command reads (a recipe, a teacher), which -o must not overwrite either."""
    from dcomp.atomic import check_writable, output_kind

    if output == "-" or (output is None and not sys.stdout.isatty()):
        state.stdout_taken = True
        return Sink(None)
    if output is None:
        raise UsageError(f"where should the {what} go? give -o PATH, or pipe stdout into another command")
    p = Path(output)
    if p.is_dir():
        raise UsageError(f"-o {output} is a directory; give a file name")
    if not p.is_symlink() and not p.parent.is_dir():
        raise UsageError(f"-o {output}: folder {p.parent} does not exist")
    kind, target = output_kind(p)
    if kind == "stdout":
        state.stdout_taken = True
        return Sink(None)
    if kind == "file":
        if inp is not None and inp.path is not None and target.exists() and target == inp.path.resolve():
            raise UsageError(f"-o {output} would overwrite the input; choose another output path")
        for other in reads:
            if other and target.exists() and Path(other).exists() and target == Path(other).resolve():
                raise UsageError(f"-o {output} would overwrite {other}, which this command reads; choose another output path")
    if expected_bytes is None and inp is not None:
        expected_bytes = len(inp.data)
    check_writable(p, expected_bytes)
    return Sink(p)


# ---- summaries -----------------------------------------------------------------------------

def emit(summary: dict[str, Any], human: Callable[[Console], None] | None = None) -> None:
    """--json: print ``summary`` as JSON (stdout, or stderr when stdout carries binary output).
    Otherwise call ``human`` with the stderr console."""
    if not is_main_process():
        return
    if state.json:
        text = json.dumps(summary, indent=2, default=_json_default)
        stream = sys.stderr if state.stdout_taken else sys.stdout
        print(text, file=stream, flush=True)
    elif human is not None:
        human(console())


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


# ---- model loading shared by the stage commands ------------------------------------------------

def load_checkpoint(inp: Input, arch: str | None = None, arch_kwargs: str | None = None,
                    data: str | None = None, resize: int | None = None, execute: bool = True):
    """Any accepted model file -> Checkpoint. --data/--resize give the input shape where the
    file does not (state_dicts, TorchScript); the dataset is then recorded in the checkpoint.

    ``arch`` was typed by the user: it joins ``state.typed_archs``, the references a file may
    name and have imported without --trust-pickle. ``execute=False``: run nothing (info)."""
    from dcomp.data import load_dataset
    from dcomp.formats.model_input import load_model, parse_arch_kwargs

    used: dict = {}

    def shape_of():
        ds = load_dataset(data or "digits", resize)
        used.update(spec=ds.spec, resize=resize)
        return list(ds.input_shape), ds.num_classes

    if arch:
        state.typed_archs.add(arch)
    ckpt = load_model(inp.data, inp.source, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
                      trust_pickle=state.trust_pickle, shape_of=shape_of, typed=frozenset(state.typed_archs),
                      execute=execute)
    if used:
        ckpt.data = used
        # the shape came from the data, not from the model: check that the model takes it now,
        # rather than as a torch traceback deep inside a stage (never for info/inspect: execute=False)
        if execute:
            check_input_fits(ckpt.build_model(trust_pickle=state.trust_pickle), ckpt.input_shape,
                             _data_words(data or "digits", resize))
    note = (ckpt.provenance[-1].get("params", {}).get("graph_note") if ckpt.provenance
            and ckpt.provenance[-1].get("stage") == "import" else None)
    if note and ckpt.arch.get("kind") in ("factory", "import"):
        note_for_output(f"note: {arch} is stored as a reference, not as a graph ({note}); later commands on the "
            f"output need --arch {arch} again (or --trust-pickle)")
    return ckpt


def _data_words(spec: str, resize: int | None) -> str:
    return f"--data {spec}" + (f" --resize {resize}" if resize else "")


def expected_input(model) -> str | None:
    """What the model's first layer takes, in words: '(3, H, W)', '784 features'."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Conv3d)):
            dims = {nn.Conv1d: "L", nn.Conv2d: "H, W", nn.Conv3d: "D, H, W"}[type(m)]
            return f"({m.in_channels}, {dims})"
        if isinstance(m, nn.Linear):
            return f"{m.in_features} features"
        if isinstance(m, nn.Embedding):
            return "token ids"
    return None


def check_input_fits(model, input_shape, data_words: str) -> None:
    """One forward pass on zeros of ``input_shape``; a failure is one line saying what the model
    expects and what the data gives (a UsageError), not a torch traceback."""
    import math

    import torch

    shape = tuple(int(s) for s in input_shape)
    was_training = getattr(model, "training", False)
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *shape))
        return
    except Exception as e:  # noqa: BLE001 - any failure here is the model refusing this input
        error = e
    finally:
        if was_training:
            model.train()
    given = f"{data_words} gives {shape}"
    want = expected_input(model)
    if want is None:
        first = (str(error).splitlines() or [""])[0]
        raise UsageError(f"the model does not take input {shape} ({type(error).__name__}: {first[:120]}); "
                         f"{given}: use --resize or other data") from None
    hint = "use --resize or other data"
    if want.endswith("features"):
        n = int(want.split()[0])
        c = shape[0] if len(shape) == 3 else 1
        side = math.isqrt(n // c) if n % c == 0 else 0
        if len(shape) == 3 and side * side * c == n and side != shape[-1]:
            hint = f"use --resize {side} or other data"
        want = f"input of {n} features (flattened)"
        given = f"{given} = {math.prod(shape)}"
    else:
        want = f"input {want}"
    raise UsageError(f"model expects {want}; {given}: {hint}") from None


def dataset_for(ckpt, data: str | None, resize: int | None):
    """The dataset a command uses: --data if given, else the one the model was trained on."""
    from dcomp.data import load_dataset

    if data is None:
        data = ckpt.data.get("spec") or "digits"
        if resize is None:
            resize = ckpt.data.get("resize")
    ds = load_dataset(data, resize)
    if list(ds.input_shape) != list(ckpt.input_shape):
        raise UsageError(f"model expects input {tuple(ckpt.input_shape)}; {_data_words(data, resize)} gives "
                         f"{tuple(ds.input_shape)}: use --resize or other data")
    if ds.num_classes > ckpt.num_classes:
        raise UsageError(f"data {data} has {ds.num_classes} classes but the model outputs {ckpt.num_classes}")
    return ds


def threads_env() -> None:
    """Apply --threads to torch (and record it for onnxruntime sessions). Torch is not imported
    for this: if it is not loaded yet, OMP_NUM_THREADS tells it at import."""
    if state.threads is None:
        return
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(state.threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(state.threads)
        os.environ["MKL_NUM_THREADS"] = str(state.threads)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ---- option types declared by several commands ---------------------------------------------------

InputArg = Annotated[Optional[str], typer.Argument(
    help="model file (path, or '-' / omitted to read stdin): a dcomp checkpoint, .dcz, state_dict (+ --arch), "
         "or TorchScript (TorchScript is code: it runs when loaded, so give only your own)", show_default=False)]
OutputOpt = Annotated[Optional[str], typer.Option("-o", "--output", help="output path ('-' or omitted with a piped stdout: stdout). Written atomically (temporary file + rename; "
                                                       "a symlink's target is replaced, the link kept); character devices, FIFOs and /dev/* are "
                                                       "written through, where no atomicity is possible", show_default=False)]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="architecture for a plain state_dict: zoo name, package.module:factory "
                                                             "(a module in the current folder works) or path/to/file.py:factory; "
                                                             "importing runs that code. A file naming this same factory is then trusted too")]
ArchKwargsOpt = Annotated[Optional[str], typer.Option("--arch-kwargs", help="factory arguments: JSON object or k=v,k=v")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="dataset: digits, idx:DIR, npz:FILE, synthetic[:N] (default: the model's own, else digits)")]
ResizeOpt = Annotated[Optional[int], typer.Option("--resize", help="rescale images to HxH")]

EpochsOpt = Annotated[int, typer.Option("--epochs", min=0, help="passes over the training set")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="samples per step")]
LrOpt = Annotated[float, typer.Option("--lr", min=0.0, help="learning rate")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="sgd, adam or adamw")]
MomentumOpt = Annotated[float, typer.Option("--momentum", help="SGD momentum")]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", min=0.0, help="L2 weight decay")]
LrScheduleOpt = Annotated[str, typer.Option("--lr-schedule", help="cosine, step or constant")]
SelectOpt = Annotated[str, typer.Option("--select", help="keep the 'last' epoch or the 'best' on a validation split")]


TRAIN_OPTIONS = {"batch_size": BatchSizeOpt, "lr": LrOpt, "optimizer": OptimizerOpt, "momentum": MomentumOpt,
                 "weight_decay": WeightDecayOpt, "lr_schedule": LrScheduleOpt, "select": SelectOpt}


def with_train_options(exclude: tuple[str, ...] = (), **defaults):
    """Give a command the shared training options (--batch-size, --lr, --optimizer, --momentum,
    --weight-decay, --lr-schedule, --select), declared once here; the command receives their
    values as ``train_opts`` (a dict for ``train_config``). Defaults are the fine-tuning ones
    unless overridden (``dcomp train`` trains from scratch with its own)."""
    from dcomp.config.train import FINETUNE_DEFAULTS, TrainConfig

    base = {n: f.default for n, f in TrainConfig.model_fields.items()}
    values = {**base, **FINETUNE_DEFAULTS, **defaults}
    names = [n for n in TRAIN_OPTIONS if n not in exclude]

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)  # typer reads evaluated annotations
        own = [p for p in sig.parameters.values() if p.name != "train_opts"]
        extra = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=values[n],
                                   annotation=TRAIN_OPTIONS[n]) for n in names]

        @functools.wraps(fn)
        def command(**kwargs):
            train_opts = {n: kwargs.pop(n) for n in names}
            return fn(**kwargs, train_opts=train_opts)

        command.__signature__ = sig.replace(parameters=own + extra)
        return command

    return decorate


def stage_input(model, output, arch, arch_kwargs, data, resize, needs_data: bool):
    """What a checkpoint-to-checkpoint command starts with: the output planned (and probed)
    before any work, the input checkpoint, and the StageContext (with a dataset when --data is
    given or ``needs_data``). Returns (sink, ckpt, ctx)."""
    from dcomp.stages import StageContext

    inp = read_input(model)
    sink = plan_output(output, inp)
    ckpt = load_checkpoint(inp, arch, arch_kwargs, data, resize)
    ds = dataset_for(ckpt, data, resize) if (data is not None or needs_data) else None
    ctx = StageContext(data=ds, console=console(), seed=state.seed, trust_pickle=state.trust_pickle)
    return sink, ckpt, ctx


def layer_values(specs: list[str] | None, unit: str = "VALUE", example: str = "fc3=0.7",
                 convert=str) -> dict:
    """Repeated ``--layer REGEX=VALUE`` options -> {regex: convert(value)}; the last '=' separates
    the value, so a regex may contain '='. Bad entries are one usage line naming the entry."""
    out: dict = {}
    for spec in specs or []:
        pattern, sep, value = spec.rpartition("=")
        if not sep or not pattern:
            raise UsageError(f"--layer {spec!r}: expected REGEX={unit}, e.g. --layer '{example}'")
        try:
            out[pattern] = convert(value)
        except ValueError:
            raise UsageError(f"--layer {spec!r}: {unit.lower()} must be an integer, got {value!r}") from None
    return out


def train_config(**values):
    """Build a TrainConfig from CLI option values, turning validation errors into one line."""
    from dcomp.config.train import TrainConfig

    return build_config(TrainConfig, **values)


def build_config(cls, **values):
    """A stage's option class built from CLI option values; a validation error becomes one
    usage line naming the option (``pydantic_message``)."""
    from pydantic import ValidationError

    try:
        return cls(**values)
    except ValidationError as e:
        raise UsageError(pydantic_message(e)) from None


def pydantic_message(e) -> str:
    """One line from a ValidationError: our validators' messages name their option already
    (they start with "--") or concern the whole config (no location); pydantic's own type and
    range errors get "--option: ... (got value)"."""
    err = e.errors()[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    loc = [str(p) for p in err["loc"] if str(p) != "retrain"]
    if msg.startswith("-") or not loc:
        return msg
    got = "" if "got" in msg or err["type"] == "value_error" else f" (got {err.get('input')!r})"
    return f"--{'.'.join(loc).replace('_', '-')}: {msg}{got}"
