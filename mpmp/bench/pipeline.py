"""`mpirun -n P python -m mpmp.bench pipeline`: each schedule's bubble, measured on the real engine.

The PipelineEngine runs every schedule's instruction lists over MPI, as in training, on a stand-in
model whose chunks cost a set time: forward, input-gradient backward and weight-gradient pass each
sleep one unit (t_F = t_B = t_W, divided by v under interleaving so every rank does the same work), and
pass a small real activation ([1, 8] float32) from stage to stage. Sleeping rather than computing keeps
P ranks from competing for the cores, so the measurement reflects the schedule (and the engine's
transfers and overheads), not CPU contention: 8 ranks on a 2-core node still measure the schedule.

One warm-up step of every schedule, then --steps rounds of one step each (round robin, so a burst of
load from other jobs hits one step of every schedule), each step started by a barrier. Per step, a
rank's busy time is the sum of its compute spans (the ledger's "compute:F3.0" ... events) and the
window runs from the first computation on any rank (stage 0's first forward) to the last:

    bubble = 1 - mean busy / window

as schedules.bubble_fraction counts it (ranks' times compare by wall clock: exact on one node), reported as the median over the steps beside
`theoretical_bubble` (the papers' formulas with F = B = W; GPipe, 1F1B and interleaved run a fused
backward of B + W). The goal is a measured bubble within 10% of theory. What is left over is the
engine's cost per instruction and a message's latency, each 0.05-0.5 ms on a busy 2-core node: a unit
of 40 ms keeps them near 1% of an op. They add up along the schedule's critical path, longest where
it has no slack (ZB-H1's last stage and its B chain), and they weigh most where theory is smallest.
Sleep overshoot counts as busy and so cancels out, but its spread does not: a late op delays whatever
waits on it.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy

from mpmp.comm.mpi import wait_sleeping
from mpmp.errors import ConfigError
from mpmp.pipeline import schedules as S

ACT_SHAPE = (1, 8)
ACT_DTYPE = numpy.float32
GOAL = 0.10  # measured within 10% of theory


class SleepChunk:
    """A stand-in model chunk: forward, backward and the weight-gradient pass sleep t_f, t_b, t_w
    seconds. The activation of micro-batch i is i on the first virtual stage and grows by one per
    chunk, so the last chunk's loss (the activation's mean) proves the data went through every stage:
    i + number of virtual stages."""

    modules = ()  # no parameters: nothing for a grads_final hook to reduce

    def __init__(self, t_f: float, t_b: float, t_w: float, is_first: bool, is_last: bool):
        self.t_f, self.t_b, self.t_w = t_f, t_b, t_w
        self.is_first, self.is_last = is_first, is_last

    def forward(self, x, mb):
        time.sleep(self.t_f)
        if self.is_first:
            x = numpy.full(ACT_SHAPE, float(mb), dtype=ACT_DTYPE)
        y = x + 1
        return (float(y.mean()) if self.is_last else y), x

    def backward(self, dy, cache, wgrad=None, on_module_done=None):
        """Sleeps t_b, and queues the t_w sleep in wgrad when backward is split (B now, W later, as
        mpmp.nn.layers.defer); a fused backward sleeps t_b + t_w at once."""
        if wgrad is None:
            time.sleep(self.t_b + self.t_w)
        else:
            time.sleep(self.t_b)
            wgrad.append((time.sleep, (self.t_w,)))
        if dy is None:  # the last chunk: d mean / dx
            dy = numpy.full(cache.shape, 1.0 / cache.size, dtype=ACT_DTYPE)
        return None if self.is_first else dy  # y = x + 1 passes the gradient through


class SleepModel:
    """Rank `stage`'s chunks (virtual stages stage, stage + pp, ...), each costing unit / v per op."""

    def __init__(self, pp: int, stage: int, v: int, unit_s: float):
        t = unit_s / v
        last = pp * v - 1
        self.chunks = [SleepChunk(t, t, t, c * pp + stage == 0, c * pp + stage == last) for c in range(v)]


def expected_loss(pp: int, m: int, v: int) -> float:
    """The last stage's sum of micro-batch losses: sum over i of (i + pp·v)."""
    return m * (m - 1) / 2 + m * pp * v


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


POLL_S = 1e-4  # sleep between polls of a quiet wait: a few % of a core per waiting rank; a message is
# noticed ~0.1 ms late, ~0.1% of a step even summed over the 2(pp - 1) or so hops of its critical path
PR_SET_TIMERSLACK = 29


def _precise_sleeps():
    """Linux lets a sleep end up to 50 us late (timer slack) to batch wake-ups; 1 us makes the quiet
    waits' polls and the stand-in's compute sleeps as short as asked. Best effort."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def _quiet_group(group):
    """The pipeline group with waits that sleep between polls (--quiet-wait). MPICH's blocking wait
    polls, yielding the core now and then; with more ranks than cores, the waiting ranks then share
    the cores with the ranks waking from their (sleeping) compute. On this 2-core node both waits
    measure the same bubble when it is otherwise idle; the quiet one uses about a third of the CPU.
    The engine and its messages are unchanged: only how a rank waits differs."""
    from mpmp.comm.mpi import MPI, MPIGroup

    class QuietGroup(MPIGroup):
        def _wait_all(self, requests):
            reqs = [req for req, _ in requests]
            while not MPI().Request.Testall(reqs):
                time.sleep(POLL_S)
            super()._wait_all(requests)  # completed: copies staged buffers back

    return QuietGroup(group.comm, group.name, group.ranks)


def _label(kind: str, v: int) -> str:
    """'compute:BW3.1' -> 'B3b' (fused backward drawn as B, as mpmp.schedule does)."""
    name = kind[len("compute:") :]
    op = "W" if name.startswith("W") else name[0]
    mb, chunk = name.lstrip("BFW").split(".")
    return f"{op}{mb}" + (chr(97 + int(chunk)) if v > 1 else "")


class _Case:
    """One schedule on this rank: its instruction list and an engine over the stand-in model."""

    def __init__(self, schedule: str, grid, group, m: int, v: int, unit_s: float):
        from mpmp.pipeline.engine import PipelineEngine

        self.schedule, self.grid, self.m, self.v, self.unit_s = schedule, grid, m, v, unit_s
        self.program = S.build(schedule, grid.pp, m, grid.stage, v)
        model = SleepModel(grid.pp, grid.stage, v, unit_s)
        self.engine = PipelineEngine(
            model,
            group,
            pp=grid.pp,
            stage=grid.stage,
            neighbours=(grid.prev_stage, grid.next_stage),
            virtual_stages=v,
            act_shape=ACT_SHAPE,
            act_dtype=ACT_DTYPE,
        )

    def step(self):
        """One step from a barrier; rank 0 gets every rank's (start, end, compute spans), others None."""
        from mpmp.comm import ledger

        led, grid = ledger.get(), self.grid
        led.reset()
        wait_sleeping(grid.comm.Ibarrier(), POLL_S)  # early ranks leave the cores to the busy ones
        start = led.now()
        loss = self.engine.run(self.program, list(range(self.m)))
        end = led.now()
        want = expected_loss(grid.pp, self.m, self.v)
        if grid.is_last_stage and abs(loss - want) > 1e-3:
            raise RuntimeError(f"{self.schedule}: the last stage's loss is {loss}, not {want}: activations went astray")
        spans = [(_label(e.kind, self.v), e.start, e.end) for e in led.events if e.kind.startswith("compute:")]
        return grid.comm.gather((start, end, spans), root=0)

    def row(self, per_step) -> dict:
        """The table row from the measured steps: the median step's bubble, times and timeline."""
        bubbles = [s["bubble"] for s in per_step]
        median = statistics.median_low(bubbles)
        shown = per_step[bubbles.index(median)]  # drawn by --png
        theory = S.theoretical_bubble(self.schedule, self.grid.pp, self.m, self.v)
        ratio = median / theory if theory else float("nan")
        return {
            "schedule": self.schedule,
            "pp": self.grid.pp,
            "m": self.m,
            "v": self.v,
            "unit_ms": self.unit_s * 1e3,
            "bubble": median,
            "best": min(bubbles),
            "theory": theory,
            "ratio": ratio,
            "within_goal": abs(ratio - 1) <= GOAL,
            "window_ms": shown["window_ms"],
            "step_ms": shown["step_ms"],
            "busy_ms": shown["busy_ms"],
            "step_bubbles": bubbles,
            "timeline": shown["timeline"],
        }


def _step_result(gathered) -> dict:
    """Bubble, window, step time and per-rank timeline (ms from the first computation) of one step.

    The window runs from the first computation (stage 0's first forward) to the last, as
    schedules.bubble_fraction and the papers count it; the step time also holds the skew of the ranks
    leaving the barrier (milliseconds on a loaded node) and the final waits on sends."""
    first = min(s for _, _, spans in gathered for _, s, _ in spans)
    last = max(e for _, _, spans in gathered for _, _, e in spans)
    step = max(end for _, end, _ in gathered) - min(start for start, _, _ in gathered)
    busy = [sum(e - s for _, s, e in spans) for _, _, spans in gathered]
    timeline = [[(label, (s - first) * 1e3, (e - first) * 1e3) for label, s, e in spans] for _, _, spans in gathered]
    mean_busy = sum(busy) / len(busy)
    return {
        "bubble": 1 - mean_busy / (last - first),
        "window_ms": (last - first) * 1e3,
        "step_ms": step * 1e3,
        "busy_ms": mean_busy * 1e3,
        "timeline": timeline,
    }


def run(args, comm) -> list[dict] | None:
    """Measure every schedule; the rows on rank 0, None elsewhere."""
    from mpmp.comm import ledger
    from mpmp.comm.grid import ProcessGrid

    grid = ProcessGrid(tp=1, pp=comm.Get_size(), dp=1, comm=comm)
    _precise_sleeps()
    group = _quiet_group(grid.pp_group) if args.quiet_wait else grid.pp_group
    previous = ledger.get()
    ledger.install(ledger.Ledger(grid.rank, keep_events=True))
    try:
        cases = [
            _Case(s, grid, group, args.m, args.virtual_stages if s == "interleaved" else 1, args.unit_ms / 1e3)
            for s in args.schedules
        ]
        per_step = [[] for _ in cases]
        # Round robin over the schedules, step by step: a burst of load on the node (other jobs) then
        # spoils one step of every schedule, which the median drops, not every step of one schedule.
        for step in range(args.warmup + args.steps):
            for case, results in zip(cases, per_step):
                gathered = case.step()
                if step >= args.warmup and gathered is not None:
                    results.append(_step_result(gathered))
    finally:
        ledger.install(previous)
    if grid.rank != 0:
        return None
    return [case.row(results) for case, results in zip(cases, per_step)]


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _node_load() -> str:
    try:
        return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except OSError:
        return "load average unknown"


def format_table(rows, steps: int, warmup: int, load: str = "") -> str:
    r0 = rows[0]
    lines = [
        f"# mpmp pipeline bench: pp {r0['pp']}, m {r0['m']}, unit {r0['unit_ms']:g} ms (t_F = t_B = t_W per stage, "
        f"unit/v per chunk), median of {steps} step(s) after {warmup} warm-up",
        "# bubble = 1 - mean busy / window (first to last computation), median step; best: the lowest step; "
        f"step: barrier to the last rank's end; theory = theoretical_bubble with F = B = W; goal: within {GOAL:.0%}",
        f"{'schedule':<12}{'pp':>4}{'m':>5}{'v':>4}{'step ms':>10}{'window':>10}{'busy ms':>10}"
        f"{'bubble':>9}{'best':>8}{'theory':>9}{'ratio':>8}  within {GOAL:.0%}",
    ]
    if load:
        lines.insert(2, f"# node {load} at the start: other jobs' load delays wake-ups and adds to the bubble")
    for r in rows:
        lines.append(
            f"{r['schedule']:<12}{r['pp']:>4}{r['m']:>5}{r['v']:>4}{r['step_ms']:>10.1f}"
            f"{r['window_ms']:>10.1f}{r['busy_ms']:>10.1f}"
            f"{r['bubble']:>9.4f}{r['best']:>8.4f}{r['theory']:>9.4f}{r['ratio']:>8.3f}  {'yes' if r['within_goal'] else 'NO'}"
        )
    return "\n".join(lines)


def save_timeline_png(path: str, rows):
    """One panel per schedule: the median step's compute spans per rank, on a shared time axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--png needs matplotlib (pip install matplotlib)") from None
    from mpmp.pipeline.timeline import draw_timeline, save_figure

    xmax = max(r["window_ms"] for r in rows)
    slots = max(r["window_ms"] / (r["unit_ms"] / r["v"]) for r in rows)  # narrowest bar ~ 0.3 inch
    pp = rows[0]["pp"]
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(min(40, 2 + 0.3 * slots), len(rows) * (1.2 + 0.45 * pp)), sharex=True, squeeze=False
    )
    for i, (ax, r) in enumerate(zip(axes[:, 0], rows)):
        bars = [[(s, e - s, label) for label, s, e in spans] for spans in r["timeline"]]
        title = (
            f"{r['schedule']} pp={r['pp']} m={r['m']} v={r['v']}: measured bubble {r['bubble']:.3f}, "
            f"theory {r['theory']:.3f} (ratio {r['ratio']:.2f}); F/B/W = {r['unit_ms'] / r['v']:g} ms"
            + ("" if r["schedule"] == "zb-h1" else ", fused B lasts B+W")
        )
        draw_timeline(ax, bars, xmax, title, xlabel="ms since the first forward" if i == len(rows) - 1 else "")
    fig.tight_layout()
    save_figure(plt, fig, path)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None, world_size: int = 2):
    p = argparse.ArgumentParser(
        prog="mpirun -n P python -m mpmp.bench pipeline",
        description="Measure each pipeline schedule's bubble on the real engine over MPI (pp = world size), "
        "with stages of equal, controlled cost (sleeps), beside the papers' formulas.",
    )
    p.add_argument("--micro-batches", type=int, dest="m", metavar="M", help="micro-batches per step (default 2*pp)")
    p.add_argument(
        "--schedules",
        default=",".join(S.SCHEDULES),
        metavar="LIST",
        help=f"comma-separated, from {','.join(S.SCHEDULES)} (default: all)",
    )
    p.add_argument("--virtual-stages", type=int, default=2, metavar="V", help="chunks per rank for interleaved (2)")
    p.add_argument(
        "--unit-ms",
        type=float,
        default=40.0,
        metavar="MS",
        help="t_F = t_B = t_W of one stage in ms (default 40: the engine's cost per instruction and "
        "a message's latency, 0.05-0.5 ms each on a busy 2-core node, stay near 1%% of it)",
    )
    p.add_argument("--steps", type=int, default=5, help="measured steps per schedule; the median is reported (5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (1)")
    p.add_argument(
        "--quiet-wait",
        action="store_true",
        help="wait for messages by polling with short sleeps, not in MPICH's wait (which training "
        "uses): less CPU on a node shared with other jobs, the same bubble on an idle one",
    )
    p.add_argument("--png", metavar="FILE", help="draw the measured per-rank timelines (needs matplotlib)")
    p.add_argument("--json", metavar="FILE", help="write the rows, per-step bubbles and timelines as JSON")
    args = p.parse_args(argv)
    if world_size < 2:
        raise ConfigError("the pipeline bench needs at least 2 ranks (pp = world size): mpirun -n 4 ...")
    args.schedules = [s for s in args.schedules.split(",") if s]
    for s in args.schedules:
        if s not in S.SCHEDULES:
            raise ConfigError(f"--schedules: {s!r} is not one of {', '.join(S.SCHEDULES)}")
    if not args.schedules:
        raise ConfigError("--schedules names no schedule")
    if args.m is None:
        args.m = 2 * world_size
    if args.unit_ms <= 0 or args.steps < 1 or args.warmup < 0:
        raise ConfigError(
            f"--unit-ms ({args.unit_ms}) must be positive, --steps ({args.steps}) at least 1, "
            f"--warmup ({args.warmup}) at least 0"
        )
    for s in args.schedules:  # every rank validates before the first collective
        S.validate(s, world_size, args.m, args.virtual_stages if s == "interleaved" else 1)
    return args


def main(argv=None, comm=None) -> int:
    from mpmp.comm.mpi import MPI

    comm = comm if comm is not None else MPI().COMM_WORLD
    args = parse_args(argv, comm.Get_size())
    load = _node_load()  # before our ranks start working
    rows = run(args, comm)
    if rows is not None:
        print(format_table(rows, args.steps, args.warmup, load), flush=True)
        if args.png:
            save_timeline_png(args.png, rows)
            print(f"png: {args.png}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"steps": args.steps, "warmup": args.warmup, "node": load, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    from mpmp.comm.mpi import abort_on_exception

    abort_on_exception()
    sys.exit(main())
