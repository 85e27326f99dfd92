"""Rendering: the training progress bar and small table helpers. All of it goes to the stderr
console; tests can pass a Console that records into a string."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class TrainProgress:
    """What ``dcomp.train.fit`` reports to: a bar over all steps on a terminal, and one line per
    epoch when stderr is not a terminal (CI logs)."""

    def __init__(self, console: Console, label: str = "train"):
        self.console = console
        self.label = label
        self._progress: Progress | None = None
        self._task = None
        self._epochs = 0

    def start(self, epochs: int, steps_per_epoch: int) -> None:
        self._epochs = epochs
        if self.console.quiet or not self.console.is_terminal:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2f}%"), TimeElapsedColumn(),
            console=self.console, transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(f"{self.label} epoch 1/{epochs}", total=epochs * steps_per_epoch,
                                             loss=0.0, acc=0.0)

    def advance(self, loss: float, acc: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, loss=loss, acc=acc)

    def epoch_done(self, rec: dict) -> None:
        extra = f"  val {rec['val_top1']:.2f}%" if "val_top1" in rec else ""
        line = f"{self.label} epoch {rec['epoch']}/{self._epochs}: loss {rec['loss']:.4f}  train {rec['train_top1']:.2f}%{extra}"
        if self._progress is not None:
            self._progress.update(self._task, description=f"{self.label} epoch {min(rec['epoch'] + 1, self._epochs)}/{self._epochs}")
        else:
            self.console.print(line)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def kv_table(title: str, rows: dict) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows.items():
        t.add_row(str(k), fmt(v))
    return t


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
