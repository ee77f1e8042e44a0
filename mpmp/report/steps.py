"""What one step of a trace holds, and the numbers the pictures print.

A rank's step k is its span `step k` (cat "step"). The picture of step k runs from the first rank's
start of it to the last rank's end (its length T is the step time in the title); each rank shows the
spans that overlap its own step span, clipped to it.

The measured bubble is the fraction of the ranks' time in that picture with no computation:

    bubble = 1 - sum_r busy_r / (R * T)

where R is the number of ranks and busy_r the length of the union of rank r's compute spans (F, B,
BW, W, recompute, optimizer) inside its step span. A nested span (recompute inside its backward)
counts once; time blocked in communication counts as idle, as a pipeline bubble does.
"""

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass, replace

from mpmp.report.files import Metrics, ReportError, Span, Trace

NON_BLOCKING = {"iall_reduce": "all_reduce"}  # the bytes panel counts an operation under one name


@dataclass(frozen=True)
class StepView:
    step: int
    start: float  # microseconds: the first rank's start of the step
    end: float  # the last rank's end
    ranks: int
    compute: dict  # rank -> [Span] clipped to the rank's step span
    comm: dict  # rank -> [Span]

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / 1e6


def step_spans(trace: Trace) -> dict:
    """{step: {rank: its `step k` span}}."""
    out = defaultdict(dict)
    for s in trace.spans:
        k = s.args.get("step")
        if s.cat == "step" and isinstance(k, int):
            out[k][s.rank] = s
    return dict(out)


def complete_steps(trace: Trace) -> list:
    """The steps with a step span on every rank, in order."""
    return sorted(k for k, ranks in step_spans(trace).items() if len(ranks) == trace.world)


def _clip(span: Span, lo: float, hi: float) -> Span | None:
    if span.start > hi or span.end < lo:
        return None
    start, end = max(span.start, lo), min(span.end, hi)
    return replace(span, start=start, dur=end - start)


def step_view(trace: Trace, k: int) -> StepView:
    own = step_spans(trace)[k]
    compute = {r: [] for r in range(trace.world)}
    comm = {r: [] for r in range(trace.world)}
    for s in trace.spans:
        mine = own.get(s.rank)
        if s.cat == "step" or mine is None:
            continue
        piece = _clip(s, mine.start, mine.end)
        if piece is not None:
            (compute if s.cat == "compute" else comm)[s.rank].append(piece)
    start = min(s.start for s in own.values())
    end = max(s.end for s in own.values())
    return StepView(k, start, end, trace.world, compute, comm)


def busy_time(spans: list) -> float:
    """Length of the union of the spans (microseconds)."""
    total, reach = 0.0, -math.inf
    for s in sorted(spans, key=lambda s: s.start):
        if s.end > reach:
            total += s.end - max(s.start, reach)
            reach = s.end
    return total


def measured_bubble(view: StepView) -> float:
    """1 - (compute busy time summed over ranks) / (ranks x step span); see the module docstring."""
    span = view.end - view.start
    if span <= 0:
        return math.nan
    busy = sum(busy_time(view.compute[r]) for r in range(view.ranks))
    return 1.0 - busy / (view.ranks * span)


def blocked_us(span: Span) -> float:
    """Microseconds the rank was blocked: the whole span for blocking operations, the wait() time
    (at the end of the span, which runs from issue to completion) for non-blocking ones."""
    value = span.args.get("blocked_us", span.dur)
    return min(max(float(value), 0.0), span.dur) if isinstance(value, (int, float)) else span.dur


def choose_step(trace: Trace, metrics: Metrics, wanted: int | None = None) -> int:
    """--step K if the trace holds it; else the median-duration step after warm-up (the first step
    of the trace's launch is warm-up); the lower median of an even count, ties to the earlier step."""
    steps = complete_steps(trace)
    if not steps:
        raise ReportError(
            f"trace {trace.path} holds no complete step (a 'step k' span on each of its {trace.world} ranks)"
        )
    if wanted is not None:
        if wanted not in steps:
            raise ReportError(f"step {wanted} is not in trace {trace.path} (it holds steps {steps[0]}..{steps[-1]})")
        return wanted
    warm = metrics.first_step.get(trace.run_id)
    after = [k for k in steps if k != warm] or steps
    windows = step_spans(trace)
    length = {k: max(s.end for s in windows[k].values()) - min(s.start for s in windows[k].values()) for k in after}
    ordered = sorted(after, key=lambda k: (length[k], k))
    return ordered[(len(ordered) - 1) // 2]


def op_key(group: str, kind: str) -> str:
    """'group:op' as the plan writes it, e.g. 'tp:all_reduce'."""
    return f"{group}:{NON_BLOCKING.get(kind, kind)}"


def normal_key(key: str) -> str:
    group, _, kind = key.partition(":")
    return op_key(group, kind)


def bytes_per_step(trace: Trace) -> dict:
    """{'group:op': [bytes per step of rank r]}: the communication spans that start inside a rank's
    complete steps, averaged over those steps."""
    steps = complete_steps(trace)
    own = step_spans(trace)
    windows = {r: sorted((own[k][r].start, own[k][r].end) for k in steps) for r in range(trace.world)}
    totals = defaultdict(lambda: [0.0] * trace.world)
    for s in trace.spans:
        if s.cat in ("compute", "step") or s.rank not in windows:
            continue
        i = bisect.bisect_right(windows[s.rank], (s.start, math.inf)) - 1
        if i >= 0 and s.start < windows[s.rank][i][1]:
            totals[op_key(s.cat, s.name.split()[0])][s.rank] += float(s.args.get("bytes", 0) or 0)
    return {key: [b / max(len(steps), 1) for b in per_rank] for key, per_rank in sorted(totals.items())}
