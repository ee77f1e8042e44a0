"""`python -m mpmp.bench pipeline`: the stand-in model costs what it is told and carries real activations;
under MPI the bench measures every schedule and reports bubbles beside theory."""

import json
import time

import numpy
import pytest

from mpmp.bench import pipeline as bench
from mpmp.comm.group import SelfGroup
from mpmp.errors import ConfigError
from mpmp.pipeline import schedules as S
from mpmp.pipeline.engine import PipelineEngine


def test_sleep_chunk_costs_its_times_and_defers_the_weight_gradient():
    chunk = bench.SleepChunk(0.004, 0.006, 0.008, is_first=True, is_last=False)
    t = time.perf_counter()
    y, cache = chunk.forward(None, 3)
    assert time.perf_counter() - t >= 0.004
    assert y.shape == bench.ACT_SHAPE and y.dtype == bench.ACT_DTYPE and numpy.all(y == 4)

    wgrad = []
    t = time.perf_counter()
    assert chunk.backward(numpy.ones_like(y), cache, wgrad) is None  # the first chunk has no input gradient
    split = time.perf_counter() - t
    assert split >= 0.006
    assert len(wgrad) == 1  # B ran; W waits in wgrad (and costs its own time below)
    t = time.perf_counter()
    fn, args = wgrad[0]
    fn(*args)
    assert time.perf_counter() - t >= 0.008

    t = time.perf_counter()
    chunk.backward(numpy.ones_like(y), cache, None)  # fused: B + W at once
    assert time.perf_counter() - t >= 0.014


def test_sleep_model_runs_every_schedule_on_one_process_with_the_expected_loss():
    """pp = 1 through the real engine: F, B (and W) of every micro-batch run, the loss says the
    activation went through each chunk, and the compute time is m (F + B + W)."""
    unit, m = 0.001, 3
    for schedule in ("gpipe", "1f1b", "zb-h1"):
        model = bench.SleepModel(pp=1, stage=0, v=1, unit_s=unit)
        assert [(c.is_first, c.is_last) for c in model.chunks] == [(True, True)]
        engine = PipelineEngine(
            model,
            SelfGroup("pp"),
            pp=1,
            stage=0,
            neighbours=(0, 0),
            act_shape=bench.ACT_SHAPE,
            act_dtype=bench.ACT_DTYPE,
        )
        t = time.perf_counter()
        loss = engine.run(S.build(schedule, 1, m, 0), list(range(m)))
        assert time.perf_counter() - t >= 3 * m * unit
        assert loss == pytest.approx(bench.expected_loss(1, m, 1))


def test_sleep_model_splits_the_unit_over_virtual_stages():
    model = bench.SleepModel(pp=2, stage=1, v=2, unit_s=0.02)
    assert [c.t_f for c in model.chunks] == [0.01, 0.01]
    assert [(c.is_first, c.is_last) for c in model.chunks] == [(False, False), (False, True)]  # stages 1, 3 of 4


def test_labels_follow_the_schedule_drawing():
    assert bench._label("compute:F3.0", 1) == "F3"
    assert bench._label("compute:BW12.1", 2) == "B12b"
    assert bench._label("compute:W0.0", 1) == "W0"


def test_bad_schedule_names_are_refused():
    with pytest.raises(ConfigError, match="not one of"):
        bench.parse_args(["--schedules", "gpipe,zb-h2"], world_size=2)


@pytest.mark.mpi(min_size=2)
def test_bench_measures_every_schedule(comm_of, tmp_path, capsys):
    comm = comm_of(2)
    if comm is None:
        return
    out = tmp_path / "pipe.json"
    argv = ["--unit-ms", "2", "--steps", "1", "--warmup", "0", "--json", str(out)]
    assert bench.main(argv, comm=comm) == 0
    if comm.Get_rank() != 0:
        return
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["schedule"] for r in rows] == list(S.SCHEDULES)
    for r in rows:
        assert (r["pp"], r["m"], r["v"]) == (2, 4, 2 if r["schedule"] == "interleaved" else 1)
        assert 0 <= r["bubble"] < 1
        assert r["theory"] == pytest.approx(S.theoretical_bubble(r["schedule"], 2, 4, r["v"]))
        assert len(r["timeline"]) == 2
        assert any(line.startswith(r["schedule"] + " ") for line in table.splitlines())
