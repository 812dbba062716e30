"""Randomized seeded simulations of the Raft core: 3- and 5-replica groups under message loss, duplication,
reordering, partitions, crashes (also between append and fsync), pauses and clock drift. Every step checks
the safety properties; after healing, the group must make progress. ``SEED=n pytest tests/test_raft_sim.py``
replays one seed exactly; ``python -m engine.raft.sim --seeds N --jobs 0`` runs many in parallel."""
import os

import pytest

from engine.raft.sim import run_seed

SEEDS_IN_SUITE = 500
_one = os.environ.get("SEED")
SEEDS = [int(_one)] if _one else list(range(SEEDS_IN_SUITE))


@pytest.mark.parametrize("chunk", range(0, len(SEEDS), 50))
def test_random_seeds(chunk):
    for seed in SEEDS[chunk:chunk + 50]:
        try:
            result = run_seed(seed, steps=1200)
        except AssertionError as exc:
            pytest.fail(f"SEED={seed} failed (replay: SEED={seed} python -m pytest tests/test_raft_sim.py): {exc}")
        assert result["heal_steps"] < 3000
