"""3D layouts (dp x pp x tp), ZeRO-1 and recomputation train the one-process model to the same numbers,
move the data-parallel bytes of the formula, and hold the memory the formulas say."""

from dataclasses import replace

import numpy
import pytest
from helpers import gather_full, make_data, random_weights, reference_run, train_config

from mpmp.comm import ledger
from mpmp.config import ModelConfig
from mpmp.model.gpt import param_infos
from mpmp.nn.parallel import padded_vocab

# 14 blocks + embedding + head = 16 units: enough for pp = 8 with 2 virtual stages.
CFG = ModelConfig(vocab=37, seq_len=8, d_model=16, layers=14, heads=4)
LAYOUTS = [(2, 2, 2), (1, 2, 4), (4, 2, 1), (2, 1, 4), (8, 1, 1), (1, 8, 1)]  # (dp, pp, tp)
STEPS = 5


def cases():
    for dp, pp, tp in LAYOUTS:
        for schedule in ["1f1b", "interleaved"] if pp > 1 else ["1f1b"]:
            for zero in (0, 1):
                for recompute in ("none", "full"):
                    yield pytest.param(
                        dp,
                        pp,
                        tp,
                        schedule,
                        zero,
                        recompute,
                        id=f"dp{dp}-pp{pp}-tp{tp}-{schedule}-zero{zero}-{recompute}",
                    )


def config(dp, pp, tp, schedule="1f1b", zero=0, recompute="none", **kw):
    return train_config(
        CFG,
        tp=tp,
        pp=pp,
        dp=dp,
        schedule=schedule,
        virtual_stages=2 if schedule == "interleaved" else 1,
        micro_batches=max(2, pp),
        global_batch=16,
        zero=zero,
        recompute=recompute,
        bucket_mb=0.004,
        clip=0.5,
        weight_decay=0.1,
        **kw,
    )


def trainer_for(comm, cfg, weights):
    from mpmp.comm.grid import ProcessGrid
    from mpmp.runtime import Trainer

    par = cfg.parallel
    grid = ProcessGrid(par.tp, par.pp, par.dp, comm=comm, wire=cfg.precision)
    return Trainer(cfg, grid, make_data(cfg), weights.__getitem__)


_reference = {}


def reference(cfg, weights_seed):
    key = (weights_seed, cfg.clip, cfg.lr)
    if key not in _reference:
        losses, weights, _ = reference_run(cfg, random_weights(CFG, weights_seed), STEPS)
        _reference[key] = (losses, weights)
    return _reference[key]


@pytest.mark.mpi(min_size=8)
@pytest.mark.parametrize("dp,pp,tp,schedule,zero,recompute", list(cases()))
def test_layout_trains_like_one_process(comm_of, dp, pp, tp, schedule, zero, recompute):
    comm = comm_of(8)
    cfg = config(dp, pp, tp, schedule, zero, recompute)
    ref_losses, ref_weights = reference(cfg, 11)
    trainer = trainer_for(comm, cfg, random_weights(CFG, 11))
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    numpy.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    final = gather_full(trainer.grid, CFG, trainer.model.local_state())
    d = CFG.d_model
    for name, want in ref_weights.items():
        got = final[name]
        if name.endswith("attn.c_attn.bias"):
            # The key bias only shifts every score of a query by the same amount: its gradient is
            # mathematically zero, and AdamW turns round-off there into lr-sized steps.
            got, want = numpy.delete(got, numpy.s_[d : 2 * d]), numpy.delete(want, numpy.s_[d : 2 * d])
        numpy.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.mpi(min_size=8)
@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.parametrize("dp,pp,tp", [(2, 2, 2), (8, 1, 1), (4, 2, 1)])
def test_data_parallel_traffic_is_two_psi_per_rank(comm_of, dp, pp, tp, zero):
    """Plain dp all-reduces the gradient buffer; ZeRO-1 reduce-scatters it and all-gathers the updated
    weights: either way 2 Psi (dp - 1) / dp bytes leave each rank per step (ring algorithms)."""
    comm = comm_of(8)
    trainer = trainer_for(comm, config(dp, pp, tp, zero=zero), random_weights(CFG))
    led = ledger.install(ledger.Ledger(trainer.grid.rank, keep_events=True))
    try:
        trainer.train_step()
    finally:
        ledger.install(ledger.Ledger())
    psi = trainer.flat.grad.nbytes
    kinds = {"iall_reduce", "reduce_scatter", "all_gather"}
    dp_events = [e for e in led.events if e.group == "dp" and e.kind in kinds]
    wire = sum(e.wire_bytes for e in dp_events)
    assert wire == pytest.approx(2 * psi * (dp - 1) / dp)
    used = {e.kind for e in dp_events}
    assert used == ({"reduce_scatter", "all_gather"} if zero else {"iall_reduce"})


@pytest.mark.mpi(min_size=8)
def test_zero1_optimizer_state_is_the_full_state_divided_by_dp(comm_of):
    comm = comm_of(8)
    weights = random_weights(CFG)
    plain = trainer_for(comm, config(8, 1, 1, zero=0), weights)
    sharded = trainer_for(comm, config(8, 1, 1, zero=1), weights)
    full = plain.memory()["optimizer_bytes"]
    assert full == 2 * plain.flat.data.nbytes  # AdamW's m and v
    assert sharded.memory()["optimizer_bytes"] * 8 == sharded.flat.data.nbytes * 2
    assert sharded.flat.data.nbytes - plain.flat.data.nbytes < 8 * 4 * len(sharded.flat.buckets)  # padding only


def expected_param_elements(cfg, ranges, tp):
    """The formula: each unit's tensors on its stage, split tensors divided by tp (the vocabulary
    padded to a multiple of tp), replicated tensors whole."""
    from mpmp.model.gpt import unit_params

    infos = {p.name: p for p in param_infos(cfg)}
    names = {n for a, b in ranges for u in range(a, b) for n in unit_params(cfg, u)}
    total = 0
    for n in names:
        shape = infos[n].shape
        if infos[n].split is None:
            total += int(numpy.prod(shape))
        elif infos[n].split == "vocab":
            total += padded_vocab(shape[0], tp) // tp * shape[1]
        else:
            total += int(numpy.prod(shape)) // tp
    return total


@pytest.mark.mpi(min_size=8)
@pytest.mark.parametrize("dp,pp,tp", LAYOUTS)
def test_parameter_bytes_per_rank_follow_the_formula(comm_of, dp, pp, tp):
    comm = comm_of(8)
    trainer = trainer_for(comm, config(dp, pp, tp), random_weights(CFG))
    from mpmp.pipeline.partition import stage_ranges

    ranges = stage_ranges(trainer.split, pp, trainer.grid.coord.pp, 1)
    expected = expected_param_elements(CFG, ranges, tp)
    assert trainer.flat.param_elements == expected
    # memory() reports the flat buffer: the formula's float32 bytes plus each bucket's dp padding
    padding = trainer.memory()["param_bytes"] - 4 * expected
    assert 0 <= padding < 4 * dp * len(trainer.flat.buckets)


def test_layouts_need_enough_units_and_divisible_batches():
    from mpmp.config import validate
    from mpmp.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot fill"):
        validate(replace(config(1, 8, 1), model=replace(CFG, layers=4)))
    with pytest.raises(ConfigError, match=r"--global-batch \(16\) must be divisible by dp\*micro-batches"):
        validate(replace(config(2, 1, 4), parallel=replace(config(2, 1, 4).parallel, micro_batches=3)))
