"""Seeds derived from a run's seed: one independent stream per purpose.

A run draws its policy initialisation, its training batches, its measured batches and
its reference episodes from separate streams, so changing how many draws one purpose
makes never shifts another's. Anything that must rebuild what a run did (its initial
policy, say) derives the same seed here.
"""

from __future__ import annotations

import numpy as np

# Streams of derived seeds: each purpose draws from its own independent sequence.
SEED_STREAMS = {"torch": 0, "policy": 1, "critic": 2, "train": 3, "measure": 4, "reference": 5,
                "critic_data": 6}


def derive_seed(run_seed: int, stream: str, index: int = 0, *more: int) -> int:
    """A 32-bit seed for ``(run seed, purpose, index, *more)``, independent across them
    (``more`` tells apart several draws of one purpose at one index, e.g. a second reference)."""
    words = [int(run_seed) % 2**32, SEED_STREAMS[stream], int(index), *(int(m) for m in more)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])
