"""Configuration dataclasses and their validation.

Every check happens before the first collective and raises ConfigError with the numbers in the
message, so every rank prints the same clear line and exits with code 2. The meaning of each field is
the command line's (docs/command-line.md); `validate` is the one place that decides whether a whole
configuration can run.
"""

import math
from dataclasses import asdict, dataclass, field

from mpmp.errors import ConfigError

PARTITIONS = ("uniform", "parameters", "time")
RECOMPUTE = ("none", "selective", "full")
DTYPES = ("fp32", "bf16", "fp16")
LOW_PRECISION = ("bf16", "fp16")
# AdamW's decoupled decay multiplies the weights by (1 - lr * wd) each step: typical values are 0 to
# 0.1; beyond 10 it is a typo (the 1e30), not a setting.
MAX_WEIGHT_DECAY = 10.0
SEED_LIMIT = 2**63  # seeds are non-negative int64s (NumPy's generators, the checkpoint's manifest)


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 256
    seq_len: int = 128  # the length of wpe (maximum positions)
    d_model: int = 128
    layers: int = 4
    heads: int = 4

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def units(self) -> int:
        """Pipeline units: the embedding, the L blocks, the head (ln_f + tied output + loss)."""
        return self.layers + 2

    @property
    def block_params(self) -> int:
        """One transformer block: c_attn 3D^2+3D, c_proj D^2+D, c_fc 4D^2+4D, c_proj 4D^2+D, 2 LayerNorms 4D."""
        return 12 * self.d_model**2 + 13 * self.d_model

    def num_params(self, include_wpe=True) -> int:
        d = self.d_model
        n = self.vocab * d + self.layers * self.block_params + 2 * d
        return n + (self.seq_len * d if include_wpe else 0)

    def flops_per_token(self, seq_len: int) -> int:
        """6N + 12·L·D·S (N without position embeddings, as in nanoGPT / PaLM's MFU)."""
        return 6 * self.num_params(include_wpe=False) + 12 * self.layers * self.d_model * seq_len

    def validate(self, tp: int = 1):
        for name in ("vocab", "seq_len", "d_model", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ConfigError(f"--heads ({self.heads}) must divide --d-model ({self.d_model})")
        if self.heads % tp:
            raise ConfigError(f"--heads ({self.heads}) must be divisible by --tp ({tp})")
        if (4 * self.d_model) % tp:
            raise ConfigError(f"4*d_model ({4 * self.d_model}) must be divisible by --tp ({tp})")


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    micro_batches: int = 1
    sequence_parallel: bool = False
    partition: str = "uniform"
    zero: int = 0
    bucket_mb: float = 25.0
    recompute: str = "none"
    cp: int = 1  # context parallelism: ranks that split each sequence (ring attention)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp


@dataclass(frozen=True)
class AdamWConfig:
    """torch.optim.AdamW's hyper-parameters (docs/training.md)."""

    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    global_batch: int = 16
    seq_len: int = 128
    steps: int = 150
    lr: float = 3e-3
    min_lr: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0
    seed: int = 1234
    dtype: str = "fp32"

    @property
    def adamw(self) -> AdamWConfig:
        return AdamWConfig(self.beta1, self.beta2, self.eps, self.weight_decay)

    @property
    def precision(self) -> str | None:
        """ "bf16" or "fp16" for mixed precision, None for fp32."""
        return self.dtype if self.dtype in LOW_PRECISION else None

    @property
    def micro_batch(self) -> int:
        """Sequences in one micro-batch of one data-parallel replica."""
        par = self.parallel
        return self.global_batch // (par.dp * par.micro_batches)

    def to_dict(self):
        return asdict(self)


def validate_batch(global_batch: int, dp: int, micro_batches: int, seq_len: int, model: ModelConfig):
    if global_batch < 1:
        raise ConfigError(f"--global-batch must be at least 1, not {global_batch}")
    if micro_batches < 1:
        raise ConfigError(f"--micro-batches must be at least 1, not {micro_batches}")
    if global_batch % (dp * micro_batches):
        raise ConfigError(
            f"--global-batch ({global_batch}) must be divisible by dp*micro-batches "
            f"({dp}*{micro_batches} = {dp * micro_batches})"
        )
    if seq_len < 1:
        raise ConfigError(f"--seq-len must be at least 1, not {seq_len}")
    if seq_len > model.seq_len:
        raise ConfigError(f"--seq-len ({seq_len}) is longer than the position table wpe ({model.seq_len} positions)")


def _one_of(flag: str, value: str, allowed):
    if value not in allowed:
        raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}")


def _validate_context_parallel(seq_len: int, par: ParallelConfig):
    """Each cp rank holds 2 of 2·cp equal chunks of every sequence; under SP its tp ranks then split
    those S/cp positions."""
    if par.cp < 1:
        raise ConfigError(f"--cp must be at least 1, not {par.cp}")
    if par.cp > 1 and seq_len % (2 * par.cp):
        raise ConfigError(
            f"--cp {par.cp} needs --seq-len ({seq_len}) divisible by 2*cp ({2 * par.cp}): the sequence is cut "
            f"into 2*cp equal chunks"
        )
    if par.cp > 1 and par.sequence_parallel and (seq_len // par.cp) % par.tp:
        raise ConfigError(
            f"--sequence-parallel with --cp {par.cp} needs seq-len/cp ({seq_len}/{par.cp} = {seq_len // par.cp}) "
            f"divisible by --tp ({par.tp})"
        )


def validate(cfg: TrainConfig, world_size: int | None = None, *, mpi_tags: bool = True):
    """Every check of a whole configuration that needs no communication; raises ConfigError.
    mpi_tags=False leaves out MPI's tag range (the planner judging software that has no tags)."""
    from mpmp.comm.grid import check_layout
    from mpmp.pipeline import schedules

    par, model = cfg.parallel, cfg.model
    if world_size is not None:
        check_layout(world_size, par.tp, par.pp, par.dp, par.cp)
    model.validate(par.tp)
    validate_batch(cfg.global_batch, par.dp, par.micro_batches, cfg.seq_len, model)
    schedules.validate(par.schedule, par.pp, par.micro_batches, par.virtual_stages)
    if mpi_tags:
        schedules.check_tag_range(par.pp, par.micro_batches, par.virtual_stages)
    _one_of("--partition", par.partition, PARTITIONS)
    validate_knobs(cfg)
    if par.sequence_parallel and cfg.seq_len % par.tp:
        raise ConfigError(f"--sequence-parallel needs --seq-len ({cfg.seq_len}) divisible by --tp ({par.tp})")
    _validate_context_parallel(cfg.seq_len, par)
    if model.units < par.pp * par.virtual_stages:
        raise ConfigError(
            f"{model.layers} layers + embedding + head = {model.units} units cannot fill "
            f"pp*virtual-stages = {par.pp * par.virtual_stages} pipeline stages"
        )
    check_numbers(cfg)


def validate_knobs(cfg: TrainConfig):
    """The named choices that hold whatever the layout: --recompute, --dtype, --lr-schedule, --zero
    (the trainer and the planner check them here alike)."""
    from mpmp.optim.lr import SCHEDULES as LR_SCHEDULES

    _one_of("--recompute", cfg.parallel.recompute, RECOMPUTE)
    _one_of("--dtype", cfg.dtype, DTYPES)
    _one_of("--lr-schedule", cfg.lr_schedule, LR_SCHEDULES)
    if cfg.parallel.zero not in (0, 1):
        raise ConfigError(f"--zero must be 0 or 1, not {cfg.parallel.zero}")


def _numbers(cfg: TrainConfig) -> list:
    """(flag, value, low, high, low_open, high_open) for every real number of a configuration."""
    return [
        ("--lr", cfg.lr, 0.0, None, True, False),
        ("--min-lr", cfg.min_lr, 0.0, cfg.lr, False, False),
        ("--weight-decay", cfg.weight_decay, 0.0, MAX_WEIGHT_DECAY, False, False),
        ("--beta1", cfg.beta1, 0.0, 1.0, False, True),
        ("--beta2", cfg.beta2, 0.0, 1.0, False, True),
        ("eps", cfg.eps, 0.0, None, True, False),
        ("--clip", cfg.clip, 0.0, None, False, False),
        ("--bucket-mb", cfg.parallel.bucket_mb, 0.0, None, True, False),
    ]


def check_range(flag: str, value, low: float, high=None, low_open=False, high_open=False):
    """A finite number between low and high (each end included unless open); ConfigError otherwise."""
    above = value > low if low_open else value >= low
    below = high is None or (value < high if high_open else value <= high)
    if not (math.isfinite(value) and above and below):
        if high is None:
            where = f"{'>' if low_open else '>='} {low:g}"
        else:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{flag} must be a finite number {where}, not {value}")


def check_numbers(cfg: TrainConfig):
    """Every number of the configuration finite and in its range (docs/command-line.md)."""
    for flag, value, low, high, low_open, high_open in _numbers(cfg):
        check_range(flag, value, low, high, low_open, high_open)
    if not 0 <= cfg.seed < SEED_LIMIT:
        raise ConfigError(f"--seed must be in [0, 2**63), not {cfg.seed}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps must be >= 0, not {cfg.warmup_steps}")
    if cfg.steps < 1:
        raise ConfigError(f"--steps must be at least 1, not {cfg.steps}")


def embedding_bytes(model: ModelConfig, tp: int) -> int:
    """What one rank's share of the embedding needs in training: V/tp rows of D float32 values, four
    times (parameter, gradient, AdamW's m and v). A lower bound of a rank's memory, cheap enough to
    check before anything is allocated; the full estimate (blocks, activations) is the planner's."""
    return -(-model.vocab // tp) * model.d_model * 4 * 4


def check_embedding_fits(model: ModelConfig, tp: int, memory_bytes: int, vocab_from: str = ""):
    """Refuse, with the numbers in GiB, an embedding that cannot be allocated on this machine.
    vocab_from: where the vocabulary came from, when the user did not choose it."""
    need = embedding_bytes(model, tp)
    if need > memory_bytes:
        raise ConfigError(
            f"the embedding alone needs {need / 2**30:,.1f} GiB per rank (vocabulary {model.vocab:,} / tp {tp} "
            f"x d-model {model.d_model} x 4 bytes x 4: parameter, gradient, AdamW m and v), but this machine "
            f"has {memory_bytes / 2**30:,.1f} GiB{vocab_from}"
        )
