"""What a training run prints: the start-up banner, progress lines, the end-of-run summary (loss,
tokens/s, memory per rank, communication by kind and group over all ranks) and the Chrome trace.
Printing happens on the rank that is_main; gathering from all ranks is collective. Every line is
written whole, text and newline in one write (`line`), so the launcher never merges two ranks' lines."""

import sys

from mpmp import backend
from mpmp.comm import ledger

MEMORY_KEYS = ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes")


def line(text: str, stream=None):
    """Write text and its newline in one write, then flush: under mpirun each rank's output is a pipe
    the launcher reads in chunks, and print()'s separate write of the newline lets another rank's
    line slip in between."""
    stream = sys.stdout if stream is None else stream
    stream.write(text + "\n")
    stream.flush()


def banner(cfg, grid, *, split, memory: dict, data: str) -> str:
    """The start-up lines: layout, model and data, schedule and partition, backend, memory."""
    from mpmp.comm import mpi
    from mpmp.pipeline.partition import describe

    mc, par = cfg.model, cfg.parallel
    extras = [
        f"sequence parallel {'on' if par.sequence_parallel else 'off'}",
        f"ZeRO-{par.zero}",
        f"recompute {par.recompute}",
        f"dtype {cfg.dtype}",
    ]
    where = "CUDA-aware MPI" if backend.name() == "cupy" and mpi.cuda_aware() else "host buffers"
    return "\n".join(
        [
            grid.describe(),
            f"model: GPT-2 V={mc.vocab} S={mc.seq_len} D={mc.d_model} L={mc.layers} H={mc.heads}, "
            f"{mc.num_params():,} parameters; data: {data}",
            f"schedule: {par.schedule}, {par.micro_batches} micro-batches of {cfg.micro_batch}"
            + (f", {par.virtual_stages} virtual stages" if par.virtual_stages > 1 else "")
            + f"; partition ({par.partition}):",
            describe(split, par.pp, par.virtual_stages, mc),
            f"backend: {backend.name()} ({where}), BLAS threads per rank: {backend.blas_threads()}; "
            + ", ".join(extras),
            "memory (rank 0): "
            + ", ".join(f"{k.replace('_bytes', '')} {memory[k] / 2**20:.2f} MiB" for k in MEMORY_KEYS[:3])
            + " (activations: after the first step, in the summary)",
        ]
    )


def progress(m, total) -> str:
    width = 24
    done = int(width * m["step"] / total)
    bar = "#" * done + "." * (width - done)
    return (
        f"[{bar}] step {m['step']:>5}/{total}  loss {m['loss']:.4f}  grad norm {m['grad_norm']:.3f}  "
        f"lr {m['lr']:.2e}  {m['step_s'] * 1e3:.0f} ms  {m['tokens_per_s']:,.0f} tok/s"
    )


def summary(grid, memory: dict, history, wall, is_main) -> str | None:
    """Collective: gathers every rank's communication totals and memory; the text on is_main."""
    rows = grid.world.all_gather_json(ledger.get().summary_rows())
    mems = grid.world.all_gather_json([memory[k] for k in MEMORY_KEYS])
    if not is_main or not history:
        return None
    steady = history[1:] or history
    tok_s = sum(h["tokens_per_s"] for h in steady) / len(steady)
    first, last = history[0]["loss"], history[-1]["loss"]
    lines = [
        f"summary: loss {first:.4f} -> {last:.4f} over {len(history)} steps in {wall:.1f} s; {tok_s:,.0f} tokens/s",
        "memory per rank (MiB: parameters / gradients / optimizer state / peak activation caches):",
    ]
    lines += [f"  rank {r}: " + " / ".join(f"{b / 2**20:.2f}" for b in m) for r, m in enumerate(mems)]
    table = ledger.merge_rows(rows)
    if table:
        lines.append(ledger.format_summary(table, "communication, all ranks (seconds blocked)"))
    return "\n".join(lines)


def write_trace(grid, path, is_main, about: dict) -> str | None:
    """Collective: every rank's events (and memory) into one Chrome trace written by is_main; `about`
    describes the run (trace otherData.mpmp, which python -m mpmp.report reads)."""
    per_rank = grid.world.all_gather_json(ledger.get().chrome_events())
    memory = grid.world.all_gather_json(about.pop("memory", None))
    if not is_main:
        return None
    keys = ("params", "grads", "optimizer", "activations")
    about["memory_per_rank"] = [
        {"rank": r} | {k: m[key] for k, key in zip(keys, MEMORY_KEYS)} for r, m in enumerate(memory) if m
    ]
    with open(path, "w") as f:
        f.write(ledger.chrome_trace(per_rank, about))
    return f"trace: {path} ({sum(len(e) for e in per_rank)} events; open in https://ui.perfetto.dev)"
