"""``pgvar-run`` that also saves the policy and critic at every measured step.

    python experiments/gradient_quality/train.py <pgvar-run overrides> hydra.run.dir=DIR

runs ``pgvar.run.main`` unchanged except that, at each measured step (before that step's
update), ``DIR/checkpoints/step_NNNNNN.pt`` gets ``{"step", "policy", "critic"}`` state
dicts (``torch.save``; read back with ``torch.load(weights_only=True)``). It stands in
for pgvar-run's own checkpoints until those exist; ``hydra.run.dir`` must be given.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import pgvar.run as run

_measure_row = run.measure_row


def run_dir_argument(argv: list[str]) -> Path:
    """The ``hydra.run.dir=DIR`` override (required: the checkpoints go there)."""
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            return Path(arg.split("=", 1)[1])
    raise SystemExit("train.py: give hydra.run.dir=DIR (the checkpoints are saved under it)")


def measure_and_save(run_cfg, env, policy, critic, est_cfg, step):
    """Save the policy (and critic) measured at ``step``, then measure as pgvar-run does."""
    out = run_dir_argument(sys.argv[1:]) / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "policy": policy.state_dict(),
                "critic": None if critic is None else critic.state_dict()},
               out / f"step_{step:06d}.pt")
    return _measure_row(run_cfg, env, policy, critic, est_cfg, step)


if __name__ == "__main__":
    run_dir_argument(sys.argv[1:])
    run.measure_row = measure_and_save
    run.main()
