"""Theory beside practice: what the planner predicts for a run, beside what the run measured.

`python -m mpmp.train --explain` gathers, at the end of a run, each rank's memory and the ledger's
totals of its last step (per group and operation: count, bytes, seconds blocked), and hands them here.
The prediction is the planner's for the same configuration (search.evaluate, with the named hardware
profile; the cpu profile for this machine): memory per rank, bytes per group and operation per step
(they must agree exactly: tests/test_plan_mpi.py), the bubble and the step time. Pure: no MPI.
"""

from mpmp.comm.grid import coord_of
from mpmp.config import TrainConfig
from mpmp.plan import hardware, search

MIB = 2**20


def measured_bubble(last_step: list, step_s: float) -> float:
    """The pipeline bubble as the ledger sees it: the time each rank was blocked in pipeline transfers
    during the step (waiting for a neighbour stage: 1F1B's warm-up and cool-down), over the step,
    averaged over ranks."""
    if step_s <= 0:
        return 0.0
    blocked = [sum(s for (group, _), (_, _, s) in rows.items() if group == "pp") for rows in last_step]
    return sum(blocked) / (len(blocked) * step_s)


def explain(cfg: TrainConfig, *, profile: str, memory: list, last_step: list, step_s: float) -> str:
    """memory: per rank [params, grads, optimizer, activations] bytes; last_step: per rank
    {(group, kind): (count, bytes, seconds blocked)} of the run's last step; step_s: its median step."""
    par = cfg.parallel
    if par.cp > 1:
        return "explain: the planner does not model context parallelism (--cp) yet; nothing to compare"
    plan = search.evaluate(cfg, hardware.load(profile))
    stage_of = [coord_of(r, par.tp, par.dp).pp for r in range(len(memory))]
    lines = [f"explain: the planner's prediction (python -m mpmp.plan, {profile} profile) beside this run"]
    lines.append("  memory per rank, MiB (params / grads / optimizer / activations): predicted | measured")
    for r, got in enumerate(memory):
        m = plan.memory[stage_of[r]]
        want = (m.params, m.grads, m.optimizer, m.activations)
        lines.append(
            f"    rank {r}: "
            + " / ".join(f"{b / MIB:.2f}" for b in want)
            + " | "
            + " / ".join(f"{b / MIB:.2f}" for b in got)
        )
    lines += _bytes_lines(plan, last_step, stage_of)
    bubble = measured_bubble(last_step, step_s)
    lines.append(
        f"  bubble: predicted {plan.step.bubble_fraction:.3f} (the schedule re-timed with modelled costs), "
        f"measured {bubble:.3f} (time blocked in pipeline transfers / step time)"
    )
    lines.append(f"  step time: predicted {plan.step.step_s * 1e3:.1f} ms, measured median {step_s * 1e3:.1f} ms")
    return "\n".join(lines)


def _bytes_lines(plan, last_step: list, stage_of: list) -> list:
    """Per group:op, rank 0's predicted and measured bytes of one step, and how many ranks match."""
    lines = ["  bytes per step, rank 0 (group:op): predicted | measured; ranks whose every op matches"]
    want0, got0 = plan.comm_bytes[stage_of[0]], last_step[0]
    for key in sorted(set(want0) | set(got0)):
        want = want0.get(key, (0, 0))[1]
        got = got0.get(key, (0, 0, 0.0))[1]
        name = f"{key[0]}:{key[1]}"
        lines.append(f"    {name:<22} {want:>14,} | {got:>14,}" + ("" if want == got else "   <- differs"))
    agree = sum(
        {k: v[1] for k, v in plan.comm_bytes[stage_of[r]].items()} == {k: v[1] for k, v in rows.items() if v[1]}
        for r, rows in enumerate(last_step)
    )
    lines.append(f"    {agree} of {len(last_step)} ranks: every group:op equal to the prediction")
    return lines
