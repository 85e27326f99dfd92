"""The shape every compression stage has, so the CLI and the recipe runner call the same code.

A stage is a pydantic config (``extra="forbid"``; validators say what to do when a value is
wrong) plus one function::

    apply_<stage>(ckpt: Checkpoint, cfg: <Stage>Config, ctx: StageContext) -> StageResult

which never modifies ``ckpt`` in place; it returns a new checkpoint with a provenance entry
and a dict of plain metrics (what ``--json`` prints and the recipe run log records).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from dcomp.data import Dataset
from dcomp.formats.checkpoint import Checkpoint


@dataclass
class StageContext:
    data: Dataset | None = None      # loaded by the caller for stages that train or evaluate
    console: Console | None = None   # progress and logs go here (stderr); None = silent
    seed: int = 0
    trust_pickle: bool = False
    threads: int | None = None       # CPU threads for runtimes (None: torch's current setting)


@dataclass
class StageResult:
    checkpoint: Checkpoint
    metrics: dict[str, Any] = field(default_factory=dict)
