"""Assigning units (embedding, blocks, head) to pipeline stages."""

import itertools

import pytest

from mpmp.config import ModelConfig
from mpmp.errors import ConfigError
from mpmp.pipeline.partition import balanced_split, describe, stage_ranges, unit_costs


def brute_force(costs, parts):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_balanced_split_is_optimal_contiguous_and_complete(seed):
    import random

    rnd = random.Random(seed)
    n = rnd.randint(2, 9)
    parts = rnd.randint(1, n)
    costs = [rnd.uniform(0.1, 5) for _ in range(n)]
    split = balanced_split(costs, parts)
    assert len(split) == parts
    assert split[0][0] == 0 and split[-1][1] == n
    assert all(a < b for a, b in split) and all(b == c for (_, b), (c, _) in zip(split, split[1:]))
    assert max(sum(costs[a:b]) for a, b in split) == pytest.approx(brute_force(costs, parts))


def test_uniform_spreads_uneven_blocks_and_keeps_the_ends_with_blocks():
    cfg = ModelConfig(vocab=50, seq_len=8, d_model=8, layers=5, heads=2)
    split = balanced_split(unit_costs(cfg, "uniform"), 2)
    blocks = [sum(1 for u in range(a, b) if 1 <= u <= cfg.layers) for a, b in split]
    assert sorted(blocks) == [2, 3]
    assert split[0][0] == 0 and split[-1][1] == cfg.units


def test_parameters_partition_gives_the_large_embedding_stages_fewer_blocks():
    cfg = ModelConfig(vocab=5000, seq_len=64, d_model=32, layers=8, heads=2)
    split = balanced_split(unit_costs(cfg, "parameters"), 4)
    blocks = [sum(1 for u in range(a, b) if 1 <= u <= cfg.layers) for a, b in split]
    assert blocks[0] < blocks[1] and blocks[-1] < blocks[2]


def test_time_partition_follows_measured_costs():
    cfg = ModelConfig(vocab=50, seq_len=8, d_model=8, layers=6, heads=2)
    split = balanced_split(unit_costs(cfg, "time", measured=(0.1, 1.0, 3.0)), 2)
    assert split == [(0, 5), (5, 8)]  # the head costs 3 blocks: the last stage takes 2 blocks + head
    with pytest.raises(ValueError):
        unit_costs(cfg, "time")


def test_too_many_stages_and_unknown_methods_are_refused():
    cfg = ModelConfig(vocab=50, seq_len=8, d_model=8, layers=2, heads=2)
    with pytest.raises(ConfigError, match="cannot split 4 units"):
        balanced_split(unit_costs(cfg, "uniform"), 5)
    with pytest.raises(ConfigError, match="--partition must be one of"):
        unit_costs(cfg, "magic")


def test_interleaved_chunks_of_a_stage_and_the_printed_split():
    cfg = ModelConfig(vocab=50, seq_len=8, d_model=8, layers=6, heads=2)
    split = balanced_split(unit_costs(cfg, "uniform"), 4)
    assert stage_ranges(split, 2, 1, 2) == [split[1], split[3]]
    text = describe(split, 2, 2, cfg)
    assert "stage 1 chunk 1" in text and "head" in text


def dynamic_programme(costs, parts):
    """balanced_split as it was (O(parts n^2)): the reference its faster version must equal exactly."""
    import numpy

    n = len(costs)
    prefix = numpy.concatenate([[0.0], numpy.cumsum(costs, dtype=numpy.float64)])
    best = numpy.full((parts + 1, n + 1), float("inf"))
    cut = numpy.zeros((parts + 1, n + 1), dtype=int)
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i] - 1e-12:
                    best[k][i], cut[k][i] = value, j
    ranges, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        ranges.append((int(j), int(i)))
        i = j
    return ranges[::-1]


def cost_vector(rnd, kind, n):
    # scales put prefix sums where float round-off is far below, near, and above the 1e-12 tie tolerance
    scale = rnd.choice([1.0, 0.1, 7.3, 57.1, 1000.0, 1e5])
    if kind == "uniform":  # what --partition uniform produces: ties everywhere
        return [1e-3 * scale] + [scale] * (n - 2) + [1e-3 * scale] if n > 2 else [scale] * n
    if kind == "few values":
        return [scale * rnd.choice([1.0, 1.0, 0.1, 0.2, 0.3, 0.7]) for _ in range(n)]
    if kind == "zeros":
        return [rnd.choice([0.0, 0.0, 0.5, 1.0]) for _ in range(n)]
    if kind == "near ties":
        return [rnd.choice([1.0, 1.0 + 4e-13, 1.0 - 3e-13, 2e-12, 0.0]) for _ in range(n)]
    if kind == "negative":
        return [rnd.uniform(-1, 2) for _ in range(n)]
    return [rnd.uniform(0, 5) for _ in range(n)]


@pytest.mark.parametrize("kind", ["uniform", "random", "few values", "zeros", "near ties", "negative"])
def test_balanced_split_equals_the_dynamic_programme_exactly(kind):
    import random

    rnd = random.Random(kind)
    for _ in range(150):
        n = rnd.randint(1, 60)
        parts = rnd.randint(1, min(n, 10))
        costs = cost_vector(rnd, kind, n)
        assert balanced_split(costs, parts) == dynamic_programme(costs, parts), (costs, parts)


def test_balanced_split_of_a_hundred_thousand_layers():
    """The old programme needed ~10^11 steps here; the ranges are the even split, ties to the earliest cut."""
    costs = [1e-3] + [1.0] * 100_000 + [1e-3]
    split = balanced_split(costs, 8)
    assert [b - a for a, b in split] == [12501] + [12500] * 6 + [12501]
