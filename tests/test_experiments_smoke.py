"""Every experiment under experiments/ runs end to end at its smoke preset, through the
``pgvar-reproduce`` command (``python -m analysis.reproduce``), and its own analysis
writes a verdict and its figures.

One parametrised test instead of one per experiment, in the slow run (``make test-slow``):
each case takes 15-30 s on 2 cores. The default run covers each analysis in process on
synthetic runs (tests/test_experiment_*.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.parent.name for p in (REPO / "experiments").glob("*/analyze.py"))


def reproduce_command() -> list[str]:
    """``pgvar-reproduce`` as this Python runs it (the console script calls the same ``main``)."""
    return [sys.executable, "-m", "analysis.reproduce"]


def test_every_claim_of_issue_6_has_an_experiment():
    assert set(EXPERIMENTS) >= {"reward_to_go", "baselines", "gae_lambda", "horizon_action_dim",
                                "sparse_reward", "batch_size", "ppo_clip", "practice_biases"}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_preset_writes_a_verdict_and_figures(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    proc = subprocess.run([*reproduce_command(), name, "--preset", "smoke", "--out", str(out)],
                          check=False, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "result.md").read_text()
    assert "Verdict" in text
    assert (out / "result.csv").exists()
    assert list((out / "figures").glob(f"{name}_*.png")), "the experiment wrote no figure"
    # the last line names the main result: the table, or a simulation's own result.md
    simulation = "kind: simulation" in (REPO / "experiments" / name / "sweep.yaml").read_text()
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith("result.md" if simulation else "table.md"), last
