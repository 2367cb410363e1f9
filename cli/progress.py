"""A Rich progress bar that a pull reports into."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.columns import Columns
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from myllm.pull.progress import PullProgress


class _BytesOnly(ProgressColumn):
    """Shows byte counts, speed and time left only for stages that move a known number of
    bytes; a stage like "checking" shows just its name and a pulsing bar."""

    def __init__(self, *inner: ProgressColumn) -> None:
        super().__init__()
        self.inner = inner

    def render(self, task: Task) -> RenderableType:
        if not task.fields.get("counts_bytes"):
            return Text("")
        return Columns([col.render(task) for col in self.inner])


@contextmanager
def pull_progress(console: Console) -> Iterator[PullProgress]:
    """Yields a callback; each stage (downloading, copying, verifying...) gets its own bar."""
    bars = Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        _BytesOnly(DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()),
        console=console,
        transient=False,
    )
    tasks: dict[str, TaskID] = {}

    def report(stage: str, done: int, total: int | None) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total, counts_bytes=total is not None)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield report
        for task_id in tasks.values():  # a finished pull shows every stage as done
            task = bars.tasks[task_id]
            if task.total is None:
                bars.update(task_id, total=1, completed=1)
