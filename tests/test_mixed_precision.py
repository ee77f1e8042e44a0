"""Mixed precision: bf16/fp16 rounding, 16-bit communication, fp32 master weights, and fp16 dynamic loss
scaling that skips overflowing steps."""

import numpy
import pytest
from helpers import make_data, random_weights, train_config

from mpmp.backend import from_wire, round_to, to_wire
from mpmp.comm import ledger
from mpmp.config import ModelConfig
from mpmp.optim.loss_scale import DynamicLossScaler

CFG = ModelConfig(vocab=37, seq_len=32, d_model=32, layers=2, heads=4)


def bf16_reference(values):
    """Round-to-nearest-even onto the bf16 grid, by exhaustive search of the two neighbours."""
    out = []
    for v in numpy.asarray(values, numpy.float32):
        bits = int(numpy.array(v).view(numpy.uint32))
        lo = numpy.array(bits & 0xFFFF0000, numpy.uint32).view(numpy.float32)
        hi = numpy.array((bits & 0xFFFF0000) + 0x10000, numpy.uint32).view(numpy.float32)
        d_lo, d_hi = abs(float(v) - float(lo)), abs(float(hi) - float(v))
        if d_lo < d_hi or (d_lo == d_hi and ((bits >> 16) & 1) == 0):
            out.append(lo)
        else:
            out.append(hi)
    return numpy.array(out, numpy.float32)


def test_bf16_rounds_to_nearest_even():
    rng = numpy.random.default_rng(0)
    x = numpy.concatenate(
        [rng.standard_normal(2000).astype(numpy.float32) * 10.0 ** rng.integers(-8, 8, 2000), [1.00390625, 1.01171875]]
    ).astype(numpy.float32)
    numpy.testing.assert_array_equal(round_to(x.copy(), "bf16"), bf16_reference(x))
    assert round_to(numpy.array([1.00390625], numpy.float32), "bf16")[0] == 1.0  # tie goes to even
    assert numpy.isinf(round_to(numpy.array([numpy.inf], numpy.float32), "bf16")[0])


def test_fp16_rounding_and_overflow():
    x = numpy.array([1.0 + 2.0**-11, 65504.0, 70000.0, 1e-8], numpy.float32)
    with numpy.errstate(over="ignore"):
        numpy.testing.assert_array_equal(round_to(x.copy(), "fp16"), x.astype(numpy.float16).astype(numpy.float32))
    assert numpy.isinf(round_to(x.copy(), "fp16")[2])


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_wire_format_round_trips_rounded_values(fmt):
    x = round_to(numpy.random.default_rng(1).standard_normal(100).astype(numpy.float32), fmt)
    wire = to_wire(x, fmt)
    assert wire.dtype == numpy.uint16 and wire.nbytes == x.nbytes // 2
    numpy.testing.assert_array_equal(from_wire(wire, fmt), x)


def run(dtype, steps, lr=1e-3, weights=None):
    from mpmp.comm.grid import LocalGrid
    from mpmp.runtime import Trainer

    cfg = train_config(CFG, global_batch=8, dtype=dtype, lr=lr)
    trainer = Trainer(cfg, LocalGrid(), make_data(cfg), (weights or random_weights(CFG, 5)).__getitem__)
    return [trainer.train_step()["loss"] for _ in range(steps)], trainer


@pytest.mark.parametrize("dtype,mean_tol,final_tol", [("bf16", 0.003, 0.003), ("fp16", 0.001, 0.001)])
def test_low_precision_tracks_the_fp32_loss_curve(dtype, mean_tol, final_tol):
    """50 steps: the mean absolute gap to the fp32 curve and the gap of the last 10 steps' mean stay
    within a few thousandths of a nat (measured: 2e-4 for bf16, 1e-4 for fp16)."""
    ref, _ = run("fp32", 50)
    low, trainer = run(dtype, 50)
    ref, low = numpy.array(ref), numpy.array(low)
    assert ref[-10:].mean() < ref[0] - 0.5  # the run learns
    assert numpy.abs(low - ref).mean() < mean_tol
    assert abs(low[-10:].mean() - ref[-10:].mean()) < final_tol
    assert not (low == ref).all()  # and it really ran in lower precision
    # the model's parameters are on the format's grid; the fp32 masters are not
    data = trainer.flat.data
    numpy.testing.assert_array_equal(round_to(data.copy(), dtype), data)
    master = trainer.optimizer.masters[0]
    assert not numpy.array_equal(round_to(master.copy(), dtype), master)


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    _, trainer = run("fp16", 3)
    before = trainer.flat.data.copy()
    masters = [m.copy() for m in trainer.optimizer.masters]
    adam_steps = trainer.optimizer.steps_taken
    # A loss scale far beyond fp16's range: the scaled gradients overflow, as they would in a real run.
    trainer.scaler.scale = scale = 2.0**60
    m = trainer.train_step()
    assert m["skipped"] and m["step"] == 4
    assert trainer.scaler.scale == scale / 2
    numpy.testing.assert_array_equal(trainer.flat.data, before)
    for a, b in zip(trainer.optimizer.masters, masters):
        numpy.testing.assert_array_equal(a, b)
    assert trainer.optimizer.steps_taken == adam_steps
    trainer.scaler.scale = 2.0**16
    m = trainer.train_step()  # with the scale back in range, the next step trains again
    assert not m["skipped"] and not numpy.array_equal(trainer.flat.data, before)


def test_loss_scaler_grows_after_an_interval_of_good_steps():
    s = DynamicLossScaler(initial=8.0, interval=3)
    for _ in range(3):
        s.update(False)
    assert s.scale == 16.0
    s.update(True)
    assert s.scale == 8.0 and s.good_steps == 0 and s.skipped == 1
    assert s.overflowed(float("inf")) and s.overflowed(float("nan")) and not s.overflowed(3.0)


@pytest.mark.mpi(min_size=8)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_on_a_3d_grid_halves_activation_traffic(comm_of, dtype):
    """(2, 2, 2) in bf16/fp16: trains close to its one-process run, and the tp and pp traffic moves
    half the bytes of fp32 (gradients and the loss stay fp32)."""
    from mpmp.comm.grid import ProcessGrid
    from mpmp.runtime import Trainer

    comm = comm_of(8)
    weights = random_weights(CFG, 5)
    ref, _ = run(dtype, 5, weights=weights)
    totals = {}
    for d in ("fp32", dtype):
        cfg = train_config(CFG, tp=2, pp=2, dp=2, micro_batches=2, global_batch=8, dtype=d, lr=1e-3)
        grid = ProcessGrid(2, 2, 2, comm=comm, wire=cfg.precision)
        trainer = Trainer(cfg, grid, make_data(cfg), weights.__getitem__)
        led = ledger.install(ledger.Ledger(trainer.grid.rank, keep_events=True))
        try:
            losses = [trainer.train_step()["loss"] for _ in range(5)]
        finally:
            ledger.install(ledger.Ledger())
        totals[d] = {
            g: sum(e.nbytes for e in led.events if e.group == g and e.label.startswith("h.")) for g in ("tp", "pp")
        }
        totals[d]["pp"] = sum(e.nbytes for e in led.events if e.group == "pp")
    numpy.testing.assert_allclose(losses, ref, rtol=2e-2)
    assert totals[dtype]["tp"] * 2 == totals["fp32"]["tp"]
    assert totals[dtype]["pp"] * 2 == totals["fp32"]["pp"]
