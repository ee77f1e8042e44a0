"""python -m mpmp.bench plan: the planner's step time beside the measured one, for 1- and 2-rank layouts.

For each case the planner predicts the step from a cpu profile, and the case runs for real
(`mpirun -n N python -m mpmp.bench plan --worker ...`, one after the other so they do not share the
cores): the median step after warm-up. By default the compute rates are measured again right before
each measurement (`python -m mpmp.plan calibrate`'s probes; the MPI link once), since a shared machine's
rates drift with what else runs on it; --hardware uses a saved profile instead. Each case is repeated
(--repeats) and the medians compared. Goal: predicted / measured within 0.75 .. 1.25.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys

from mpmp.config import ModelConfig, ParallelConfig, TrainConfig

# (name, ranks, (V, D, L, H, S, B), parallel options)
CASES = [
    ("1 rank, D=256", 1, (256, 256, 4, 4, 128, 8), {}),
    ("1 rank, D=768", 1, (256, 768, 4, 12, 256, 4), {}),
    ("1 rank, D=256, 4 micro-batches, bf16", 1, (256, 256, 4, 4, 128, 8), {"micro_batches": 4, "dtype": "bf16"}),
    ("tp=2", 2, (256, 256, 4, 4, 128, 8), {"tp": 2}),
    ("pp=2, 1f1b, 4 micro-batches", 2, (256, 256, 4, 4, 128, 8), {"pp": 2, "micro_batches": 4}),
    ("dp=2", 2, (256, 256, 4, 4, 128, 8), {"dp": 2}),
]
GOAL = (0.75, 1.25)


def config(shape, opts) -> TrainConfig:
    v, d, layers, heads, s, b = shape
    model = ModelConfig(vocab=v, seq_len=s, d_model=d, layers=layers, heads=heads)
    opts = dict(opts)
    dtype = opts.pop("dtype", "fp32")
    return TrainConfig(model=model, parallel=ParallelConfig(**opts), global_batch=b, seq_len=s, dtype=dtype)


def measure(cfg: TrainConfig, steps: int, warmup: int) -> float | None:
    """Median step seconds of this layout on the ranks of this (MPI) job; None on ranks but 0."""
    from mpmp.data import TokenData, builtin_corpus
    from mpmp.model.gpt import random_source
    from mpmp.runtime import Trainer

    par = cfg.parallel
    if par.tp * par.pp * par.dp > 1:
        from mpmp.comm.grid import ProcessGrid

        grid = ProcessGrid(par.tp, par.pp, par.dp, wire=cfg.precision)
    else:
        from mpmp.comm.grid import LocalGrid

        grid = LocalGrid()
    trainer = Trainer(cfg, grid, TokenData(builtin_corpus(), cfg.seq_len, cfg.model.vocab), random_source(cfg.model, 0))
    for _ in range(warmup):
        trainer.train_step()
    times = [trainer.train_step()["step_s"] for _ in range(steps)]
    return statistics.median(times) if grid.rank == 0 else None


def run_case(ranks: int, shape, opts, steps: int, warmup: int) -> float:
    cmd = [sys.executable, "-m", "mpmp.bench", "plan", "--worker", json.dumps([shape, opts, steps, warmup])]
    if ranks > 1:
        cmd = [shutil.which("mpirun") or "mpirun", "-n", str(ranks)] + cmd
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["step_s"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpmp.bench plan", description=__doc__.split("\n")[0])
    p.add_argument("--hardware", default=None, help="a saved profile (name or .json) instead of measuring one now")
    p.add_argument("--steps", type=int, default=7, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="calibrate-predict-measure rounds per case")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        shape, opts, steps, warmup = json.loads(args.worker)
        step = measure(config(shape, opts), steps, warmup)
        if step is not None:
            print(json.dumps({"step_s": step}), flush=True)
        return 0

    from mpmp.plan import calibrate, hardware, search

    link = None if args.hardware else calibrate.run_pingpong()
    print(f"{'case':<40}{'ranks':>6}{'predicted s':>13}{'measured s':>12}{'ratio':>8}  goal {GOAL[0]}..{GOAL[1]}")
    rows = []
    for name, ranks, shape, opts in CASES:
        cfg = config(shape, opts)
        predicted, measured = [], []
        for _ in range(args.repeats):
            hw = hardware.load(args.hardware) if args.hardware else calibrate.measure(link)
            predicted.append(search.evaluate(cfg, hw).step.step_s)
            measured.append(run_case(ranks, shape, opts, args.steps, args.warmup))
        pred, meas = statistics.median(predicted), statistics.median(measured)
        ok = "ok" if GOAL[0] <= pred / meas <= GOAL[1] else "MISSED"
        print(f"{name:<40}{ranks:>6}{pred:>13.4f}{meas:>12.4f}{pred / meas:>8.2f}  {ok}", flush=True)
        rows.append(
            {"case": name, "ranks": ranks, "predicted_s": predicted, "measured_s": measured, "ratio": pred / meas}
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hardware": args.hardware or "calibrated per round", "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
