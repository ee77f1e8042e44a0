"""python -m mpmp.train: train GPT-2 on any (dp, pp, tp) layout.

python -m mpmp.train                       one process, built-in corpus, about a minute
mpirun -n 8 python -m mpmp.train           tp=2, pp=2, dp=2 with 1F1B
mpirun -n 4 python -m mpmp.train --tp 4    tensor parallelism over 4 ranks
"""

import argparse
import json
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass

import numpy

from mpmp import backend, console
from mpmp._setup import launcher_rank, local_rank, local_ranks, mpi_launched
from mpmp.cli import check_output_file, check_writable_folder, number
from mpmp.comm import ledger
from mpmp.config import ModelConfig, ParallelConfig, TrainConfig, check_embedding_fits, validate
from mpmp.errors import ConfigError, DivergedError, MpmpError, StartupErrors


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage, help and errors written once per job, each in one write. argv is the
    same on every rank, so every rank finds the same error; the launcher's rank 0 says it, before MPI
    is initialised, and every rank exits with code 2."""

    def _print_message(self, message, file=None):
        if message and launcher_rank() == 0:
            (file or sys.stderr).write(message)
            (file or sys.stderr).flush()

    def error(self, message):
        self._print_message(f"{self.format_usage()}{self.prog}: error: {message}\n", sys.stderr)
        sys.exit(2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" once: not for flags whose help already says their default, nor for
    defaults computed at start-up (None) or switches (False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


_POSITIVE_INT, _COUNT = number(int, False), number(int, True)
_POSITIVE, _NON_NEGATIVE = number(float, False), number(float, True)
# A stop request must reach the process: KILL and STOP cannot be caught, and the fault signals
# report a crash in progress, not a request.
_UNCATCHABLE = {"SIGKILL", "SIGSTOP"}
_FAULTS = {"SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT"}


def catchable_signal(text: str) -> signal.Signals:
    """An argparse type: the name of a signal a process can catch (USR1, SIGUSR1, TERM, ...)."""
    name = "SIG" + text.upper().removeprefix("SIG")
    sig = signal.Signals.__members__.get(name)
    if sig is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a signal name (USR1, USR2, TERM, ...)")
    if name in _UNCATCHABLE | _FAULTS:
        why = "cannot be caught" if name in _UNCATCHABLE else "reports a crash, not a request"
        raise argparse.ArgumentTypeError(f"{name} {why}; use USR1, USR2 or TERM")
    return sig


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m mpmp.train",
        description="Train GPT-2 with hand-written layers over MPI: tensor, pipeline and data parallelism.",
        formatter_class=_HelpFormatter,
    )
    _layout_flags(p.add_argument_group("layout (dp = world size / (tp*pp*cp))"))
    _model_flags(p.add_argument_group("model (GPT-2)"))
    _training_flags(p.add_argument_group("training"))
    files = p.add_argument_group("data and files")
    _data_flags(files)
    _output_flags(files)
    return p


def _layout_flags(g):
    g.add_argument("--tp", type=_POSITIVE_INT, help="tensor-parallel ranks (default: 2 on 4+ even ranks)")
    g.add_argument("--pp", type=_POSITIVE_INT, help="pipeline stages (default: 2 on 8+ ranks divisible by 4)")
    g.add_argument(
        "--cp", type=_POSITIVE_INT, default=1, help="context-parallel ranks: ring attention over sequence chunks"
    )
    g.add_argument("--schedule", default="1f1b", help="pipeline schedule: gpipe, 1f1b, interleaved, zb-h1")
    g.add_argument("--virtual-stages", type=_POSITIVE_INT, help="model chunks per rank (interleaved; default 2)")
    g.add_argument("--micro-batches", type=_POSITIVE_INT, help="micro-batches per replica per step (default 2*pp)")
    g.add_argument("--sequence-parallel", action="store_true", help="shard LayerNorm regions along the sequence")
    g.add_argument("--partition", default="uniform", help="layers to stages: uniform, parameters, time")
    g.add_argument("--zero", type=_COUNT, default=0, help="1 = ZeRO-1: shard optimizer state over dp")
    g.add_argument("--bucket-mb", type=_POSITIVE, default=25.0, help="data-parallel gradient bucket size in MiB")
    g.add_argument("--recompute", default="none", help="activation recomputation: none, selective, full")
    g.add_argument("--backend", default="numpy", help="array backend: numpy or cupy")
    g.add_argument(
        "--comm",
        default="auto",
        help="transport between ranks: mpi, or nccl (CuPy, one GPU per rank); auto: nccl when every rank "
        "has its own GPU, else mpi",
    )


def _model_flags(g):
    g.add_argument("--vocab", type=_POSITIVE_INT, help="vocabulary size (default: 256 for bytes, else max token + 1)")
    g.add_argument("--d-model", type=_POSITIVE_INT, default=128, help="hidden size D")
    g.add_argument("--layers", type=_POSITIVE_INT, default=4, help="transformer blocks L")
    g.add_argument("--heads", type=_POSITIVE_INT, default=4, help="attention heads H")
    g.add_argument("--init-from", help="start from an interchange .npz (V, S, D, L read from it)")


def _training_flags(g):
    g.add_argument("--global-batch", type=_POSITIVE_INT, default=16, help="sequences per step B")
    g.add_argument("--seq-len", type=_POSITIVE_INT, default=128, help="tokens per sequence S")
    g.add_argument("--steps", type=_POSITIVE_INT, default=150, help="total steps (a resumed run continues up to this)")
    g.add_argument("--lr", type=_POSITIVE, default=3e-3, help="peak learning rate")
    g.add_argument("--lr-schedule", default="constant", help="constant, warmup, cosine")
    g.add_argument("--warmup-steps", type=_COUNT, default=0, help="linear warmup steps")
    g.add_argument("--min-lr", type=_NON_NEGATIVE, default=0.0, help="final learning rate of the cosine schedule")
    g.add_argument(
        "--weight-decay", type=_NON_NEGATIVE, default=0.1, help="AdamW decoupled weight decay (2-D tensors), at most 10"
    )
    g.add_argument("--beta1", type=_NON_NEGATIVE, default=0.9, help="AdamW's first-moment decay, in [0, 1)")
    g.add_argument("--beta2", type=_NON_NEGATIVE, default=0.95, help="AdamW's second-moment decay, in [0, 1)")
    g.add_argument("--clip", type=_NON_NEGATIVE, default=1.0, help="clip the global gradient norm (0 = off)")
    g.add_argument("--seed", type=_COUNT, default=1234, help="initialisation and shuffling seed, in [0, 2**63)")
    g.add_argument(
        "--dtype",
        default="fp32",
        help="fp32, bf16 or fp16: parameters, activations and their traffic in that format, fp32 master "
        "weights and gradients; fp16 adds dynamic loss scaling",
    )


def _data_flags(g):
    g.add_argument("--data", help=".bin (uint16), .npy (1-D ints) or any file as bytes (default: built-in corpus)")
    g.add_argument("--data-order", default="sequential", help="sequential or shuffled")
    g.add_argument("--save", help="checkpoint directory")
    g.add_argument("--save-every", type=_COUNT, default=0, help="save every K steps (0: only at the end); needs --save")
    g.add_argument(
        "--keep-last", type=_COUNT, default=0, help="keep only the newest N checkpoints (0 = all); needs --save"
    )
    g.add_argument("--resume", help="resume from a checkpoint directory, or 'auto' (the newest in --save)")


def _output_flags(g):
    g.add_argument("--metrics", help="write one JSON line per step (rank 0)")
    g.add_argument("--trace", help="write a Chrome trace of every operation (open in Perfetto)")
    g.add_argument(
        "--trace-steps", metavar="A:B", help="trace only steps A..B (1-based, inclusive; default: every step)"
    )
    g.add_argument(
        "--explain",
        nargs="?",
        const="cpu",
        metavar="PROFILE",
        help="end with the planner's prediction beside the run's memory, bytes per group and op, bubble and "
        "step time (python -m mpmp.plan; hardware profile, default cpu)",
    )
    g.add_argument("--log-every", type=_COUNT, help="progress line every K steps (default: steps/15)")
    g.add_argument("--quiet", action="store_true", help="only errors, warnings and the summary")
    g.add_argument(
        "--comm-timeout",
        type=_NON_NEGATIVE,
        default=600.0,
        help="seconds an operation may wait before every rank reports and the job aborts (0 = off)",
    )
    g.add_argument(
        "--preempt-signal",
        type=catchable_signal,
        default="USR1",
        help="signal that asks for a checkpoint and exit code 75 (SLURM: #SBATCH --signal=USR1@120)",
    )


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

    def say(self, text: str):
        """A progress line on rank 0's stdout (not with --quiet)."""
        if self.is_main and not self.args.quiet:
            console.line(text)

    def tell(self, text: str):
        """A line on rank 0's stdout, also with --quiet: what the run did, when it did nothing."""
        if self.is_main:
            console.line(text)

    def warn(self, text: str):
        """A warning on rank 0's stderr (every rank found the same), also with --quiet."""
        if self.is_main:
            console.line(f"warning: {text}", sys.stderr)


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
    """What the run starts from, with every check that needs no communication."""
    from mpmp import weights
    from mpmp.data import TokenData, load_tokens
    from mpmp.model.gpt import random_source

    args = run.args
    check_flags(run)
    backend.use(args.backend, local_rank())
    resume = _load_resume(run) if args.resume else None
    init_cfg, init_arrays = (resume["model"], resume["params"]) if resume else (None, None)
    if args.init_from and not resume:  # with --resume auto: only while nothing is saved yet (fine-tuning)
        init_cfg, init_arrays = weights.load(args.init_from, args.heads if run.given("--heads") else None)
    tokens, data_vocab = load_tokens(args.data)
    cfg = make_config(run, data_vocab, init_cfg, init_source="the checkpoint" if resume else "--init-from")
    validate(cfg, run.world_size)
    _check_memory(run, cfg, inferred_vocab=not args.vocab and init_cfg is None)
    data = TokenData(tokens, cfg.seq_len, cfg.model.vocab, args.data_order, cfg.seed, args.data or "built-in corpus")
    source = init_arrays.__getitem__ if init_arrays is not None else random_source(cfg.model, cfg.seed)
    if args.save:
        check_writable_folder(args.save, "--save", create=True)
    return Start(cfg, data, source, resume)


def choose_comm(run: Run) -> tuple[str, str]:
    """(--comm's transport, why), the same on every rank (collective when launched on several)."""
    from mpmp.comm import factory

    return factory.choose_here(run.args.comm, run.world_size)


def check_flags(run: Run):
    """The flags that no configuration object holds, and the output files: before anything is loaded."""
    args = run.args
    if args.init_from and args.resume and args.resume != "auto":
        raise ConfigError("--init-from and --resume DIR exclude each other (a checkpoint already holds the weights)")
    # by value, not by run.given: argparse also takes abbreviations (--save-ev 2)
    for flag, value, needed, present in (
        ("--save-every", args.save_every, "--save", args.save),
        ("--keep-last", args.keep_last, "--save", args.save),
        ("--trace-steps", args.trace_steps, "--trace", args.trace),
    ):
        if value and not present:
            raise ConfigError(f"{flag} needs {needed}")
    if args.trace:
        parse_trace_steps(args.trace_steps, args.steps)
    if run.is_main:  # rank 0 writes these two
        for flag, path in (("--metrics", args.metrics), ("--trace", args.trace)):
            if path:
                check_output_file(path, flag)


def _check_memory(run: Run, cfg: TrainConfig, inferred_vocab: bool):
    """Too big to run: refused before anything is allocated, with the numbers in GiB. First the
    embedding alone (a --vocab typo, or a stray huge token id the vocabulary was inferred from), then
    the planner's estimate of what each rank holds (mpmp.plan.memory: parameters, gradients, optimizer
    state, peak activations) against this node's memory shared by its ranks. NumPy backend only."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return  # the system does not say
    data = run.args.data
    hint = f"; the vocabulary is the largest token id in {data} + 1: check the data or give --vocab" if data else ""
    check_embedding_fits(cfg.model, cfg.parallel.tp, memory, hint if inferred_vocab else "")
    if backend.name() == "numpy":
        check_rank_memory(cfg, memory // (local_ranks() if run.world_size > 1 else 1))


def check_rank_memory(cfg: TrainConfig, per_rank_bytes: int):
    """ConfigError when the planner's estimate of the largest rank exceeds per_rank_bytes. Under cp
    each rank's activations are those of its S/cp positions (the weights are the whole model's)."""
    from dataclasses import replace

    from mpmp.plan.memory import per_rank

    par = cfg.parallel
    local = replace(cfg, seq_len=cfg.seq_len // par.cp, parallel=replace(par, cp=1)) if par.cp > 1 else cfg
    worst = max(per_rank(local), key=lambda m: m.total)
    if worst.total > per_rank_bytes:
        gib = 2**30
        raise ConfigError(
            f"too big to run: a rank needs about {worst.total / gib:,.1f} GiB (parameters "
            f"{worst.params / gib:,.1f}, gradients {worst.grads / gib:,.1f}, optimizer {worst.optimizer / gib:,.1f}, "
            f"activations {(worst.activations + worst.workspace) / gib:,.1f}) but has {per_rank_bytes / gib:,.1f} GiB "
            "(this node's memory over its ranks); use more ranks (--tp, --pp), --recompute full or smaller "
            "micro-batches, or see python -m mpmp.plan"
        )


def prepare_together(run: Run) -> Start:
    """prepare() on every rank, then one small all-gather of what each rank found wrong (the run's
    first collective), so that every rank stops together when any rank cannot start, and each error
    is printed once, by rank 0, naming the ranks that found it unless all did."""
    try:
        start, problem = prepare(run), None
    except MpmpError as exc:
        start, problem = None, [exc.exit_code, str(exc)]
    found = [problem]
    if run.world_size > 1:
        from mpmp.comm.mpi import world_group

        found = world_group().all_gather_json(problem)
    errors = {}
    for rank, f in enumerate(found):
        if f:
            errors.setdefault(f[1], []).append(rank)
    if errors:
        raise StartupErrors(errors, run.world_size, next(f[0] for f in found if f))
    return start


def make_grid(cfg: TrainConfig, world_size: int, transport: str = "mpi"):
    """The rank grid of the layout (its Splits come right after prepare_together's all-gather)."""
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
    periodic checkpoints. Returns (every step's metrics, whether the run was asked to stop); raises
    DivergedError, on every rank alike, at the step whose loss or gradients are not finite."""
    from mpmp import checkpoint

    args, cfg = run.args, trainer.cfg
    led = ledger.get()
    traced = parse_trace_steps(args.trace_steps, cfg.steps) if args.trace else None
    metrics_file = open(args.metrics, "a" if append else "w") if args.metrics and run.is_main else None
    history, stopped = [], False
    try:
        while trainer.step < cfg.steps and not stopped:
            led.keep_events = traced is not None and traced[0] <= trainer.step + 1 <= traced[1]
            mark = led.mark()
            m = trainer.train_step(stop_requested=run.preempt.is_set())
            m["comm"] = led.since(mark)  # this rank's operations of the step, for --explain
            history.append(m)
            _report_step(m, trainer, run, metrics_file)
            if m["diverged"]:
                raise DivergedError(
                    f"the run diverged at step {m['step']}: {m['diverged']}; stopped without saving a checkpoint"
                )
            stopped = m["stop"]
            if args.save and args.save_every and trainer.step % args.save_every == 0 and not stopped:
                checkpoint.save(args.save, trainer.state(), keep_last=args.keep_last)
    finally:
        if metrics_file:
            metrics_file.close()
    return history, stopped


def _report_step(m: dict, trainer, run: Run, metrics_file):
    """The step's metrics line (rank 0), its progress line every --log-every steps, an fp16 skip."""
    steps = trainer.cfg.steps
    if metrics_file:
        metrics_file.write(metrics_line(m, trainer.memory(), run.run_id))  # rank 0's bytes
        metrics_file.flush()
    if m["step"] % (run.args.log_every or max(1, steps // 15)) == 0 or m["step"] in (1, steps):
        run.say(console.progress(m, steps))
    if m["skipped"] and not m["diverged"]:
        run.say(
            f"step {m['step']}: gradients overflowed in fp16: update skipped, loss scale "
            f"{m['loss_scale']:g} -> {trainer.scaler.scale:g}"
        )


def finish(trainer, run: Run, history, stopped: bool, wall: float) -> int:
    """The last checkpoint, the summary and the trace (collective); the exit code."""
    from mpmp import checkpoint

    args = run.args
    if args.save and (stopped or not args.save_every or trainer.step % args.save_every):
        checkpoint.save(args.save, trainer.state(), keep_last=args.keep_last)
    text = console.summary(trainer.grid, trainer.memory(), history, wall, run.is_main)
    if text and run.is_main:
        console.line(text)
    if args.trace:
        run.say(console.write_trace(trainer.grid, args.trace, run.is_main, about=_trace_about(trainer, run)))
    if args.explain and history:
        text = explain_run(trainer, run, history)
        if text:
            console.line(text)
    if stopped:
        where = f"checkpoint saved in {args.save}" if args.save else "no --save given, nothing saved"
        run.say(f"preempted at step {trainer.step}: {where}; exit code {EXIT_PREEMPTED} asks the job to requeue")
        return EXIT_PREEMPTED
    return 0


def explain_run(trainer, run: Run, history) -> str | None:
    """Collective: every rank's memory and last-step operations, beside the planner's prediction (on
    rank 0; None elsewhere). The step time is the median over the steps after the first."""
    import statistics

    from mpmp.console import MEMORY_KEYS

    memory = trainer.memory()
    mine = {
        "memory": [memory[k] for k in MEMORY_KEYS],
        "ops": [[g, k, *v] for (g, k), v in history[-1]["comm"].items()],
    }
    every = trainer.grid.world.all_gather_json(mine)
    if not run.is_main:
        return None
    from mpmp.plan.explain import explain

    step_s = statistics.median(h["step_s"] for h in (history[1:] or history))
    last_step = [{(g, k): (c, b, s) for g, k, c, b, s in e["ops"]} for e in every]
    return explain(
        trainer.cfg, profile=run.args.explain, memory=[e["memory"] for e in every], last_step=last_step, step_s=step_s
    )


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
    start = prepare_together(run)  # checked on every rank without communication, then agreed
    if start.resume and start.resume["manifest"]["step"] >= start.cfg.steps:
        run.tell(
            f"nothing to do: {start.resume['dir']} holds step {start.resume['manifest']['step']} and --steps is "
            f"{start.cfg.steps} (the total a resumed run continues up to); the checkpoint is left as it is"
        )
        return 0
    transport, why = choose_comm(run)
    grid = make_grid(start.cfg, run.world_size, transport)
    ledger.install(ledger.Ledger(grid.rank, keep_events=False))
    run.say(f"communication: {transport} ({why})")
    trainer = make_trainer(start, grid, run)
    from mpmp.comm.watchdog import start_watchdog

    watchdog = start_watchdog(run.world_size, run.args.comm_timeout)
    t0 = time.perf_counter()
    # a resumed run appends to its metrics; a fresh start (also --resume auto with nothing saved) does not
    history, stopped = train_loop(trainer, run, append=start.resume is not None)
    wall = time.perf_counter() - t0
    if watchdog:
        watchdog.stop()
    return finish(trainer, run, history, stopped, wall)


def _install_preempt_handler(signum: signal.Signals):
    """Set an event when the preemption signal arrives; the step loop checks it between steps."""
    import threading

    event = threading.Event()
    signal.signal(signum, lambda *_: event.set())
    return event


def _load_resume(run: Run):
    """The checkpoint to resume from, checked against the flags: {"dir", "manifest", "model",
    "params", "optimizer"}; None for --resume auto with nothing saved yet (a first start)."""
    from mpmp import checkpoint

    args = run.args
    step_dir = _resume_dir(run)
    if step_dir is None:
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
    params = checkpoint.parameters(step_dir, manifest, optimizer)
    return {"dir": step_dir, "manifest": manifest, "model": model, "params": params, "optimizer": optimizer}


def _resume_dir(run: Run) -> str | None:
    """The step directory --resume names (a warning for each newer one passed over, and why); None
    for --resume auto when --save holds no complete checkpoint yet."""
    from mpmp import checkpoint

    args = run.args
    if args.resume == "auto" and not args.save:
        raise ConfigError("--resume auto needs --save DIR (it resumes from the newest checkpoint there)")
    root = args.save if args.resume == "auto" else args.resume
    if args.resume == "auto" and not os.path.isdir(root):
        return None
    step_dir, passed = checkpoint.choose(root)
    for note in passed:
        run.warn(f"--resume: {note}")
    if step_dir is None and args.resume == "auto":
        if passed:
            run.warn(f"--resume auto: no complete checkpoint in {root}; starting from step 0")
        return None
    return step_dir or checkpoint.resolve(root)  # resolve raises the error for an explicit DIR


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)  # a bad flag: usage and error once per job, exit code 2
    # The run watches its numbers itself (a non-finite loss or gradient stops it with one line):
    # NumPy's per-kernel warnings would only repeat that, once per rank.
    numpy.seterr(over="ignore", invalid="ignore", divide="ignore")
    # First of all, so a preemption signal during start-up (a long checkpoint load after a requeue)
    # is remembered instead of killing the rank.
    preempt = _install_preempt_handler(args.preempt_signal)
    run = Run(args, argv, preempt)
    if mpi_launched() and args.preempt_signal != signal.SIGINT:
        from mpmp.comm.mpi import report_interrupts

        run.interrupts = report_interrupts(run.rank)
    if run.world_size > 1:
        from mpmp.comm.mpi import abort_on_exception

        abort_on_exception()
    try:
        return train(run)
    except MpmpError as exc:
        report_and_exit(exc, run)
    except KeyboardInterrupt:  # one process, Ctrl-C
        from mpmp.comm.mpi import EXIT_INTERRUPTED, interrupted_line

        console.line(interrupted_line(run.rank), sys.stderr)
        return EXIT_INTERRUPTED
    return 2


def report_and_exit(exc: MpmpError, run: Run):
    """An error every rank raised alike is printed once, by rank 0, and every rank exits with its code
    (none is left waiting). Any other: this rank's line, then the job is aborted, so that peers
    waiting for this rank in a collective end too."""
    if exc.shared:
        if run.is_main:
            console.line(exc.report(run.rank), sys.stderr)
        sys.exit(exc.exit_code)
    console.line(exc.report(run.rank), sys.stderr)
    if run.world_size > 1:
        from mpmp.comm.mpi import abort_world

        abort_world(exc.exit_code)
    sys.exit(exc.exit_code)


if __name__ == "__main__":
    sys.exit(main())
