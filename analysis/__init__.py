"""Analysis of pgvar sweeps: load runs into one tidy frame, build the bias/variance
table and the figures. ``load_runs`` and ``analyze`` are the notebook entry points."""

from analysis.loader import LoadError, LoadReport, load_runs
from analysis.pipeline import AnalysisResult, analyze

__all__ = ["AnalysisResult", "LoadError", "LoadReport", "analyze", "load_runs"]
