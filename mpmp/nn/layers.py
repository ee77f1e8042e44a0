"""Layers: they own parameters, never activations.

`forward(x) -> (y, cache)` and `backward(dy, cache, wgrad=None) -> dx`; parameter gradients are
accumulated into `param.grad`. Backward can be split (zero-bubble schedules, arXiv 2401.10241): when a
list is passed as `wgrad`, the weight-gradient GEMMs are appended to it as deferred calls instead of
being run, and `run_weight_grads(wgrad)` performs them later from the same cache.

Each layer takes its kernel module (mpmp.nn.functional, or its CUDA twin on CuPy) once, when it is
built, as `self.F`. Activations may be bf16 bit patterns on CuPy: every arithmetic step on them,
the residual additions included, goes through that module.
"""

from mpmp.backend import xp
from mpmp.comm import ledger
from mpmp.nn.kernels import kernels


class Parameter:
    """A (local shard of a) named model tensor and its gradient.

    name:  the interchange name of the full tensor (docs/interchange.md), e.g. "h.0.attn.c_attn.weight".
    split: how the full tensor is split over tensor-parallel ranks (see parallel.shard), None = replicated.
    decay: whether AdamW's weight decay applies (2-D tensors only).
    """

    __slots__ = ("data", "_grad", "name", "split", "decay", "sequence_parallel", "tied_copy")

    def __init__(self, data, name, split=None, decay=False):
        self.data = data
        self._grad = None  # made on first use: training rebinds it to a view of its flat buffer first
        self.name = name
        self.split = split
        self.decay = decay
        # Set by the model: the gradient is a partial sum over sequence shards (sequence parallelism).
        self.sequence_parallel = False
        # Set by the model: this is the last stage's copy of the tied embedding, synchronised with the
        # first stage's copy and therefore not counted again in the global gradient norm.
        self.tied_copy = False

    @property
    def grad(self):
        """The gradient, accumulated in place: zeros of data's shape until a backward adds to it
        (allocated on first use, so generation, which never asks, holds none)."""
        if self._grad is None:
            self._grad = xp().zeros_like(self.data)
        return self._grad

    @grad.setter
    def grad(self, value):
        self._grad = value

    @property
    def shape(self):
        return self.data.shape

    def __repr__(self):
        return f"Parameter({self.name}, {tuple(self.data.shape)}, split={self.split})"


def defer(wgrad, fn, *args):
    """Run a weight-gradient computation now, or queue it when backward is split (B now, W later)."""
    if wgrad is None:
        fn(*args)
    else:
        wgrad.append((fn, args))


def run_weight_grads(wgrad):
    for fn, args in wgrad:
        fn(*args)
    wgrad.clear()


class LayerNorm:
    def __init__(self, weight: Parameter, bias: Parameter, eps=1e-5):
        self.weight, self.bias, self.eps = weight, bias, eps
        self.F = kernels()

    def parameters(self):
        return [self.weight, self.bias]

    def forward(self, x):
        return self.F.layernorm_forward(x, self.weight.data, self.bias.data, self.eps)

    def backward(self, dy, cache, wgrad=None):
        # LayerNorm's weight gradient is elementwise and cheap: it stays in the B half.
        return self.F.layernorm_backward(dy, cache, self.weight.grad, self.bias.grad)


class Attention:
    """Causal self-attention over the heads this rank owns: c_attn -> split heads -> core -> c_proj.

    c_attn and c_proj are a column- and a row-parallel linear (nn/parallel.py); on a tp group of size 1
    they are the dense layers, so the same block serves one process and any tp. keep_probs=False recomputes the softmax in backward.
    core: None for the dense kernel, or an object with forward(q, k, v) -> (o, cache) and
    backward(do, cache) -> (dq, dk, dv) over the same [B, H, T, hd] (context parallelism's ring,
    nn/ring.RingAttention).
    """

    def __init__(self, c_attn, c_proj, n_heads_local, keep_probs=True, core=None):
        self.c_attn, self.c_proj, self.n_heads = c_attn, c_proj, n_heads_local
        self.keep_probs = keep_probs
        self.core = core
        self.F = kernels()

    def parameters(self):
        return self.c_attn.parameters() + self.c_proj.parameters()

    def forward(self, x):
        F = self.F
        qkv, c_attn_cache = self.c_attn.forward(x)
        q, k, v = F.split_heads(qkv, self.n_heads)
        del qkv
        if self.core is None:
            o, core_cache = F.attention_forward(q, k, v, keep_probs=self.keep_probs)
        else:
            o, core_cache = self.core.forward(q, k, v)
        y, c_proj_cache = self.c_proj.forward(F.merge_heads(o))
        return y, (c_attn_cache, core_cache, c_proj_cache)

    def forward_kv(self, x, kv):
        """Generation: x [B, t, D] holds only the new positions; their keys and values join the layer's
        KV cache `kv` (mpmp/inference/kv_cache.py) and the queries attend over every cached position.
        Returns y (no activation cache: nothing flows backward)."""
        F = self.F
        qkv, _ = self.c_attn.forward(x)
        q, k, v = F.split_heads(qkv, self.n_heads)
        del qkv
        k_all, v_all = kv.append(k, v)
        o = F.attention_forward_kv(q, k_all, v_all)
        y, _ = self.c_proj.forward(F.merge_heads(o))
        return y

    def backward(self, dy, cache, wgrad=None):
        F = self.F
        c_attn_cache, core_cache, c_proj_cache = cache
        do = self.c_proj.backward(dy, c_proj_cache, wgrad)
        core_backward = F.attention_backward if self.core is None else self.core.backward
        dq, dk, dv = core_backward(F.split_heads_grad(do, self.n_heads), core_cache)
        return self.c_attn.backward(F.merge_heads_qkv(dq, dk, dv), c_attn_cache, wgrad)


class MLP:
    """c_fc -> GELU(tanh) -> c_proj. c_fc's bias is added by the GELU kernel (bias_gelu: one pass
    over the [.., 4D] activation on GPUs instead of two); its gradient is taken there too."""

    def __init__(self, c_fc, c_proj):
        self.c_fc, self.c_proj = c_fc, c_proj
        self.F = kernels()

    def parameters(self):
        return self.c_fc.parameters() + self.c_proj.parameters()

    def forward(self, x):
        h, c_fc_cache = self.c_fc.forward(x, with_bias=False)
        a, gelu_cache = self.F.bias_gelu_forward(h, self.c_fc.bias.data)
        del h
        y, c_proj_cache = self.c_proj.forward(a)
        return y, (c_fc_cache, gelu_cache, c_proj_cache)

    def backward(self, dy, cache, wgrad=None):
        c_fc_cache, gelu_cache, c_proj_cache = cache
        da = self.c_proj.backward(dy, c_proj_cache, wgrad)
        dh = self.F.bias_gelu_backward(da, gelu_cache, self.c_fc.bias.grad)
        return self.c_fc.backward(dh, c_fc_cache, wgrad, with_bias=False)


class Block:
    """GPT-2's pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(.)).

    recompute="full" keeps only the block's input and re-runs the forward (with its communication)
    at the start of backward (activation recomputation, arXiv 1604.06174; Megatron's "full").
    """

    def __init__(self, name, ln_1, attn, ln_2, mlp, recompute="none"):
        self.name = name
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp
        self.recompute = recompute
        self.F = kernels()

    def parameters(self):
        return self.ln_1.parameters() + self.attn.parameters() + self.ln_2.parameters() + self.mlp.parameters()

    def _forward(self, x):
        h, c1 = self.ln_1.forward(x)
        a, c2 = self.attn.forward(h)
        del h
        a = self.F.add_(a, x)  # residual: x + attn(ln_1(x))
        h, c3 = self.ln_2.forward(a)
        m, c4 = self.mlp.forward(h)
        del h
        m = self.F.add_(m, a)  # residual: a + mlp(ln_2(a))
        return m, (c1, c2, c3, c4)

    def forward(self, x, mb=None):
        y, cache = self._forward(x)
        if self.recompute == "full":
            return y, x
        return y, cache

    def forward_kv(self, x, kv):
        """Generation: _forward's block over the new positions x [B, t, D], attention reading and
        extending this block's entry of the KV cache (kv.layer(name)). Returns y."""
        h, _ = self.ln_1.forward(x)
        a = self.attn.forward_kv(h, kv.layer(self.name))
        del h
        a = self.F.add_(a, x)
        h, _ = self.ln_2.forward(a)
        m, _ = self.mlp.forward(h)
        del h
        return self.F.add_(m, a)

    def backward(self, dy, cache, wgrad=None):
        if self.recompute == "full":
            with ledger.get().span("recompute"):
                _, cache = self._forward(cache)
        c1, c2, c3, c4 = cache
        dh = self.mlp.backward(dy, c4, wgrad)
        dx1 = self.F.add_(self.ln_2.backward(dh, c3, wgrad), dy)  # the residual passes dy through
        dh = self.attn.backward(dx1, c2, wgrad)
        return self.F.add_(self.ln_1.backward(dh, c1, wgrad), dx1)
