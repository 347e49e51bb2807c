"""``python -m pgvar.bench --env hopper``: its options are checked, and a tiny run prints
the reference's rate next to Gymnasium's raw stepping rate with their ratio."""

from __future__ import annotations

import re

import pytest

from pgvar import bench


def test_pairs_needs_the_hopper_part(capsys):
    with pytest.raises(SystemExit) as err:
        bench.main(["--pairs", "5000"])
    assert err.value.code == 2
    assert "--pairs: only with --env hopper" in capsys.readouterr().err


def test_pairs_below_a_thousand_is_refused(capsys):
    with pytest.raises(SystemExit) as err:
        bench.main(["--env", "hopper", "--pairs", "10"])
    assert err.value.code == 2
    assert "must be an integer >= 1000" in capsys.readouterr().err


@pytest.mark.slow
def test_hopper_bench_prints_the_ratio_to_raw_stepping(capsys):
    pytest.importorskip("mujoco")
    assert bench.main(["--env", "hopper", "--pairs", "3000", "--repeats", "1", "--lanes", "16"]) == 0
    out = capsys.readouterr().out
    raw = float(re.search(r"raw_gymnasium_stepping: pairs_per_s=(\d+)", out).group(1))
    ref = float(re.search(r"monte_carlo_reference: pairs_per_s=(\d+)", out).group(1))
    ratio = float(re.search(r"reference_over_raw_stepping: ([\d.]+) \(wall\)", out).group(1))
    assert raw > 0 and ref > 0
    assert ratio == pytest.approx(ref / raw, rel=0.02, abs=0.01)
    assert "where_the_time_goes" in out
