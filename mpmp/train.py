"""python -m mpmp.train: train GPT-2 on any (dp, pp, tp) layout.

python -m mpmp.train                       one process, built-in corpus, about a minute
mpirun -n 8 python -m mpmp.train           tp=2, pp=2, dp=2 with 1F1B
mpirun -n 4 python -m mpmp.train --tp 4    tensor parallelism over 4 ranks
"""

import argparse
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass

import numpy

from mpmp import backend, console
from mpmp._setup import local_rank, local_ranks, mpi_launched
from mpmp.comm import ledger
from mpmp.config import ModelConfig, ParallelConfig, TrainConfig, validate
from mpmp.errors import ConfigError, MpmpError


def _number(kind, allow_zero):
    """An argparse type: a number of `kind` that is positive (or, with allow_zero, not negative)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be {'non-negative' if allow_zero else 'positive'}, not {text}")
        return value

    return parse


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m mpmp.train",
        description="Train GPT-2 with hand-written layers over MPI: tensor, pipeline and data parallelism.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pi, ni, pf, nf = _number(int, False), _number(int, True), _number(float, False), _number(float, True)
    g = p.add_argument_group("layout (dp = world size / (tp*pp*cp))")
    g.add_argument("--tp", type=pi, default=None, help="tensor-parallel ranks (default: 2 on 4+ even ranks)")
    g.add_argument("--pp", type=pi, default=None, help="pipeline stages (default: 2 on 8+ ranks divisible by 4)")
    g.add_argument("--cp", type=pi, default=1, help="context-parallel ranks: ring attention over sequence chunks")
    g.add_argument("--schedule", default="1f1b", help="pipeline schedule: gpipe, 1f1b, interleaved, zb-h1")
    g.add_argument("--virtual-stages", type=pi, default=None, help="model chunks per rank (interleaved; default 2)")
    g.add_argument("--micro-batches", type=pi, default=None, help="micro-batches per replica per step (default 2*pp)")
    g.add_argument("--sequence-parallel", action="store_true", help="shard LayerNorm regions along the sequence")
    g.add_argument("--partition", default="uniform", help="layers to stages: uniform, parameters, time")
    g.add_argument("--zero", type=ni, default=0, help="1 = ZeRO-1: shard optimizer state over dp")
    g.add_argument("--bucket-mb", type=pf, default=25.0, help="data-parallel gradient bucket size in MiB")
    g.add_argument("--recompute", default="none", help="activation recomputation: none, selective, full")
    g.add_argument("--backend", default="numpy", help="array backend: numpy or cupy")
    g.add_argument(
        "--comm",
        default="auto",
        help="transport between ranks: mpi, or nccl (CuPy, one GPU per rank); auto: nccl when every rank "
        "has its own GPU, else mpi",
    )
    m = p.add_argument_group("model (GPT-2)")
    m.add_argument(
        "--vocab", type=pi, default=None, help="vocabulary size (default: 256 for bytes, else max token + 1)"
    )
    m.add_argument("--d-model", type=pi, default=128, help="hidden size D")
    m.add_argument("--layers", type=pi, default=4, help="transformer blocks L")
    m.add_argument("--heads", type=pi, default=4, help="attention heads H")
    m.add_argument("--init-from", default=None, help="start from an interchange .npz (V, S, D, L read from it)")
    t = p.add_argument_group("training")
    t.add_argument("--global-batch", type=pi, default=16, help="sequences per step B")
    t.add_argument("--seq-len", type=pi, default=128, help="tokens per sequence S")
    t.add_argument("--steps", type=pi, default=150, help="total steps (a resumed run continues up to this)")
    t.add_argument("--lr", type=pf, default=3e-3, help="peak learning rate")
    t.add_argument("--lr-schedule", default="constant", help="constant, warmup, cosine")
    t.add_argument("--warmup-steps", type=ni, default=0, help="linear warmup steps")
    t.add_argument("--min-lr", type=nf, default=0.0, help="final learning rate of the cosine schedule")
    t.add_argument("--weight-decay", type=nf, default=0.1, help="AdamW decoupled weight decay (2-D tensors)")
    t.add_argument("--beta1", type=nf, default=0.9, help="AdamW's first-moment decay")
    t.add_argument("--beta2", type=nf, default=0.95, help="AdamW's second-moment decay")
    t.add_argument("--clip", type=nf, default=1.0, help="clip the global gradient norm (0 = off)")
    t.add_argument("--seed", type=int, default=1234, help="initialisation and shuffling seed")
    t.add_argument(
        "--dtype",
        default="fp32",
        help="fp32, bf16 or fp16: parameters, activations and their traffic in that format, fp32 master "
        "weights and gradients; fp16 adds dynamic loss scaling",
    )
    d = p.add_argument_group("data and files")
    d.add_argument(
        "--data",
        default=None,
        help=".bin (uint16), .npy (1-D ints) or any file as bytes; default: built-in corpus",
    )
    d.add_argument("--data-order", default="sequential", help="sequential or shuffled")
    d.add_argument("--save", default=None, help="checkpoint directory")
    d.add_argument("--save-every", type=ni, default=0, help="save every K steps (0: only at the end, with --save)")
    d.add_argument("--keep-last", type=ni, default=0, help="keep only the newest N checkpoints in --save (0 = all)")
    d.add_argument("--resume", default=None, help="resume from a checkpoint directory, or 'auto' (newest in --save)")
    d.add_argument("--metrics", default=None, help="write one JSON line per step (rank 0)")
    d.add_argument("--trace", default=None, help="write a Chrome trace of every operation (open in Perfetto)")
    d.add_argument(
        "--trace-steps",
        default=None,
        metavar="A:B",
        help="trace only steps A..B (1-based, inclusive; default: every step)",
    )
    d.add_argument("--log-every", type=ni, default=None, help="progress line every K steps (default: steps/15)")
    d.add_argument("--quiet", action="store_true", help="only errors and the summary")
    d.add_argument(
        "--comm-timeout",
        type=nf,
        default=600.0,
        help="seconds an operation may wait before every rank reports and the job aborts (0 = off)",
    )
    d.add_argument(
        "--preempt-signal",
        default="USR1",
        help="signal that asks for a checkpoint and exit code 75 (SLURM: #SBATCH --signal=USR1@120)",
    )
    return p


def default_layout(world: int, tp, pp):
    """tp=2, pp=2 for 8 ranks (and multiples of 4 from 8), tp=2 on 4 or 6 ranks, else pure dp."""
    if tp is None and pp is None:
        if world >= 8 and world % 4 == 0:
            return 2, 2
        if world >= 4 and world % 2 == 0:
            return 2, 1
        return 1, 1
    return tp or 1, pp or 1


class Run:
    """One launch of the command: the flags (and which were given), this process's place in the
    world, the preemption event and the run's id."""

    def __init__(self, args, argv, preempt):
        self.args, self.argv, self.preempt = args, list(argv), preempt
        if mpi_launched():
            from mpmp.comm.mpi import MPI

            self.world_size = MPI().COMM_WORLD.Get_size()
            self.rank = MPI().COMM_WORLD.Get_rank()
        else:
            self.world_size, self.rank = 1, 0
        self.is_main = self.rank == 0
        # names this launch in the metrics and the trace (mpmp.report matches them); rank 0's only
        self.run_id = uuid.uuid4().hex[:12]

    def given(self, flag: str) -> bool:
        """Whether the user passed a flag (rather than taking its default)."""
        return any(a == flag or a.startswith(flag + "=") for a in self.argv)

    def say(self, *msg):
        if self.is_main and not self.args.quiet:
            print(*msg, flush=True)


def make_config(run: Run, data_vocab: int, init_cfg: ModelConfig | None, *, init_source="--init-from") -> TrainConfig:
    from mpmp.comm.grid import check_layout

    args = run.args
    tp, pp = default_layout(run.world_size // args.cp, args.tp, args.pp)
    dp = check_layout(run.world_size, tp, pp, cp=args.cp)
    par = ParallelConfig(
        tp=tp,
        pp=pp,
        dp=dp,
        cp=args.cp,
        schedule=args.schedule,
        virtual_stages=args.virtual_stages or (2 if args.schedule == "interleaved" else 1),
        micro_batches=args.micro_batches or (2 * pp if pp > 1 else 1),
        sequence_parallel=args.sequence_parallel,
        partition=args.partition,
        zero=args.zero,
        bucket_mb=args.bucket_mb,
        recompute=args.recompute,
    )
    training = {k: getattr(args, k) for k in _TRAINING_FLAGS}
    return TrainConfig(model=_model_config(run, data_vocab, init_cfg, init_source), parallel=par, **training)


_TRAINING_FLAGS = (
    "global_batch",
    "seq_len",
    "steps",
    "lr",
    "min_lr",
    "lr_schedule",
    "warmup_steps",
    "weight_decay",
    "beta1",
    "beta2",
    "clip",
    "seed",
    "dtype",
)


def _model_config(run: Run, data_vocab: int, init_cfg: ModelConfig | None, source: str) -> ModelConfig:
    """The model of the flags, or the one of the weights we start from, named `source` (flags given must agree)."""
    args = run.args
    if init_cfg is None:
        return ModelConfig(
            vocab=args.vocab or data_vocab,
            seq_len=args.seq_len,
            d_model=args.d_model,
            layers=args.layers,
            heads=args.heads,
        )
    for flag, mine, theirs in (
        ("--d-model", args.d_model, init_cfg.d_model),
        ("--layers", args.layers, init_cfg.layers),
        ("--vocab", args.vocab, init_cfg.vocab),
    ):
        if run.given(flag) and mine != theirs:
            raise ConfigError(f"{flag} {mine} disagrees with {source} ({theirs}); leave it out")
    return init_cfg


@dataclass
class Start:
    """What a run starts from, prepared and checked identically on every rank without communication."""

    cfg: TrainConfig
    data: object  # TokenData
    source: object  # name -> full float32 tensor
    resume: dict | None  # _load_resume's


def prepare(run: Run) -> Start:
    from mpmp import weights
    from mpmp.data import TokenData, load_tokens
    from mpmp.model.gpt import random_source

    args = run.args
    backend.use(args.backend, local_rank())
    if args.init_from and args.resume and args.resume != "auto":
        raise ConfigError("--init-from and --resume DIR exclude each other (a checkpoint already holds the weights)")
    resume = _load_resume(run) if args.resume else None
    init_cfg, init_arrays = (resume["model"], resume["params"]) if resume else (None, None)
    if args.init_from and not resume:  # with --resume auto: only while nothing is saved yet (fine-tuning)
        init_cfg, init_arrays = weights.load(args.init_from, args.heads if run.given("--heads") else None)
    tokens, data_vocab = load_tokens(args.data)
    cfg = make_config(run, data_vocab, init_cfg, init_source="the checkpoint" if resume else "--init-from")
    validate(cfg, run.world_size)
    data = TokenData(tokens, cfg.seq_len, cfg.model.vocab, args.data_order, cfg.seed, args.data or "built-in corpus")
    source = init_arrays.__getitem__ if init_arrays is not None else random_source(cfg.model, cfg.seed)
    for flag, path in (("--metrics", args.metrics), ("--trace", args.trace)):
        if path:
            _check_writable(os.path.dirname(os.path.abspath(path)), flag)
    if args.save:
        _check_writable(args.save, "--save", create=True)
    return Start(cfg, data, source, resume)


def choose_comm(run: Run) -> tuple[str, str]:
    """(--comm's transport, why), the same on every rank (collective when launched on several)."""
    from mpmp.comm import factory

    on_gpu = backend.name() == "cupy"
    ranks = local_ranks() if run.world_size > 1 else 1
    if on_gpu:
        from mpmp.comm.nccl import nccl_available

        devices, nccl_ok = backend.device_count(), nccl_available()
    else:
        devices, nccl_ok = 0, False
    kind, why = factory.choose(
        run.args.comm, backend=backend.name(), ranks_on_node=ranks, devices=devices, nccl_ok=nccl_ok
    )
    if run.world_size == 1:
        return "none", "one process: nothing crosses a process boundary"
    from mpmp.comm.mpi import world_group

    return factory.agree(world_group(), kind, why)


def make_grid(cfg: TrainConfig, world_size: int, transport: str = "mpi"):
    """The rank grid of the layout (its Splits are the run's first collectives)."""
    par = cfg.parallel
    if world_size == 1:
        from mpmp.comm.grid import LocalGrid

        return LocalGrid(wire=cfg.precision)
    from mpmp.comm.grid import ProcessGrid

    return ProcessGrid(par.tp, par.pp, par.dp, wire=cfg.precision, transport=transport, cp=par.cp)


def make_trainer(start: Start, grid, run: Run):
    """The Trainer for this rank, resumed when a checkpoint was given; says what it built."""
    from mpmp import checkpoint
    from mpmp.runtime import Trainer

    cfg, par = start.cfg, start.cfg.parallel
    costs = None
    if par.partition == "time":
        from mpmp.pipeline.partition import profile_units

        # rank 0 measures, every rank receives the same numbers, so every rank computes the same split
        costs = numpy.array(profile_units(cfg.model, cfg.micro_batch, cfg.seq_len) if grid.rank == 0 else (0.0,) * 3)
        costs = tuple(float(c) for c in grid.world.broadcast(costs, 0))
    trainer = Trainer(cfg, grid, start.data, start.source, unit_costs=costs)
    if start.resume:
        r = start.resume
        vectors = checkpoint.optimizer_vectors(r["optimizer"], trainer.flat, grid.coord.tp, grid.tp, cfg.precision)
        trainer.load_state(r["manifest"]["step"], vectors, r["optimizer"]["step"], r["manifest"].get("loss_scaler"))
        run.say(f"resumed from {r['dir']} at step {trainer.step}")
    data = f"{run.args.data or 'built-in corpus'} ({start.data.num_sequences} sequences of {cfg.seq_len})"
    run.say(console.banner(cfg, grid, split=trainer.split, memory=trainer.memory(), data=data))
    return trainer


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early on request, state saved, run again to continue
METRICS = ("step", "loss", "grad_norm", "lr", "step_s", "tokens_per_s", "comm_s", "loss_scale", "skipped")


def metrics_line(m: dict, memory: dict, run_id: str) -> str:
    """One JSON line of --metrics: valid JSON always (a non-finite number is written as null)."""
    values = {k: m[k] for k in METRICS} | memory | {"run_id": run_id}
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
    return json.dumps(clean) + "\n"


def parse_trace_steps(text: str | None, steps: int) -> tuple[int, int]:
    """--trace-steps A:B (1-based, inclusive; either end may be left out) -> (A, B)."""
    if not text:
        return 1, steps
    first, sep, last = text.partition(":")
    try:
        a, b = int(first) if first else 1, int(last) if last else steps
    except ValueError:
        a = b = 0
    if not sep or a < 1 or b < a:
        raise ConfigError(f"--trace-steps takes A:B with 1 <= A <= B (steps, inclusive), not {text!r}")
    return a, b


def train_loop(trainer, run: Run, append: bool) -> tuple[list, bool]:
    """Steps until --steps or a stop request; writes metrics (appended to when resuming), progress and
    periodic checkpoints. Returns (every step's metrics, whether the run was asked to stop)."""
    from mpmp import checkpoint

    args, cfg = run.args, trainer.cfg
    led = ledger.get()
    traced = parse_trace_steps(args.trace_steps, cfg.steps) if args.trace else None
    metrics_file = open(args.metrics, "a" if append else "w") if args.metrics and run.is_main else None
    log_every = args.log_every or max(1, cfg.steps // 15)
    history, stopped = [], False
    while trainer.step < cfg.steps and not stopped:
        led.keep_events = traced is not None and traced[0] <= trainer.step + 1 <= traced[1]
        m = trainer.train_step(stop_requested=run.preempt.is_set())
        history.append(m)
        if metrics_file:
            metrics_file.write(metrics_line(m, trainer.memory(), run.run_id))  # rank 0's bytes
            metrics_file.flush()
        if m["step"] % log_every == 0 or m["step"] in (1, cfg.steps):
            run.say(console.progress(m, cfg.steps))
        if m["skipped"]:
            run.say(
                f"step {m['step']}: gradients overflowed in fp16: update skipped, loss scale "
                f"{m['loss_scale']:g} -> {trainer.scaler.scale:g}"
            )
        stopped = m["stop"]
        if args.save and args.save_every and trainer.step % args.save_every == 0 and not stopped:
            checkpoint.save(args.save, trainer.state(), keep_last=args.keep_last)
    if metrics_file:
        metrics_file.close()
    return history, stopped


def finish(trainer, run: Run, history, stopped: bool, wall: float) -> int:
    """The last checkpoint, the summary and the trace (collective); the exit code."""
    from mpmp import checkpoint

    args = run.args
    if args.save and (stopped or not args.save_every or trainer.step % args.save_every):
        checkpoint.save(args.save, trainer.state(), keep_last=args.keep_last)
    text = console.summary(trainer.grid, trainer.memory(), history, wall, run.is_main)
    if text and run.is_main:
        print(text, flush=True)
    if args.trace:
        run.say(console.write_trace(trainer.grid, args.trace, run.is_main, about=_trace_about(trainer, run)))
    if stopped:
        where = f"checkpoint saved in {args.save}" if args.save else "no --save given, nothing saved"
        run.say(f"preempted at step {trainer.step}: {where}; exit code {EXIT_PREEMPTED} asks the job to requeue")
        return EXIT_PREEMPTED
    return 0


def _trace_about(trainer, run: Run) -> dict:
    """The run, for the trace's otherData (mpmp.report reads it)."""
    from mpmp.comm.grid import layout_ranks

    par = trainer.cfg.parallel
    first, last = parse_trace_steps(run.args.trace_steps, trainer.cfg.steps)
    return {
        "run_id": run.run_id,
        "layout": {"tp": par.tp, "pp": par.pp, "dp": par.dp, "cp": par.cp},
        "schedule": par.schedule,
        "micro_batches": par.micro_batches,
        "virtual_stages": par.virtual_stages,
        "world": trainer.grid.world_size,
        "coords": [
            {"rank": r, "tp": c.tp, "pp": c.pp, "dp": c.dp, "cp": c.cp}
            for r, c in layout_ranks(par.tp, par.pp, par.dp, par.cp)
        ],
        "steps": [first, last],
        "memory": trainer.memory(),  # gathered from every rank by console.write_trace
    }


def train(run: Run) -> int:
    start = prepare(run)  # everything that needs no communication: checked identically on every rank
    transport, why = choose_comm(run)
    grid = make_grid(start.cfg, run.world_size, transport)
    ledger.install(ledger.Ledger(grid.rank, keep_events=False))
    run.say(f"communication: {transport} ({why})")
    trainer = make_trainer(start, grid, run)
    watchdog = None
    if run.world_size > 1 and run.args.comm_timeout > 0:
        from mpmp.comm.mpi import MPI
        from mpmp.comm.watchdog import Watchdog

        watchdog = Watchdog(MPI().COMM_WORLD, run.args.comm_timeout).start()
    t0 = time.perf_counter()
    # a resumed run appends to its metrics; a fresh start (also --resume auto with nothing saved) does not
    history, stopped = train_loop(trainer, run, append=start.resume is not None)
    wall = time.perf_counter() - t0
    if watchdog:
        watchdog.stop()
    return finish(trainer, run, history, stopped, wall)


def _install_preempt_handler(name):
    """Set an event when the preemption signal arrives; the step loop checks it between steps."""
    import signal
    import threading

    event = threading.Event()
    signum = getattr(signal, "SIG" + name.upper().removeprefix("SIG"), None)
    if signum is None:
        raise ConfigError(f"--preempt-signal {name}: no such signal")
    signal.signal(signum, lambda *_: event.set())
    return event


def _load_resume(run: Run):
    """The checkpoint to resume from, checked against the flags: {"dir", "manifest", "model",
    "params", "optimizer"}; None for --resume auto with nothing saved yet (a first start)."""
    from mpmp import checkpoint
    from mpmp.errors import CheckpointError

    args = run.args
    if args.resume != "auto":
        step_dir = checkpoint.resolve(args.resume)
    elif not args.save:
        raise ConfigError("--resume auto needs --save DIR (it resumes from the newest checkpoint there)")
    else:
        try:
            step_dir = checkpoint.resolve(args.save)
        except CheckpointError:
            return None
    manifest = checkpoint.read_manifest(step_dir)
    model = checkpoint.model_config_of(manifest)
    if run.given("--heads") and args.heads != model.heads:
        raise ConfigError(f"--heads {args.heads} disagrees with the checkpoint ({model.heads}); leave it out")
    saved = manifest["config"]
    for flag, mine, theirs in (
        ("--seed", args.seed, saved["seed"]),
        ("--data-order", args.data_order, manifest["data"]["order"]),
        ("--global-batch", args.global_batch, saved["global_batch"]),
        ("--seq-len", args.seq_len, saved["seq_len"]),
    ):
        if mine != theirs:
            raise ConfigError(
                f"{flag} {mine} differs from the checkpoint's {theirs} in {step_dir}; resume with {flag} {theirs}"
            )
    optimizer = checkpoint.optimizer_state(step_dir, manifest)
    # Mixed-precision checkpoints hold fp32 master weights: those are the parameters.
    params = optimizer.get("master") or checkpoint.full_tensors(step_dir, manifest)
    return {"dir": step_dir, "manifest": manifest, "model": model, "params": params, "optimizer": optimizer}


def _check_writable(folder, flag, create=False):
    """Fail before training, not after it, when an output folder cannot be written."""
    if create:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{flag} {folder}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.path.isdir(folder):
        raise ConfigError(f"{flag}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{flag}: folder {folder} is not writable")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # First of all, so a preemption signal during start-up (a long checkpoint load after a requeue)
    # is remembered instead of killing the rank.
    try:
        preempt = _install_preempt_handler(args.preempt_signal)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run = Run(args, argv, preempt)
    if run.world_size > 1:
        from mpmp.comm.mpi import abort_on_exception

        abort_on_exception()
    try:
        return train(run)
    except MpmpError as exc:
        report_and_exit(exc, run)
    return 2


def report_and_exit(exc, run):
    """One line per rank, then end the job with exit code 2 (aborting peers that may be waiting)."""
    sys.stderr.write(f"rank {run.rank}: error: {exc}\n")
    if run.world_size > 1:
        from mpmp.comm.mpi import abort_world

        abort_world(exc.exit_code)
    sys.stderr.flush()
    sys.exit(exc.exit_code)


if __name__ == "__main__":
    sys.exit(main())
