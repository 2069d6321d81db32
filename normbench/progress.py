"""One progress display on stderr, shared by data decoding, corruption generation and the runner.

A terminal shows one live display at a time. ``display()`` opens it (transient: once a task is
done its bar disappears, so piped or captured output holds only the log lines); code that
wants a bar calls ``task()``, which adds its bar to the display already open (the runner's,
during a suite) or opens one of its own. So ``normbench.data`` and the corruption sets show
their bars the same way whether the CLI calls them directly or a run does. When the console is
not a terminal (piped, captured) nothing is drawn at all.

Every bar has the same columns: description, bar, count, rate and time left. A task may set its
own ``rate`` and ``left`` text fields (the runner does: it knows more than rich's moving average,
e.g. that evaluation is still to come); otherwise rich's rate and estimate are shown.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
)
from rich.text import Text

_active: Progress | None = None


def format_duration(seconds: float | None) -> str:
    """``42 s``, ``6 min 10 s``, ``1 h 12 min``; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs and minutes < 10 else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


class CountColumn(ProgressColumn):
    """``12,000/50,000``; nothing while the total is unknown."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{task.completed:,.0f}/{task.total:,.0f}", style="progress.download")


class RateColumn(ProgressColumn):
    """The task's ``rate`` field, else rich's moving average in the task's ``unit`` per second."""

    def render(self, task: Task) -> Text:
        if "rate" in task.fields:
            return Text(task.fields["rate"], style="progress.data.speed")
        speed = task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.0f} {unit}/s" if speed else "", style="progress.data.speed")


class LeftColumn(ProgressColumn):
    """The task's ``left`` field, else the time left at rich's moving-average rate."""

    def render(self, task: Task) -> Text:
        if "left" in task.fields:
            return Text(task.fields["left"], style="progress.remaining")
        left = task.time_remaining
        return Text("" if left is None else f"~{format_duration(left)} left", "progress.remaining")


def columns() -> tuple[ProgressColumn, ...]:
    return (
        TextColumn("{task.description}"),
        BarColumn(bar_width=30),
        CountColumn(),
        RateColumn(),
        LeftColumn(),
    )


@contextlib.contextmanager
def display(console: Console | None = None) -> Iterator[Progress]:
    """The live display: the one already open, else a new transient one on ``console``
    (default: stderr) that bars opened with ``task()`` join until the block ends."""
    global _active
    if _active is not None:
        yield _active
        return
    console = console or Console(stderr=True)
    # Off when the console is not a terminal: rich would still end each display with an empty
    # line, and a log has no use for bars.
    disable = not console.is_terminal
    with Progress(*columns(), console=console, transient=True, disable=disable) as live:
        _active = live
        try:
            yield live
        finally:
            _active = None


@contextlib.contextmanager
def task(
    description: str, total: float | None, unit: str = "images"
) -> Iterator[Callable[[float], None]]:
    """A bar for the block; yields ``advance(n)``. The bar is removed when the block ends."""
    with display() as live:
        task_id = live.add_task(description, total=total, unit=unit)
        live.refresh()  # show the bar now, even if the block ends before the next refresh
        try:
            yield lambda n=1: live.advance(task_id, n)
        finally:
            live.remove_task(task_id)
