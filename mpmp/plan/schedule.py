"""The pipeline schedule's computations as compact arrays, built once per (schedule, pp, m, v).

schedules.compute_order (the instruction lists the engine runs and the simulator checks) is the
source; memory (micro-batches in flight) and step time (the re-timed simulation) read these arrays.
"""

from functools import cache, lru_cache

import numpy

from mpmp.errors import ConfigError
from mpmp.pipeline import schedules as S

F, B, W, BW = 0, 1, 2, 3  # forward, input-gradient backward, weight gradient, fused backward (B + W)
_KIND = {S.Forward: F, S.BackwardInput: B, S.BackwardWeight: W, S.Backward: BW}


@lru_cache(maxsize=128)
def orders(schedule: str, pp: int, m: int, v: int = 1) -> tuple:
    """Per stage: (kind, mb, chunk) int arrays in execution order."""
    S.validate(schedule, pp, m, v)
    out = []
    for s in range(pp):
        order = S.compute_order(schedule, pp, m, s, v)
        kind = numpy.fromiter((_KIND[type(i)] for i in order), dtype=numpy.int8, count=len(order))
        mb = numpy.fromiter((i.mb for i in order), dtype=numpy.int32, count=len(order))
        chunk = numpy.fromiter((i.chunk for i in order), dtype=numpy.int32, count=len(order))
        out.append((kind, mb, chunk))
    return tuple(out)


@cache
def splits_backward(schedule: str) -> bool:
    """Whether the schedule runs input and weight gradients apart (B, then W later): read off a
    two-stage pipeline of two micro-batches."""
    for v in (1, 2):
        try:
            return any(isinstance(i, S.BackwardInput) for i in S.compute_order(schedule, 2, 2, 0, v))
        except ConfigError:
            continue
    return False
