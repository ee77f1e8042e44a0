"""`mpirun -n P python -m mpmp.bench generate`: generation speed per layout, and what the cache buys.

For each layout of the P ranks (tp x pp, dp = P / (tp·pp); every one that fits, or --layout TP,PP),
on a GPT-2 of random weights, greedy decoding, times taken on the first stage of replica 0 (where the
tokens arrive), each measurement started by a barrier:

- prefill: one prompt of --context tokens, time to its first token -> prompt tokens/s;
- decode: one prompt of --prompt-len tokens, --new-tokens tokens -> ms per token, p50 and p99 of the
  time between consecutive tokens;
- throughput: generated tokens/s of 1 prompt and of 8 prompts of --prompt-len tokens (8 prompts: the
  slowest replica's time), with pp micro-batches (the default) and, when pp > 1, with one micro-batch
  (batched but not pipelined: what the overlap of stages adds);
- cache vs recomputation: ms per decode step at a --context-token context with the KV cache and with
  the whole sequence recomputed at every step (--no-kv-cache).

Goals: decode with the cache at least 10x faster per token than recomputation at a 512-token
context; with pp 2 on 2 ranks, 8 prompts give at least 1.6x the tokens/s of 1 prompt.
"""

import argparse
import json
import statistics
import time

import numpy

from mpmp.config import ModelConfig

GOAL_CACHE = 10.0  # recomputation / cache, per decode step at --context tokens
GOAL_PIPELINE = 1.6  # pp 2: tokens/s of 8 prompts / tokens/s of 1 prompt


def layouts(world: int, cfg: ModelConfig) -> list[tuple[int, int]]:
    """Every (tp, pp) whose product divides the world and that the model can be split into."""
    out = []
    for tp in range(1, world + 1):
        for pp in range(1, world // tp + 1):
            fits = world % (tp * pp) == 0 and cfg.heads % tp == 0 and cfg.units >= pp
            if fits:
                out.append((tp, pp))
    return out


def _timed(gen, grid, prompts, new: int):
    """Run generate on each replica's share after a barrier; (rank 0's token times relative to its
    start, on every rank; the slowest replica's seconds to its last token)."""
    from mpmp.comm.group import block_sizes

    share = block_sizes(len(prompts), grid.dp)
    first = sum(share[: grid.coord.dp])
    grid.world.barrier()
    gen.generate(prompts[first : first + share[grid.coord.dp]], first_index=first, max_new_tokens=new)
    times = [t - gen.started for t in gen.token_times]  # first stages only: the tokens arrive there
    mine = numpy.array([times[-1] if times else 0.0])
    return grid.world.all_gather_json(times)[0], float(grid.world.all_gather(mine).max())


def measure(grid, cfg: ModelConfig, args) -> dict:
    """The figures of one layout (meaningful on rank 0)."""
    from mpmp.inference.generator import Generator, inference_model
    from mpmp.model.gpt import random_source

    model = inference_model(cfg, random_source(cfg, 0), grid)
    rng = numpy.random.default_rng(0)

    def prompts(n, length):
        return [rng.integers(0, cfg.vocab, length).tolist() for _ in range(n)]

    gen = Generator(model, grid)
    _timed(gen, grid, prompts(1, args.prompt_len), 2)  # warm-up
    long, short = prompts(1, args.context), prompts(1, args.prompt_len)
    prefill = min(_timed(gen, grid, long, 1)[0][0] for _ in range(args.repeat))
    times, one_s = _timed(gen, grid, short, args.new_tokens)
    steps = numpy.diff(times) * 1e3
    eight = prompts(8, args.prompt_len)
    row = {"tp": grid.tp, "pp": grid.pp, "dp": grid.dp, "prefill_tokens_per_s": args.context / prefill}
    row |= {"decode_ms_p50": float(numpy.percentile(steps, 50)), "decode_ms_p99": float(numpy.percentile(steps, 99))}
    row["tokens_per_s_1"] = args.new_tokens / one_s
    row["tokens_per_s_8"] = 8 * args.new_tokens / _timed(gen, grid, eight, args.new_tokens)[1]
    if grid.pp > 1:
        one_mb = Generator(model, grid, micro_batches=1)
        row["tokens_per_s_8_one_micro_batch"] = 8 * args.new_tokens / _timed(one_mb, grid, eight, args.new_tokens)[1]
    row |= _cache_vs_recompute(model, grid, long[0], args.recompute_steps)
    return row


def _cache_vs_recompute(model, grid, prompt, steps: int) -> dict:
    """Median ms per decode step after a len(prompt)-token prefill, with and without the KV cache."""
    from mpmp.inference.generator import Generator

    out = {}
    for name, cache in (("cache", True), ("recompute", False)):
        times, _ = _timed(Generator(model, grid, use_cache=cache), grid, [prompt], steps + 1)
        out[f"{name}_ms"] = statistics.median(numpy.diff(times)) * 1e3
    out["cache_speedup"] = out["recompute_ms"] / out["cache_ms"]
    return out


def format_table(rows, cfg: ModelConfig, args) -> str:
    lines = [
        f"GPT-2 V {cfg.vocab}, D {cfg.d_model}, L {cfg.layers}, H {cfg.heads}; greedy; prompts of {args.prompt_len} "
        f"tokens, {args.new_tokens} new; prefill and cache-vs-recompute at {args.context} tokens",
        f"{'tp':>3}{'pp':>3}{'dp':>3}{'prefill tok/s':>15}{'ms/tok p50':>12}{'p99':>8}{'tok/s 1':>10}"
        f"{'tok/s 8':>10}{'8 (M=1)':>10}{'cache ms':>10}{'recomp ms':>11}{'x':>7}",
    ]
    for r in rows:
        m1 = r.get("tokens_per_s_8_one_micro_batch")
        lines.append(
            f"{r['tp']:>3}{r['pp']:>3}{r['dp']:>3}{r['prefill_tokens_per_s']:>15.0f}{r['decode_ms_p50']:>12.2f}"
            f"{r['decode_ms_p99']:>8.2f}{r['tokens_per_s_1']:>10.1f}{r['tokens_per_s_8']:>10.1f}"
            f"{'-' if m1 is None else f'{m1:.1f}':>10}{r['cache_ms']:>10.2f}{r['recompute_ms']:>11.1f}"
            f"{r['cache_speedup']:>7.1f}"
        )
    lines.append(f"goal: recompute / cache >= {GOAL_CACHE:g} at {args.context} tokens")
    for r in rows:
        if r["pp"] == 2 and r["tp"] == 1 and r["dp"] == 1:
            ratio = r["tokens_per_s_8"] / r["tokens_per_s_1"]
            lines.append(f"goal: pp 2, 8 prompts / 1 prompt tokens/s = {ratio:.2f} (>= {GOAL_PIPELINE:g})")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mpmp.bench generate", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="8192,256,4,4,1024", metavar="V,D,L,H,S", help="the model")
    p.add_argument("--layout", action="append", default=None, metavar="TP,PP", help="a layout (repeatable)")
    p.add_argument("--context", type=int, default=512, help="prefill and cache-vs-recompute context")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens of the decode measurements")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--recompute-steps", type=int, default=8, help="decode steps timed at --context tokens")
    p.add_argument("--repeat", type=int, default=2, help="prefill measurements (the fastest counts)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None, comm=None) -> int:
    from mpmp.comm import ledger
    from mpmp.comm.grid import ProcessGrid
    from mpmp.comm.mpi import MPI

    args = parse_args(argv)
    v, d, layers, heads, s = (int(x) for x in args.config.split(","))
    cfg = ModelConfig(vocab=v, seq_len=s, d_model=d, layers=layers, heads=heads)
    comm = comm if comm is not None else MPI().COMM_WORLD
    ledger.install(ledger.Ledger(comm.Get_rank()))
    chosen = [tuple(int(x) for x in lay.split(",")) for lay in args.layout] if args.layout else None
    rows = []
    for tp, pp in chosen or layouts(comm.Get_size(), cfg):
        t0 = time.perf_counter()
        rows.append(measure(ProcessGrid(tp, pp, comm=comm), cfg, args))
        if comm.Get_rank() == 0:
            print(f"  measured tp {tp} pp {pp} in {time.perf_counter() - t0:.0f} s", flush=True)
    if comm.Get_rank() == 0:
        print(format_table(rows, cfg, args), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": vars(args), "rows": rows}, f, indent=1)
    return 0
