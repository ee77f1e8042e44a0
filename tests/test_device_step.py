"""The trainer's GPU path on CPUs, through the strict fake CuPy of tests/cuda_fake.py: every kernel
launch checked against its C++ signature and emulated, cuBLAS as column-major GEMMs on raw pointers,
and every way a device value can reach the host counted.

- 10 steps on the fake CuPy equal the NumPy run (fp32: rtol 1e-4); fp16 and bf16, held in 16 bits,
  stay within 2e-2 of fp32 (what tests/gpu/check_train.py asks of a real GPU);
- a whole step moves device values to the host exactly once, at backend.to_host, and never mixes
  host and device arrays (CuPy would refuse);
- 16-bit parameters and activations take half the bytes, and memory() reports what is held;
- an fp16 overflow is vetoed on the device: nothing changes, the step is not counted;
- under MPI, two ranks with tp 2 or pp 2 equal one process, with device buffers handed to MPI
  (CUDA-aware) or staged through pinned host memory from a pool that stops allocating after a step.
"""

import cuda_fake as fake
import numpy
import pytest
from helpers import make_data, random_weights, train_config

from mpmp import backend
from mpmp.config import ModelConfig

CFG = ModelConfig(vocab=37, seq_len=16, d_model=32, layers=2, heads=4)


def trainer_for(dtype, comm=None, tp=1, pp=1, **kw):
    """A trainer of CFG; on comm a ProcessGrid of tp x pp (else one process)."""
    from mpmp.comm.grid import LocalGrid, ProcessGrid
    from mpmp.runtime import Trainer

    cfg = train_config(CFG, tp=tp, pp=pp, global_batch=4, micro_batches=2, dtype=dtype, lr=1e-3, clip=1.0, **kw)
    grid = LocalGrid(wire=cfg.precision) if comm is None else ProcessGrid(tp, pp, 1, comm=comm, wire=cfg.precision)
    return Trainer(cfg, grid, make_data(cfg), random_weights(CFG, 5).__getitem__)


def losses(trainer, steps):
    return [trainer.train_step()["loss"] for _ in range(steps)]


@pytest.fixture(scope="module")
def numpy_fp32():
    return losses(trainer_for("fp32"), 10)


@pytest.fixture
def device(monkeypatch):
    """The fake CuPy as this process's backend (layers built now take the CUDA kernels)."""
    cp = fake.install(monkeypatch)
    backend.use("cupy")
    fake.reset_transfers()
    yield cp
    backend.use("numpy")


def test_ten_steps_on_the_device_equal_numpy_and_16_bit_tracks_fp32(device, numpy_fp32):
    runs = {}
    with fake.strict():
        for dtype in ("fp32", "fp16", "bf16"):
            runs[dtype] = losses(trainer_for(dtype), 10)
    numpy.testing.assert_allclose(runs["fp32"], numpy_fp32, rtol=1e-4)
    for dtype in ("fp16", "bf16"):
        numpy.testing.assert_allclose(runs[dtype], runs["fp32"], rtol=2e-2)
        assert runs[dtype] != runs["fp32"]  # really computed in 16 bits


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_a_step_moves_device_values_to_the_host_once(device, monkeypatch, dtype, recompute):
    calls = []
    to_host = backend.to_host
    monkeypatch.setattr(backend, "to_host", lambda a: calls.append(a.size) or to_host(a))
    trainer = trainer_for(dtype, recompute=recompute)
    for step in range(3):
        fake.reset_transfers()
        with fake.strict():
            metrics = trainer.train_step()
        where = "\n---\n".join(fake.TRANSFERS["where"])
        assert fake.TRANSFERS["d2h"] == 1, f"step {step + 1}: {fake.TRANSFERS['d2h']} transfers:\n{where}"
        assert "to_host" in where
    assert calls == [4, 4, 4]  # loss, stop, overflow flag, squared norm: together
    assert isinstance(metrics["loss"], float) and isinstance(metrics["grad_norm"], float)


def test_sixteen_bit_storage_holds_half_the_bytes(device):
    full, half = trainer_for("fp32"), trainer_for("bf16")
    assert full.flat.data.dtype == numpy.float32 and half.flat.data.dtype == numpy.uint16
    assert trainer_for("fp16").flat.data.dtype == numpy.float16
    for t in (full, half):
        t.train_step()
    a, b = full.memory(), half.memory()
    assert b["param_bytes"] * 2 == a["param_bytes"]
    assert b["grad_bytes"] == a["grad_bytes"]  # fp32 gradients
    assert b["optimizer_bytes"] == a["optimizer_bytes"] + a["param_bytes"]  # + fp32 masters
    # caches are 16-bit too, but for what stays fp32 (LayerNorm's rstd, the loss's sums) and the ids
    assert a["activation_bytes"] / 2 <= b["activation_bytes"] < 0.51 * a["activation_bytes"]
    assert all(p.data.dtype == numpy.uint16 and p.grad.dtype == numpy.float32 for p in half.model.parameters())
    state = half.model.local_state()  # checkpoints and exports get float32 values
    assert all(type(v) is numpy.ndarray and v.dtype == numpy.float32 for v in state.values())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow itself
def test_fp16_overflow_is_vetoed_on_the_device(device):
    trainer = trainer_for("fp16")
    losses(trainer, 2)
    before = numpy.array(trainer.flat.data)
    masters = [numpy.array(m) for m in trainer.optimizer.masters]
    taken = trainer.optimizer.steps_taken
    trainer.scaler.scale = 2.0**60  # the scaled gradients overflow fp16, as in a real run
    m = trainer.train_step()
    assert m["skipped"] and trainer.scaler.scale == 2.0**59
    numpy.testing.assert_array_equal(numpy.array(trainer.flat.data), before)
    for got, want in zip(trainer.optimizer.masters, masters):
        numpy.testing.assert_array_equal(numpy.array(got), want)
    assert trainer.optimizer.steps_taken == taken
    trainer.scaler.scale = 2.0**16
    assert not trainer.train_step()["skipped"]
    assert trainer.optimizer.steps_taken == taken + 1


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("cuda_aware", [False, True], ids=["pinned", "cuda-aware"])
@pytest.mark.parametrize("layout", [(2, 1, "fp32"), (1, 2, "fp32"), (2, 1, "bf16"), (1, 2, "fp16")], ids=str)
def test_two_ranks_through_mpi_on_the_device_equal_one_process(comm_of, device, monkeypatch, layout, cuda_aware):
    from mpmp.comm import mpi

    tp, pp, dtype = layout
    comm = comm_of(2)
    if comm is None:
        return
    monkeypatch.setattr(mpi, "_cuda_aware", cuda_aware)
    monkeypatch.setattr(mpi, "pinned", mpi.PinnedPool())
    one = losses(trainer_for(dtype), 4)
    trainer = trainer_for(dtype, comm, tp=tp, pp=pp)
    with fake.strict():
        got = losses(trainer, 1)
        allocated = mpi.pinned.allocated
        got += losses(trainer, 3)
    # fp32: the same sums in another order; 16 bits: tp's partial sums are rounded before they add
    numpy.testing.assert_allclose(got, one, rtol=1e-5 if dtype == "fp32" else 2e-2)
    # 16-bit reductions (tp's all-reduces in bf16/fp16) run in Python on host memory: staged always
    if cuda_aware and not (tp > 1 and dtype != "fp32"):
        assert mpi.pinned.allocated == 0  # device buffers went to MPI as they are
    else:
        assert allocated > 0 and mpi.pinned.allocated == allocated and mpi.pinned.reused > 0
