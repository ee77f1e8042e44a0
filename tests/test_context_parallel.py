"""Context parallelism (--cp): the grid's fourth axis, the load-balanced sequence split, ring attention
(its block kernels against finite differences, the whole ring against the dense kernel in float64, on
a ring simulated by threads), every cp layout training like one process, the ring's traffic in the
ledger, checkpoints that reshard across cp, and the attention term of activation memory."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy
import pytest
from helpers import (
    ThreadRing,
    gather_full,
    make_data,
    numerical_grad,
    random_weights,
    reference_run,
    rel_error,
    train_config,
)

from mpmp.comm import ledger
from mpmp.comm.grid import Coord, check_layout, context_chunks, coord_of, layout_ranks, world_rank
from mpmp.config import ModelConfig, validate
from mpmp.data import context_positions
from mpmp.errors import ConfigError
from mpmp.nn import functional as F
from mpmp.nn import ring as R
from mpmp.pipeline.engine import nbytes

# ---- the grid: tp fastest, then cp, then dp, then pp -----------------------------------------------


@pytest.mark.parametrize("tp,cp,dp,pp", [(1, 2, 1, 1), (2, 2, 2, 1), (1, 4, 2, 1), (2, 2, 1, 2), (3, 2, 2, 2)])
def test_rank_formula_puts_cp_between_tp_and_dp(tp, cp, dp, pp):
    seen = set()
    for r, c in layout_ranks(tp, pp, dp, cp):
        assert world_rank(c, tp, dp, cp) == r
        assert r == c.tp + tp * (c.cp + cp * (c.dp + dp * c.pp))  # Megatron's order
        seen.add((c.tp, c.cp, c.dp, c.pp))
    assert len(seen) == tp * cp * dp * pp
    assert coord_of(tp, tp, dp, cp) == Coord(dp=0, pp=0, tp=0, cp=1)  # after the tp ranks, the next cp rank


@pytest.mark.parametrize("tp,dp,pp", [(2, 2, 2), (4, 2, 1), (1, 8, 1), (3, 2, 2)])
def test_cp_1_keeps_every_rank_where_it_was(tp, dp, pp):
    for r, c in layout_ranks(tp, pp, dp):
        assert c == coord_of(r, tp, dp, 1) and c.cp == 0
        assert (c.tp, c.dp, c.pp) == (r % tp, (r // tp) % dp, r // (tp * dp))


def test_world_size_must_hold_the_cp_ranks():
    assert check_layout(8, 2, 1, cp=2) == 2
    with pytest.raises(ConfigError, match=r"world size \(6\) must be divisible by tp\*pp\*cp \(1\*1\*4 = 4\)"):
        check_layout(6, 1, 1, cp=4)
    with pytest.raises(ConfigError, match="--cp must be at least 1"):
        check_layout(4, 1, 1, cp=0)


# ---- the sequence split ------------------------------------------------------------------------------


def test_rank_r_holds_chunks_r_and_2cp_minus_1_minus_r():
    assert [context_chunks(r, 4) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert context_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert context_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    every = numpy.sort(numpy.concatenate([context_positions(32, r, 4) for r in range(4)]))
    assert every.tolist() == list(range(32))


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_every_cp_rank_does_the_same_attention_work(cp):
    """Under the causal mask query i sees i + 1 keys: each rank's two chunks sum to the same count."""
    s = 16 * cp
    work = [int(sum(p + 1 for p in context_positions(s, r, cp))) for r in range(cp)]
    assert len(set(work)) == 1


CFG = ModelConfig(vocab=37, seq_len=16, d_model=16, layers=2, heads=4)


def test_seq_len_must_split_into_2cp_chunks_with_the_numbers_in_the_message():
    with pytest.raises(ConfigError, match=r"--cp 4 needs --seq-len \(12\) divisible by 2\*cp \(8\)"):
        validate(train_config(replace(CFG, seq_len=12), cp=4, global_batch=8))
    msg = r"--sequence-parallel with --cp 2 needs seq-len/cp \(12/2 = 6\) divisible by --tp \(4\)"
    with pytest.raises(ConfigError, match=msg):
        validate(train_config(replace(CFG, seq_len=12), cp=2, tp=4, sequence_parallel=True, global_batch=8))
    validate(train_config(CFG, cp=4, global_batch=8))  # 16 = 2*4 chunks of 2


# ---- the block kernels: float64 finite differences ---------------------------------------------------


def test_block_mask_follows_the_chunk_order():
    assert F.block_mask(3, 1) == F.FULL
    assert F.block_mask(2, 2) == F.DIAGONAL
    assert F.block_mask(1, 3) is None


@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept", "rebuilt"])
def test_block_kernels_match_finite_differences(keep_probs):
    """One query chunk against an earlier key chunk (full) and its own (diagonal), combined by the
    online softmax; d(sum(out * w)) against central differences in float64."""
    rng = numpy.random.default_rng(0)
    b, h, c, hd = 1, 2, 3, 4
    qs, k0, v0, k1, v1 = (rng.standard_normal((b, h, c, hd)) for _ in range(5))
    w = rng.standard_normal((b, h, c, hd))

    def forward():
        stats, p0, m0 = F.attention_block_forward(qs, k0, v0, None, F.FULL)
        stats, p1, m1 = F.attention_block_forward(qs, k1, v1, stats, F.DIAGONAL)
        out, lse = F.attention_blocks_finish(stats)
        return out, lse, (p0, m0), (p1, m1)

    out, lse, (p0, m0), (p1, m1) = forward()
    delta = F.attention_delta(w, out)
    kept = [F.normalize_block_probs(p, m, lse) if keep_probs else None for p, m in ((p0, m0), (p1, m1))]
    dq0, dk0, dv0 = F.attention_block_backward(w, delta, qs, k0, v0, lse, mask=F.FULL, p=kept[0])
    dq1, dk1, dv1 = F.attention_block_backward(w, delta, qs, k1, v1, lse, mask=F.DIAGONAL, p=kept[1])

    def loss():
        return float((forward()[0] * w).sum())

    for analytic, x in ((dq0 + dq1, qs), (dk0, k0), (dv0, v0), (dk1, k1), (dv1, v1)):
        assert rel_error(analytic, numerical_grad(loss, x)) < 1e-8


# ---- the ring against the dense kernel, on a ring of threads -----------------------------------------


def ring_attention(q, k, v, dout, cp, keep_probs=True):
    """Ring attention over cp simulated ranks, each given its positions of the [B, H, T, hd] inputs;
    (out, dq, dk, dv) put back in sequence order, and each rank's sends."""
    t = q.shape[-2]
    positions = [context_positions(t, r, cp) for r in range(cp)]
    ring = ThreadRing(cp)

    def rank(group):
        pos = positions[group.rank]
        out, cache = R.ring_attention_forward(
            q[..., pos, :], k[..., pos, :], v[..., pos, :], group, keep_probs=keep_probs
        )
        return (out, *R.ring_attention_backward(numpy.ascontiguousarray(dout[..., pos, :]), cache, group))

    results = ring.run(rank)
    full = [numpy.zeros_like(q) for _ in range(4)]
    for pos, parts in zip(positions, results):
        for f, part in zip(full, parts):
            f[..., pos, :] = part
    return full, [m.sent for m in ring.members]


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("heads,hd", [(4, 8), (3, 5)], ids=["4-heads", "3-heads-hd5"])
@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept", "rebuilt"])
def test_ring_attention_equals_the_dense_kernel_in_float64(cp, heads, hd, keep_probs):
    rng = numpy.random.default_rng(cp * 10 + heads)
    q, k, v, dout = (rng.standard_normal((2, heads, 8 * cp, hd)) for _ in range(4))
    out, cache = F.attention_forward(q, k, v)
    want = (out, *F.attention_backward(dout.copy(), cache))
    got, _ = ring_attention(q, k, v, dout, cp, keep_probs)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_error(g, w) < 1e-12, name


def test_ring_attention_backward_matches_finite_differences():
    rng = numpy.random.default_rng(5)
    q, k, v, w = (rng.standard_normal((1, 2, 8, 3)) for _ in range(4))
    (_, dq, dk, dv), _ = ring_attention(q, k, v, w, 2)

    def loss():
        return float((ring_attention(q, k, v, w, 2)[0][0] * w).sum())

    for analytic, x in ((dq, q), (dk, k), (dv, v)):
        assert rel_error(analytic, numerical_grad(loss, x)) < 1e-8


@pytest.mark.parametrize("cp", [2, 4])
def test_each_rank_sends_its_kv_cp_minus_1_times_forward_and_again_with_the_gradients_backward(cp):
    b, h, t, hd = 2, 3, 8 * cp, 4
    rng = numpy.random.default_rng(1)
    q, k, v, dout = (rng.standard_normal((b, h, t, hd)) for _ in range(4))
    _, sent = ring_attention(q, k, v, dout, cp)
    kv_bytes = 2 * b * h * (t // cp) * hd * 8  # K and V of this rank's two chunks, float64
    for rank_sent in sent:
        assert sorted(rank_sent) == [("send", R.KV_TAG, kv_bytes)] * 2 * (cp - 1) + [("send", R.DKV_TAG, kv_bytes)] * (
            cp - 1
        )


def core_cache_bytes(cp, keep_probs, b=2, h=4, s=64, hd=8):
    """Bytes of one rank's attention-core cache (rank 0) for a [b, h, s, hd] float64 problem."""
    rng = numpy.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, h, s, hd)) for _ in range(3))
    if cp == 1:
        return nbytes(F.attention_forward(q, k, v, keep_probs=keep_probs)[1])
    pos = [context_positions(s, r, cp) for r in range(cp)]
    caches = ThreadRing(cp).run(
        lambda g: R.ring_attention_forward(
            q[..., pos[g.rank], :], k[..., pos[g.rank], :], v[..., pos[g.rank], :], g, keep_probs=keep_probs
        )[1]
    )
    sizes = {nbytes(c) for c in caches}
    assert len(sizes) == 1  # the same on every rank: the load balance
    return sizes.pop()


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_the_attention_term_of_activation_memory_falls_as_1_over_cp(cp):
    """Dense: q, k, v and the [s, s] probabilities. Ring, per rank: q, K|V, out (s/cp rows each), the
    log-sum-exp, and the (2cp + 1) kept blocks of (s/2cp)^2 probabilities: (2cp+1)/(4cp^2) of the
    dense s^2, at most 1/cp of it; with selective recomputation none."""
    b, h, s, hd, item = 2, 4, 64, 8, 8
    dense = core_cache_bytes(1, True)
    assert dense == item * b * h * (3 * s * hd + s * s)
    c = s // (2 * cp)
    linear = item * b * h * (4 * (s // cp) * hd + s // cp)  # qs, K|V, out; lse
    attention = item * b * h * (2 * cp + 1) * c * c
    assert core_cache_bytes(cp, True) == linear + attention
    assert core_cache_bytes(cp, False) == linear
    assert attention <= item * b * h * s * s / cp


# ---- on MPI: groups, every cp layout against one process, the ledger ---------------------------------


def _moved(grid):
    """rank(**coords): the world rank of this rank's coordinates with some of them changed."""
    return lambda **kw: world_rank(replace(grid.coord, **kw), grid.tp, grid.dp, grid.cp)


@pytest.mark.mpi(min_size=4)
def test_cp_groups_hold_the_ranks_of_the_formula(comm_of):
    from mpi4py import MPI

    from mpmp.comm.grid import ProcessGrid

    size = MPI.COMM_WORLD.Get_size()
    layouts = [(tp, cp, pp) for tp in (1, 2) for cp in (2, 4) for pp in (1, 2) if size % (tp * cp * pp) == 0]
    for tp, cp, pp in layouts:
        dp = size // (tp * cp * pp)
        g = ProcessGrid(tp, pp, dp, cp=cp)
        c = g.coord
        rank = _moved(g)
        assert g.rank == world_rank(c, tp, dp, cp)
        assert list(g.tp_group.ranks) == [rank(tp=t) for t in range(tp)]
        assert list(g.cp_group.ranks) == [rank(cp=k) for k in range(cp)]
        assert list(g.dp_group.ranks) == [rank(dp=d) for d in range(dp)]
        assert list(g.dp_cp_group.ranks) == [rank(dp=d, cp=k) for d in range(dp) for k in range(cp)]
        assert list(g.pp_group.ranks) == [rank(pp=p) for p in range(pp)]
        assert list(g.mp_group.ranks) == [rank(pp=p, tp=t) for p in range(pp) for t in range(tp)]
        for group in (g.tp_group, g.cp_group, g.dp_group, g.dp_cp_group, g.pp_group, g.mp_group):
            got = group.all_gather(numpy.array([g.rank], dtype=numpy.int64))
            assert got.tolist() == list(group.ranks)  # the communicator really holds them, in order
        assert g.cp_group.rank == c.cp
        assert "then cp, then dp" in g.describe()


TRAIN = ModelConfig(vocab=37, seq_len=16, d_model=16, layers=2, heads=4)
STEPS = 10


def cp_config(cp, tp=1, pp=1, dp=1, *, schedule="1f1b", **kw):
    kw.setdefault("micro_batches", 2 if pp > 1 else 1)
    return train_config(
        TRAIN,
        tp=tp,
        pp=pp,
        dp=dp,
        cp=cp,
        schedule=schedule,
        virtual_stages=2 if schedule == "interleaved" else 1,
        global_batch=8,
        bucket_mb=0.004,
        clip=0.5,
        weight_decay=0.1,
        **kw,
    )


def trainer_for(comm, cfg, weights):
    from mpmp.comm.grid import ProcessGrid
    from mpmp.runtime import Trainer

    par = cfg.parallel
    grid = ProcessGrid(par.tp, par.pp, par.dp, comm=comm, wire=cfg.precision, cp=par.cp)
    return Trainer(cfg, grid, make_data(cfg), weights.__getitem__)


_reference = {}


def reference(cfg):
    key = (cfg.dtype, cfg.parallel.micro_batches)
    if key not in _reference:
        losses, weights, _ = reference_run(cfg, random_weights(TRAIN, 11), STEPS)
        _reference[key] = (losses, weights)
    return _reference[key]


def equivalence_cases():
    # (world, cp, tp, pp, dp, options)
    yield 2, 2, 1, 1, 1, {}
    yield 2, 2, 1, 1, 1, {"recompute": "full"}
    yield 2, 2, 1, 1, 1, {"recompute": "selective"}
    yield 4, 4, 1, 1, 1, {}
    yield 4, 2, 2, 1, 1, {"sequence_parallel": True}
    yield 4, 2, 2, 1, 1, {}
    yield 4, 2, 1, 1, 2, {"zero": 1}
    for schedule in ("gpipe", "1f1b", "interleaved", "zb-h1"):
        yield 4, 2, 1, 2, 1, {"schedule": schedule}
    yield 8, 2, 1, 2, 2, {"zero": 1}
    yield 8, 2, 2, 2, 1, {"sequence_parallel": True, "recompute": "full"}
    yield 8, 4, 1, 1, 2, {"zero": 1, "recompute": "selective"}


def case_id(world, cp, tp, pp, dp, options):
    return f"cp{cp}-tp{tp}-pp{pp}-dp{dp}" + "".join(f"-{k}={v}" for k, v in options.items())


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("world,cp,tp,pp,dp,options", [pytest.param(*c, id=case_id(*c)) for c in equivalence_cases()])
def test_cp_layout_trains_like_one_process(comm_of, world, cp, tp, pp, dp, options):
    comm = comm_of(world)
    if comm is None:
        return
    cfg = cp_config(cp, tp, pp, dp, **options)
    ref_losses, ref_weights = reference(cfg)
    trainer = trainer_for(comm, cfg, random_weights(TRAIN, 11))
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    numpy.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    final = gather_full(trainer.grid, TRAIN, trainer.model.local_state())
    d = TRAIN.d_model
    for name, want in ref_weights.items():
        got = final[name]
        if name.endswith("attn.c_attn.bias"):
            # The key bias shifts every score of a query by the same amount: its gradient is zero, and
            # AdamW turns round-off there into lr-sized steps (as in test_layouts.py).
            got, want = numpy.delete(got, numpy.s_[d : 2 * d]), numpy.delete(want, numpy.s_[d : 2 * d])
        numpy.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=name)


def nccl_cases():
    # (world, cp, tp, pp, dp, options)
    yield 2, 2, 1, 1, 1, {"recompute": "full"}
    yield 4, 2, 2, 1, 1, {"sequence_parallel": True}
    yield 4, 2, 1, 2, 1, {"schedule": "1f1b", "micro_batches": 4}
    yield 4, 4, 1, 1, 1, {}
    yield 8, 2, 1, 2, 2, {"schedule": "interleaved", "zero": 1}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("world,cp,tp,pp,dp,options", [pytest.param(*c, id=case_id(*c)) for c in nccl_cases()])
def test_cp_on_nccl_rules_trains_like_one_process(comm_of, world, cp, tp, pp, dp, options):
    """Every ring hop is a batched send and receive: on NCCL's rules (comm/nccl_standin.py), which
    report an ungrouped send on a ring where every rank sends first, the ring runs."""
    from mpmp.comm.grid import ProcessGrid
    from mpmp.runtime import Trainer

    comm = comm_of(world)
    if comm is None:
        return
    cfg = cp_config(cp, tp, pp, dp, **options)
    ref_losses, _ = reference(cfg)
    grid = ProcessGrid(tp, pp, dp, comm=comm, transport="nccl-standin", cp=cp)
    assert type(grid.cp_group).__name__ == "NCCLStandIn"
    trainer = Trainer(cfg, grid, make_data(cfg), random_weights(TRAIN, 11).__getitem__)
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    numpy.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


@pytest.mark.mpi(min_size=2)
def test_cp_in_bf16_tracks_one_process_in_bf16(comm_of):
    comm = comm_of(2)
    if comm is None:
        return
    cfg = cp_config(2, dtype="bf16")
    ref_losses, _ = reference(cfg)
    trainer = trainer_for(comm, cfg, random_weights(TRAIN, 11))
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    numpy.testing.assert_allclose(losses, ref_losses, rtol=2e-3)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("cp,tp", [(2, 2), (4, 1)])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_ring_traffic_in_the_ledger_is_the_formula(comm_of, cp, tp, recompute):
    """Per block and micro-batch each rank sends (and receives) its K|V chunk pair cp - 1 times
    forward, cp - 1 times backward and the matching dK|dV cp - 1 times: 3(cp - 1) messages of
    2·b·(H/tp)·(S/cp)·hd float32 each; full recomputation runs the forward ring again, 4(cp - 1)."""
    comm = comm_of(4)
    if comm is None:
        return
    cfg = cp_config(cp, tp, micro_batches=2, recompute=recompute)
    trainer = trainer_for(comm, cfg, random_weights(TRAIN))
    led = ledger.install(ledger.Ledger(trainer.grid.rank, keep_events=True))
    try:
        trainer.train_step()
    finally:
        ledger.install(ledger.Ledger())
    ring = [e for e in led.events if e.group == "cp"]
    b, m, hd = cfg.micro_batch, cfg.parallel.micro_batches, TRAIN.head_dim
    message = 2 * b * (TRAIN.heads // tp) * (TRAIN.seq_len // cp) * hd * 4
    per_block = (cp - 1) * (4 if recompute == "full" else 3)
    for kind in ("send", "recv"):
        events = [e for e in ring if e.kind == kind]
        assert len(events) == TRAIN.layers * m * per_block
        assert {e.nbytes for e in events} == {message}
        assert {e.label for e in events} == {f"h.{i}" for i in range(TRAIN.layers)}
    assert sum(e.nbytes for e in ring if e.kind == "send") == TRAIN.layers * m * per_block * message


# ---- the command line and checkpoints across cp ------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")
TINY = ["--d-model", "32", "--layers", "2", "--heads", "4", "--seq-len", "16", "--global-batch", "8", "--quiet"]


def run_train(args, n=1, timeout=180):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_", "HYDRA_", "OMPI_", "PMIX_"))}
    env["PYTHONPATH"] = ROOT
    cmd = ([MPIRUN, "-n", str(n)] if n > 1 else []) + [sys.executable, "-m", "mpmp.train", *TINY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def metric_losses(path):
    return [json.loads(line)["loss"] for line in open(path)]


def test_cp_that_the_world_cannot_hold_is_one_clear_error():
    proc = run_train(["--cp", "2", "--steps", "1"])
    assert proc.returncode == 2, proc.stderr
    assert "world size (1) must be divisible by tp*pp*cp (1*1*2 = 2)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
def test_checkpoints_reshard_across_cp(tmp_path):
    """One process for 6 steps against: cp2 x dp2 with ZeRO-1 for 3 steps (written once per
    distinct shard), resumed on cp4 to 5, then on tp2 x dp2 (cp 1) to 6; the banner prints the grid."""
    m = tmp_path / "m.jsonl"
    whole = run_train(["--steps", "6", "--metrics", str(tmp_path / "whole.jsonl")])
    assert whole.returncode == 0, whole.stderr
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    steps = [
        (["--cp", "2", "--tp", "1", "--zero", "1", "--steps", "3", "--save", str(a)], a),
        (["--cp", "4", "--steps", "5", "--resume", str(a), "--save", str(b)], b),
        (["--tp", "2", "--steps", "6", "--resume", str(b), "--save", str(c)], c),
    ]
    for args, _ in steps:
        proc = run_train([*args, "--metrics", str(m)], n=4)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    numpy.testing.assert_allclose(metric_losses(m), metric_losses(tmp_path / "whole.jsonl"), rtol=1e-5)
    step_dir = next(a.glob("step_*"))
    manifest = json.load(open(step_dir / "manifest.json"))
    assert (manifest["layout"]["cp"], manifest["layout"]["dp"], manifest["layout"]["zero"]) == (2, 2, 1)
    # ZeRO-1 over dp x cp: every rank's slice of the optimizer state; the weights once per (tp, pp)
    assert sorted(manifest["files"]) == ["model_tp0_pp0.npz"] + [f"optim_rank{r}.npz" for r in range(4)]
    assert json.load(open(next(b.glob("step_*")) / "manifest.json"))["layout"]["cp"] == 4


@pytest.mark.mpi(min_size=2)
def test_bench_cp_measures_the_attention_term_of_its_formula(tmp_path, capsys):
    from mpi4py import MPI

    from mpmp.bench import cp as bench

    out = tmp_path / "cp.json"
    args = ["--seq-len", "64", "--d-model", "32", "--heads", "4", "--steps", "1", "--warmup", "0", "--json", str(out)]
    assert bench.main(args) == 0
    if MPI.COMM_WORLD.Get_rank() != 0:
        return
    size = MPI.COMM_WORLD.Get_size()
    results = json.load(open(out))["results"]
    assert {"one rank", f"cp {size}"} <= set(results)
    for name, row in results.items():
        assert row["attention_core_bytes"] == row["attention_formula_bytes"], name
    one, ring = results["one rank"], results[f"cp {size}"]
    assert ring["attention_core_bytes"] < one["attention_core_bytes"] / size
    assert ring["ring_hops_per_step"] == 3 * (size - 1) * 2  # per block, 2 blocks
    assert "overlap" in capsys.readouterr().out


# ---- on the device (the fake CuPy of tests/cuda_fake.py) ---------------------------------------------


@pytest.fixture
def device(monkeypatch):
    import cuda_fake as fake

    from mpmp import backend

    fake.install(monkeypatch)
    backend.use("cupy")
    yield fake
    backend.use("numpy")


@pytest.mark.mpi(min_size=2)
def test_cp_on_the_device_equals_one_process(comm_of, device):
    """fp32 on (fake) CuPy arrays through MPI: the ring's kernels are NumPy's code on device arrays,
    and nothing mixes host and device arrays."""
    comm = comm_of(2)
    if comm is None:
        return
    cfg = cp_config(2)
    ref_losses, _ = reference(cfg)
    trainer = trainer_for(comm, cfg, random_weights(TRAIN, 11))
    with device.strict():
        losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    numpy.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cp_on_the_device_in_16_bits_is_refused(comm_of, device, dtype):
    comm = comm_of(2)
    if comm is None:
        return
    with pytest.raises(ConfigError, match=f"--cp 2 on --backend cupy needs --dtype fp32, not {dtype}"):
        trainer_for(comm, cp_config(2, dtype=dtype), random_weights(TRAIN, 11))
