"""pgvar: measure the bias and variance of policy-gradient estimators.

The few names most users need::

    from pgvar import make_env, make_policy, measure
    env = make_env("lqr", state_dim=2, action_dim=1, horizon=20)
    m = measure(env, make_policy(env), "rloo", n_batches=64, batch_size=16, seed=0)
"""

from pgvar.envs.registry import available_envs, make_env, make_policy
from pgvar.estimators import ESTIMATORS, EstimatorConfig, estimate_gradients, get_estimator
from pgvar.measure import Measurement, measure, measure_many
from pgvar.reference import Reference, reference_gradient
from pgvar.stats import GradStats, gradient_stats

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS", "EstimatorConfig", "GradStats", "Measurement", "Reference",
    "available_envs", "estimate_gradients", "get_estimator", "gradient_stats", "make_env",
    "make_policy", "measure", "measure_many", "reference_gradient",
]
