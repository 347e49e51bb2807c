"""pgvar.checks: the one home of the argument rules, and the error class each caller picks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pgvar.checks import require_choice, require_in_range, require_int
from pgvar.config import ConfigError, require_positive_int


def test_require_int_accepts_integers_and_refuses_the_rest():
    assert require_int("n", 3) == 3
    assert require_int("n", np.int64(5)) == 5 and type(require_int("n", np.int64(5))) is int
    assert require_int("n", 0, minimum=0) == 0
    for bad in (0, -1, True, 2.0, "3", None):
        with pytest.raises(ValueError, match=r"n must be an integer >= 1, got"):
            require_int("n", bad)


def test_require_in_range_honours_open_and_closed_ends():
    assert require_in_range("g", 1, 0.0, 1.0) == 1.0
    assert require_in_range("g", np.float32(0.5), 0.0, 1.0) == 0.5
    with pytest.raises(ValueError, match=r"g must lie in \[0.0, 1.0\), got 1.0"):
        require_in_range("g", 1.0, 0.0, 1.0, high_open=True)
    with pytest.raises(ValueError, match=r"\(0.0, inf\)"):
        require_in_range("lr", 0.0, 0.0, math.inf, low_open=True, high_open=True)
    for bad in (math.nan, math.inf, True, "0.5"):
        with pytest.raises(ValueError):
            require_in_range("g", bad, 0.0, 1.0)


def test_require_choice_names_the_valid_values():
    assert require_choice("kind", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match="kind='c' is not valid; valid values: a, b"):
        require_choice("kind", "c", ("a", "b"))


def test_config_raises_config_error_by_the_same_rule():
    with pytest.raises(ConfigError, match="training.batch_size must be an integer >= 1, got 0"):
        require_positive_int("training.batch_size", 0)
