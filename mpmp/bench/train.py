"""python -m mpmp.bench train: single-process training throughput against this machine's GEMM.

For each configuration: the median step time of a few steps after warm-up, tokens/s, the model
FLOP/s (6N + 12·L·D·S FLOPs per token, N without position embeddings, as nanoGPT and PaLM count), and
that as a fraction of a float32 GEMM (2048³, `a @ b`) measured in the same run: the share of the
machine's matrix speed that the whole training step achieves.
"""

import argparse
import json
import statistics
import time

import numpy

from mpmp.config import ModelConfig, ParallelConfig, TrainConfig

# (V, D, L, H, S, B) and the goal for each
DEFAULTS = [((256, 256, 4, 4, 128, 8), 0.5), ((256, 768, 4, 12, 256, 4), 0.65)]


def gemm_flops(n=2048, reps=5) -> float:
    """float32 matrix product FLOP/s: the median of reps products of two n x n matrices."""
    rng = numpy.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=numpy.float32)
    b = rng.standard_normal((n, n), dtype=numpy.float32)
    out = numpy.empty((n, n), numpy.float32)
    numpy.matmul(a, b, out=out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        numpy.matmul(a, b, out=out)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def train_rate(shape, *, steps=5, warmup=2) -> dict:
    """Median step time of a one-process run of shape (V, D, L, H, S, B), and what it implies."""
    v, d, layers, heads, s, b = shape
    from mpmp.comm.grid import LocalGrid
    from mpmp.data import TokenData, builtin_corpus
    from mpmp.model.gpt import random_source
    from mpmp.runtime import Trainer

    model = ModelConfig(vocab=v, seq_len=s, d_model=d, layers=layers, heads=heads)
    cfg = TrainConfig(model=model, parallel=ParallelConfig(), global_batch=b, seq_len=s, steps=steps + warmup)
    trainer = Trainer(cfg, LocalGrid(), TokenData(builtin_corpus(), s, v), random_source(model, 0))
    for _ in range(warmup):
        trainer.train_step()
    times = [trainer.train_step()["step_s"] for _ in range(steps)]
    step_s = statistics.median(times)
    tokens = b * s
    return {
        "config": {"V": v, "D": d, "L": layers, "H": heads, "S": s, "B": b},
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "model_flops": model.flops_per_token(s) * tokens / step_s,
    }


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpmp.bench train", description=__doc__.split("\n")[0])
    p.add_argument(
        "--config",
        action="append",
        default=None,
        metavar="V,D,L,H,S,B",
        help="a model and batch to measure (repeatable); default: the two tracked configurations",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    configs = [(tuple(int(x) for x in c.split(",")), None) for c in args.config] if args.config else DEFAULTS
    peak = gemm_flops()
    print(f"float32 GEMM (2048^3): {peak / 1e9:.1f} GFLOP/s")
    print(
        f"{'V':>5} {'D':>5} {'L':>3} {'H':>3} {'S':>5} {'B':>3} {'step ms':>9} {'tokens/s':>10} {'GFLOP/s':>9} {'of GEMM':>8} {'goal':>6}"
    )
    rows = []
    for shape, goal in configs:
        r = train_rate(shape, steps=args.steps, warmup=args.warmup)
        r["fraction_of_gemm"] = r["model_flops"] / peak
        r["goal"] = goal
        rows.append(r)
        c = r["config"]
        print(
            f"{c['V']:>5} {c['D']:>5} {c['L']:>3} {c['H']:>3} {c['S']:>5} {c['B']:>3} {r['step_s'] * 1e3:>9.1f} "
            f"{r['tokens_per_s']:>10,.0f} {r['model_flops'] / 1e9:>9.1f} {r['fraction_of_gemm']:>8.2f} "
            f"{'' if goal is None else f'>= {goal:.2f}':>6}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gemm_flops": peak, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
