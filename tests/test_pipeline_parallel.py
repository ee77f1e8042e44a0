"""Pipeline parallelism equals one process, for every schedule, and keeps each schedule's memory."""

import numpy
import pytest
from helpers import assert_close_dicts, gather_full, local_grads, random_weights, reference_run, train_config

from mpmp.config import ModelConfig

CFG = ModelConfig(vocab=37, seq_len=8, d_model=16, layers=6, heads=2)
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)]


def cases():
    for pp in (2, 4):
        for name, v in SCHEDULES:
            for m in (pp, 2 * pp + 1):
                yield pytest.param(pp, 1, name, v, m, id=f"pp{pp}-{name}-m{m}")
    yield pytest.param(2, 2, "1f1b", 1, 5, id="pp2-tp2-1f1b-m5")
    yield pytest.param(2, 2, "interleaved", 2, 2, id="pp2-tp2-interleaved-m2")


def parallel_trainer(comm, cfg, weights):
    from helpers import make_data

    from mpmp.comm.grid import ProcessGrid
    from mpmp.runtime import Trainer

    par = cfg.parallel
    grid = ProcessGrid(par.tp, par.pp, par.dp, comm=comm, wire=cfg.precision)
    return Trainer(cfg, grid, make_data(cfg), weights.__getitem__)


def one_step_grads(trainer):
    """Loss and gradients of step 0 (no optimizer step)."""
    loss, _ = trainer.global_loss(trainer.gradients(0))
    return loss, local_grads(trainer.model)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("pp,tp,schedule,v,m", list(cases()))
def test_pipeline_matches_one_process(comm_of, pp, tp, schedule, v, m):
    comm = comm_of(pp * tp)
    if comm is None:
        return
    cfg = train_config(CFG, tp=tp, pp=pp, schedule=schedule, virtual_stages=v, micro_batches=m, global_batch=2 * m)
    weights = random_weights(CFG, seed=pp + m)

    # gradients of one step
    _, _, ref = reference_run(cfg, weights, 0)
    ref_loss, ref_grads = one_step_grads(ref)
    trainer = parallel_trainer(comm, cfg, weights)
    loss, grads = one_step_grads(trainer)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert_close_dicts(gather_full(trainer.grid, CFG, grads), ref_grads, rtol=1e-5, atol=1e-6)

    # ten training steps
    ref_losses, _, _ = reference_run(cfg, weights, 10)
    trainer = parallel_trainer(comm, cfg, weights)
    losses = [trainer.train_step()["loss"] for _ in range(10)]
    numpy.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("schedule,limit", [("1f1b", "pp"), ("gpipe", "m"), ("zb-h1", "pp")])
def test_first_stage_holds_the_schedules_number_of_caches(comm_of, schedule, limit):
    pp, m = 4, 9
    comm = comm_of(pp)
    if comm is None:
        return
    cfg = train_config(CFG, pp=pp, schedule=schedule, micro_batches=m, global_batch=m)
    trainer = parallel_trainer(comm, cfg, random_weights(CFG))
    trainer.train_step()
    peak = trainer.engine.peak_caches
    if trainer.grid.is_first_stage:
        assert peak == (pp if limit == "pp" else m)
    assert peak <= (pp if limit == "pp" else m)


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("partition", ["parameters", "time"])
def test_uneven_partitions_train_like_one_process(comm_of, partition):
    """L = 5 blocks over 3 stages, split by parameters or by (given) measured time."""
    comm = comm_of(3)
    if comm is None:
        return
    from dataclasses import replace

    from helpers import make_data

    from mpmp.comm.grid import ProcessGrid
    from mpmp.runtime import Trainer

    model = replace(CFG, layers=5)
    cfg = train_config(model, pp=3, micro_batches=3, global_batch=6, partition=partition)
    weights = random_weights(model, seed=3)
    ref_losses, _, _ = reference_run(cfg, weights, 5)
    costs = (0.3, 1.0, 2.5) if partition == "time" else None
    trainer = Trainer(cfg, ProcessGrid(1, 3, 1, comm=comm), make_data(cfg), weights.__getitem__, unit_costs=costs)
    blocks = [sum(1 for u in range(a, b) if 1 <= u <= model.layers) for a, b in trainer.split]
    assert sum(blocks) == 5 and len(set(blocks)) > 1
    losses = [trainer.train_step()["loss"] for _ in range(5)]
    numpy.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)])
def test_receive_buffers_come_from_a_pool_reused_across_steps(comm_of, schedule, v):
    """The first step allocates the receive buffers; later steps take every one from the pool."""
    comm = comm_of(2)
    if comm is None:
        return
    m = 4
    cfg = train_config(CFG, pp=2, schedule=schedule, virtual_stages=v, micro_batches=m, global_batch=m)
    trainer = parallel_trainer(comm, cfg, random_weights(CFG))
    receives = sum(type(ins).__name__.startswith("Recv") for ins in trainer.program)
    assert receives > 0
    trainer.train_step()
    pool = trainer.engine.pool
    allocated = pool.allocated
    assert 0 < allocated <= receives and pool.reused == receives - allocated
    for step in range(2, 4):
        trainer.train_step()
        assert pool.allocated == allocated
        assert pool.reused == step * receives - allocated
