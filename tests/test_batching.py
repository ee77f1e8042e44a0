"""Pipeline transfers batched for NCCL (mpmp/pipeline/batching.py): every schedule's plan runs under
NCCL's rules (a batch completes when all of its operations are matched; sends and receives between
two ranks match in issue order), keeps each rank's computations in order and issues every transfer
exactly once; the checker catches the hang and the mismatch it exists for."""

import pytest

from mpmp.errors import ConfigError
from mpmp.pipeline import batching as B
from mpmp.pipeline import schedules as S


def layouts():
    for schedule in S.SCHEDULES:
        for pp in (2, 3, 4, 8):
            for m in (1, 2, pp, pp + 1, 2 * pp + 3):
                for v in (2, 3) if schedule == "interleaved" else (1,):
                    try:
                        S.validate(schedule, pp, m, v)
                    except ConfigError:
                        continue
                    yield pytest.param(schedule, pp, m, v, id=f"{schedule}-pp{pp}-m{m}-v{v}")


def _flatten(plan):
    for ins in plan:
        yield from ins.ops if isinstance(ins, B.Transfers) else (ins,)


@pytest.mark.parametrize("schedule,pp,m,v", list(layouts()))
def test_every_schedule_has_a_plan_that_runs_under_nccl_rules(schedule, pp, m, v):
    programs = S.build_all(schedule, pp, m, v)
    plans = B.plan(programs, pp)
    B.check(plans, pp)
    for program, plan in zip(programs, plans):
        flat = list(_flatten(plan))
        assert sorted(map(str, flat)) == sorted(map(str, program)), "a transfer lost or doubled"
        computations = [i for i in program if not isinstance(i, B.TRANSFERS)]
        assert [i for i in flat if not isinstance(i, B.TRANSFERS)] == computations
        assert not any(isinstance(i, B.TRANSFERS) for i in plan), "a transfer outside a batch"


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_non_interleaved_schedules_keep_their_transfers_in_place(schedule):
    """Megatron's pairing: consecutive transfers form one batch, nothing moves."""
    programs = S.build_all(schedule, 4, 6)
    assert B.plan(programs, 4) == [B._consecutive(p) for p in programs]
    middle = B.plan(programs, 4)[1]
    assert any(len(i.ops) == 2 for i in middle if isinstance(i, B.Transfers)), "no send/receive pair"


def test_interleaved_needs_deferred_sends_and_the_checker_says_why():
    consecutive = [B._consecutive(p) for p in S.build_all("interleaved", 2, 4, 2)]
    with pytest.raises(S.ScheduleError, match="deadlock on NCCL"):
        B.check(consecutive, 2)
    consecutive = [B._consecutive(p) for p in S.build_all("interleaved", 2, 5, 3)]
    with pytest.raises(S.ScheduleError, match="deadlock on NCCL|issue order"):
        B.check(consecutive, 2)
    assert B.plan(S.build_all("interleaved", 2, 4, 2), 2) != consecutive


def test_checker_refuses_unbatched_transfers_and_mismatched_order():
    programs = S.build_all("gpipe", 2, 2)
    with pytest.raises(S.ScheduleError, match="outside a batch"):
        B.check(programs, 2)
    plans = B.plan(programs, 2)
    receiver = [i for i in plans[1] if isinstance(i, B.Transfers)]
    first, second = receiver[0], receiver[1]  # RecvForward(0) then RecvForward(1) on stage 1
    swapped = [second if i is first else first if i is second else i for i in plans[1]]
    with pytest.raises(S.ScheduleError, match="issue order"):
        B.check([plans[0], swapped], 2)
