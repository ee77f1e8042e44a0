"""The Trainer: one training step of any layout, assembled from the layers below.

It builds this rank's chunks of the model (partition), the flat parameter/gradient buffers, the
gradient reducer (dp buckets, tied embedding, sequence-parallel sums), the optimizer (replicated or
ZeRO-1) and the pipeline engine with this rank's instruction list, and runs steps in the data order
of docs/data.md. A step reads top-down: `gradients` (the schedule, then the reductions), `update`
(norm, clipping or an fp16 skip, AdamW), then one small all-reduce that gives every rank the loss.
A non-finite loss or gradient norm ends in `diverged` (the reason), decided by every rank alike from
those two all-reduced numbers. `python -m mpmp.train` is a command line around it; tests drive it
directly.

On a GPU (CuPy) the same step never waits for the device until its end: the micro-batches' losses
add up on the device, the norm, the clip coefficient and the overflow flag are computed there and
steer the AdamW kernel (`update_on_device`), and the step's values reach the host together in one
transfer (backend.to_host). Parameters and activations are then held in the 16-bit format of
--dtype (float16, or bf16 bit patterns in uint16), with fp32 master weights and gradients.
"""

import math
import time
from dataclasses import dataclass

import numpy

from mpmp import backend
from mpmp.backend import round_to
from mpmp.checkpoint import TrainingState
from mpmp.comm import ledger
from mpmp.config import TrainConfig, validate
from mpmp.data import context_positions
from mpmp.errors import ConfigError
from mpmp.model.gpt import GPT, param_infos, split_microbatches
from mpmp.optim import clip
from mpmp.optim.buffer import FlatParams
from mpmp.optim.grads import GradReducer
from mpmp.optim.loss_scale import DynamicLossScaler, NoLossScaling
from mpmp.optim.lr import learning_rate
from mpmp.optim.optimizer import Optimizer
from mpmp.pipeline import batching, partition, schedules
from mpmp.pipeline.engine import PipelineEngine

# --dtype -> the array dtype of parameters and activations on a GPU (bf16: bit patterns in uint16)
STORAGE = {"fp32": numpy.float32, "fp16": numpy.float16, "bf16": numpy.uint16}


@dataclass(frozen=True)
class Update:
    """What the optimizer step of one training step did."""

    grad_norm: float  # global, before clipping (with the loss scale divided out)
    lr: float
    clip_coef: float  # 0 when the step was skipped
    skipped: bool  # the gradient norm was not finite (an fp16 overflow, or divergence): no update
    loss_scale: float  # the scale this step's loss was multiplied by


class Trainer:
    def __init__(self, cfg: TrainConfig, grid, data, source, *, unit_costs=None):
        """grid: a ProcessGrid (or LocalGrid) whose sizes match cfg.parallel and whose wire format is
        cfg.precision. data: TokenData. source: name -> full float32 tensor (random_source or an
        interchange file). unit_costs: measured (embed, block, head) seconds for --partition time."""
        validate(cfg, grid.world_size)
        if grid.world_size > 1 and grid.wire != cfg.precision:
            raise ValueError(f"the grid's wire format is {grid.wire}, the configuration's {cfg.precision}")
        self.cfg, self.grid, self.data = cfg, grid, data
        par = cfg.parallel
        self.micro_batch = cfg.micro_batch
        costs = partition.unit_costs(cfg.model, par.partition, unit_costs)
        self.split = partition.balanced_split(costs, par.pp * par.virtual_stages)
        # Mixed precision: parameters and activations in bf16/fp16 (on NumPy emulated: float32 arrays
        # rounded to the format; on a GPU held in it), fp32 master weights, gradients and reductions.
        self.precision = cfg.precision
        self.on_device = backend.name() == "cupy"
        if self.on_device and self.precision and par.cp > 1:
            raise ConfigError(
                f"--cp {par.cp} on --backend cupy needs --dtype fp32, not {cfg.dtype}: ring attention runs "
                "NumPy's blockwise kernels on CuPy arrays, which hold 16-bit values as bit patterns"
            )
        self.storage = numpy.dtype(STORAGE[cfg.dtype] if self.on_device else numpy.float32)
        self.scaler = DynamicLossScaler() if cfg.dtype == "fp16" else NoLossScaling()
        self.model = GPT(
            cfg.model,
            source,
            ranges=partition.stage_ranges(self.split, par.pp, grid.stage, par.virtual_stages),
            group=grid.tp_group,
            sp=par.sequence_parallel,
            recompute=par.recompute,
            precision=None if self.on_device else self.precision,
            cp_group=grid.cp_group,
        )
        self.flat, self.reducer = self._gradient_buffers()
        self.optimizer = Optimizer(
            self.flat,
            cfg.adamw,
            dp_group=grid.dp_cp_group,  # cp ranks hold the same weights: ZeRO-1 shards over dp x cp
            norm_groups=[grid.mp_group],
            zero=par.zero == 1,
            precision=self.precision,
        )
        if self.precision and self.on_device:  # after the fp32 masters were copied
            from mpmp.nn.cuda.elementwise import cast

            self.flat.hold_in(self.storage, cast)
        elif self.precision:
            round_to(self.flat.data, self.precision)
        programs = schedules.build_all(par.schedule, par.pp, par.micro_batches, par.virtual_stages)
        schedules.check(programs, par.pp, par.micro_batches, par.virtual_stages)
        if grid.pp_group.batched_p2p:  # NCCL: transfers in batches that complete together
            programs = batching.plan(programs, par.pp)
        self.program = programs[grid.stage]
        self.engine = self._engine()
        self.step = 0

    def _gradient_buffers(self):
        """The flat buffers and their reducer. The tied embedding (pp > 1) and sequence-parallel
        partial sums go to the late bucket: they need another reduction before the dp one. Under
        context parallelism each cp rank's gradients are its tokens' share: summed over dp x cp."""
        par, grid = self.cfg.parallel, self.grid
        params = self.model.parameters()
        tied = next((p for p in params if p.name == "wte.weight"), None) if par.pp > 1 else None
        sp_params = [p for p in params if p.sequence_parallel]
        late = sp_params + ([tied] if tied is not None else [])
        flat = FlatParams(params, grid.coord.tp, par.dp * par.cp, par.bucket_mb * 2**20, late)
        reducer = GradReducer(
            flat,
            dp_group=grid.dp_cp_group,
            tp_group=grid.tp_group,
            embed_group=grid.embed_group,
            zero=par.zero == 1,
            tied=tied,
            sp_params=sp_params,
            modules=[m for c in self.model.chunks for m in c.modules],
        )
        return flat, reducer

    def _engine(self) -> PipelineEngine:
        cfg, par, grid = self.cfg, self.cfg.parallel, self.grid
        s_local = cfg.seq_len // par.cp  # context parallelism splits the sequence first, then SP within
        s_local = s_local // par.tp if par.sequence_parallel else s_local
        return PipelineEngine(
            self.model,
            grid.pp_group,
            pp=par.pp,
            stage=grid.stage,
            neighbours=(grid.prev_stage, grid.next_stage),
            virtual_stages=par.virtual_stages,
            act_shape=(self.micro_batch, s_local, cfg.model.d_model),
            act_dtype=self.storage,
            on_grads_final=self.reducer.module_done,
            param_buffers=(self.flat.data,),
        )

    # ---- one step -----------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        c = self.cfg
        return learning_rate(step, c.lr, c.lr_schedule, c.warmup_steps, c.steps, c.min_lr)

    def microbatches(self, step: int):
        """This replica's micro-batches of step `step` (0-based), with the loss scale folded in."""
        cfg, par = self.cfg, self.cfg.parallel
        inputs, targets = self.data.replica_batch(step, cfg.global_batch, self.grid.coord.dp, par.dp)
        xp = backend.xp()
        positions = None
        if par.cp > 1:  # this cp rank's positions of every sequence (docs/data.md)
            positions = context_positions(cfg.seq_len, self.grid.coord.cp, par.cp)
            inputs, targets = inputs[:, positions], targets[:, positions]
            positions = xp.asarray(positions)
        # The loss is the mean over the global batch (each cp rank adds its tokens' share); fp16
        # multiplies it by the loss scale S.
        scale = self.scaler.scale / (cfg.global_batch * cfg.seq_len)
        return split_microbatches(xp.asarray(inputs), xp.asarray(targets), par.micro_batches, scale, positions)

    def gradients(self, step: int) -> float:
        """Run the schedule on step `step`'s data and finish every gradient reduction. Returns this
        rank's share of the (loss-scaled) loss: non-zero on the last stage only."""
        mbs = self.microbatches(step)
        self.flat.zero_grad()
        loss = self.engine.run(self.program, mbs)
        self.reducer.finish()
        return loss

    def update(self, step: int) -> Update:
        """Global norm, then clip and AdamW; a non-finite norm (an fp16 overflow, or a diverging run)
        skips the update, so the weights and AdamW's state stay finite, and lowers the fp16 loss scale."""
        s = self.scaler.scale
        with ledger.get().span("optimizer"):
            norm = self.optimizer.grad_norm() / s
            lr = self.lr_at(step)
            finite = math.isfinite(norm)
            coef = clip.clip_coefficient(norm, self.cfg.clip) if finite else 0.0
            if finite:  # a skipped step's data is consumed all the same
                self.optimizer.step(lr, coef / s)
            self.scaler.update(self.scaler.overflowed(norm))
        return Update(grad_norm=norm, lr=lr, clip_coef=coef, skipped=not finite, loss_scale=s)

    @property
    def _owns_loss(self) -> bool:
        """Whether this rank's loss counts in the global one: the last stage's tp rank 0 (of each dp
        and cp rank, which hold shares)."""
        return self.grid.is_last_stage and self.grid.coord.tp == 0

    def global_loss(self, local_loss: float, stop_requested: bool = False) -> tuple[float, bool]:
        """One small all-reduce carries the loss (still scaled) to every rank, and whether any rank
        was asked to stop."""
        total = numpy.array([local_loss if self._owns_loss else 0.0, float(stop_requested)])
        self.grid.world.all_reduce(total)
        return float(total[0]), bool(total[1] > 0)

    def divergence(self, loss: float, done: Update) -> str | None:
        """Why the step just run shows the run diverged, or None. Every rank holds the same loss and
        norm (both all-reduced), so every rank decides alike; only then the ranks look up, with one
        more small all-reduce, the first parameter whose gradient is not finite."""
        if self.cfg.dtype == "fp16" and done.skipped:
            if not self.scaler.gave_up:
                return None  # an overflow: skipped, the scale lowered, as loss scaling does
            why = (
                f"gradient norm {done.grad_norm:.6g}: fp16 overflowed in {self.scaler.floor_overflows} steps in a "
                f"row with the loss scale at its floor ({self.scaler.minimum:g})"
            )
        elif math.isfinite(loss) and math.isfinite(done.grad_norm):
            return None
        else:
            why = f"loss {loss:.6g}, gradient norm {done.grad_norm:.6g}"
        name = self.first_non_finite_gradient()
        return why + (f", first non-finite gradient in {name}" if name else "")

    def first_non_finite_gradient(self) -> str | None:
        """The interchange name of the first parameter (in model order) whose gradient holds inf or
        NaN on any rank. Collective: a local scan, then one all-reduce of an index."""
        names = [info.name for info in param_infos(self.cfg.model)]
        order = {name: i for i, name in enumerate(names)}
        xp = backend.xp()
        bad = [order[p.name] for p in self.model.parameters() if not bool(xp.isfinite(p.grad).all())]
        first = numpy.array([min(bad, default=len(names))], dtype=numpy.float64)
        self.grid.world.all_reduce(first, op="min")
        return names[int(first[0])] if first[0] < len(names) else None

    def train_step(self, stop_requested: bool = False) -> dict:
        """Run step self.step; returns its metrics (the same on every rank). stop_requested: this rank
        was asked to stop (a preemption signal); metrics["stop"] says whether any rank was, and
        metrics["diverged"] why the run cannot go on (None while it can)."""
        led = ledger.get()
        t0, comm0 = time.perf_counter(), led.comm_seconds()
        with led.span(f"step {self.step + 1}", "step"):
            local = self.gradients(self.step)
            if self.on_device:
                done, loss, stop = self.update_on_device(self.step, local, stop_requested)
            else:
                done = self.update(self.step)
                loss, stop = self.global_loss(local, stop_requested)
            backend.synchronize()
        dt = time.perf_counter() - t0
        self.step += 1
        loss /= done.loss_scale
        return {
            "step": self.step,
            "loss": loss,
            "grad_norm": done.grad_norm,
            "lr": done.lr,
            "step_s": dt,
            "tokens_per_s": self.cfg.global_batch * self.cfg.seq_len / dt,
            "comm_s": led.comm_seconds() - comm0,
            "peak_caches": self.engine.peak_caches,
            "activation_peak_bytes": self.engine.peak_bytes,
            "stop": stop,
            "skipped": done.skipped,
            "loss_scale": done.loss_scale,
            "diverged": self.divergence(loss, done),
        }

    # ---- the end of a step on a GPU, without waiting for it ------------------------------------------
    def update_on_device(self, step: int, local_loss, stop_requested: bool):
        """update and global_loss as the device does them: norm, clip coefficient and overflow flag
        stay on the device and drive the AdamW kernel (a skipped fp16 step is vetoed there); then
        the loss sum, the stop flag, the overflow flag and the squared norm come to the host in one
        transfer. Returns (Update, loss still scaled, stop)."""
        xp, s = backend.xp(), self.scaler.scale
        with ledger.get().span("optimizer"):
            sq = self.optimizer.device_sq_norm()
            overflow = ~xp.isfinite(sq)  # a non-finite norm (fp16 overflow, divergence) vetoes the update
            lr = self.lr_at(step)
            self.optimizer.step(lr, _device_grad_scale(sq, s, self.cfg.clip), skip=overflow.astype(xp.int32))
        totals = self._device_totals(local_loss, stop_requested)
        loss, stop, skipped, sq = (float(v) for v in backend.to_host(xp.concatenate([totals, overflow, sq])))
        skipped = skipped > 0
        if skipped:
            self.optimizer.undo_step()
        self.scaler.update(skipped)
        norm = math.sqrt(sq) / s
        coef = 0.0 if skipped else clip.clip_coefficient(norm, self.cfg.clip)
        return Update(grad_norm=norm, lr=lr, clip_coef=coef, skipped=skipped, loss_scale=s), loss, stop > 0

    def _device_totals(self, local_loss, stop_requested: bool):
        """[loss, stop] summed over every rank on the device: over the model-parallel group (one
        replica), then over data parallelism. The loss counts once, from the last stage's tp rank 0."""
        totals = backend.xp().zeros(2, dtype=numpy.float64)
        if self._owns_loss:
            totals[0] = local_loss
        totals[1] = float(stop_requested)
        for group in (self.grid.mp_group, self.grid.dp_cp_group):  # cp ranks hold shares of the loss too
            group.all_reduce(totals, exact=True)
        return totals

    # ---- state and accounting --------------------------------------------------------------------
    def state(self) -> TrainingState:
        """The named parts a checkpoint saves."""
        return TrainingState(
            step=self.step,
            cfg=self.cfg,
            grid=self.grid,
            model=self.model,
            optimizer=self.optimizer,
            flat_layout=self.flat.layout(),
            split=self.split,
            data_order=self.data.order,
            data_seed=self.data.seed,
            loss_scaler=self.scaler.state(),
        )

    def load_state(self, step: int, optimizer_vectors: dict, optimizer_step: int, loss_scaler: dict | None):
        """Continue from a checkpoint: the optimizer state as vectors in this rank's flat layout
        (checkpoint.optimizer_vectors), the step, and the fp16 loss scaler's state."""
        self.optimizer.import_state(optimizer_vectors, optimizer_step)
        if loss_scaler:
            self.scaler.load(loss_scaler)
        self.step = step

    def memory(self) -> dict:
        """Bytes this rank holds for parameters, gradients, optimizer state (and fp32 master weights),
        and the peak of its activation caches in the last step (0 before the first)."""
        # The bytes held: with NumPy, bf16/fp16 parameters are emulated in float32 arrays; on a GPU
        # they are held in 16 bits (half the bytes). Gradients, masters and AdamW's state are fp32.
        return {
            "param_bytes": int(self.flat.data.nbytes),
            "grad_bytes": int(self.flat.grad.nbytes),
            "optimizer_bytes": int(self.optimizer.state_bytes()),
            "activation_bytes": int(self.engine.peak_bytes),
        }


def _device_grad_scale(sq, loss_scale: float, max_norm: float):
    """AdamW's gradient factor as a float32 [1] device array: torch's clip coefficient
    min(1, C / (norm + 1e-6)) of norm = sqrt(sq) / loss_scale (1 without clipping), divided by the
    loss scale that the gradients still carry."""
    xp = backend.array_module(sq)
    if max_norm <= 0:
        return xp.full(1, 1.0 / loss_scale, dtype=numpy.float32)
    coef = xp.minimum(1.0, max_norm / (xp.sqrt(sq) / loss_scale + 1e-6))
    return (coef / loss_scale).astype(numpy.float32)
