"""GPT-2 built from the layers, sliceable into pipeline stages, named as the interchange format.

The model is a sequence of L + 2 units: the embedding (unit 0), the L blocks (units 1..L) and the head
(unit L + 1: ln_f, the tied output projection and the loss). A pipeline chunk is a contiguous range of
units. Every parameter is created from a *source* of full interchange tensors (a seeded initialiser or
an .npz file) and then sharded for this rank's tp position, so any layout starts from the same numbers.
"""

import zlib
from dataclasses import dataclass

import numpy

from mpmp.backend import round_to, xp
from mpmp.comm import ledger
from mpmp.comm.group import SelfGroup
from mpmp.config import ModelConfig
from mpmp.nn import layers as L
from mpmp.nn import parallel as P
from mpmp.nn.kernels import kernels
from mpmp.nn.ring import RingAttention


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple
    split: str | None  # see parallel.shard
    decay: bool  # AdamW weight decay: 2-D tensors only
    std: float  # initialisation: normal(0, std); 0 = zeros; -1 = ones


def param_infos(cfg: ModelConfig) -> list[ParamInfo]:
    """Every tensor of the interchange format, in forward order. GPT-2's initialisation: N(0, 0.02),
    residual projections scaled by 1/sqrt(2L), position table N(0, 0.01), LayerNorm (1, 0)."""
    v, s, d = cfg.vocab, cfg.seq_len, cfg.d_model
    proj_std = 0.02 / (2 * cfg.layers) ** 0.5
    out = [
        ParamInfo("wte.weight", (v, d), "vocab", True, 0.02),
        ParamInfo("wpe.weight", (s, d), None, True, 0.01),
    ]
    for i in range(cfg.layers):
        h = f"h.{i}."
        out += [
            ParamInfo(h + "ln_1.weight", (d,), None, False, -1),
            ParamInfo(h + "ln_1.bias", (d,), None, False, 0),
            ParamInfo(h + "attn.c_attn.weight", (d, 3 * d), "qkv", True, 0.02),
            ParamInfo(h + "attn.c_attn.bias", (3 * d,), "qkv", False, 0),
            ParamInfo(h + "attn.c_proj.weight", (d, d), "row", True, proj_std),
            ParamInfo(h + "attn.c_proj.bias", (d,), None, False, 0),
            ParamInfo(h + "ln_2.weight", (d,), None, False, -1),
            ParamInfo(h + "ln_2.bias", (d,), None, False, 0),
            ParamInfo(h + "mlp.c_fc.weight", (d, 4 * d), "col", True, 0.02),
            ParamInfo(h + "mlp.c_fc.bias", (4 * d,), "col", False, 0),
            ParamInfo(h + "mlp.c_proj.weight", (4 * d, d), "row", True, proj_std),
            ParamInfo(h + "mlp.c_proj.bias", (d,), None, False, 0),
        ]
    out += [ParamInfo("ln_f.weight", (d,), None, False, -1), ParamInfo("ln_f.bias", (d,), None, False, 0)]
    return out


def random_source(cfg: ModelConfig, seed: int):
    """Full float32 tensors from GPT-2's initialisation; each tensor's stream depends only on (seed,
    name), so every rank of every layout draws the same numbers."""
    infos = {p.name: p for p in param_infos(cfg)}

    def source(name):
        p = infos[name]
        if p.std == 0:
            return numpy.zeros(p.shape, numpy.float32)
        if p.std == -1:
            return numpy.ones(p.shape, numpy.float32)
        rng = numpy.random.default_rng([seed, zlib.crc32(name.encode())])
        return (rng.standard_normal(p.shape, dtype=numpy.float32) * numpy.float32(p.std)).astype(numpy.float32)

    return source


def unit_names(cfg: ModelConfig) -> list[str]:
    return ["embed"] + [f"h.{i}" for i in range(cfg.layers)] + ["head"]


def unit_params(cfg: ModelConfig, unit: int) -> list[str]:
    """Interchange names used by a unit (the head uses the tied wte)."""
    if unit == 0:
        return ["wte.weight", "wpe.weight"]
    if unit == cfg.layers + 1:
        return ["wte.weight", "ln_f.weight", "ln_f.bias"]
    return [p.name for p in param_infos(cfg) if p.name.startswith(f"h.{unit - 1}.")]


@dataclass
class MicroBatch:
    inputs: object  # [b, S] token ids (first stage); [b, S/cp] under context parallelism
    targets: object  # [b, S] token ids (last stage); [b, S/cp] under context parallelism
    loss_scale: float  # 1 / (tokens in the global batch): the loss is the global mean
    positions: object = None  # context parallelism: this rank's positions (data.context_positions)


class Embedding:
    """Unit 0: token embedding (vocab-parallel) plus learned positions."""

    name = "embed"

    def __init__(self, wte, wpe, group, sp):
        self.tok = P.VocabParallelEmbedding(wte, group, sp)
        self.wpe, self.group, self.sp = wpe, group, sp
        self.F = kernels()

    def parameters(self):
        return [self.tok.weight, self.wpe]

    def _positions(self, seq):
        if not self.sp:
            return 0, seq
        k = seq // self.group.size
        return self.group.rank * k, (self.group.rank + 1) * k

    def forward(self, x, mb):
        ids = mb.inputs
        out, cache = self.tok.forward(ids)
        lo, hi = self._positions(ids.shape[1])
        # context parallelism: this rank's tokens sit at mb.positions of the sequence (distinct rows)
        rows = slice(lo, hi) if mb.positions is None else mb.positions[lo:hi]
        # + wpe[rows] for every sequence: a bias over the flattened [positions x D] of each one
        b = out.shape[0]
        out = self.F.bias_add_(out.reshape(b, -1), self.wpe.data[rows].reshape(-1)).reshape(out.shape)
        return out, (cache, rows)

    def forward_kv(self, ids, kv):
        """Generation: ids [B, t] are the next t tokens, at positions kv.length ... kv.length + t - 1."""
        out, _ = self.tok.forward(ids)
        positions = self.wpe.data[kv.length : kv.length + ids.shape[1]].reshape(-1)
        return self.F.bias_add_(out.reshape(out.shape[0], -1), positions).reshape(out.shape)

    def backward(self, dy, cache, wgrad=None):
        tok_cache, rows = cache
        L.defer(wgrad, _position_grads, self.F, self.wpe.grad, rows, dy)
        self.tok.backward(dy, tok_cache, wgrad)
        return None


def _position_grads(F, grad, rows, dy):
    """wpe[rows]'s gradient is dy summed over the sequences: the bias gradient of the forward's view.
    Rows that context parallelism gathers (an index array, no view) collect it in a scratch first."""
    dy = dy.reshape(dy.shape[0], -1)
    if isinstance(rows, slice):
        F.bias_backward(dy, grad[rows].reshape(-1))
        return
    scratch = xp().zeros(dy.shape[1], dtype=grad.dtype)
    F.bias_backward(dy, scratch)
    grad[rows] += scratch.reshape(-1, grad.shape[1])


class Head:
    """Unit L+1: ln_f, logits against the tied (vocab-parallel) wte, and the cross-entropy."""

    name = "head"

    def __init__(self, ln_f, wte, group, sp, vocab):
        self.ln_f = ln_f
        self.lm = P.ColumnParallelLinear(wte, None, group, sp, transpose=True)
        self.group = group
        self.F = kernels()
        v_local = wte.data.shape[0]
        self.vocab_start = group.rank * v_local
        self.vocab_valid = max(0, min(v_local, vocab - self.vocab_start))

    def parameters(self):
        return self.ln_f.parameters() + [self.lm.weight]

    def forward(self, x, mb):
        h, c1 = self.ln_f.forward(x)
        logits, c2 = self.lm.forward(h)
        del h
        b, s, v = logits.shape
        loss, c3 = P.vocab_parallel_cross_entropy(
            logits.reshape(b * s, v),
            mb.targets,
            mb.loss_scale,
            self.group,
            vocab_start=self.vocab_start,
            vocab_valid=self.vocab_valid,
            F=self.F,
        )
        return loss, (c1, c2, c3, (b, s, v))

    def forward_kv(self, x, kv):
        """Generation: the logits of each sequence's last position [B, V/tp] over this rank's vocabulary
        columns; padding columns (a vocabulary padded to a multiple of tp) are -inf."""
        h, _ = self.ln_f.forward(x[:, -1:])  # only the last position predicts the next token
        logits, _ = self.lm.forward(h)
        logits = logits[:, 0]
        if self.vocab_valid < logits.shape[1]:
            logits[:, self.vocab_valid :] = -xp().inf
        return logits

    def backward(self, dy, cache, wgrad=None):
        c1, c2, c3, shape = cache
        dlogits = self.F.cross_entropy_backward(c3).reshape(shape)
        dh = self.lm.backward(dlogits, c2, wgrad)
        return self.ln_f.backward(dh, c1, wgrad)


class Chunk:
    """A contiguous range of units [start, end) held by one rank: one pipeline (virtual) stage."""

    def __init__(self, modules, start, end, n_units, precision=None):
        self.modules, self.start, self.end = modules, start, end
        self.is_first = start == 0
        self.is_last = end == n_units
        # "bf16"/"fp16": activations and their gradients are stored in that format between modules
        self.precision = precision

    def parameters(self):
        return _unique(p for m in self.modules for p in m.parameters())

    def forward(self, x, mb):
        """x: the previous chunk's activation (None on the first chunk). Returns (y, caches); y is the
        loss on the last chunk (a float; a 0-d device array on GPUs, summed there)."""
        led = ledger.get()
        caches = []
        for m in self.modules:
            with led.scope(m.name):
                x, c = m.forward(x, mb)
            if self.precision and not isinstance(m, Head):
                round_to(x, self.precision)
            caches.append(c)
        return x, caches

    def forward_kv(self, x, kv):
        """Generation with a KV cache (mpmp/inference): x is token ids [B, t] on the first chunk, else
        the previous chunk's activation [B, t, D] of the t new positions. Returns the activation for
        the next chunk, or on the last chunk the last position's logits [B, V/tp]."""
        led = ledger.get()
        t = x.shape[1]
        for m in self.modules:
            with led.scope(m.name):
                x = m.forward_kv(x, kv)
        kv.advance(t)
        return x

    def backward(self, dy, caches, wgrad=None, on_module_done=None):
        """dy: gradient of the chunk's output (None on the last chunk). Returns the input gradient.
        on_module_done(module) is called as each module's backward finishes."""
        led = ledger.get()
        for m, c in zip(reversed(self.modules), reversed(caches)):
            with led.scope(m.name):
                dy = m.backward(dy, c, wgrad)
            if self.precision and dy is not None:
                round_to(dy, self.precision)
            if on_module_done is not None:
                on_module_done(m)
        return dy


class ParamStore:
    """Creates each parameter once per rank, from the source, sharded for this tp rank."""

    def __init__(self, cfg: ModelConfig, source, group, dtype=numpy.float32):
        self.cfg, self.source, self.group, self.dtype = cfg, source, group, dtype
        self.infos = {p.name: p for p in param_infos(cfg)}
        self.params: dict[str, L.Parameter] = {}

    def __getitem__(self, name) -> L.Parameter:
        if name not in self.params:
            info = self.infos[name]
            local = P.shard(
                numpy.asarray(self.source(name), dtype=numpy.float32),
                info.split,
                self.group.rank,
                self.group.size,
            )
            data = xp().asarray(local.astype(self.dtype))
            self.params[name] = L.Parameter(data, name, split=info.split, decay=info.decay)
        return self.params[name]


def build_block(i, store, group, sp, recompute, cp_group=None):
    h = f"h.{i}."
    heads_local = store.cfg.heads // group.size
    keep_probs = recompute != "selective"
    attn = L.Attention(
        P.ColumnParallelLinear(store[h + "attn.c_attn.weight"], store[h + "attn.c_attn.bias"], group, sp),
        P.RowParallelLinear(store[h + "attn.c_proj.weight"], store[h + "attn.c_proj.bias"], group, sp),
        heads_local,
        keep_probs=keep_probs,
        core=RingAttention(cp_group, keep_probs) if cp_group is not None and cp_group.size > 1 else None,
    )
    mlp = L.MLP(
        P.ColumnParallelLinear(store[h + "mlp.c_fc.weight"], store[h + "mlp.c_fc.bias"], group, sp),
        P.RowParallelLinear(store[h + "mlp.c_proj.weight"], store[h + "mlp.c_proj.bias"], group, sp),
    )
    ln_1 = L.LayerNorm(store[h + "ln_1.weight"], store[h + "ln_1.bias"])
    ln_2 = L.LayerNorm(store[h + "ln_2.weight"], store[h + "ln_2.bias"])
    return L.Block(f"h.{i}", ln_1, attn, ln_2, mlp, recompute="full" if recompute == "full" else "none")


class GPT:
    """The chunks of GPT-2 that one rank holds.

    ranges: [(start, end)] unit ranges of this rank's chunks, in execution order (one per virtual
    stage). group: the tp group (a SelfGroup for one process). sp: sequence parallelism.
    recompute: none | selective | full. dtype: float32 (float64 for finite-difference tests).
    precision: None, or "bf16"/"fp16" for activations rounded to that format between modules (NumPy's
    emulation; on a GPU the arrays are held in the format and precision stays None).
    cp_group: the context-parallel group; of size > 1, attention is ring attention over it and each
    micro-batch holds this rank's positions of its sequences.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        source,
        *,
        ranges=None,
        group=None,
        sp=False,
        recompute="none",
        dtype=numpy.float32,
        precision=None,
        cp_group=None,
    ):
        self.cfg = cfg
        group = group or SelfGroup("tp")
        self.group, self.sp = group, sp
        ranges = ranges or [(0, cfg.units)]
        store = ParamStore(cfg, source, group, dtype)
        self.chunks = []
        for start, end in ranges:
            modules = []
            for u in range(start, end):
                if u == 0:
                    modules.append(Embedding(store["wte.weight"], store["wpe.weight"], group, sp))
                elif u == cfg.units - 1:
                    ln_f = L.LayerNorm(store["ln_f.weight"], store["ln_f.bias"])
                    modules.append(Head(ln_f, store["wte.weight"], group, sp, cfg.vocab))
                else:
                    modules.append(build_block(u - 1, store, group, sp, recompute, cp_group))
            self.chunks.append(Chunk(modules, start, end, cfg.units, precision))
        holds_embed = any(c.is_first for c in self.chunks)
        if not holds_embed and any(c.is_last for c in self.chunks):
            store["wte.weight"].tied_copy = True
        for p in store.params.values():
            # Under SP these replicated tensors see only this rank's sequence shard: partial grads.
            p.sequence_parallel = sp and p.split is None and group.size > 1

    def parameters(self) -> list[L.Parameter]:
        return _unique(p for c in self.chunks for p in c.parameters())

    def zero_grad(self):
        for p in self.parameters():
            p.grad[...] = 0

    def local_state(self) -> dict:
        """{interchange name: this rank's shard} as host arrays; parameters held in 16 bits on a GPU
        come out as float32 (the interchange format's type)."""
        from mpmp.backend import is_device_array, to_numpy

        def host(a):
            if is_device_array(a) and a.dtype != numpy.float32:
                from mpmp.nn.cuda.elementwise import cast

                a = cast(a, numpy.float32)
            return to_numpy(a)

        return {p.name: host(p.data) for p in self.parameters()}


def _unique(params):
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def split_microbatches(inputs, targets, m, loss_scale, positions=None):
    """A replica's [b*m, S] share of the batch -> m consecutive MicroBatches (positions: a cp rank's)."""
    b = inputs.shape[0] // m
    return [
        MicroBatch(inputs[i * b : (i + 1) * b], targets[i * b : (i + 1) * b], loss_scale, positions) for i in range(m)
    ]
