"""`python -m mpmp.bench comm`: nccl-tests' bandwidth formulas, and a tiny run of the whole table."""

import json

import pytest

from mpmp.bench import comm as bench
from mpmp.comm.ledger import bus_factor


@pytest.mark.parametrize(
    "op,n,factor",
    [
        ("all_reduce", 2, 1.0),
        ("all_reduce", 4, 1.5),
        ("all_reduce", 8, 1.75),
        ("all_gather", 2, 0.5),
        ("all_gather", 8, 0.875),
        ("reduce_scatter", 4, 0.75),
        ("broadcast", 8, 1.0),
        ("sendrecv", 8, 1.0),
    ],
)
def test_busbw_uses_nccl_tests_factors(op, n, factor):
    assert bus_factor(op, n) == pytest.approx(factor)
    # 1 GB in 0.5 s is 2 GB/s of algorithm bandwidth, whatever the op
    assert bench.algbw(10**9, 0.5) == pytest.approx(2.0)
    assert bench.busbw(op, 10**9, 0.5, n) == pytest.approx(2.0 * factor)


def test_sizes_are_powers_of_the_step_up_to_the_maximum():
    assert bench.sizes(1024, 64 << 20, 4) == [1 << k for k in range(10, 27, 2)]
    assert bench.sizes(1024, 5000, 2) == [1024, 2048, 4096]


def test_unknown_op_is_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--ops", "all_reduce,alltoall"])
    assert bench.parse_args(["--ops", "broadcast,sendrecv"]).ops == ("broadcast", "sendrecv")


def test_dispatcher_names_a_missing_benchmark(capsys, monkeypatch):
    import importlib

    from mpmp.bench import __main__ as dispatcher

    real = importlib.import_module

    def missing(name, *args):
        if name == "mpmp.bench.train":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    assert dispatcher.main(["train"]) == 2
    assert "'train' benchmark is not in this installation" in capsys.readouterr().err
    assert dispatcher.main(["nope"]) == 2
    assert dispatcher.main([]) == 2 and "usage" in capsys.readouterr().out


@pytest.mark.mpi(min_size=2)
def test_tiny_bench_prints_every_op_with_bandwidth_and_ratio(tmp_path, capsys):
    from mpi4py import MPI

    from mpmp.comm import ledger

    before = ledger.get()
    out = tmp_path / "comm.json"
    argv = ["--min-bytes", "1024", "--max-bytes", str(1 << 20), "--step-factor", "1024"]
    argv += ["--iters", "2", "--warmup", "1", "--repeats", "2", "--json", str(out)]
    assert bench.main(argv) == 0
    assert ledger.get() is before  # the bench's own ledger is gone again
    if MPI.COMM_WORLD.Get_rank() != 0:
        return
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    n = MPI.COMM_WORLD.Get_size()
    assert result["ranks"] == n
    assert {(r["op"], r["bytes"]) for r in result["rows"]} == {
        (op, size) for op in bench.OPS for size in (1024, 1 << 20) if op not in ("all_gather", "reduce_scatter")
    } | {(op, size // 4 // n * 4 * n) for op in ("all_gather", "reduce_scatter") for size in (1024, 1 << 20)}
    for r in result["rows"]:
        assert r["mpmp_busbw"] > 0 and r["raw_busbw"] > 0 and r["ratio"] > 0
        assert r["mpmp_busbw"] == pytest.approx(r["mpmp_algbw"] * bus_factor(r["op"], n))
        assert r["ratio"] == pytest.approx(r["mpmp_busbw"] / r["raw_busbw"])
        assert r["floor_us"] > 0 and r["floor_ratio"] == pytest.approx(r["raw_us"] / r["floor_us"])
        calls = 2 * 2 * (2 if r["op"] == "sendrecv" else 1)  # iters x repeats x messages per call
        assert r["ledger_events"] == calls  # rank 0 takes part in every op, ping-pong included
        assert f" {r['op']:>15}{r['bytes']:>12}" in text
    assert result["median_ratio_ge_1MiB"] > 0
    assert set(result["per_op_ratio_ge_1MiB"]) == set(bench.OPS)
    assert "median mpmp/raw busbw ratio, sizes >= 1 MiB" in text.splitlines()[-1]
