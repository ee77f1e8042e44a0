"""Where the memory and the bytes go.

Left: per rank, parameters, gradients, optimizer state and peak activation caches, stacked (from
the trace; without one, rank 0's from the last metrics line). Right: bytes per step of each group and
operation, all ranks together (from the trace's communication spans). With a plan, its predictions
stand hatched beside each measured bar.
"""

from mpmp.report import figure
from mpmp.report.files import MEMORY_KINDS, Metrics, Plan, ReportError, Trace, series
from mpmp.report.steps import bytes_per_step, normal_key

MIB = 2**20
METRICS_MEMORY = {
    "params": "param_bytes",
    "grads": "grad_bytes",
    "optimizer": "optimizer_bytes",
    "activations": "activation_bytes",
}


def measured_memory(metrics: Metrics, trace: Trace | None) -> list:
    if trace is not None:
        return trace.memory
    return [{"rank": 0, **{k: series(metrics, key)[1][-1] for k, key in METRICS_MEMORY.items()}}]


def planned_bytes(plan: Plan, world: int) -> dict:
    """{'group:op': bytes per step, all ranks} from the plan's per-rank table."""
    if isinstance(plan.comm, list) and len(plan.comm) != world:
        raise ReportError(f"plan {plan.path} has comm_bytes_per_step for {len(plan.comm)} ranks, the run has {world}")
    out = {}
    for r in range(world):
        for key, nbytes in plan.comm_of(r).items():
            out[normal_key(key)] = out.get(normal_key(key), 0.0) + float(nbytes)
    return out


def _stack(ax, x: float, row: dict, width: float, hatch: str | None):
    bottom = 0.0
    for kind in MEMORY_KINDS:
        value = row[kind] / MIB if row[kind] == row[kind] else 0.0
        ax.bar(
            x,
            value,
            width,
            bottom=bottom,
            color=figure.MEMORY_COLORS[kind],
            hatch=hatch,
            edgecolor="black",
            linewidth=0.3,
        )
        bottom += value


def _draw_memory(ax, measured: list, plan: Plan | None):
    width = 0.38 if plan else 0.7
    for row in measured:
        _stack(ax, row["rank"] - (width / 2 if plan else 0), row, width, None)
    for row in plan.memory if plan else []:
        _stack(ax, row["rank"] + width / 2, row, width, "//")
    ranks = sorted({row["rank"] for row in measured} | {row["rank"] for row in (plan.memory if plan else [])})
    ax.set_xticks(ranks, [f"rank {r}" for r in ranks], fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title("memory per rank" + (" (left measured, right plan, hatched)" if plan else ""), fontsize=9)
    ax.grid(axis="y", linewidth=0.3, alpha=0.5)


def _draw_bytes(ax, measured: dict, predicted: dict | None):
    keys = sorted(set(measured) | set(predicted or {}))
    width = 0.38 if predicted is not None else 0.7
    for i, key in enumerate(keys):
        color = figure.GROUP_COLORS.get(key.split(":")[0], figure.OTHER_COLOR)
        if key in measured:
            ax.bar(i - (width / 2 if predicted is not None else 0), measured[key] / MIB, width, color=color)
        if predicted is not None and key in predicted:
            ax.bar(i + width / 2, predicted[key] / MIB, width, color=color, alpha=0.5, hatch="//", edgecolor="black")
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
    if any(v > 0 for v in measured.values()) or any(v > 0 for v in (predicted or {}).values()):
        ax.set_yscale("log")
    ax.set_ylabel("MiB per step, all ranks")
    ax.set_title(
        "bytes per group and operation" + (" (left measured, right plan, hatched)" if predicted else ""), fontsize=9
    )
    ax.grid(axis="y", linewidth=0.3, alpha=0.5)


def _total(row: dict) -> float:
    return sum(row[k] for k in MEMORY_KINDS if row[k] == row[k])  # NaN (a null) counts as nothing


def title(memory: list, moved: dict | None) -> str:
    text = "memory and bytes: no memory figures"
    if memory:
        top = max(memory, key=_total)
        text = f"memory and bytes: most memory on rank {top['rank']}, {_total(top) / MIB:.2f} MiB"
    if moved is not None:
        text += f"; {sum(moved.values()) / MIB:.2f} MiB communicated per step, all ranks"
    return text


def draw(metrics: Metrics, trace: Trace | None, plan: Plan | None = None):
    """(figure, title)."""
    fig = figure.new_figure(figure.MEMORY_HEIGHT, bottom_px=110)
    left, right = fig.subplots(1, 2, gridspec_kw={"wspace": 0.2})
    memory = measured_memory(metrics, trace)
    _draw_memory(left, memory, plan)
    moved = None
    if trace is None:
        right.text(0.5, 0.5, "bytes per operation come from a trace:\nrun with --trace", ha="center", va="center")
        right.set_axis_off()
    else:
        moved = {key: sum(per_rank) for key, per_rank in bytes_per_step(trace).items()}
        _draw_bytes(right, moved, planned_bytes(plan, trace.world) if plan else None)
    figure.legend(fig, [(k, figure.MEMORY_COLORS[k], 1.0) for k in MEMORY_KINDS])
    text = title(memory, moved)
    fig.suptitle(text, fontsize=10)
    return fig, text
