"""What a training run prints: the start-up banner, progress lines, the end-of-run summary (loss,
tokens/s, memory per rank, communication by kind and group over all ranks) and the Chrome trace.
Printing happens on the rank that is_main; gathering from all ranks is collective."""

from mpmp import backend
from mpmp.comm import ledger

MEMORY_KEYS = ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes")


def banner(cfg, grid, trainer, data_name) -> str:
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
    mem = trainer.memory()
    return "\n".join(
        [
            grid.describe(),
            f"model: GPT-2 V={mc.vocab} S={mc.seq_len} D={mc.d_model} L={mc.layers} H={mc.heads}, "
            f"{mc.num_params():,} parameters; data: {data_name} ({trainer.data.num_sequences} sequences of {cfg.seq_len})",
            f"schedule: {par.schedule}, {par.micro_batches} micro-batches of {trainer.micro_batch}"
            + (f", {par.virtual_stages} virtual stages" if par.virtual_stages > 1 else "")
            + f"; partition ({par.partition}):",
            describe(trainer.split, par.pp, par.virtual_stages, mc),
            f"backend: {backend.name()} ({where}), BLAS threads per rank: {backend.blas_threads()}; "
            + ", ".join(extras),
            "memory (rank 0): "
            + ", ".join(f"{k.replace('_bytes', '')} {mem[k] / 2**20:.2f} MiB" for k in MEMORY_KEYS[:3])
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


def summary(grid, trainer, history, wall, is_main) -> str | None:
    """Collective: gathers every rank's communication totals and memory; the text on is_main."""
    rows = grid.world.all_gather_json(ledger.get().summary_rows())
    mem = trainer.memory()
    mems = grid.world.all_gather_json([mem[k] for k in MEMORY_KEYS])
    if not is_main or not history:
        return None
    totals = {}
    for rank_rows in rows:
        for kind, group, count, nbytes, secs in rank_rows:
            t = totals.setdefault((kind, group), [0, 0, 0.0])
            t[0] += count
            t[1] += nbytes
            t[2] += secs
    steady = history[1:] or history
    tok_s = sum(h["tokens_per_s"] for h in steady) / len(steady)
    first, last = history[0]["loss"], history[-1]["loss"]
    lines = [
        f"summary: loss {first:.4f} -> {last:.4f} over {len(history)} steps in {wall:.1f} s; {tok_s:,.0f} tokens/s",
        "memory per rank (MiB: parameters / gradients / optimizer state / peak activation caches):",
    ]
    lines += [f"  rank {r}: " + " / ".join(f"{b / 2**20:.2f}" for b in m) for r, m in enumerate(mems)]
    if totals:
        table = sorted(((k, g, c, b, s) for (k, g), (c, b, s) in totals.items()), key=lambda r: (r[1], r[0]))
        lines.append(ledger.format_summary(table, "communication, all ranks (seconds blocked)"))
    return "\n".join(lines)


def write_trace(grid, path, is_main) -> str | None:
    """Collective: every rank's events into one Chrome trace written by is_main."""
    per_rank = grid.world.all_gather_json(ledger.get().chrome_events())
    if not is_main:
        return None
    with open(path, "w") as f:
        f.write(ledger.chrome_trace(per_rank))
    return f"trace: {path} ({sum(len(e) for e in per_rank)} events; open in https://ui.perfetto.dev)"
