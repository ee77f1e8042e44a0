"""Tensor parallelism (and sequence parallelism) equals one process, and moves exactly the bytes of
Megatron's pattern: per block, 2 all-reduces forward and 2 backward (SP: all-gather/reduce-scatter)."""

import os
import shutil
import subprocess
import sys

import numpy
import pytest
from helpers import assert_close_dicts, gather_full, random_weights

from mpmp.comm import ledger
from mpmp.config import ModelConfig
from mpmp.model.gpt import GPT, MicroBatch
from mpmp.nn import parallel as P

CFG = ModelConfig(vocab=37, seq_len=16, d_model=32, layers=2, heads=8)  # V not divisible by 2, 4, 8


def batch(cfg, b=2, seed=3):
    rng = numpy.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab, (b, cfg.seq_len + 1))
    return MicroBatch(ids[:, :-1], ids[:, 1:], 1.0 / (b * cfg.seq_len))


def forward_backward(model, mb, sp_group=None):
    chunk = model.chunks[0]
    loss, caches = chunk.forward(None, mb)
    chunk.backward(None, caches)
    if sp_group is not None:  # what GradReducer.finish does for sequence-parallel partial sums
        for p in model.parameters():
            if p.sequence_parallel:
                sp_group.all_reduce(p.grad)
    return loss


def logits_of(model, mb):
    """The head's local logits [b, s, V/tp] (the head consumes them in the loss otherwise)."""
    chunk = model.chunks[0]
    x = None
    for m in chunk.modules[:-1]:
        x, _ = m.forward(x, mb)
    head = chunk.modules[-1]
    h, _ = head.ln_f.forward(x)
    logits, _ = head.lm.forward(h)
    return logits


def reference(weights, mb):
    model = GPT(CFG, weights.__getitem__)
    loss = forward_backward(model, mb)
    grads = {p.name: p.grad.copy() for p in model.parameters()}
    return model, loss, grads


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("sp", [False, True], ids=["sp-off", "sp-on"])
def test_tensor_parallel_matches_one_process(comm_of, tp, sp):
    from mpmp.comm.grid import ProcessGrid

    comm = comm_of(tp)
    if comm is None:
        return
    weights = random_weights(CFG, seed=tp)
    mb = batch(CFG)
    ref_model, ref_loss, ref_grads = reference(weights, mb)
    ref_logits = logits_of(ref_model, mb)

    grid = ProcessGrid(tp, 1, 1, comm=comm)
    model = GPT(CFG, weights.__getitem__, group=grid.tp_group, sp=sp)
    logits = logits_of(model, mb)
    full_logits = grid.tp_group.all_gather(numpy.ascontiguousarray(logits), axis=-1)[..., : CFG.vocab]
    numpy.testing.assert_allclose(full_logits, ref_logits, rtol=1e-5, atol=1e-6)

    model.zero_grad()
    loss = forward_backward(model, mb, grid.tp_group if sp else None)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    grads = gather_full(grid, CFG, {p.name: p.grad for p in model.parameters()})
    assert_close_dicts(grads, ref_grads, rtol=1e-5, atol=1e-6)
    # replicated tensors hold the same gradient on every tp rank
    for p in model.parameters():
        if p.split is None:
            every = grid.tp_group.all_gather(p.grad.reshape(1, -1).copy())
            numpy.testing.assert_array_equal(every, numpy.broadcast_to(every[0], every.shape))


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("sp", [False, True], ids=["sp-off", "sp-on"])
def test_ledger_shows_megatrons_communication_pattern(comm_of, sp):
    from mpmp.comm.grid import ProcessGrid

    tp = 4
    comm = comm_of(tp)
    if comm is None:
        return
    grid = ProcessGrid(tp, 1, 1, comm=comm)
    model = GPT(CFG, random_weights(CFG).__getitem__, group=grid.tp_group, sp=sp)
    b, s, d = 2, CFG.seq_len, CFG.d_model
    act_bytes = b * s * d * 4
    mb = batch(CFG, b)
    chunk = model.chunks[0]
    led = ledger.install(ledger.Ledger(grid.rank, keep_events=True))
    try:
        _, caches = chunk.forward(None, mb)
        fwd = list(led.events)
        chunk.backward(None, caches)
        bwd = led.events[len(fwd) :]
    finally:
        ledger.install(ledger.Ledger())
    for phase in (fwd, bwd):
        for layer in range(CFG.layers):
            ops = [(e.kind, e.nbytes) for e in phase if e.label == f"h.{layer}"]
            if not sp:
                assert ops == [("all_reduce", act_bytes)] * 2, ops
            else:
                assert sorted(k for k, _ in ops) == ["all_gather", "all_gather", "reduce_scatter", "reduce_scatter"]
                assert all(n == act_bytes for _, n in ops)  # the same total bytes as the all-reduces
                assert "all_reduce" not in [k for k, _ in ops]


@pytest.mark.mpi(min_size=2)
def test_vocabulary_padding_never_wins_and_is_dropped_on_export(comm_of):
    """V = 37 over tp = 2 pads one row: it gets no probability, no gradient, and export drops it."""
    from mpmp.comm.grid import ProcessGrid

    comm = comm_of(2)
    if comm is None:
        return
    grid = ProcessGrid(2, 1, 1, comm=comm)
    weights = random_weights(CFG)
    model = GPT(CFG, weights.__getitem__, group=grid.tp_group)
    wte = next(p for p in model.parameters() if p.name == "wte.weight")
    assert wte.data.shape[0] == P.padded_vocab(37, 2) // 2 == 19
    forward_backward(model, batch(CFG))
    if grid.tp_group.rank == 1:
        assert not wte.data[-1].any() and not wte.grad[-1].any()
    full = gather_full(grid, CFG, model.local_state())
    numpy.testing.assert_array_equal(full["wte.weight"], weights["wte.weight"])


def test_heads_or_hidden_not_divisible_by_tp_is_refused():
    from mpmp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--heads \(6\) must be divisible by --tp \(4\)"):
        ModelConfig(vocab=10, seq_len=8, d_model=24, layers=1, heads=6).validate(tp=4)
    with pytest.raises(ConfigError, match=r"--heads \(5\) must divide --d-model \(32\)"):
        ModelConfig(vocab=10, seq_len=8, d_model=32, layers=1, heads=5).validate(tp=1)


def _mpirun():
    return shutil.which("mpirun") or shutil.which("mpiexec")


@pytest.mark.skipif(_mpirun() is None, reason="no mpirun")
def test_training_with_tp4_gives_the_losses_of_tp1(tmp_path):
    """The command line end to end: 10 steps from the same --init-from, read from --metrics."""
    import json

    from mpmp.checkpoint import save_interchange

    cfg = ModelConfig(vocab=256, seq_len=16, d_model=32, layers=2, heads=4)
    init = tmp_path / "init.npz"
    save_interchange(str(init), random_weights(cfg, seed=7))
    common = [
        "-m",
        "mpmp.train",
        "--init-from",
        str(init),
        "--heads",
        "4",
        "--steps",
        "10",
        "--global-batch",
        "8",
        "--seq-len",
        "16",
        "--quiet",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_", "HYDRA_", "OMPI_", "PMIX_"))}
    one = subprocess.run(
        [sys.executable, *common, "--metrics", str(tmp_path / "one.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr
    four = subprocess.run(
        [
            _mpirun(),
            "-n",
            "4",
            sys.executable,
            *common,
            "--tp",
            "4",
            "--pp",
            "1",
            "--metrics",
            str(tmp_path / "four.jsonl"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert four.returncode == 0, four.stderr
    a = [json.loads(line)["loss"] for line in open(tmp_path / "one.jsonl")]
    b = [json.loads(line)["loss"] for line in open(tmp_path / "four.jsonl")]
    assert len(a) == len(b) == 10
    numpy.testing.assert_allclose(b, a, rtol=1e-5)
