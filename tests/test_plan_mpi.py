"""The planner against mpmp's own runs on 2, 4 and 8 ranks: parameter, gradient and optimizer bytes per
rank exactly as the trainer allocates them, activations within 10% of the engine's peak, and the bytes
of every (group, operation) exactly as the ledger records them over one step."""

import pytest
from helpers import make_data, random_weights, train_config

from mpmp.comm import ledger
from mpmp.config import ModelConfig
from mpmp.plan import comm, memory

# 14 blocks + embedding + head = 16 units: pp = 8 with 2 virtual stages; vocab 37 pads for every tp > 1
CFG = ModelConfig(vocab=37, seq_len=8, d_model=16, layers=14, heads=4)

CASES = [
    # (dp, pp, tp), options
    ((1, 1, 2), {}),
    ((1, 1, 2), {"sequence_parallel": True, "dtype": "bf16"}),
    ((1, 2, 1), {"schedule": "zb-h1", "micro_batches": 4}),
    ((1, 2, 1), {"schedule": "interleaved", "virtual_stages": 2, "dtype": "fp16"}),
    ((2, 1, 1), {"zero": 1, "bucket_mb": 0.004}),
    ((2, 1, 1), {"recompute": "full"}),
    ((1, 2, 2), {"recompute": "full", "dtype": "bf16"}),
    ((2, 1, 2), {"zero": 1, "sequence_parallel": True, "bucket_mb": 0.004}),
    ((1, 4, 1), {"schedule": "interleaved", "virtual_stages": 2, "micro_batches": 8}),
    ((1, 2, 2), {"sequence_parallel": True, "recompute": "selective"}),
    ((2, 2, 1), {"schedule": "gpipe", "zero": 1, "dtype": "fp16"}),
    ((1, 1, 4), {"sequence_parallel": True, "recompute": "full"}),
    ((2, 2, 2), {"zero": 1, "sequence_parallel": True, "dtype": "bf16", "bucket_mb": 0.004}),
    ((1, 8, 1), {"schedule": "interleaved", "virtual_stages": 2, "micro_batches": 8}),
    ((2, 2, 2), {"schedule": "interleaved", "virtual_stages": 2, "recompute": "full"}),
    ((8, 1, 1), {"zero": 1, "bucket_mb": 0.001}),
    ((1, 2, 4), {"schedule": "zb-h1", "sequence_parallel": True, "micro_batches": 4}),
]


def case_id(case):
    (dp, pp, tp), opts = case
    return f"dp{dp}-pp{pp}-tp{tp}" + "".join(f"-{k}={v}" for k, v in opts.items())


def run_one_step(comm_world, cfg):
    """One training step with a fresh ledger; activations counted without parameter buffers."""
    from mpmp.comm.grid import ProcessGrid
    from mpmp.runtime import Trainer

    par = cfg.parallel
    trainer = Trainer(
        cfg,
        ProcessGrid(par.tp, par.pp, par.dp, comm=comm_world, wire=cfg.precision),
        make_data(cfg),
        random_weights(CFG).__getitem__,
    )
    led = ledger.install(ledger.Ledger(trainer.grid.rank))
    try:
        trainer.train_step()
    finally:
        ledger.install(ledger.Ledger())
    return trainer, led


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_plan_matches_the_trainer_and_the_ledger(comm_of, case):
    (dp, pp, tp), opts = case
    comm_world = comm_of(dp * pp * tp)
    if comm_world is None:
        return
    opts = {"micro_batches": max(2, pp), "global_batch": 16, **opts}
    cfg = train_config(CFG, tp=tp, pp=pp, dp=dp, **opts)
    trainer, led = run_one_step(comm_world, cfg)
    stage = trainer.grid.coord.pp

    want = memory.stage_memory(cfg, stage)
    got = trainer.memory()
    assert (got["param_bytes"], got["grad_bytes"], got["optimizer_bytes"]) == (
        want.params,
        want.grads,
        want.optimizer,
    ), f"rank {trainer.grid.rank}"
    assert want.activations == pytest.approx(got["activation_bytes"], rel=0.10)

    measured = {(group, kind): list(v[:2]) for (kind, group), v in led.totals.items()}
    assert measured == comm.bytes_per_step(cfg, stage), f"rank {trainer.grid.rank}"
