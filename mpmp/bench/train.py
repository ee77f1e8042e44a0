"""python -m mpmp.bench train: training throughput against this machine's matrix speed.

For each configuration: the median step time of a few steps after warm-up, tokens/s, the model
FLOP/s (6N + 12·L·D·S FLOPs per token, N without position embeddings, as nanoGPT and PaLM count) and
that as a fraction of a GEMM measured in the same run: a 2048³ float32 `a @ b` on NumPy, an 8192³
bf16 cuBLAS product on CuPy (mpmp.nn.cuda.gemm). On a GPU it also prints the MFU, the fraction of the
card's dense bf16 tensor-core peak (datasheet, by device name). The goal at the GPT-2 124M shape
(V 50304, D 768, L 12, H 12, S 1024) in bf16 is an MFU of at least 40%; below 25% something
structural is wrong.

With --against torch (one process) the same step also runs in PyTorch eager (bench/torch_gpt.py: the
same shapes, weights, batches, AdamW and clipping), interleaved with mpmp's step by step, and the
benchmark prints torch step / mpmp step (goal at the two tracked shapes: at least 1.1) and the peak
resident memory of each framework's step, each measured in a process of its own.

One process on NumPy also times the step's matrix products alone (step_products: every linear's three
products, attention's six per head, the output head's three), back to back on the same BLAS; with
--against torch they run in turn with the two steps. No step on this BLAS can take less, so torch
step / products alone is the highest torch/mpmp ratio any NumPy implementation could reach.

Under mpirun with N ranks the layout is pure data parallelism (dp = N, each rank the configured
batch B), and each configuration is also timed on one rank alone with the same B: the difference is
the data-parallel all-reduce time that backward did not hide (goal: at most 10% of the step).
"""

import argparse
import json
import statistics
import sys

import numpy

from mpmp import backend
from mpmp.comm import factory
from mpmp.config import DTYPES, ModelConfig, ParallelConfig, TrainConfig
from mpmp.errors import ConfigError
from mpmp.plan.calibrate import median_seconds

# (V, D, L, H, S, B) and the goal (fraction of the GEMM) for each, on NumPy
DEFAULTS = [((256, 256, 4, 4, 128, 8), 0.5), ((256, 768, 4, 12, 256, 4), 0.65)]
GPT2_124M = (50304, 768, 12, 12, 1024)
MFU_GOAL, MFU_FLOOR, DP_EXPOSED_GOAL = 0.40, 0.25, 0.10
TORCH_RATIO_GOAL = 1.1  # torch step / mpmp step, one process on the CPU
# dense bf16 tensor-core peak, TFLOP/s (datasheets, no sparsity), by a substring of the device name;
# the longer names come first where they overlap
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1}


def card_peak(name: str):
    """The dense bf16 peak FLOP/s of a device by name, or None when it is not in the table."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value * 1e12
    return None


def gemm_flops(n=2048, reps=5) -> float:
    """float32 matrix product FLOP/s: the median of reps products of two n x n matrices."""
    rng = numpy.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=numpy.float32)
    b = rng.standard_normal((n, n), dtype=numpy.float32)
    out = numpy.empty((n, n), numpy.float32)
    return 2 * n**3 / median_seconds(lambda: numpy.matmul(a, b, out=out), reps)


def device_gemm_flops(n=8192, reps=10) -> float:
    """bf16 cuBLAS product FLOP/s (fp32 accumulation) through mpmp.nn.cuda.gemm, timed with events."""
    import cupy

    from mpmp.nn.cuda.elementwise import cast
    from mpmp.nn.cuda.gemm import matmul

    a = cast(cupy.random.standard_normal((n, n), dtype=cupy.float32), numpy.uint16)
    out = cupy.empty((n, n), dtype=cupy.uint16)
    for _ in range(3):
        matmul(a, a, out=out)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(reps):
        matmul(a, a, out=out)
    end.record()
    end.synchronize()
    return 2 * n**3 * reps / (cupy.cuda.get_elapsed_time(start, end) / 1e3)


def configs(shape, dtype, steps, dp=1):
    """The model and training configurations of shape (V, D, L, H, S, B), B sequences per replica."""
    v, d, layers, heads, s, b = shape
    model = ModelConfig(vocab=v, seq_len=s, d_model=d, layers=layers, heads=heads)
    par = ParallelConfig(dp=dp)
    return model, TrainConfig(model=model, parallel=par, global_batch=b * dp, seq_len=s, steps=steps, dtype=dtype)


def token_data(shape):
    from mpmp.data import TokenData, builtin_corpus

    return TokenData(builtin_corpus(), shape[4], shape[0])


def make_trainer(shape, dtype, steps, grid=None):
    """A trainer of shape (V, D, L, H, S, B) on grid (one process when None; B per replica)."""
    from mpmp.comm.grid import LocalGrid
    from mpmp.model.gpt import random_source
    from mpmp.runtime import Trainer

    model, cfg = configs(shape, dtype, steps, 1 if grid is None else grid.dp)
    grid = grid or LocalGrid(wire=cfg.precision)
    return Trainer(cfg, grid, token_data(shape), random_source(model, 0)), model


def train_rate(shape, *, steps=5, warmup=2, dtype="fp32", grid=None) -> dict:
    """Median step time of shape (V, D, L, H, S, B) (B sequences per replica), and what it implies."""
    trainer, model = make_trainer(shape, dtype, steps + warmup, grid)
    for _ in range(warmup):
        trainer.train_step()
    step_s = statistics.median(trainer.train_step()["step_s"] for _ in range(steps))
    return rate(shape, dtype, step_s, model, trainer)


def rate(shape, dtype, step_s, model, trainer) -> dict:
    tokens = shape[5] * shape[4]  # per rank
    return {
        "config": dict(zip("VDLHSB", shape)),
        "dtype": dtype,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "model_flops": model.flops_per_token(shape[4]) * tokens / step_s,
        "memory": trainer.memory(),
    }


def step_products(shape) -> dict:
    """The matrix products of one training step of shape (V, D, L, H, S, B), {(batch, m, k, n): how
    many}: each linear's forward, input-gradient and weight-gradient products, attention's two
    forward and four backward products per head, and those of the tied output head. Their FLOPs are
    the step's 6N + 12·L·D·S per token but for N's biases and LayerNorm parameters."""
    v, d, layers, heads, s, b = shape
    t, bh, hd = b * s, b * heads, d // heads
    count = {}

    def add(key, n=1):
        count[key] = count.get(key, 0) + n

    for k, n in ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)):  # q|k|v, attention out, MLP up, MLP down
        for key in ((1, t, k, n), (1, t, n, k), (1, k, t, n)):  # y = x W, dx = dy W^T, dW = x^T dy
            add(key, layers)
    add((bh, s, hd, s), 2 * layers)  # scores q k^T; backward dp = dout v^T
    add((bh, s, s, hd), 4 * layers)  # p v; backward dv = p^T dout, dq = ds k, dk = ds^T q
    for key in ((1, t, d, v), (1, t, v, d), (1, v, t, d)):  # logits = x E^T, dx, dE
        add(key)
    return count


def products_runner(shape):
    """A call that runs the step's matrix products (step_products) as often as the step does, on
    float32 arrays made here once, with this process's BLAS: the floor of the step on this BLAS."""
    rng = numpy.random.default_rng(0)
    work = []
    for (batch, m, k, n), times in step_products(shape).items():
        lead = (batch,) if batch > 1 else ()
        a = rng.standard_normal(lead + (m, k), dtype=numpy.float32)
        b = rng.standard_normal(lead + (k, n), dtype=numpy.float32)
        work.append((a, b, numpy.empty(lead + (m, n), numpy.float32), times))

    def run():
        for a, b, out, times in work:
            for _ in range(times):
                numpy.matmul(a, b, out=out)

    return run


def products_seconds(shape, reps=3) -> float:
    """The median seconds of reps runs of products_runner(shape), after one untimed run."""
    return median_seconds(products_runner(shape), reps)


def _world_size() -> int:
    from mpmp._setup import mpi_launched

    if not mpi_launched():
        return 1
    from mpmp.comm.mpi import MPI

    return MPI().COMM_WORLD.Get_size()


def _dp_grid(transport, world):
    """dp = world size, or None when this is one process."""
    from mpmp.comm.grid import ProcessGrid

    return ProcessGrid(1, 1, world, transport=transport) if world > 1 else None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m mpmp.bench train", description=__doc__.split("\n")[0])
    p.add_argument(
        "--config",
        action="append",
        default=None,
        metavar="V,D,L,H,S,B",
        help="a model and batch to measure (repeatable); default: the two tracked configurations",
    )
    p.add_argument("--backend", default="numpy", help="numpy or cupy")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (on CuPy held in 16 bits)")
    p.add_argument("--comm", default="mpi", help="under mpirun: mpi or nccl between the data-parallel ranks")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--against",
        choices=["torch"],
        default=None,
        help="one process: also run the same step in PyTorch eager, interleaved, and print torch/mpmp",
    )
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mpmp._setup import local_rank

    try:
        backend.use(args.backend, local_rank())
        if args.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be {', '.join(DTYPES)}, not {args.dtype!r}")
        world = _world_size()
        transport, _ = factory.choose_here(args.comm, world)  # as the trainer chooses --comm
    except ConfigError as exc:
        print(f"mpmp.bench train: error: {exc}", file=sys.stderr)
        return 2
    on_gpu = backend.name() == "cupy"
    configs = [(tuple(int(x) for x in c.split(",")), None) for c in args.config] if args.config else DEFAULTS
    machine = _machine(on_gpu)
    grid = _dp_grid(transport, world)
    say = print if grid is None or grid.rank == 0 else (lambda *a, **k: None)
    say(machine["line"])
    args.torch = args.against == "torch" and _torch_usable(on_gpu, grid, args.dtype, say)
    rows = [_measure(shape, goal, args, machine, grid, say) for shape, goal in configs]
    if args.json and (grid is None or grid.rank == 0):
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in machine.items() if k != "line"} | {"rows": rows}, f, indent=1)
    return 0


def _machine(on_gpu) -> dict:
    """The matrix speed every step is compared with, measured now, and the card's peak."""
    if not on_gpu:
        flops = gemm_flops()
        line = f"float32 GEMM (2048^3): {flops / 1e9:.1f} GFLOP/s"
        return {"device": "CPU", "gemm": "float32 2048^3", "gemm_flops": flops, "peak_flops": None, "line": line}
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    flops, peak = device_gemm_flops(), card_peak(name)
    share = f", {flops / peak:.0%} of the datasheet's {peak / 1e12:.0f}" if peak else " (card not in the peak table)"
    line = f"{name}: bf16 GEMM (8192^3, cuBLAS via mpmp.nn.cuda.gemm): {flops / 1e12:.0f} TFLOP/s{share}"
    return {"device": name, "gemm": "bf16 8192^3", "gemm_flops": flops, "peak_flops": peak, "line": line}


def _torch_usable(on_gpu, grid, dtype, say) -> bool:
    """Whether --against torch can run here; if not, says why (the GEMM fraction is reported as ever)."""
    from mpmp.bench.torch_gpt import available

    why = available()
    if why is None and not on_gpu and grid is None and dtype == "fp32":
        import torch

        from mpmp._setup import blas_thread_count

        say(f"against PyTorch {torch.__version__} eager on the CPU, {blas_thread_count()} threads each, interleaved")
        return True
    if why is not None:
        why = f"PyTorch is not installed ({why}; pip install 'mpmp[test]')"
    else:
        why = "it compares fp32 steps of one process on the CPU" + (
            " (not --backend cupy)"
            if on_gpu
            else " (not under mpirun)"
            if grid is not None
            else f" (not --dtype {dtype})"
        )
    say(f"--against torch: {why}: reporting the GEMM fraction only")
    return False


def _measure(shape, goal, args, machine, grid, say) -> dict:
    from mpmp.bench import torch_gpt

    vs_torch = None
    if args.torch:
        alone, vs_torch = torch_gpt.against_torch(shape, steps=args.steps, warmup=args.warmup)
    else:
        alone = train_rate(shape, steps=args.steps, warmup=args.warmup, dtype=args.dtype)
    r = dict(alone, goal=goal, fraction_of_gemm=alone["model_flops"] / machine["gemm_flops"])
    if machine["peak_flops"]:
        r["mfu"] = alone["model_flops"] / machine["peak_flops"]
    c = r["config"]
    mfu = f", MFU {r['mfu']:.1%} of peak" if "mfu" in r else ""
    say(
        f"V {c['V']} D {c['D']} L {c['L']} H {c['H']} S {c['S']} B {c['B']} {args.dtype}: "
        f"{r['step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, {r['model_flops'] / 1e12:.3f} "
        f"TFLOP/s = {r['fraction_of_gemm']:.2f} of the GEMM{mfu}"
        + (f" (goal >= {goal:.2f} of the GEMM)" if goal else "")
    )
    if "mfu" in r and shape[:5] == GPT2_124M and args.dtype == "bf16":
        say(f"  goal: MFU >= {MFU_GOAL:.0%} at the GPT-2 124M shape in bf16: {_verdict(r['mfu'])}")
    if grid is None and backend.name() == "numpy":
        r["products_s"] = vs_torch["products_s"] if vs_torch else products_seconds(shape)
        say(
            f"  its matrix products alone, back to back: {r['products_s'] * 1e3:.1f} ms = "
            f"{r['products_s'] / r['step_s']:.2f} of the step (no step on this BLAS takes less)"
        )
    if vs_torch is not None:
        r["torch"] = _report_torch(shape, vs_torch, say)
    if grid is not None:
        dp = train_rate(shape, steps=args.steps, warmup=args.warmup, dtype=args.dtype, grid=grid)
        r["dp"] = {"ranks": grid.dp, "step_s": dp["step_s"], "exposed": 1 - alone["step_s"] / dp["step_s"]}
        say(
            f"  dp {grid.dp} over {grid.transport}: {dp['step_s'] * 1e3:.1f} ms/step vs {alone['step_s'] * 1e3:.1f} alone: "
            f"{r['dp']['exposed']:.1%} of the step is all-reduce that backward did not hide "
            f"(goal <= {DP_EXPOSED_GOAL:.0%})"
        )
    return r


def _report_torch(shape, vs, say) -> dict:
    """Print the PyTorch comparison of a shape and measure both peak memories; returns the row."""
    from mpmp.bench import torch_gpt

    met = "met" if vs["ratio"] >= TORCH_RATIO_GOAL else "missed"
    say(
        f"  PyTorch: {vs['step_s'] * 1e3:.1f} ms/step; torch step / mpmp step = {vs['ratio']:.2f} "
        f"(median over step pairs; goal >= {TORCH_RATIO_GOAL}: {met}); "
        f"losses differ by at most {vs['loss_diff']:.1e}"
    )
    say(
        f"  torch step / the matrix products alone = {vs['bound']:.2f} (median over steps): the most "
        f"torch/mpmp any step on this BLAS could reach, were everything else free"
    )
    memory = {side: torch_gpt.peak_memory(shape, side) for side in ("mpmp", "torch")}
    mib = {side: (m["peak"] / 2**20, (m["peak"] - m["imports"]) / 2**20) for side, m in memory.items()}
    say(
        f"  peak resident memory of a process running the step: mpmp {mib['mpmp'][0]:.0f} MiB "
        f"({mib['mpmp'][1]:.0f} above its imports), PyTorch {mib['torch'][0]:.0f} MiB "
        f"({mib['torch'][1]:.0f} above its imports)"
    )
    return dict(vs, memory=memory)


def _verdict(mfu: float) -> str:
    if mfu >= MFU_GOAL:
        return "met"
    return "missed" if mfu >= MFU_FLOOR else f"below {MFU_FLOOR:.0%}: something structural is wrong"


if __name__ == "__main__":
    raise SystemExit(main())
