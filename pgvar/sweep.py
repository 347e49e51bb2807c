"""Hydra's command line and sweep expansion: the one module that uses Hydra's private API.

Hydra offers no public function that parses ``pgvar-run``'s argv or that lists the jobs
of a multirun before launching them; pgvar needs both to validate every job before any
starts (``pgvar.run``), to count a sweep's jobs for progress lines (``analysis.reproduce``)
and to subclass the basic sweeper (``hydra_plugins.pgvar_sweeper``). Everything from
``hydra._internal`` is imported here and nowhere else, so a Hydra upgrade that moves it
(pyproject pins hydra-core below 1.4) needs one file changed.
"""

from __future__ import annotations

import argparse

from hydra.core.override_parser.overrides_parser import OverridesParser

__all__ = ["basic_sweeper_class", "expand_sweep", "hydra_args_parser"]


def basic_sweeper_class() -> type:
    """Hydra's ``BasicSweeper`` class as Hydra's module holds it now.

    Looked up at each call, never bound at import: Hydra re-executes its plugin modules
    while it scans for plugins, and a subclass of the class from before the scan fails
    in ``super()`` against the class after it.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return BasicSweeper


def hydra_args_parser() -> argparse.ArgumentParser:
    """The argument parser of a Hydra app's command line (``--multirun``, overrides, ...)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser()


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper will launch them."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return basic_sweeper_class().split_arguments(parsed, None)[0]
