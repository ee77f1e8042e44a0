"""AdamW, clipping, learning-rate schedules and the flat-buffer optimizer (docs/training.md).

The references are written here in plain Python floats (float64) from torch.optim.AdamW's documented
algorithm and torch.nn.utils.clip_grad_norm_'s rule, not by calling mpmp's own functions.
"""

import math

import numpy
import pytest

from mpmp.comm.group import SelfGroup
from mpmp.config import AdamWConfig, ModelConfig
from mpmp.errors import ConfigError
from mpmp.model.gpt import GPT, random_source
from mpmp.nn.layers import Parameter
from mpmp.optim.adamw import AdamW, adamw_update, runs
from mpmp.optim.buffer import FlatParams
from mpmp.optim.clip import clip_coefficient, local_sq_norm
from mpmp.optim.lr import learning_rate
from mpmp.optim.optimizer import Optimizer

TINY = ModelConfig(vocab=64, seq_len=16, d_model=16, layers=2, heads=2)


def torch_adamw_reference(theta, grads, lr, betas, eps, weight_decay, decay):
    """torch.optim.AdamW's documented algorithm (amsgrad off, maximize off), one element at a time:

    theta <- theta - lr * wd * theta            (decoupled decay, where `decay`)
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    m_hat <- m / (1 - beta1^t),  v_hat <- v / (1 - beta2^t)
    theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)
    """
    b1, b2 = betas
    theta = [float(x) for x in theta]
    m = [0.0] * len(theta)
    v = [0.0] * len(theta)
    history = []
    for t, g in enumerate(grads, start=1):
        for i in range(len(theta)):
            if decay[i]:
                theta[i] = theta[i] - lr * weight_decay * theta[i]
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            theta[i] = theta[i] - lr * m_hat / (math.sqrt(v_hat) + eps)
        history.append(list(theta))
    return history


THETA0 = [1.0, -2.0, 0.5, 0.25]
GRADS = [[0.1, -0.2, 0.0, 3.0], [-0.05, 0.4, 0.02, 3.0]]
MASK = [1, 0, 1, 0]


def run_adamw(dtype, lr=0.1, betas=(0.9, 0.95), eps=1e-8, wd=0.1, mask=MASK):
    param = numpy.array(THETA0, dtype=dtype)
    opt = AdamW(param, numpy.array(mask, dtype=dtype), AdamWConfig(*betas, eps=eps, weight_decay=wd))
    out = []
    for g in GRADS:
        opt.step(numpy.array(g, dtype=dtype), lr)
        out.append(param.copy())
    return out


def test_adamw_two_steps_match_torch_formula_in_float64():
    got = run_adamw(numpy.float64)
    want = torch_adamw_reference(THETA0, GRADS, 0.1, (0.9, 0.95), 1e-8, 0.1, MASK)
    for g, w in zip(got, want):
        numpy.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-15)


def test_adamw_two_steps_hand_values():
    # The reference's numbers, written out: the first step moves every element with a nonzero
    # gradient by about lr (m_hat / sqrt(v_hat) = sign(g)), after decay of the masked elements.
    got = run_adamw(numpy.float64)
    # Step 1: theta*(1 - 0.01) where decayed, then -0.1*sign(g) (g = 0 leaves it: 0/(0+eps)).
    numpy.testing.assert_allclose(got[0], [0.99 - 0.1, -2.0 + 0.1, 0.495, 0.25 - 0.1], rtol=0, atol=1e-7)
    # Step 1, element 0: m = 0.01, v = 0.0005, m_hat = 0.1, v_hat = 0.01.
    t1 = 0.99 - 0.1 * 0.1 / (0.1 + 1e-8)
    assert got[0][0] == pytest.approx(t1, rel=1e-14)
    # Step 2, element 0: m = 0.9*0.01 + 0.1*(-0.05) = 0.004, v = 0.95*0.0005 + 0.05*0.0025 = 0.0006;
    # m_hat = 0.004/0.19, v_hat = 0.0006/0.0975; theta = t1*0.99 - 0.1*m_hat/(sqrt(v_hat)+1e-8).
    e0 = t1 * 0.99 - 0.1 * (0.004 / 0.19) / (math.sqrt(0.0006 / 0.0975) + 1e-8)
    # Element 3 (no decay), constant gradient 3: m_hat = 3, v_hat = 9, a step of lr*3/(3+eps) each.
    e3 = 0.25 - 2 * 0.1 * 3 / (3 + 1e-8)
    assert got[1][0] == pytest.approx(e0, rel=1e-13)
    assert got[1][3] == pytest.approx(e3, rel=1e-13)
    assert got[1][0] == pytest.approx(0.85426307, abs=1e-8)
    assert got[1][3] == pytest.approx(0.05, abs=1e-8)


def test_adamw_float32_matches_the_float64_reference():
    got = run_adamw(numpy.float32)
    want = torch_adamw_reference(THETA0, GRADS, 0.1, (0.9, 0.95), 1e-8, 0.1, MASK)
    for g, w in zip(got, want):
        assert g.dtype == numpy.float32
        numpy.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-7)


def test_adamw_eps_is_added_after_the_bias_correction():
    # A large eps separates sqrt(v_hat) + eps (torch) from sqrt(v) + eps and other placements.
    got = run_adamw(numpy.float64, eps=0.05, betas=(0.8, 0.9), lr=0.3, wd=0.2)
    want = torch_adamw_reference(THETA0, GRADS, 0.3, (0.8, 0.9), 0.05, 0.2, MASK)
    for g, w in zip(got, want):
        numpy.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-15)


def test_weight_decay_applies_only_where_the_mask_is_one():
    # Zero gradients: only the decoupled decay moves the parameters.
    param = numpy.array([2.0, 2.0, -4.0, -4.0])
    opt = AdamW(param, numpy.array([1, 0, 1, 0]), AdamWConfig(weight_decay=0.5))
    opt.step(numpy.zeros(4), 0.1)
    opt.step(numpy.zeros(4), 0.1)
    numpy.testing.assert_allclose(param, [2.0 * 0.95**2, 2.0, -4.0 * 0.95**2, -4.0], rtol=1e-15)


def test_weight_decay_uses_the_learning_rate_of_each_step():
    param = numpy.array([1.0])
    opt = AdamW(param, numpy.array([1]), AdamWConfig(weight_decay=0.1))
    opt.step(numpy.zeros(1), 0.5)
    opt.step(numpy.zeros(1), 0.2)
    assert param[0] == pytest.approx((1 - 0.05) * (1 - 0.02), rel=1e-15)


def test_adamw_update_counts_steps_from_one():
    # At step 1 the bias correction makes the update exactly lr * g / (|g| + eps).
    param, m, v = numpy.array([0.0]), numpy.zeros(1), numpy.zeros(1)
    adamw_update(param, numpy.array([2.0]), m, v, step=1, lr=0.01, hp=AdamWConfig(0.9, 0.999, 1e-8, 0.0))
    assert param[0] == pytest.approx(-0.01 * 2.0 / (2.0 + 1e-8), rel=1e-14)


@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_adamw_matches_torch(weight_decay):
    torch = pytest.importorskip("torch")
    rng = numpy.random.default_rng(9)
    n = 40
    param = rng.standard_normal(n)
    decay_mask = (rng.random(n) < 0.5).astype(numpy.float64)
    decay_mask[:2] = [1, 0]
    decay = decay_mask == 1
    lrs = [1e-2, 3e-2, 2e-2, 5e-3, 1e-2]  # a changing learning rate, as a schedule gives
    grads_seq = [rng.standard_normal(n) * 10 ** rng.uniform(-3, 1) for _ in lrs]

    ours = AdamW(param.copy(), decay_mask, AdamWConfig(0.9, 0.95, 1e-8, weight_decay))
    p_decay = torch.tensor(param[decay], requires_grad=True)
    p_plain = torch.tensor(param[~decay], requires_grad=True)
    ref = torch.optim.AdamW(
        [
            {"params": [p_decay], "weight_decay": weight_decay},
            {"params": [p_plain], "weight_decay": 0.0},
        ],
        lr=lrs[0],
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    for step, (lr, g) in enumerate(zip(lrs, grads_seq), start=1):
        ours.step(g.copy(), lr)
        for group in ref.param_groups:
            group["lr"] = lr
        p_decay.grad = torch.tensor(g[decay])
        p_plain.grad = torch.tensor(g[~decay])
        ref.step()
        numpy.testing.assert_allclose(ours.param[decay], p_decay.detach().numpy(), rtol=1e-6, err_msg=f"step {step}")
        numpy.testing.assert_allclose(ours.param[~decay], p_plain.detach().numpy(), rtol=1e-6, err_msg=f"step {step}")
    assert ours.step_count == len(lrs)
    assert not numpy.allclose(ours.param, param)  # it did move


# ---------------------------------------------------------------------------------------------
# Which parameters decay and which count in the norm: FlatParams on a real model
# ---------------------------------------------------------------------------------------------


def test_decay_mask_covers_exactly_the_two_dimensional_parameters_of_gpt():
    model = GPT(TINY, random_source(TINY, 0))
    params = model.parameters()
    flat = FlatParams(params)
    decayed, kept = set(), set()
    for p in params:
        off, size = flat.span(p)
        mask = flat.decay_mask[off : off + size]
        assert mask.min() == mask.max(), p.name
        (decayed if mask[0] == 1 else kept).add(p.name)
        assert (mask[0] == 1) == (p.data.ndim == 2), p.name
    assert {"wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.1.mlp.c_proj.weight"} <= decayed
    assert {"h.0.ln_1.weight", "h.0.ln_1.bias", "h.0.attn.c_attn.bias", "ln_f.weight", "ln_f.bias"} <= kept
    assert len(decayed) == 2 + 4 * TINY.layers
    assert len(kept) == 2 + 8 * TINY.layers


def test_flat_params_are_views_of_the_buffer_and_keep_their_values():
    model = GPT(TINY, random_source(TINY, 0))
    before = {name: a.copy() for name, a in model.local_state().items()}
    flat = FlatParams(model.parameters())
    for p in model.parameters():
        numpy.testing.assert_array_equal(p.data, before[p.name])
        off, size = flat.span(p)
        assert numpy.shares_memory(p.data, flat.data[off : off + size])
        assert numpy.shares_memory(p.grad, flat.grad[off : off + size])


def test_norm_mask_counts_replicated_params_on_tp_rank_zero_only():
    model = GPT(TINY, random_source(TINY, 0))
    params = model.parameters()
    for tp_rank in (0, 1, 3):
        flat = FlatParams(params, tp_rank=tp_rank)
        for p in params:
            off, size = flat.span(p)
            mask = flat.norm_mask[off : off + size]
            counted = p.split is not None or tp_rank == 0
            assert (mask == (1 if counted else 0)).all(), (tp_rank, p.name)
    # The replicated tensors of GPT-2 under tp: LayerNorms, row-parallel biases and wpe.
    replicated = {p.name for p in params if p.split is None}
    assert "wpe.weight" in replicated and "h.0.attn.c_proj.bias" in replicated
    assert "h.0.ln_2.weight" in replicated and "ln_f.bias" in replicated
    assert "wte.weight" not in replicated and "h.0.mlp.c_fc.bias" not in replicated


def test_norm_mask_skips_the_tied_copy_of_the_embedding():
    # A last pipeline stage holding only the head: its wte is the tied copy of the first stage's.
    head_only = GPT(TINY, random_source(TINY, 0), ranges=[(TINY.units - 1, TINY.units)])
    params = {p.name: p for p in head_only.parameters()}
    assert params["wte.weight"].tied_copy
    flat = FlatParams(list(params.values()))
    off, size = flat.span(params["wte.weight"])
    assert (flat.norm_mask[off : off + size] == 0).all()
    off, size = flat.span(params["ln_f.weight"])
    assert (flat.norm_mask[off : off + size] == 1).all()
    # The first stage's wte (not a copy) counts.
    whole = GPT(TINY, random_source(TINY, 0))
    wte = next(p for p in whole.parameters() if p.name == "wte.weight")
    assert not wte.tied_copy
    flat = FlatParams(whole.parameters())
    off, size = flat.span(wte)
    assert (flat.norm_mask[off : off + size] == 1).all()


def test_global_norm_counts_only_masked_gradients():
    grads = numpy.array([3.0, 4.0, 12.0, 100.0, 2.0])
    mask = numpy.array([1.0, 1.0, 1.0, 0.0, 1.0])
    assert runs(mask) == [(0, 3), (4, 5)]
    assert local_sq_norm(grads, runs(mask)) == 9 + 16 + 144 + 4


def test_global_norm_of_a_long_float32_vector_is_accurate():
    """Chunked pairwise float32 sums added in float64: relative error far below what clipping needs."""
    g = numpy.random.default_rng(0).standard_normal(1_000_003).astype(numpy.float32)
    exact = float(numpy.dot(g.astype(numpy.float64), g.astype(numpy.float64)))
    assert local_sq_norm(g, [(0, g.size)]) == pytest.approx(exact, rel=1e-6)


def test_optimizer_grad_norm_counts_each_distinct_parameter_once():
    model = GPT(TINY, random_source(TINY, 0))
    params = model.parameters()
    flat = FlatParams(params, tp_rank=1)
    rng = numpy.random.default_rng(0)
    flat.grad[:] = rng.standard_normal(flat.grad.size).astype(flat.grad.dtype)
    want = math.sqrt(sum(float((p.grad.astype(numpy.float64) ** 2).sum()) for p in params if p.split is not None))
    opt = Optimizer(flat, AdamWConfig(), dp_group=SelfGroup("dp"), norm_groups=[SelfGroup("mp")])
    # float32 dot products per chunk: round-off near 1e-8; one parameter counted twice or missed moves
    # the norm by far more than 1e-6
    assert opt.grad_norm() == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Clipping: torch.nn.utils.clip_grad_norm_'s coefficient
# ---------------------------------------------------------------------------------------------


def test_clip_coefficient_is_max_norm_over_norm_plus_1e6():
    assert clip_coefficient(10.0, 1.0) == 1.0 / (10.0 + 1e-6)
    assert clip_coefficient(4.0, 2.0) == 2.0 / (4.0 + 1e-6)
    assert clip_coefficient(1e6, 0.5) == 0.5 / (1e6 + 1e-6)


def test_clip_coefficient_is_capped_at_one():
    assert clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(0.0, 1.0) == 1.0
    # At norm == max_norm torch's rule gives slightly less than 1.
    assert clip_coefficient(1.0, 1.0) == 1.0 / (1.0 + 1e-6)


def test_clip_zero_disables_clipping():
    assert clip_coefficient(1e9, 0.0) == 1.0
    assert clip_coefficient(0.0, 0.0) == 1.0


def test_clip_coefficient_matches_torch_when_available():
    torch = pytest.importorskip("torch")
    for norm_target, max_norm in ((5.0, 1.0), (0.3, 1.0), (2.0, 2.0)):
        g = torch.full((4,), norm_target / 2, dtype=torch.float64)
        p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        p.grad = g.clone()
        total = float(torch.nn.utils.clip_grad_norm_([p], max_norm))
        coef = clip_coefficient(total, max_norm)
        numpy.testing.assert_allclose(p.grad.numpy(), g.numpy() * coef, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------


def test_constant_schedule_is_the_peak_rate_at_every_step():
    for step in (0, 1, 50, 10_000):
        assert learning_rate(step, 3e-3) == 3e-3
        assert learning_rate(step, 3e-3, "constant", warmup=10, total=100) == 3e-3


def test_warmup_rises_linearly_then_holds():
    # lr * (step + 1) / warmup for the first `warmup` steps.
    got = [learning_rate(s, 0.1, "warmup", warmup=4, total=20) for s in range(7)]
    assert got == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1], rel=1e-15)


def test_cosine_decays_from_lr_to_min_lr_after_warmup():
    lr, low = 1.0, 0.1
    at = [learning_rate(s, lr, "cosine", warmup=2, total=12, min_lr=low) for s in range(15)]
    # Warmup: 0.5, 1.0.
    assert at[0] == pytest.approx(0.5, rel=1e-15)
    assert at[1] == pytest.approx(1.0, rel=1e-15)
    # First step after warmup: the peak.
    assert at[2] == pytest.approx(1.0, rel=1e-15)
    # Middle (progress (7-2)/10 = 1/2): halfway between lr and min_lr.
    assert at[7] == pytest.approx(0.55, rel=1e-15)
    # Progress 1/10: 0.1 + 0.45 * (1 + cos(pi/10)) = 0.1 + 0.45 * 1.9510565163 = 0.97797543.
    assert at[3] == pytest.approx(0.9779754323328191, rel=1e-14)
    # Last step of the run (progress 9/10): 0.1 + 0.45 * (1 - 0.9510565163) = 0.12202457.
    assert at[11] == pytest.approx(0.12202456766718093, rel=1e-14)
    # At and past `total`: min_lr.
    assert at[12] == pytest.approx(0.1, rel=1e-15)
    assert at[14] == pytest.approx(0.1, rel=1e-15)
    # Monotone decay after warmup.
    assert all(a >= b for a, b in zip(at[2:], at[3:]))


def test_cosine_without_warmup_starts_at_the_peak():
    assert learning_rate(0, 2e-3, "cosine", warmup=0, total=100) == pytest.approx(2e-3, rel=1e-15)
    assert learning_rate(50, 2e-3, "cosine", warmup=0, total=100) == pytest.approx(1e-3, rel=1e-14)
    assert learning_rate(100, 2e-3, "cosine", warmup=0, total=100) == pytest.approx(0.0, abs=1e-18)


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="linear"):
        learning_rate(0, 1e-3, "linear")


# ---------------------------------------------------------------------------------------------
# The optimizer over the flat buffer
# ---------------------------------------------------------------------------------------------


def small_params():
    w = Parameter(numpy.array([[1.0, -2.0], [0.5, 0.25]], dtype=numpy.float32), "w", split="col", decay=True)
    b = Parameter(numpy.array([0.3, -0.7], dtype=numpy.float32), "b", split=None, decay=False)
    return [w, b]


@pytest.mark.parametrize("zero", [False, True])
def test_optimizer_on_a_self_group_is_plain_adamw_on_the_flat_buffer(zero):
    model = GPT(TINY, random_source(TINY, 0))
    flat = FlatParams(model.parameters())
    hp = AdamWConfig(0.9, 0.95, weight_decay=0.1)
    opt = Optimizer(flat, hp, dp_group=SelfGroup("dp"), norm_groups=[SelfGroup("mp")], zero=zero)
    ref_param = flat.data.copy()
    ref = AdamW(ref_param, flat.decay_mask, hp)
    rng = numpy.random.default_rng(0)
    for step, (lr, scale) in enumerate(((1e-2, 1.0), (5e-3, 0.25), (2e-3, 1.0))):
        flat.grad[:] = rng.standard_normal(flat.grad.size).astype(numpy.float32)
        opt.step(lr, scale)
        ref.step(flat.grad * numpy.float32(scale), lr)
        numpy.testing.assert_array_equal(flat.data, ref_param, err_msg=f"step {step}")
    # The model's parameters are views: they see the update.
    for p in model.parameters():
        off, size = flat.span(p)
        numpy.testing.assert_array_equal(p.data.reshape(-1), flat.data[off : off + size])


def test_optimizer_decays_matrices_not_biases_with_torch_values():
    params = small_params()
    flat = FlatParams(params)
    opt = Optimizer(flat, AdamWConfig(0.9, 0.95, 1e-8, 0.1), dp_group=SelfGroup("dp"), norm_groups=[SelfGroup("mp")])
    grads = {"w": [[0.1, -0.2], [0.0, 3.0]], "b": [0.5, -0.05]}
    grads2 = {"w": [[-0.05, 0.4], [0.02, 3.0]], "b": [0.1, 0.1]}
    w, b = params
    theta0 = w.data.reshape(-1).tolist() + b.data.tolist()
    for g in (grads, grads2):
        w.grad[...] = g["w"]
        b.grad[...] = g["b"]
        opt.step(0.1)
    seq = [sum(grads["w"], []) + grads["b"], sum(grads2["w"], []) + grads2["b"]]
    want = torch_adamw_reference(theta0, seq, 0.1, (0.9, 0.95), 1e-8, 0.1, [1, 1, 1, 1, 0, 0])[-1]
    numpy.testing.assert_allclose(w.data.reshape(-1), want[:4], rtol=2e-6, atol=1e-7)
    numpy.testing.assert_allclose(b.data, want[4:], rtol=2e-6, atol=1e-7)


def test_optimizer_grad_scale_scales_the_gradient():
    # Clipping passes coef as grad_scale: AdamW must see grad * coef (visible once eps matters).
    params = small_params()
    flat = FlatParams(params)
    opt = Optimizer(flat, AdamWConfig(eps=0.1), dp_group=SelfGroup("dp"), norm_groups=[SelfGroup("mp")])
    w, b = params
    theta0 = w.data.reshape(-1).tolist() + b.data.tolist()
    w.grad[...] = [[0.1, -0.2], [0.0, 3.0]]
    b.grad[...] = [0.5, -0.05]
    opt.step(0.1, grad_scale=0.5)
    g = [0.05, -0.1, 0.0, 1.5, 0.25, -0.025]
    want = torch_adamw_reference(theta0, [g], 0.1, (0.9, 0.95), 0.1, 0.0, [0] * 6)[-1]
    numpy.testing.assert_allclose(w.data.reshape(-1), want[:4], rtol=2e-6, atol=1e-7)
    numpy.testing.assert_allclose(b.data, want[4:], rtol=2e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The Trainer's step: norm before clipping, clipped gradients into AdamW
# ---------------------------------------------------------------------------------------------


def one_step_trainer(clip, weight_decay=0.1, lr=1e-2):
    from mpmp.comm.grid import LocalGrid
    from mpmp.config import ParallelConfig, TrainConfig
    from mpmp.data import TokenData, builtin_corpus
    from mpmp.runtime import Trainer

    cfg = TrainConfig(
        model=TINY,
        parallel=ParallelConfig(),
        global_batch=4,
        seq_len=16,
        steps=3,
        lr=lr,
        clip=clip,
        weight_decay=weight_decay,
        eps=1e-3,
    )
    return Trainer(cfg, LocalGrid(), TokenData(builtin_corpus() % TINY.vocab, 16, TINY.vocab), random_source(TINY, 0))


def test_trainer_reports_the_norm_before_clipping_and_steps_with_clipped_grads():
    clipped, free = one_step_trainer(clip=1e-3), one_step_trainer(clip=0.0)
    before = clipped.flat.data.copy()
    m_clipped, m_free = clipped.train_step(), free.train_step()
    # Same weights before step 1: the same gradient, and the reported norm ignores clipping.
    assert m_clipped["grad_norm"] == m_free["grad_norm"]
    norm = math.sqrt(sum(float((p.grad.astype(numpy.float64) ** 2).sum()) for p in clipped.model.parameters()))
    assert m_clipped["grad_norm"] == pytest.approx(norm, rel=1e-6)  # float32 dot products per chunk
    coef = 1e-3 / (norm + 1e-6)
    assert coef < 1
    # The update is AdamW on grad * coef (eps = 1e-3 makes the scale visible in the update).
    ref_param = before.copy()
    ref = AdamW(ref_param, clipped.flat.decay_mask, AdamWConfig(0.9, 0.95, 1e-3, 0.1))
    ref.step(clipped.flat.grad * numpy.float32(coef), 1e-2)
    numpy.testing.assert_allclose(clipped.flat.data, ref_param, rtol=1e-6, atol=1e-9)
    assert not numpy.allclose(clipped.flat.data, free.flat.data, rtol=1e-6, atol=1e-9)
