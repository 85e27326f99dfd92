"""Where a search keeps what a rerun can reuse: the scored candidates (a jsonl log, one record per
line, keyed by model, data, PruningNet settings and seed) and the trained PruningNet (a
``torch.save``d {"key", "state"}). ``dcomp search`` keeps them beside its output (OUT.search.jsonl,
OUT.pruningnet.pt); a recipe's search stage keeps them in the work directory (NN-search.jsonl,
NN-pruningnet.pt), so a run interrupted in the middle of a search loses no scored candidate.
Records and PruningNets of other keys are ignored by ``apply_search``, so a stale file costs nothing.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any


class SearchStore:
    """The resume files of one search (either may be None: nothing kept). ``fresh``: ignore what the
    files hold and start them again. Use as a context manager around ``apply_search(**store.hooks())``."""

    def __init__(self, log: Path | None, pruningnet: Path | None, fresh: bool = False):
        self.log, self.pruningnet, self.fresh = log, pruningnet, fresh
        self._file = None

    def hooks(self) -> dict[str, Any]:
        """The keyword arguments of ``apply_search`` that read and extend these files."""
        return {"cache": {} if self.fresh else read_log(self.log), "on_record": self.on_record,
                "pruningnet": None if self.fresh else read_pruningnet(self.pruningnet),
                "on_pruningnet": self.on_pruningnet}

    def on_record(self, rec: dict) -> None:
        if self.log is None:
            return
        if self._file is None:
            self._file = open(self.log, "w" if self.fresh else "a", encoding="utf-8")
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()

    def on_pruningnet(self, state: dict) -> None:
        if self.pruningnet is None:
            return
        import torch

        from dcomp.atomic import atomic_write

        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(self.pruningnet, buf.getvalue())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "SearchStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_log(path: Path | None) -> dict[str, dict]:
    """Scored candidates of earlier runs (key:genes -> record); a torn last line is skipped."""
    cache: dict[str, dict] = {}
    if path is None or not path.is_file():
        return cache
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
            cache[f"{r['key']}:{','.join(str(int(g)) for g in r['genes'])}"] = r
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return cache


def read_pruningnet(path: Path | None) -> dict | None:
    """A saved PruningNet ({"key", "state"}), or None when there is none or it is torn or foreign."""
    if path is None or not path.is_file():
        return None
    import torch

    try:
        doc = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - a torn or foreign file: train again
        return None
    return doc if isinstance(doc, dict) and "key" in doc and "state" in doc else None
