"""The Trainer: one training step of any layout, assembled from the layers below.

It builds this rank's chunks of the model (partition), the flat parameter/gradient buffers, the
gradient reducer (dp buckets, tied embedding, sequence-parallel sums), the optimizer (replicated or
ZeRO-1) and the pipeline engine with this rank's instruction list, and runs steps in the data order
of the contract. `python -m mpmp.train` is a command line around it; tests drive it directly.
"""

import time

import numpy

from mpmp import backend
from mpmp.backend import LOW_PRECISION, round_to
from mpmp.comm import ledger
from mpmp.config import TrainConfig, validate_batch
from mpmp.errors import ConfigError
from mpmp.model.gpt import GPT, split_microbatches
from mpmp.optim import clip
from mpmp.optim.buffer import FlatParams
from mpmp.optim.grads import GradReducer
from mpmp.optim.loss_scale import DynamicLossScaler, NoLossScaling
from mpmp.optim.lr import learning_rate
from mpmp.optim.zero import Optimizer
from mpmp.pipeline import partition, schedules
from mpmp.pipeline.engine import MAX_TAGS, PipelineEngine

RECOMPUTE = ("none", "selective", "full")


def validate(cfg: TrainConfig, world_size: int | None = None):
    """Every check that needs no communication; raises ConfigError."""
    par, model = cfg.parallel, cfg.model
    if world_size is not None and par.tp * par.pp * par.dp != world_size:
        raise ConfigError(f"world size ({world_size}) != tp*pp*dp ({par.tp}*{par.pp}*{par.dp})")
    model.validate(par.tp)
    validate_batch(cfg.global_batch, par.dp, par.micro_batches, cfg.seq_len, model)
    schedules.validate(par.schedule, par.pp, par.micro_batches, par.virtual_stages)
    if par.micro_batches * par.pp * par.virtual_stages * 2 > MAX_TAGS:
        raise ConfigError(
            f"micro-batches * pp * virtual-stages ({par.micro_batches}*{par.pp}*{par.virtual_stages}) exceeds "
            f"{MAX_TAGS // 2}: pipeline messages would run out of MPI tags"
        )
    if par.partition not in partition.METHODS:
        raise ConfigError(f"--partition must be one of {', '.join(partition.METHODS)}, not {par.partition!r}")
    if par.recompute not in RECOMPUTE:
        raise ConfigError(f"--recompute must be one of {', '.join(RECOMPUTE)}, not {par.recompute!r}")
    if par.zero not in (0, 1):
        raise ConfigError(f"--zero must be 0 or 1, not {par.zero}")
    if par.sequence_parallel and cfg.seq_len % par.tp:
        raise ConfigError(f"--sequence-parallel needs --seq-len ({cfg.seq_len}) divisible by --tp ({par.tp})")
    if model.units < par.pp * par.virtual_stages:
        raise ConfigError(
            f"{model.layers} layers + embedding + head = {model.units} units cannot fill "
            f"pp*virtual-stages = {par.pp * par.virtual_stages} pipeline stages"
        )
    if cfg.dtype not in ("fp32",) + LOW_PRECISION:
        raise ConfigError(f"--dtype must be one of fp32, bf16, fp16, not {cfg.dtype!r}")
    if cfg.clip < 0:
        raise ConfigError(f"--clip must be >= 0, not {cfg.clip}")


class Trainer:
    def __init__(self, cfg: TrainConfig, grid, data, source, unit_costs=None, log=None):
        """grid: a ProcessGrid (or LocalGrid) whose sizes match cfg.parallel. data: TokenData.
        source: name -> full float32 tensor (random_source or an interchange file).
        unit_costs: measured (embed, block, head) seconds for --partition time."""
        validate(cfg, grid.world_size)
        self.cfg, self.grid, self.data = cfg, grid, data
        par, mcfg = cfg.parallel, cfg.model
        self.log = log or (lambda *_: None)
        self.micro_batch = cfg.global_batch // (par.dp * par.micro_batches)

        costs = partition.unit_costs(mcfg, par.partition, unit_costs)
        self.split = partition.balanced_split(costs, par.pp * par.virtual_stages)
        ranges = partition.stage_ranges(self.split, par.pp, grid.coord.pp, par.virtual_stages)
        # Mixed precision: parameters and activations in bf16/fp16 (emulated: float32 arrays rounded
        # to the format), fp32 master weights, gradients and their reductions; activation traffic
        # (tp collectives, pipeline transfers) travels as 16-bit patterns.
        self.precision = cfg.dtype if cfg.dtype in LOW_PRECISION else None
        grid.tp_group.wire = grid.pp_group.wire = self.precision
        self.scaler = DynamicLossScaler() if cfg.dtype == "fp16" else NoLossScaling()
        self.model = GPT(
            mcfg, source, ranges, grid.tp_group, par.sequence_parallel, par.recompute, precision=self.precision
        )

        params = self.model.parameters()
        tied = next((p for p in params if p.name == "wte.weight"), None) if par.pp > 1 else None
        sp_params = [p for p in params if p.sequence_parallel]
        late = sp_params + ([tied] if tied is not None else [])
        self.flat = FlatParams(params, grid.coord.tp, par.dp, par.bucket_mb * 2**20, late)
        modules = [m for c in self.model.chunks for m in c.modules]
        self.reducer = GradReducer(
            self.flat, grid.dp_group, grid.tp_group, grid.embed_group, par.zero == 1, tied, sp_params, modules
        )
        self.optimizer = Optimizer(
            self.flat, grid.dp_group, [grid.mp_group], par.zero == 1,
            (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay, self.precision,
        )  # fmt: skip
        if self.precision:
            round_to(self.flat.data, self.precision)  # after the fp32 masters were copied
        self.inject_overflow = False  # tests: make the next step's gradients overflow

        self.programs = schedules.build_all(par.schedule, par.pp, par.micro_batches, par.virtual_stages)
        schedules.check(self.programs, par.pp, par.micro_batches, par.virtual_stages)
        self.program = self.programs[grid.coord.pp]
        s_local = cfg.seq_len // par.tp if par.sequence_parallel else cfg.seq_len
        self.engine = PipelineEngine(
            self.model, grid.pp_group, par.pp, grid.coord.pp, (grid.prev_stage, grid.next_stage), par.virtual_stages,
            (self.micro_batch, s_local, mcfg.d_model), numpy.float32,
            grads_final=lambda chunk, module: self.reducer.module_done(module),
        )  # fmt: skip
        self.step = 0
        self.last = {}

    # ---- one step -----------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        c = self.cfg
        return learning_rate(step, c.lr, c.lr_schedule, c.warmup_steps, c.steps, c.min_lr)

    def _microbatches(self, step):
        cfg, par = self.cfg, self.cfg.parallel
        inputs, targets = self.data.replica_batch(step, cfg.global_batch, self.grid.coord.dp, par.dp)
        xp = backend.xp()
        # The loss is the mean over the global batch; fp16 multiplies it by the loss scale S.
        scale = self.scaler.scale / (cfg.global_batch * cfg.seq_len)
        return split_microbatches(xp.asarray(inputs), xp.asarray(targets), par.micro_batches, scale)

    def _optimizer_step(self):
        if self.inject_overflow:
            self.flat.grad[0] = numpy.inf
            self.inject_overflow = False
        s = self.scaler.scale
        norm = self.optimizer.grad_norm() / s
        lr = self.lr_at(self.step)
        overflow = self.scaler.overflowed(norm)
        if overflow:
            coef = 0.0  # skip the update; the step's data is consumed all the same
        else:
            coef = clip.clip_coefficient(norm, self.cfg.clip)
            self.optimizer.step(lr, coef / s)
        self.scaler.update(overflow)
        self.last.update(grad_norm=norm, lr=lr, clip_coef=coef, skipped=overflow, loss_scale=s)

    def train_step(self, stop_requested: bool = False) -> dict:
        """Run step self.step; returns its metrics (the same on every rank). stop_requested: this rank
        was asked to stop (a preemption signal); metrics["stop"] says whether any rank was."""
        t0 = time.perf_counter()
        comm0 = ledger.get().comm_seconds()
        mbs = self._microbatches(self.step)
        self.flat.zero_grad()
        loss = self.engine.run(self.program, mbs, self.reducer.finish, self._optimizer_step)
        # One small all-reduce carries the loss to every rank and whether any rank must stop.
        owner = self.grid.is_last_stage and self.grid.coord.tp == 0
        total = numpy.array([loss if owner else 0.0, float(stop_requested)])
        self.grid.world.all_reduce(total)
        backend.synchronize()
        dt = time.perf_counter() - t0
        self.step += 1
        tokens = self.cfg.global_batch * self.cfg.seq_len
        metrics = {
            "step": self.step,
            "loss": float(total[0]) / self.last["loss_scale"],
            "grad_norm": self.last["grad_norm"],
            "lr": self.last["lr"],
            "step_s": dt,
            "tokens_per_s": tokens / dt,
            "comm_s": ledger.get().comm_seconds() - comm0,
            "peak_caches": self.engine.peak_caches,
            "activation_peak_bytes": self.engine.peak_bytes,
            "stop": bool(total[1] > 0),
            "skipped": self.last["skipped"],
            "loss_scale": self.last["loss_scale"],
        }
        return metrics

    # ---- accounting -----------------------------------------------------------------------------
    def memory(self) -> dict:
        """Bytes this rank holds for parameters, gradients, optimizer state (and fp32 master weights),
        and the peak of its activation caches in the last step (0 before the first)."""
        # bf16/fp16 are emulated in float32 arrays: these are the bytes held here, not the format's.
        return {
            "param_bytes": int(self.flat.data.nbytes),
            "grad_bytes": int(self.flat.grad.nbytes),
            "optimizer_bytes": int(self.optimizer.state_bytes()),
            "activation_bytes": int(getattr(self.engine, "peak_bytes", 0)),
        }
