"""`mpirun -n N python -m mpmp.bench cp`: one long sequence on one rank, split by heads over N ranks
(tensor parallelism with sequence parallelism) and split along itself over N ranks (context
parallelism: ring attention).

Each case trains the same GPT-2 on the same batch (default: one sequence of S = 4096 tokens) and
reports, from rank 0 with the slowest rank's numbers: the median step time and tokens/s; the peak
activation bytes of a rank (the engine's cache meter) and, of those, the attention core's bytes of
one layer against their formula; the bytes a rank sends per step by group. For cp it also reports
the ring's overlap: a rank's time blocked per hop in training against the time a bare hop (post,
then wait at once) of the same K|V takes, 1 - blocked / bare. All ranks share this machine's cores:
each rank has the BLAS threads start-up gave it (cores / ranks), also the one-rank case, whose other
ranks wait meanwhile.

Attention core per layer and rank, float32, b sequences, H/tp heads of hd, sequence S:
    dense (cp 1)  4·b·(H/tp)·(3·S·hd + S²)                      q, k, v and the [S, S] probabilities
    ring (cp)     4·b·(H/tp)·(4·(S/cp)·hd + S/cp + (2cp+1)·(S/2cp)²)   q, K|V, out, log-sum-exp, kept blocks
"""

import argparse
import json
import statistics
import time

import numpy

from mpmp.comm.mpi import wait_sleeping
from mpmp.config import ModelConfig, ParallelConfig, TrainConfig


def attention_formula(*, b, heads, hd, s, cp) -> int:
    """Bytes of one layer's attention-core cache on one rank (the formulas above; heads already /tp)."""
    if cp == 1:
        return 4 * b * heads * (3 * s * hd + s * s)
    c = s // (2 * cp)
    return 4 * b * heads * (4 * (s // cp) * hd + s // cp + (2 * cp + 1) * c * c)


def _core_bytes(trainer) -> int:
    """Bytes of the first block's attention-core cache after one forward of the step's first
    micro-batch (collective under tp and cp: every rank runs it)."""
    from mpmp.pipeline.engine import nbytes

    chunk = trainer.model.chunks[0]
    mb = trainer.microbatches(0)[0]
    x, _ = chunk.modules[0].forward(None, mb)
    block = chunk.modules[1]
    _, (c1, (c_attn, core, c_proj), c3, c4) = block._forward(x)
    return nbytes(core)


def _bare_hop_seconds(trainer, reps=5) -> float:
    """The time of one ring hop of this layout's K|V, posted and waited on at once."""
    from mpmp.nn import ring

    cfg, par = trainer.cfg, trainer.cfg.parallel
    shape = (2, cfg.micro_batch, cfg.model.heads // par.tp, cfg.seq_len // par.cp, cfg.model.head_dim)
    kv = numpy.ones(shape, numpy.float32)
    times = []
    for _ in range(reps + 1):
        trainer.grid.cp_group.barrier()
        t = time.perf_counter()
        ring.pass_kv(kv, trainer.grid.cp_group).wait()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def _trainer(comm, model: ModelConfig, layout: dict, batch: int):
    from mpmp.comm.grid import LocalGrid, ProcessGrid
    from mpmp.data import TokenData, builtin_corpus
    from mpmp.model.gpt import random_source
    from mpmp.runtime import Trainer

    world = 1 if comm is None else comm.Get_size()
    tp, cp = layout.get("tp", 1), layout.get("cp", 1)
    par = ParallelConfig(tp=tp, cp=cp, dp=world // (tp * cp), sequence_parallel=layout.get("sp", False))
    cfg = TrainConfig(model=model, parallel=par, global_batch=batch, seq_len=model.seq_len)
    grid = LocalGrid() if comm is None else ProcessGrid(tp, 1, par.dp, comm=comm, cp=cp)
    data = TokenData(builtin_corpus(), model.seq_len, model.vocab)
    return Trainer(cfg, grid, data, random_source(model, 0))


def run_case(comm, model: ModelConfig, layout: dict, *, batch: int, steps: int, warmup: int) -> dict:
    """One layout's numbers on this rank (comm None: one process)."""
    from mpmp.comm import ledger

    trainer = _trainer(comm, model, layout, batch)
    for _ in range(warmup):
        trainer.train_step()
    led = ledger.install(ledger.Ledger(trainer.grid.rank, keep_events=True))
    times = [trainer.train_step()["step_s"] for _ in range(steps)]
    ledger.install(ledger.Ledger())
    sent = {}
    for e in led.events:
        if e.wire_bytes:  # sends and this rank's share of collectives; receives and spans count 0
            sent[e.group] = sent.get(e.group, 0) + e.wire_bytes / steps
    ring = [e for e in led.events if e.group == "cp"]
    hops = sum(1 for e in ring if e.kind == "send") / steps
    out = {
        "step_s": statistics.median(times),
        "activation_peak_bytes": trainer.engine.peak_bytes,
        "attention_core_bytes": _core_bytes(trainer),
        "sent_bytes_per_step": sent,
        "ring_hops_per_step": hops,
        "ring_blocked_s_per_step": sum(e.blocked for e in ring) / steps,
    }
    if hops:
        out["bare_hop_s"] = _bare_hop_seconds(trainer)
    par = trainer.cfg.parallel
    hd, heads = model.head_dim, model.heads // par.tp
    out["attention_formula_bytes"] = attention_formula(
        b=trainer.cfg.micro_batch, heads=heads, hd=hd, s=model.seq_len, cp=par.cp
    )
    return out


def _slowest(comm, row: dict) -> dict:
    """Rank 0's view: the step time and memory of the slowest / fullest rank."""
    rows = comm.allgather(row) if comm is not None else [row]
    out = dict(rows[0])
    for key in ("step_s", "activation_peak_bytes", "attention_core_bytes", "ring_blocked_s_per_step", "bare_hop_s"):
        if key in out:
            out[key] = max(r[key] for r in rows)
    return out


def cases(world: int, model: ModelConfig) -> list[tuple[str, dict]]:
    """One rank; tp over the world with SP (when the heads divide); cp over the world."""
    out = [("one rank", {"ranks": 1})]
    if world > 1 and model.heads % world == 0:
        out.append((f"tp {world} + SP", {"tp": world, "sp": True}))
    if world > 1:
        out.append((f"cp {world}", {"cp": world}))
    return out


def _print_row(name, r, tokens):
    lse = r["attention_core_bytes"] / 2**20
    print(
        f"{name:<12} {r['step_s'] * 1e3:>9.0f} {tokens / r['step_s']:>9,.0f} {r['activation_peak_bytes'] / 2**20:>10.1f} "
        f"{lse:>9.1f} {r['attention_formula_bytes'] / 2**20:>9.1f} "
        + "  ".join(f"{g} {b / 2**20:.1f}" for g, b in sorted(r["sent_bytes_per_step"].items())),
        flush=True,
    )


def main(argv=None):
    from mpmp.comm.mpi import MPI

    p = argparse.ArgumentParser(prog="python -m mpmp.bench cp", description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results here (rank 0)")
    args = p.parse_args(argv)
    world = MPI().COMM_WORLD
    size, rank = world.Get_size(), world.Get_rank()
    model = ModelConfig(vocab=256, seq_len=args.seq_len, d_model=args.d_model, layers=args.layers, heads=args.heads)
    tokens = args.batch * args.seq_len
    if rank == 0:
        from mpmp import backend

        print(
            f"GPT-2 D={args.d_model} L={args.layers} H={args.heads}, {args.batch} x {args.seq_len} tokens per step; "
            f"{size} ranks, BLAS threads per rank: {backend.blas_threads()}"
        )
        print(
            f"{'layout':<12} {'step ms':>9} {'tok/s':>9} {'act MiB':>10} {'attn MiB':>9} {'formula':>9} sent MiB/step"
        )
    results = {}
    for name, layout in cases(size, model):
        if layout.get("ranks") == 1:
            row = (
                run_case(None, model, layout, batch=args.batch, steps=args.steps, warmup=args.warmup)
                if rank == 0
                else None
            )
            wait_sleeping(world.Ibarrier(), 0.05)  # the waiting ranks leave the cores to the one that works
            row = world.bcast(row, root=0)
        else:
            row = _slowest(
                world, run_case(world, model, layout, batch=args.batch, steps=args.steps, warmup=args.warmup)
            )
        results[name] = row
        if rank == 0:
            _print_row(name, row, tokens)
    if rank == 0:
        _report_ring(results, size)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": vars(args), "world": size, "results": results}, f, indent=1)
    return 0


def _report_ring(results: dict, world: int):
    ring = results.get(f"cp {world}")
    if not ring or not ring.get("ring_hops_per_step"):
        return
    per_hop = ring["ring_blocked_s_per_step"] / ring["ring_hops_per_step"]
    bare = ring["bare_hop_s"]
    print(
        f"ring: {ring['ring_hops_per_step']:.0f} hops per step and rank; blocked {per_hop * 1e3:.2f} ms per hop in "
        f"training against {bare * 1e3:.2f} ms for a bare hop: overlap {max(0.0, 1 - per_hop / bare):.0%}"
    )
    one = results["one rank"]
    print(
        f"cp {world} against one rank: {one['step_s'] / ring['step_s']:.2f}x tokens/s, attention core "
        f"{ring['attention_core_bytes'] / one['attention_core_bytes']:.3f}x, peak activations "
        f"{ring['activation_peak_bytes'] / one['activation_peak_bytes']:.3f}x per rank"
    )


if __name__ == "__main__":
    raise SystemExit(main())
