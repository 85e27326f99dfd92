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

    # the bar's own columns and their starting values (DAFLProgress shows other fields)
    FIELDS = "loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2f}%"
    START = {"loss": 0.0, "acc": 0.0}

    def start(self, epochs: int, steps_per_epoch: int) -> None:
        self._epochs = epochs
        if self.console.quiet or not self.console.is_terminal:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn(self.FIELDS), TimeElapsedColumn(), console=self.console, transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(f"{self.label} epoch 1/{epochs}", total=epochs * steps_per_epoch,
                                             **self.START)

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


class DAFLProgress(TrainProgress):
    """Data-free distillation: the generator's and the student's losses, the student's agreement
    with the teacher on generated batches, and (when real test data is given) the student's
    test top-1 after every epoch. ``dafl`` is the ``dcomp.compressors.dafl.DAFL`` callback."""

    def __init__(self, console: Console, label: str, dafl):
        super().__init__(console, label)
        self.dafl = dafl
        self._test = ""

    FIELDS = "G {task.fields[loss_g]:.3f}  S {task.fields[loss_s]:.4f}  agree {task.fields[acc]:.1f}%{task.fields[test]}"
    START = {"loss_g": 0.0, "loss_s": 0.0, "acc": 0.0, "test": ""}

    def advance(self, loss: float, acc: float) -> None:
        if self._progress is not None:
            last = self.dafl.last
            self._progress.update(self._task, advance=1, loss_g=last.get("loss_g", 0.0),
                                  loss_s=last.get("loss_s", 0.0), acc=acc, test=self._test)

    def epoch_done(self, rec: dict) -> None:
        h = self.dafl.history[-1] if self.dafl.history else {}
        if "test_top1" in h:
            self._test = f"  test {h['test_top1']:.2f}%"
        line = (f"{self.label} epoch {rec['epoch']}/{self._epochs}: G {h.get('loss_g', 0.0):.3f} "
                f"(oh {h.get('oh', 0.0):.3f} ie {h.get('ie', 0.0):.3f} a {h.get('a', 0.0):.3f})  "
                f"S {h.get('loss_s', 0.0):.4f}  agree {rec['train_top1']:.2f}%{self._test}")
        if self._progress is not None:
            self._progress.update(self._task, test=self._test,
                                  description=f"{self.label} epoch {min(rec['epoch'] + 1, self._epochs)}/{self._epochs}")
        else:
            self.console.print(line)
