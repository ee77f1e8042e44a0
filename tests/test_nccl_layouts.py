"""The trainer on NCCL's rules: its groups built as NCCLStandIn (comm/nccl_standin.py, the CPU
stand-in that refuses what would hang or be refused on NCCL), every schedule with its transfers
batched by pipeline/batching.py, tensor parallelism, and data parallelism with ZeRO-1, train like
one process.

Run under MPI: timeout 900 mpirun -n 8 bash tests/mpi_rank.sh -q --with-mpi -m mpi tests/test_nccl_layouts.py
"""

import numpy
import pytest
from helpers import make_data, random_weights, reference_run, train_config

from mpmp.config import ModelConfig

CFG = ModelConfig(vocab=37, seq_len=8, d_model=16, layers=6, heads=4)
STEPS = 4


def cases():
    """(world, tp, pp, dp, schedule, micro-batches, zero): a subset that covers each schedule, tp,
    and dp with and without ZeRO-1, on 2, 4 and 8 ranks."""
    for schedule, m in (("gpipe", 3), ("1f1b", 5), ("interleaved", 4), ("zb-h1", 4)):
        yield 2, 1, 2, 1, schedule, m, 0
    yield 2, 2, 1, 1, "1f1b", 1, 0
    yield 2, 1, 1, 2, "1f1b", 1, 1
    yield 4, 1, 4, 1, "interleaved", 4, 0
    yield 4, 2, 2, 1, "zb-h1", 4, 0
    yield 4, 1, 2, 2, "1f1b", 2, 1
    yield 8, 2, 2, 2, "interleaved", 2, 1
    yield 8, 2, 2, 2, "gpipe", 2, 0


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "case", [pytest.param(c, id=f"n{c[0]}-tp{c[1]}-pp{c[2]}-dp{c[3]}-{c[4]}-m{c[5]}-zero{c[6]}") for c in cases()]
)
def test_layout_on_nccl_rules_trains_like_one_process(comm_of, case):
    from mpmp.comm.grid import ProcessGrid
    from mpmp.runtime import Trainer

    world, tp, pp, dp, schedule, m, zero = case
    comm = comm_of(world)
    if comm is None:
        return
    v = 2 if schedule == "interleaved" else 1
    cfg = train_config(
        CFG,
        tp=tp,
        pp=pp,
        dp=dp,
        schedule=schedule,
        virtual_stages=v,
        micro_batches=m,
        global_batch=2 * m * dp,
        zero=zero,
        bucket_mb=0.004,
        clip=0.5,
        weight_decay=0.1,
    )
    weights = random_weights(CFG, seed=world + pp)
    ref, _, _ = reference_run(cfg, weights, STEPS)
    grid = ProcessGrid(tp, pp, dp, comm=comm, transport="nccl-standin")
    assert type(grid.pp_group).__name__ == "NCCLStandIn" and grid.world.batched_p2p is False
    trainer = Trainer(cfg, grid, make_data(cfg), weights.__getitem__)
    if pp > 1:
        assert any(type(ins).__name__ == "Transfers" for ins in trainer.program)
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    numpy.testing.assert_allclose(losses, ref, rtol=1e-5)


@pytest.mark.mpi(min_size=2)
def test_unbatched_one_f_one_b_would_hang_on_nccl(comm_of):
    """The MPI program of 1F1B issues its sends one by one; in the steady state both stages send
    first (stage 0 its next activation, stage 1 its gradient): buffered on MPI, a hang on NCCL. The
    stand-in reports it; the batched program above runs."""
    from mpmp.comm.grid import ProcessGrid
    from mpmp.comm.nccl_standin import NCCLRuleError
    from mpmp.pipeline import schedules
    from mpmp.runtime import Trainer

    comm = comm_of(2)
    if comm is None:
        return
    cfg = train_config(CFG, pp=2, schedule="1f1b", micro_batches=4, global_batch=8)
    grid = ProcessGrid(1, 2, 1, comm=comm, transport="nccl-standin")
    trainer = Trainer(cfg, grid, make_data(cfg), random_weights(CFG).__getitem__)
    trainer.program = schedules.build("1f1b", 2, 4, grid.stage)
    grid.pp_group.timeout = 1.0
    with pytest.raises(NCCLRuleError, match="was not matched"):
        trainer.gradients(0)
