"""A plan as text (the table `python -m mpmp.plan` prints) and as JSON (its --json, whose keys scripts
depend on: step_s, tflops_per_gpu, bubble_fraction, memory_bytes_per_rank, comm_bytes_per_step and the
chosen knobs)."""

from mpmp.comm.grid import coord_of
from mpmp.plan import comm

GIB = 2**30


def plan_json(plan, hw, sw, rejected: str = "") -> dict:
    """One plan (a layout with its chosen knobs); `rejected` says why it cannot run ("" if it can)."""
    cfg = plan.cfg
    par = cfg.parallel
    ranks = range(par.world_size)
    stage_of = [coord_of(r, par.tp, par.dp).pp for r in ranks]
    return {
        "tp": par.tp,
        "pp": par.pp,
        "dp": par.dp,
        "schedule": par.schedule,
        "virtual_stages": par.virtual_stages,
        "micro_batches": par.micro_batches,
        "micro_batch_size": cfg.micro_batch,
        "layout": {"tp": par.tp, "pp": par.pp, "dp": par.dp, "cp": 1},
        "step_s": plan.step.step_s,
        "tflops_per_gpu": plan.tflops_per_gpu,
        "bubble_fraction": plan.step.bubble_fraction,
        "memory_bytes_per_rank": [
            {
                "rank": r,
                "params": m.params,
                "grads": m.grads,
                "optimizer": m.optimizer,
                "activations": m.activations,
                "workspace": m.workspace,
            }
            for r, m in ((r, plan.memory[stage_of[r]]) for r in ranks)
        ],
        "comm_bytes_per_step": [{"rank": r, **comm.keyed(plan.comm_bytes[stage_of[r]])} for r in ranks],
        "comm_seconds_per_step": plan.comm_seconds,
        "fits": not rejected,
        "rejected": rejected or None,
        "hardware": hw.name,
        "software": sw.name,
    }


def rejected_json(rejected, hw, sw) -> dict:
    """A layout that cannot run: the same keys, its numbers null, `rejected` the reason."""
    (tp, pp, dp), reason = rejected.layout, rejected.reason
    keys = (
        "schedule",
        "virtual_stages",
        "micro_batches",
        "micro_batch_size",
        "step_s",
        "tflops_per_gpu",
        "bubble_fraction",
        "memory_bytes_per_rank",
        "comm_bytes_per_step",
        "comm_seconds_per_step",
    )
    return {
        "tp": tp,
        "pp": pp,
        "dp": dp,
        **dict.fromkeys(keys),
        "fits": False,
        "rejected": reason,
        "hardware": hw.name,
        "software": sw.name,
    }


def header(cfg, hw, sw, gpus: int) -> str:
    m, par = cfg.model, cfg.parallel
    return (
        f"GPT-2 V={m.vocab} S={cfg.seq_len} D={m.d_model} L={m.layers} H={m.heads}, {m.num_params():,} parameters; "
        f"global batch {cfg.global_batch}, {cfg.dtype}, recompute {par.recompute}, "
        f"sequence parallel {'on' if par.sequence_parallel else 'off'}, ZeRO-{par.zero}\n"
        f"{gpus} devices of {hw.name} ({hw.devices_per_node} per node), software {sw.name}"
    )


COLUMNS = (
    f"{'layout':<18}{'schedule':<16}{'m x b':>10}{'GiB/rank':>10}{'step s':>11}{'TFLOP/s':>9}{'% peak':>8}"
    f"{'bubble':>8}  comm s per step (link time)"
)


def row(plan, hw) -> str:
    par = plan.cfg.parallel
    b = plan.cfg.micro_batch
    sched = par.schedule + (f" v={par.virtual_stages}" if par.virtual_stages > 1 else "")
    need = max(m.total for m in plan.memory) / GIB
    comm_s = " ".join(f"{g} {plan.comm_seconds[g]:.3g}" for g in comm.GROUPS if plan.comm_seconds.get(g))
    return (
        f"{f'tp{par.tp} pp{par.pp} dp{par.dp}':<18}{sched:<16}{f'{par.micro_batches} x {b}':>10}{need:>10.2f}"
        f"{plan.step.step_s:>11.4g}{plan.tflops_per_gpu:>9.3g}{100 * plan.tflops_per_gpu * 1e12 / hw.peak_flops:>7.1f}%"
        f"{plan.step.bubble_fraction:>8.3f}  {comm_s or '-'}"
    )


def render(req, hw, plans, rejected, *, limit: int = 0) -> str:
    """The table: the plans best first (at most `limit`, 0 = all), the layouts that cannot run and why,
    and the best plan's memory by stage."""
    lines = [header(req.cfg, hw, req.software, req.gpus), "", COLUMNS]
    shown = plans[:limit] if limit else plans
    lines += [row(p, hw) for p in shown]
    if len(shown) < len(plans):
        lines.append(f"... {len(plans) - len(shown)} more (--top 0 shows all)")
    if rejected:
        lines += ["", "cannot run:"]
        lines += [f"  {f'tp{tp} pp{pp} dp{dp}':<16}{r.reason}" for r in rejected for tp, pp, dp in [r.layout]]
    if plans:
        best = plans[0]
        lines += ["", memory_breakdown(best)]
    return "\n".join(lines)


def memory_breakdown(plan) -> str:
    """Memory of each stage of a plan (every rank of a stage holds the same)."""
    out = [
        f"memory per rank of tp{plan.cfg.parallel.tp} pp{plan.cfg.parallel.pp} (GiB): "
        "stage: params + grads + optimizer + activations (+ workspace)"
    ]
    stages = plan.memory
    shown = list(range(len(stages))) if len(stages) <= 4 else [0, 1, len(stages) - 2, len(stages) - 1]
    for s in shown:
        m = stages[s]
        out.append(
            f"  {s:>5}: {m.params / GIB:.3f} + {m.grads / GIB:.3f} + {m.optimizer / GIB:.3f} + "
            f"{m.activations / GIB:.3f} (+ {m.workspace / GIB:.3f}) = {m.total / GIB:.3f}"
        )
        if len(stages) > 4 and s == 1:
            out.append("    ...")
    return "\n".join(out)
