"""The whole GPT-2 of mpmp.model.gpt on one process: finite differences, PyTorch, recomputation, split
backward.

The model is tiny (2 layers, vocabulary 11, d_model 16) and its parameters are drawn far from GPT-2's
initialisation (non-zero biases, LayerNorm weights away from one, matrices ten times larger), so that
no term of the forward or backward hides behind a zero or a near-uniform softmax.
"""

import zlib

import numpy
import pytest
from helpers import numerical_grad, rel_error

from mpmp.config import ModelConfig
from mpmp.model.gpt import GPT, MicroBatch, param_infos, random_source
from mpmp.nn.layers import run_weight_grads

CFG = ModelConfig(vocab=11, seq_len=8, d_model=16, layers=2, heads=2)
BATCH = 2
FD_STEP = 1e-6
FD_TOL = 1e-6


def spread_source(cfg, seed=0):
    """random_source with every tensor moved away from the degenerate values of GPT-2's init."""
    base = random_source(cfg, seed)
    infos = {p.name: p for p in param_infos(cfg)}

    def source(name):
        rng = numpy.random.default_rng([seed + 1, zlib.crc32(name.encode())])
        a = base(name).astype(numpy.float64)
        noise = rng.standard_normal(a.shape)
        if infos[name].std == -1:  # LayerNorm weights
            a = a + 0.2 * noise
        elif infos[name].std == 0:  # biases
            a = 0.1 * noise
        else:
            a = a * 10
        return a.astype(numpy.float32)

    return source


def make_batch(cfg, batch=BATCH, seq=None, seed=0):
    seq = seq or cfg.seq_len
    rng = numpy.random.default_rng(seed)
    inputs = rng.integers(0, cfg.vocab, size=(batch, seq))
    targets = rng.integers(0, cfg.vocab, size=(batch, seq))
    return MicroBatch(inputs, targets, 1.0 / (batch * seq))


def forward_backward(model, mb):
    """One micro-batch through the model's single chunk; returns the loss, grads in p.grad."""
    model.zero_grad()
    chunk = model.chunks[0]
    loss, caches = chunk.forward(None, mb)
    assert chunk.backward(None, caches) is None
    return loss


def grads(model):
    return {p.name: p.grad.copy() for p in model.parameters()}


# ---------------------------------------------------------------------------------------------
# Finite differences through the whole model
# ---------------------------------------------------------------------------------------------


def test_model_has_every_interchange_tensor():
    model = GPT(CFG, spread_source(CFG), dtype=numpy.float64)
    shapes = {p.name: p.shape for p in model.parameters()}
    assert shapes == {p.name: p.shape for p in param_infos(CFG)}
    assert all(p.data.dtype == numpy.float64 for p in model.parameters())


def test_model_gradients_match_finite_differences():
    """Every entry of every parameter tensor (about 7000 entries, a few seconds)."""
    model = GPT(CFG, spread_source(CFG), dtype=numpy.float64)
    mb = make_batch(CFG, seq=CFG.seq_len - 1)  # shorter than wpe: its last row gets no gradient
    forward_backward(model, mb)

    def loss():
        return model.chunks[0].forward(None, mb)[0]

    failures = []
    for p in model.parameters():
        err = rel_error(p.grad, numerical_grad(loss, p.data, FD_STEP))
        if not err < FD_TOL:
            failures.append(f"{p.name}: relative error {err:.3e}")
    assert not failures, "\n".join(failures)
    wpe = next(p for p in model.parameters() if p.name == "wpe.weight")
    assert not wpe.grad[-1].any()  # the position the batch never reaches


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------


def torch_gpt2_loss(torch, state, cfg, inputs, targets):
    """GPT-2 written directly in PyTorch from interchange tensors ([in, out] weights, y = x @ W + b)."""
    fn = torch.nn.functional
    d, nh = cfg.d_model, cfg.heads
    b, s = inputs.shape
    x = state["wte.weight"][inputs] + state["wpe.weight"][:s]
    for i in range(cfg.layers):

        def t(name, i=i):
            return state[f"h.{i}.{name}"]

        h = fn.layer_norm(x, (d,), t("ln_1.weight"), t("ln_1.bias"), eps=1e-5)
        q, k, v = (h @ t("attn.c_attn.weight") + t("attn.c_attn.bias")).split(d, dim=-1)
        q, k, v = (z.view(b, s, nh, d // nh).transpose(1, 2) for z in (q, k, v))
        o = fn.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(d/nh)
        o = o.transpose(1, 2).reshape(b, s, d)
        x = x + o @ t("attn.c_proj.weight") + t("attn.c_proj.bias")
        h = fn.layer_norm(x, (d,), t("ln_2.weight"), t("ln_2.bias"), eps=1e-5)
        h = fn.gelu(h @ t("mlp.c_fc.weight") + t("mlp.c_fc.bias"), approximate="tanh")
        x = x + h @ t("mlp.c_proj.weight") + t("mlp.c_proj.bias")
    x = fn.layer_norm(x, (d,), state["ln_f.weight"], state["ln_f.bias"], eps=1e-5)
    logits = x @ state["wte.weight"].T  # tied output head
    return fn.cross_entropy(logits.reshape(b * s, -1), targets.reshape(-1))  # mean over b*s targets


def torch_reference(torch, model, cfg, mb, dtype):
    state = {name: torch.tensor(a, dtype=dtype, requires_grad=True) for name, a in model.local_state().items()}
    loss = torch_gpt2_loss(torch, state, cfg, torch.from_numpy(mb.inputs), torch.from_numpy(mb.targets))
    loss.backward()
    return loss.item(), {name: t.grad.numpy() for name, t in state.items()}


@pytest.mark.parametrize(
    "dtype, loss_rtol, grad_rtol, grad_atol",
    [(numpy.float32, 1e-5, 1e-4, 1e-6), (numpy.float64, 1e-12, 1e-9, 1e-13)],
    ids=["float32", "float64"],
)
def test_model_matches_pytorch(dtype, loss_rtol, grad_rtol, grad_atol):
    torch = pytest.importorskip("torch")
    cfg = ModelConfig(vocab=11, seq_len=8, d_model=16, layers=2, heads=2)  # vocab not a power of two
    model = GPT(cfg, spread_source(cfg, seed=3), dtype=dtype)
    mb = make_batch(cfg, batch=3, seed=3)
    loss = forward_backward(model, mb)
    ref_loss, ref_grads = torch_reference(torch, model, cfg, mb, getattr(torch, numpy.dtype(dtype).name))

    assert loss == pytest.approx(ref_loss, rel=loss_rtol)
    assert {p.name for p in model.parameters()} == set(ref_grads)
    for p in model.parameters():
        assert p.grad.dtype == dtype
        numpy.testing.assert_allclose(p.grad, ref_grads[p.name], rtol=grad_rtol, atol=grad_atol, err_msg=p.name)


# ---------------------------------------------------------------------------------------------
# Recomputation and the split backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_gives_identical_gradients(recompute):
    mb = make_batch(CFG, seed=5)
    plain = GPT(CFG, spread_source(CFG), dtype=numpy.float64)
    again = GPT(CFG, spread_source(CFG), recompute=recompute, dtype=numpy.float64)
    assert forward_backward(again, mb) == forward_backward(plain, mb)
    expected = grads(plain)
    for p in again.parameters():
        numpy.testing.assert_array_equal(p.grad, expected[p.name], err_msg=p.name)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_split_backward_gives_identical_gradients(recompute):
    """Zero-bubble B/W split (arXiv 2401.10241): B leaves every weight GEMM queued, W runs them."""
    mb = make_batch(CFG, seed=6)
    whole = GPT(CFG, spread_source(CFG), recompute=recompute, dtype=numpy.float64)
    forward_backward(whole, mb)
    expected = grads(whole)

    split = GPT(CFG, spread_source(CFG), recompute=recompute, dtype=numpy.float64)
    chunk = split.chunks[0]
    _, caches = chunk.forward(None, mb)
    wgrad = []
    assert chunk.backward(None, caches, wgrad=wgrad) is None
    assert wgrad, "the B half queued no weight-gradient work"
    for p in split.parameters():
        if ".ln_" in p.name or p.name.startswith("ln_") or p.name.endswith("mlp.c_fc.bias"):
            # LayerNorm's weight gradient is elementwise and stays in the B half; so does c_fc's bias
            # gradient, a column sum taken by the fused bias + GELU backward.
            numpy.testing.assert_array_equal(p.grad, expected[p.name], err_msg=p.name)
        else:
            assert not p.grad.any(), f"{p.name} has a gradient after the B half alone"
    run_weight_grads(wgrad)
    assert wgrad == []
    for p in split.parameters():
        numpy.testing.assert_array_equal(p.grad, expected[p.name], err_msg=p.name)


def test_chunked_model_gives_the_same_gradients_as_one_chunk():
    """Pipeline stages in one process: chunks handing activations and their gradients along."""
    mb = make_batch(CFG, seed=7)
    whole = GPT(CFG, spread_source(CFG), dtype=numpy.float64)
    loss = forward_backward(whole, mb)
    expected = grads(whole)

    staged = GPT(CFG, spread_source(CFG), ranges=[(0, 2), (2, 3), (3, CFG.units)], dtype=numpy.float64)
    x, caches = None, []
    for chunk in staged.chunks:
        x, c = chunk.forward(x, mb)
        caches.append(c)
    assert x == loss
    dy = None
    for chunk, c in zip(reversed(staged.chunks), reversed(caches)):
        dy = chunk.backward(dy, c)
    assert dy is None
    for p in staged.parameters():
        numpy.testing.assert_array_equal(p.grad, expected[p.name], err_msg=p.name)


def test_gradients_accumulate_over_micro_batches():
    """Two micro-batches, each scaled by 1/(all tokens), sum to the gradient of the whole batch."""
    whole_mb = make_batch(CFG, batch=4, seed=8)
    model = GPT(CFG, spread_source(CFG), dtype=numpy.float64)
    whole_loss = forward_backward(model, whole_mb)
    expected = grads(model)

    model.zero_grad()
    losses = []
    for half in (slice(0, 2), slice(2, 4)):
        mb = MicroBatch(whole_mb.inputs[half], whole_mb.targets[half], whole_mb.loss_scale)
        loss, caches = model.chunks[0].forward(None, mb)
        model.chunks[0].backward(None, caches)
        losses.append(loss)
    assert sum(losses) == pytest.approx(whole_loss, rel=1e-13)
    for p in model.parameters():
        numpy.testing.assert_allclose(p.grad, expected[p.name], rtol=1e-10, atol=1e-14, err_msg=p.name)
