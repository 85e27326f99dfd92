"""YAML recipes: a lab-notebook list of stages run by ``dcomp run``.

    name: deep-compression
    description: Han et al.'s pipeline on LeNet-300-100
    defaults: {data: digits, seed: 0}
    stages:
      - stage: prune
        note: iterative pruning to the paper's per-layer rates
        method: magnitude
        sparsity: 0.92
        rounds: 3
        retrain: {epochs: 3, lr: 0.01}
      - stage: quantize
        fc_bits: 5
      - stage: pack

A stage's keys are the fields of the same config class its command builds from its options
(``dcomp recipe schema STAGE`` lists them), so a recipe can do exactly what the commands can.
Everything is validated before any work: an unknown key, a wrong type or an impossible value is
reported with the file, line and key path, and the closest valid key is suggested.

``run_recipe`` keeps a work directory: every stage's output (``NN-stage.pt``, ``NN-pack.dcz``)
written atomically, and ``run.jsonl`` (one JSON line per finished stage: stage, params, metrics,
seconds, key). A rerun skips each stage whose key — a hash of the input model, the defaults and
every stage config up to it — matches a finished one whose output is still intact, so an
interrupted run loses nothing already finished and an edited stage reruns from there on.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dcomp.errors import DcompError, UsageError
from dcomp.config.train import FINETUNE_DEFAULTS, TrainConfig

if TYPE_CHECKING:  # torch-free at import: `recipe validate` must not pay for torch
    from dcomp.formats.checkpoint import Checkpoint
    from dcomp.stages import StageContext, StageResult

RECIPE_VERSION = 1
# Command-line spellings accepted in recipes too (old scripts and habits): flag -> (block, key).
CLI_SPELLINGS: dict[str, dict[str, tuple[str, str]]] = {
    "prune": {"epochs_per_round": ("retrain", "epochs")},
}
COMMON_STAGE_KEYS = ("stage", "name", "note")
# Training blocks inside stages (prune.retrain, retrain.train, quantize.finetune, finetune.train)
# start from FINETUNE_DEFAULTS, as the commands do, not from training-from-scratch ones.


# ---- schema -----------------------------------------------------------------------------------

class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field("digits", description="dataset for every stage that trains or evaluates")
    resize: int | None = Field(None, ge=1, description="rescale images to HxH")
    seed: int = Field(0, description="random seed")


class RecipeHead(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="one file-name component: it names the default work directory")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_recipe_name(v)
    description: str = ""
    version: int = Field(RECIPE_VERSION, description="recipe format version")
    defaults: Defaults = Field(default_factory=Defaults)
    stages: list[dict[str, Any]] = Field(min_length=1)


def check_recipe_name(name: str) -> str:
    """A recipe's name becomes a folder name (dcomp-run-NAME): one path component, no escape."""
    if not name or not name.strip():
        raise ValueError("a recipe name must not be empty")
    if len(name) > 100:
        raise ValueError("a recipe name is at most 100 characters")
    if any(c in name for c in "/\\") or name in (".", "..") or any(ord(c) < 32 or c == "\x7f" for c in name):
        raise ValueError(f"the name {name!r} must be one file-name component (no '/', '\\', '..' or control "
                         f"characters): it names the work directory, e.g. name: my-recipe")
    return name


class EvalConfig(BaseModel):
    """Measure test accuracy of the current model (no change to it)."""

    model_config = ConfigDict(extra="forbid")


class FinetuneConfig(BaseModel):
    """Centroid fine-tuning of a quantized model (assignments fixed, centroids trained)."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=3, **FINETUNE_DEFAULTS))


@dataclass
class StageSpec:
    config: Callable[[], type[BaseModel]]        # lazily imported config class
    produces: Literal["checkpoint", "dcz", "metrics"]
    help: str


def _lazy(path: str) -> Callable[[], Any]:
    def get():
        mod, _, attr = path.partition(":")
        return getattr(importlib.import_module(mod), attr)
    return get


STAGES: dict[str, StageSpec] = {
    "prune": StageSpec(_lazy("dcomp.config.prune:PruneConfig"), "checkpoint",
                       "magnitude / global / std / N:M / structured pruning, optionally iterative"),
    "retrain": StageSpec(_lazy("dcomp.config.retrain:RetrainConfig"), "checkpoint",
                         "fine-tune with masks kept; AGP, DNS, IHT/DSD, L1, group lasso, distillation"),
    "distill": StageSpec(_lazy("dcomp.config.retrain:RetrainConfig"), "checkpoint",
                         "retrain with a teacher (distill.teacher: 'input' = the run's input model)"),
    "dafl": StageSpec(_lazy("dcomp.config.dafl:DistillStudentConfig"), "checkpoint",
                      "distil the current model into a student (student/width); data-free (DAFL) by default"),
    "quantize": StageSpec(_lazy("dcomp.config.quantize:QuantizeConfig"), "checkpoint",
                          "k-means weight sharing, optional centroid fine-tuning"),
    "finetune": StageSpec(lambda: FinetuneConfig, "checkpoint", "centroid fine-tuning of a quantized model"),
    "pack": StageSpec(_lazy("dcomp.config.pack:PackConfig"), "dcz",
                      "write the .dcz: sparse relative indices, codebooks, Huffman streams"),
    "eval": StageSpec(lambda: EvalConfig, "metrics", "test accuracy of the current model (of the .dcz after pack)"),
    "bench": StageSpec(_lazy("dcomp.config.bench:BenchConfig"), "metrics",
                       "onnxruntime latency/throughput/size of the result beside the input model"),
    "factorize": StageSpec(_lazy("dcomp.config.factorize:FactorizeConfig"), "checkpoint",
                           "low-rank factorization (truncated SVD) of Linear/Conv2d layers into two layers"),
    "sweep": StageSpec(_lazy("dcomp.config.sweep:SweepConfig"), "metrics",
                       "accuracy vs sparsity per method and layer; a later prune with max_drop chooses from it"),
    "search": StageSpec(_lazy("dcomp.config.search:SearchConfig"), "checkpoint",
                        "MetaPruning: PruningNet + evolutionary search of per-layer widths under a MACs/params/latency budget"),
}


def register_stage(name: str, spec: StageSpec) -> None:
    STAGES[name] = spec


# ---- loading with line numbers --------------------------------------------------------------------

class RecipeError(UsageError):
    """A recipe problem, reported as ``file:line: key.path: message``."""


def _line_map(text: str) -> dict[tuple, int]:
    """Map every key path in the YAML document to its 1-based line."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


@dataclass
class Stage:
    index: int
    kind: str
    label: str
    note: str
    config: BaseModel

    def params(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json", exclude_none=True)


@dataclass
class Recipe:
    path: str
    name: str
    description: str
    defaults: Defaults
    stages: list[Stage]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def packs(self) -> bool:
        return any(s.kind == "pack" for s in self.stages)


def apply_overrides(data: dict[str, Any], sets: list[str]) -> None:
    """``--set stages.0.sparsity=0.95``: dotted path (list indices as numbers), YAML value."""
    for item in sets:
        path, sep, value = item.partition("=")
        if not sep or not path:
            raise UsageError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set stages.0.sparsity=0.95")
        keys = path.split(".")
        node: Any = data
        for j, k in enumerate(keys):
            last = j == len(keys) - 1
            if isinstance(node, list):
                if not k.isdigit() or int(k) >= len(node):
                    raise UsageError(f"--set {path}: {'.'.join(keys[:j]) or 'top'} has {len(node)} entries, no index {k}")
                k = int(k)
            elif not isinstance(node, dict):
                raise UsageError(f"--set {path}: {'.'.join(keys[:j])} is not a mapping")
            if last:
                node[k] = yaml.safe_load(value)
            else:
                if isinstance(node, dict) and k not in node:
                    node[k] = {}
                node = node[k]


def load_recipe(path: str | Path, sets: list[str] | None = None, text: str | None = None) -> Recipe:
    """Read and validate a recipe. Every problem is a RecipeError naming file, line and key."""
    path = str(path)
    if text is None:
        p = Path(path)
        if not p.is_file():
            raise DcompError(f"{path}: no such recipe file")
        text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise RecipeError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with name, defaults and stages")
    lines = _line_map(text)
    overridden = set()
    if sets:
        apply_overrides(data, sets)
        overridden = {tuple(int(k) if k.isdigit() else k for k in s.partition("=")[0].split(".")) for s in sets}

    def where(loc: tuple) -> str:
        for cut in range(len(loc), -1, -1):
            if loc[:cut] in overridden:
                return f"--set {'.'.join(map(str, loc[:cut]))}"
            if loc[:cut] in lines:
                return f"{path}:{lines[loc[:cut]]}"
        return path

    def fail(loc: tuple, msg: str, model: type[BaseModel] | None = None, bad_key: str | None = None):
        hint = ""
        if model is not None and bad_key is not None:
            close = difflib.get_close_matches(bad_key.replace("-", "_"), list(model.model_fields), n=1, cutoff=0.5)
            if close:
                hint = f"; did you mean '{close[0]}'?"
        dotted = ".".join(map(str, loc))
        raise RecipeError(f"{where(loc)}: {dotted}: {msg}{hint}")

    try:
        head = RecipeHead.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            owner = Defaults if loc[:1] == ("defaults",) else RecipeHead
            fail(loc, "unknown key", owner, str(loc[-1]))
        fail(loc, str(err["msg"]).removeprefix("Value error, "))

    stages: list[Stage] = []
    for i, raw in enumerate(head.stages):
        loc = ("stages", i)
        if not isinstance(raw, dict) or "stage" not in raw:
            fail(loc, f"each stage needs 'stage: <type>' (one of {', '.join(STAGES)})")
        kind = raw["stage"]
        if kind not in STAGES:
            close = difflib.get_close_matches(str(kind), list(STAGES), n=1)
            fail(loc + ("stage",), f"unknown stage {kind!r} (one of {', '.join(STAGES)})"
                 + (f"; did you mean '{close[0]}'?" if close else ""))
        cls = STAGES[kind].config()
        body = {k.replace("-", "_"): v for k, v in raw.items() if k not in COMMON_STAGE_KEYS}
        for flag, (block, key) in CLI_SPELLINGS.get(kind, {}).items():  # a command's flag name, written in a recipe
            if flag in body and flag not in cls.model_fields:
                value = body.pop(flag)
                if not isinstance(body.get(block), dict):
                    body[block] = {} if body.get(block) is None else body[block]
                if isinstance(body[block], dict):
                    body[block].setdefault(key, value)
        if kind == "distill":
            body.setdefault("distill", {}).setdefault("teacher", "input")
        for key, f in cls.model_fields.items():
            if kind != "dafl" and isinstance(body.get(key), dict) and _mentions(f.annotation, TrainConfig):
                body[key] = {**FINETUNE_DEFAULTS, **body[key]}
        try:
            cfg = cls.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            eloc = loc + tuple(err["loc"])
            if err["type"] == "extra_forbidden":
                owner = _model_at(cls, tuple(err["loc"])[:-1])
                fail(eloc, "unknown key", owner, str(eloc[-1]))
            msg = err["msg"].removeprefix("Value error, ")
            fail(eloc, msg)
        note = str(raw.get("note", ""))
        changed = sorted(".".join(map(str, t[2:])) for t in overridden
                         if t[:2] == ("stages", i) and len(t) > 2 and t[2] not in COMMON_STAGE_KEYS)
        if note and changed and ("stages", i, "note") not in overridden:
            # a note restates values ("5 bits per fc layer"): after --set it would say what is not done
            note = f"(recipe note not shown: --set changed {', '.join(changed)})"
        stages.append(Stage(i, kind, str(raw.get("name") or f"{i:02d}-{kind}"), note, cfg))
    recipe = Recipe(path, head.name, head.description, head.defaults, stages, data)
    problem = check_order(recipe)
    if problem:
        idx, msg = problem
        fail(("stages", idx), msg)
    return recipe


def _mentions(annotation, cls) -> bool:
    return annotation is cls or cls in getattr(annotation, "__args__", ())


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at ``loc`` (for 'did you mean')."""
    for part in loc:
        f = cls.model_fields.get(str(part))
        if f is None:
            return cls
        ann = f.annotation
        for cand in getattr(ann, "__args__", ()) + (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                cls = cand
                break
        else:
            return cls
    return cls


def check_order(recipe: Recipe, input_quantized: bool = False) -> tuple[int, str] | None:
    """A stage order that cannot work, as (stage index, message), or None."""
    quantized = input_quantized
    packed_at = None
    for s in recipe.stages:
        if packed_at is not None and STAGES[s.kind].produces != "metrics":
            return s.index, (f"'{s.kind}' comes after 'pack' (stage {packed_at}): pack writes the final .dcz; "
                             f"move pack after every stage that changes the model")
        if s.kind == "pack":
            packed_at = s.index
        if s.kind == "quantize":
            quantized = True
        elif s.kind == "dafl":  # a new, unquantized student
            quantized = False
        elif s.kind == "finetune" and not quantized:
            return s.index, "'finetune' trains the centroids of a quantized model: put a 'quantize' stage before it"
        elif s.kind == "factorize" and quantized:
            return s.index, "'factorize' after 'quantize' would drop the codebooks: factorize first, then quantize"
        elif s.kind == "prune" and quantized:
            return s.index, "'prune' after 'quantize' would break the codebooks: prune first, then quantize"
        elif s.kind in ("retrain", "distill") and quantized:
            cfg = s.config
            if any(getattr(cfg, n, None) is not None for n in ("agp", "dns", "iht", "l1", "group_lasso")):
                return s.index, (f"'{s.kind}' with a mask method or regulariser after 'quantize': sparsify "
                                 f"before quantizing (after it only centroid fine-tuning applies)")
    return None


def recipe_schema() -> dict[str, Any]:
    """JSON schema of the recipe head and of every stage's keys."""
    return {
        "recipe": RecipeHead.model_json_schema(),
        "stages": {name: {"help": spec.help, "schema": spec.config().model_json_schema()}
                   for name, spec in STAGES.items()},
        "common_stage_keys": {"stage": "the stage type", "name": "a label for logs", "note": "what and why"},
    }


# ---- running ------------------------------------------------------------------------------------------

@dataclass
class RunRecord:
    index: int
    stage: str
    label: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    seconds: float
    key: str
    output: str | None
    output_sha256: str | None
    resumed: bool = False


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stage_keys(recipe: Recipe, input_sha: str, settings: dict[str, Any] | None = None) -> list[str]:
    """One key per stage: a hash of the input model, the run's effective settings (data, resize,
    seed, arch: what the command line may override), and every stage config up to this one,
    including the contents of any teacher file a stage reads."""
    base = {"defaults": recipe.defaults.model_dump(mode="json"), "settings": settings or {}}
    keys, h = [], input_sha + json.dumps(base, sort_keys=True, default=str)
    for s in recipe.stages:
        extra = ""
        distill = getattr(s.config, "distill", None) or getattr(s.config, "dafl", None)
        teacher = getattr(distill, "teacher", None) or (getattr(s.config, "student", None) if s.kind == "dafl" else None)
        if teacher and teacher != "input" and Path(teacher).is_file():
            extra = _sha(Path(teacher).read_bytes())
        h = _sha((h + s.kind + json.dumps(s.params(), sort_keys=True) + extra).encode())
        keys.append(h)
    return keys


def _read_log(log: Path) -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    if not log.exists():
        return done
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            done[int(rec["index"])] = rec
        except (json.JSONDecodeError, KeyError, ValueError, TypeError):
            continue  # a torn last line from an interrupted write
    return done


def _append_log(log: Path, rec: RunRecord) -> None:
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec.__dict__, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


LOCK_NAME = ".dcomp-run.lock"


class WorkdirLock:
    """An exclusive ``fcntl.flock`` on ``WORKDIR/.dcomp-run.lock`` for the whole run: a second
    ``dcomp run`` on the same work directory is refused instead of interleaving its log and
    outputs. The kernel drops the lock when the process ends, however it ends (SIGKILL too)."""

    def __init__(self, workdir: Path):
        self.path = workdir / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self):
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DcompError(f"cannot use the work directory {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 64).decode("ascii", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise DcompError(f"work directory {self.path.parent} is in use by another dcomp run{who}; wait for it "
                             f"to finish, or give this run its own --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race a waiting run)
            self._fd = None
        return False


StageRunner = Callable[["Checkpoint", Stage, "StageContext", "RunState"], tuple["Checkpoint | None", "bytes | None", dict]]


@dataclass
class RunState:
    input_ckpt: Checkpoint
    input_bytes: bytes
    current: Checkpoint
    packed: bytes | None = None
    sweep: dict[str, Any] | None = None   # the last sweep stage's document (prune max_drop reads it)
    workdir: Path | None = None           # where stages may keep resume files of their own (search)
    fresh: bool = False                   # --fresh: such files start over too


def run_recipe(recipe: Recipe, model_bytes: bytes, source: str, workdir: Path, ctx: StageContext,
               load_model: Callable[[bytes, str], Checkpoint], on_stage: Callable[[Stage, bool], None] | None = None,
               fresh: bool = False, settings: dict[str, Any] | None = None) -> tuple[RunState, list[RunRecord]]:
    """Run (or resume) ``recipe`` on a model; returns the final state and one record per stage.
    The work directory is created only once the input model has loaded and fits the recipe."""
    input_ckpt = load_model(model_bytes, source)
    problem = check_order(recipe, input_quantized=bool(input_ckpt.quant))
    if problem:
        raise RecipeError(f"{recipe.path}: stages.{problem[0]}: {problem[1]}")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DcompError(f"cannot create the work directory {workdir}: {e.strerror or e}") from None
    with WorkdirLock(workdir):
        return _run_locked(recipe, model_bytes, workdir, ctx, input_ckpt, on_stage, fresh, settings)


def _run_locked(recipe: Recipe, model_bytes: bytes, workdir: Path, ctx: StageContext, input_ckpt: Checkpoint,
                on_stage, fresh: bool, settings) -> tuple[RunState, list[RunRecord]]:
    from dcomp.atomic import atomic_write

    log = workdir / "run.jsonl"
    if fresh and log.exists():
        log.unlink()
    keys = stage_keys(recipe, _sha(model_bytes), settings)
    done = _read_log(log)
    state = RunState(input_ckpt, model_bytes, input_ckpt, workdir=workdir, fresh=fresh)
    records: list[RunRecord] = []
    resuming = True
    for s, key in zip(recipe.stages, keys):
        spec = STAGES[s.kind]
        prev = done.get(s.index)
        if resuming and prev is not None and prev.get("key") == key:
            restored = _restore(workdir, prev, spec, state)
            if restored:
                rec = RunRecord(**{**{k: prev.get(k) for k in RunRecord.__dataclass_fields__}, "resumed": True})
                records.append(rec)
                if on_stage:
                    on_stage(s, True)
                continue
        resuming = False  # from the first stage that runs, everything after runs too
        if on_stage:
            on_stage(s, False)
        t0 = time.perf_counter()
        new_ckpt, packed, metrics = RUNNERS[s.kind](state.current, s, ctx, state)
        seconds = time.perf_counter() - t0
        out_name = out_sha = None
        if spec.produces == "checkpoint" and new_ckpt is not None:
            data = new_ckpt.to_bytes()
            out_name = f"{s.index:02d}-{s.kind}.pt"
            atomic_write(workdir / out_name, data)
            out_sha = _sha(data)
            state.current = new_ckpt
        elif spec.produces == "dcz" and packed is not None:
            out_name = f"{s.index:02d}-{s.kind}.dcz"
            atomic_write(workdir / out_name, packed)
            out_sha = _sha(packed)
            state.packed = packed
        rec = RunRecord(s.index, s.kind, s.label, s.params(), _plain_metrics(metrics), round(seconds, 3), key,
                        out_name, out_sha)
        _append_log(log, rec)
        records.append(rec)
    return state, records


def _restore(workdir: Path, prev: dict[str, Any], spec: StageSpec, state: RunState) -> bool:
    """Load a finished stage's output back into ``state``; False if it is missing or altered."""
    name = prev.get("output")
    if spec.produces == "metrics":
        if prev.get("stage") == "sweep":
            state.sweep = prev.get("metrics")
        return True
    if not name:
        return False
    p = workdir / name
    if not p.is_file():
        return False
    data = p.read_bytes()
    if _sha(data) != prev.get("output_sha256"):
        return False
    if spec.produces == "checkpoint":
        state.current = _reread(data, str(p), state)
    else:
        state.packed = data
    return True


def _reread(data: bytes, source: str, state) -> Checkpoint:
    """A stage output this run wrote, read back: it keeps what the user vouched for on the input
    (typed --arch, their own TorchScript), since its architecture came from there."""
    from dcomp.formats.checkpoint import read_checkpoint

    ckpt = read_checkpoint(data, source)
    ckpt.trusted_refs = state.input_ckpt.trusted_refs
    return ckpt


def _plain_metrics(m: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(m, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# ---- what each stage kind does in a run ------------------------------------------------------------------

def _run_prune(ckpt, s, ctx, state):
    from dcomp.compressors.pruning import apply_prune

    r: StageResult = apply_prune(ckpt, s.config, ctx, sweep=state.sweep)
    return r.checkpoint, None, r.metrics


def _run_sweep(ckpt, s, ctx, state):
    from dcomp.compressors.sensitivity import apply_sweep

    r = apply_sweep(ckpt, s.config, ctx)
    state.sweep = r.metrics
    return None, None, r.metrics


def _run_retrain(ckpt, s, ctx, state):
    from dcomp.retrain import apply_retrain

    teacher = None
    if s.config.distill is not None and s.config.distill.teacher == "input":
        teacher = state.input_ckpt
    if s.config.dafl is not None:  # data-free: the stage may read the test split only
        from dataclasses import replace

        from dcomp.compressors.dafl import TestSplitOnly

        teacher = state.input_ckpt if s.config.dafl.teacher == "input" else None
        ctx = replace(ctx, data=TestSplitOnly(ctx.data) if ctx.data is not None else None)
    r = apply_retrain(ckpt, s.config, ctx, teacher_ckpt=teacher)
    return r.checkpoint, None, r.metrics


def _run_dafl(ckpt, s, ctx, state):
    from dataclasses import replace

    from dcomp.compressors.dafl import TestSplitOnly, apply_distill

    if s.config.data_free and ctx.data is not None:  # the test split only, for reporting
        ctx = replace(ctx, data=TestSplitOnly(ctx.data))
    r = apply_distill(ckpt, s.config, ctx)
    return r.checkpoint, None, r.metrics


def _run_quantize(ckpt, s, ctx, state):
    from dcomp.compressors.quantization import apply_quantize

    r = apply_quantize(ckpt, s.config, ctx)
    return r.checkpoint, None, r.metrics


def _run_finetune(ckpt, s, ctx, state):
    from dcomp.retrain import RetrainConfig, apply_retrain

    if not ckpt.quant:
        raise DcompError(f"stage {s.index} 'finetune': the model is not quantized (put a 'quantize' stage before it)")
    r = apply_retrain(ckpt, RetrainConfig(train=s.config.train), ctx)
    return r.checkpoint, None, r.metrics


def _run_eval(ckpt, s, ctx, state):
    from dcomp.train import evaluate

    src = ckpt
    if state.packed is not None:  # after pack, judge what was actually written
        src = _reread(state.packed, "packed", state)
    res = evaluate(src.build_model(trust_pickle=ctx.trust_pickle), ctx.data.x_test, ctx.data.y_test)
    return None, None, {**res, "params": src.param_count(), "nonzero": src.nonzero_count(),
                        "evaluated": "packed .dcz" if state.packed is not None else "checkpoint"}


def _run_pack(ckpt, s, ctx, state):
    from dcomp.formats.dcz import apply_pack

    r = apply_pack(ckpt, s.config, ctx)
    return None, r.data, r.metrics


def _run_bench(ckpt, s, ctx, state):
    from dcomp.runtime.bench import run_bench
    from dcomp.runtime.runner import resolve_threads

    src = _reread(state.packed, "packed", state) if state.packed is not None else ckpt
    log = (lambda m: ctx.console.print(f"[dim]{m}[/dim]")) if ctx.console is not None else None
    summary = run_bench(src, s.config, resolve_threads(ctx.threads), baseline=state.input_ckpt, data=ctx.data,
                        trust_pickle=ctx.trust_pickle, seed=ctx.seed, log=log)
    summary["headline"] = bench_headline(summary)
    return None, None, summary


def bench_headline(summary: dict[str, Any]) -> str:
    """'sparse same (0.91-1.08x); hybrid 1.90x faster (1.71-2.05) (vs baseline dense, batch 1)':
    p50 speed of each model target against the reference, a difference called only when the
    p10-p90 spreads of the interleaved rounds do not overlap."""
    from dcomp.runtime.bench import speed_label

    parts = []
    batch = min(summary.get("batches") or [1])
    for t in summary.get("targets", []):
        if t.get("role") != "model":
            continue
        for r in t.get("results", []):
            if r.get("batch") == batch and r.get("vs_reference"):
                parts.append(f"{t['name']} {speed_label(r)}")
    if not parts:
        return ""
    load = summary.get("loadavg")
    busy = f"; load {load[0]:.1f} on {summary.get('threads')} threads" if load and load[0] > (summary.get("threads") or 1) else ""
    return f"{'; '.join(parts)} (vs {summary.get('reference')}, batch {batch}{busy})"


def _run_factorize(ckpt, s, ctx, state):
    from dcomp.compressors.lowrank import apply_factorize

    r = apply_factorize(ckpt, s.config, ctx)
    return r.checkpoint, None, r.metrics


def _run_search(ckpt, s, ctx, state):
    from dcomp.compressors.metaprune.apply import apply_search
    from dcomp.compressors.metaprune.store import SearchStore

    # scored candidates and the PruningNet in the work directory: a run interrupted mid-search
    # (or a stage rerun because its output was lost) reuses them
    wd = state.workdir
    with SearchStore(wd / f"{s.index:02d}-search.jsonl" if wd else None,
                     wd / f"{s.index:02d}-pruningnet.pt" if wd else None, state.fresh) as store:
        r = apply_search(ckpt, s.config, ctx, **store.hooks())
    return r.checkpoint, None, {k: v for k, v in r.metrics.items() if k != "candidates"}


RUNNERS: dict[str, StageRunner] = {
    "pack": _run_pack,
    "bench": _run_bench,
    "prune": _run_prune,
    "retrain": _run_retrain,
    "distill": _run_retrain,
    "dafl": _run_dafl,
    "quantize": _run_quantize,
    "finetune": _run_finetune,
    "eval": _run_eval,
    "factorize": _run_factorize,
    "sweep": _run_sweep,
    "search": _run_search,
}
