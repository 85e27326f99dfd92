"""Check recipes and show what keys each stage takes."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from dcomp.cli import common
from dcomp.cli.run import SetOpt

recipe_app = typer.Typer(help=__doc__, no_args_is_help=True)


@recipe_app.command("validate", help="Validate a recipe (keys, types, values, stage order) without running it.")
def validate(recipe: Annotated[str, typer.Argument(help="recipe YAML file")], set_: SetOpt = None):
    from dcomp.recipe import load_recipe

    rec = load_recipe(recipe, set_ or [])
    stages = [{"index": s.index, "stage": s.kind, "name": s.label, "note": s.note, "params": s.params()} for s in rec.stages]

    def human(c):
        t = Table(title=f"{rec.path}: recipe '{rec.name}' is valid", title_justify="left")
        for col in ("#", "stage", "note", "settings"):
            t.add_column(col, overflow="fold")  # narrow terminals: wrap, never cut to "..."
        for s in stages:
            t.add_row(str(s["index"]), s["stage"], s["note"], json.dumps(s["params"], separators=(", ", ": ")))
        c.print(t)

    common.emit({"valid": True, "name": rec.name, "defaults": rec.defaults.model_dump(), "stages": stages}, human)


@recipe_app.command("schema", help="Print the JSON schema of recipes (or of one stage's keys).")
def schema(stage: Annotated[Optional[str], typer.Argument(help="only this stage type")] = None):
    from dcomp.recipe import STAGES, recipe_schema

    full = recipe_schema()
    if stage is not None:
        if stage not in STAGES:
            raise common.UsageError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
        full = full["stages"][stage]
    print(json.dumps(full, indent=2))
