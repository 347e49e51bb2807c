"""pgvar/progress.py: the periodic line's content, when it is printed, and the switch."""

from __future__ import annotations

import io

import pytest

from pgvar import progress as progress_module
from pgvar.progress import Progress, format_duration, progress_wanted, rate_and_remaining


class Clock:
    """A stand-in for time.perf_counter that the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", c)
    return c


def test_lines_every_period_with_rate_and_time_left(clock):
    out = io.StringIO()
    bar = Progress(1000, "reference", unit="episodes", progress=True, every_s=5, stream=out)
    clock.now += 2
    bar.update(100)  # 2 s: within the period, nothing printed
    assert out.getvalue() == ""
    clock.now += 3
    bar.update(150)  # 5 s, 250 done: 50 episodes/s, 750 left -> 15 s
    assert out.getvalue() == "reference: 250/1000 episodes (25%), 50 episodes/s, ~15s left\n"
    clock.now += 15
    bar.update(750)
    bar.close()
    assert out.getvalue().splitlines()[-1] == "reference: 1000 episodes in 20s, 50 episodes/s"


def test_quick_work_and_disabled_bars_print_nothing(clock):
    out = io.StringIO()
    with Progress(10, "quick", progress=True, every_s=5, stream=out) as bar:
        bar.update(10)
    with Progress(10, "off", progress=False, every_s=0, stream=out) as bar:
        clock.now += 10
        bar.update(10)
    assert out.getvalue() == ""


def test_default_follows_the_terminal_and_the_switch(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("PGVAR_PROGRESS", raising=False)
    assert progress_wanted(None, Tty()) and not progress_wanted(None, io.StringIO())
    monkeypatch.setenv("PGVAR_PROGRESS", "0")
    assert not progress_wanted(None, Tty())
    monkeypatch.setenv("PGVAR_PROGRESS", "1")
    assert progress_wanted(None, io.StringIO())
    assert not progress_wanted(False, io.StringIO())  # the argument wins


@pytest.mark.parametrize("seconds, text", [(42.4, "42s"), (185, "3m05s"), (3720, "1h02m"),
                                           (float("inf"), "?")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_rate_without_a_total_or_below_one_a_second():
    assert rate_and_remaining(30, None, 60, "jobs") == "30 jobs/min"
    assert rate_and_remaining(0, 10, 5, "jobs") == "0 jobs/s"
