"""The planner (mpmp/plan): memory as the trainer allocates it, the pipeline timing as the schedule
simulator computes it, and time at scale against two published tables (Narayanan et al. 2021, Table 1;
Qi et al. 2023, Table 5). The same checks on 2, 4 and 8 ranks are in test_plan_mpi.py."""

import json

import pytest
from helpers import make_data, random_weights, train_config

from mpmp.config import ModelConfig, ParallelConfig, TrainConfig
from mpmp.errors import ConfigError
from mpmp.pipeline import schedules
from mpmp.plan import hardware, memory, search, step_time
from mpmp.plan.__main__ import main as plan_main
from mpmp.plan.stages import chunk_ranges

CFG = ModelConfig(vocab=37, seq_len=8, d_model=16, layers=3, heads=4)


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"dtype": "bf16"},
        {"recompute": "full"},
        {"recompute": "selective", "micro_batches": 2},
        {"dtype": "fp16", "bucket_mb": 0.004},
        {"micro_batches": 4, "zero": 1},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_memory_equals_what_the_one_process_trainer_holds(opts):
    from mpmp.comm.grid import LocalGrid
    from mpmp.runtime import Trainer

    cfg = train_config(CFG, global_batch=4, **opts)
    trainer = Trainer(cfg, LocalGrid(), make_data(cfg), random_weights(CFG).__getitem__)
    trainer.train_step()
    got, want = trainer.memory(), memory.stage_memory(cfg, 0)
    assert (got["param_bytes"], got["grad_bytes"], got["optimizer_bytes"]) == (want.params, want.grads, want.optimizer)
    assert want.activations == pytest.approx(got["activation_bytes"], rel=0.10)


def test_memory_of_a_hundred_thousand_layers_is_cheap_to_compute():
    """The start-up check's function: no O(L^2) anywhere (partition, parameter tiling, buckets)."""
    model = ModelConfig(vocab=256, seq_len=16, d_model=16, layers=100_000, heads=2)
    cfg = TrainConfig(model=model, parallel=ParallelConfig(pp=4, micro_batches=8), global_batch=8, seq_len=16)
    stage = memory.stage_memory(cfg, 1)
    block = 12 * 16 * 16 + 13 * 16
    assert stage.params == 25_000 * block * 4  # one bucket per 25 MiB, dp = 1: no padding


def test_activation_variants_follow_korthikanti_table_2():
    """16-bit, per block (arXiv 2205.05198 Table 2 pattern): selective drops the a·s²·b probabilities,
    sequence parallelism divides the LayerNorm regions by t, full recomputation keeps the input only."""
    s, b, h, a, t = 64, 2, 32, 4, 2
    model = ModelConfig(vocab=64, seq_len=s, d_model=h, layers=2, heads=a)

    def block(**kw):
        par = ParallelConfig(tp=t, **kw)
        return memory.unit_cache_bytes(TrainConfig(model=model, parallel=par, seq_len=s, dtype="bf16"), 1, b, True)

    sbh = s * b * h
    assert block() - block(recompute="selective") == 2 * (a // t) * s * s * b
    assert block() - block(sequence_parallel=True) == 2 * (2 * sbh + 2 * s * b) * (1 - 1 / t)
    assert block(recompute="full") == 2 * sbh and block(recompute="full", sequence_parallel=True) == 2 * sbh // t
    # mpmp keeps LayerNorm's x̂ and GELU's tanh but no dropout masks: 40sbh + 2as²b at t = 1
    par = ParallelConfig()
    one = memory.unit_cache_bytes(TrainConfig(model=model, parallel=par, seq_len=s, dtype="bf16"), 1, b, True)
    assert one == 40 * sbh + 2 * a * s * s * b + 4 * s * b


@pytest.mark.parametrize(
    "schedule,pp,m,v",
    [
        ("gpipe", 3, 5, 1),
        ("1f1b", 4, 8, 1),
        ("1f1b", 5, 3, 1),
        ("interleaved", 4, 8, 2),
        ("interleaved", 2, 5, 3),
        ("zb-h1", 4, 6, 1),
        ("zb-h1", 8, 24, 1),
    ],
)
def test_retimed_pipeline_equals_the_schedule_simulator(schedule, pp, m, v):
    cfg = TrainConfig(
        model=ModelConfig(layers=30),
        parallel=ParallelConfig(pp=pp, schedule=schedule, micro_batches=m, virtual_stages=v),
    )
    for f, b, w, c in [(1, 1, 1, 0), (1, 2, 1, 0.3), (2.0, 1.0, 0.5, 1.0)]:
        run = step_time.retime(cfg, [[(f / v, b / v, w / v)] * v] * pp, [c] * (pp * v), keep=True)
        ref = schedules.simulate(schedules.build_all(schedule, pp, m, v), pp, m, v, t_f=f, t_b=b, t_w=w, t_comm=c)
        assert [[(s, e) for s, e, _ in line] for line in run.timeline] == [[(s, e) for s, e, _ in line] for line in ref]
        assert run.bubble_fraction == pytest.approx(schedules.bubble_fraction(ref), abs=1e-12)


def zero_bubble_costs(cfg):
    """Qi et al. (arXiv 2401.10241) Table 1 FLOPs per layer, summed over each stage's blocks."""
    s, b, h = cfg.seq_len, cfg.global_batch // cfg.parallel.micro_batches, cfg.model.d_model
    per_layer = (s * b * h * (24 * h + 4 * s), s * b * h * (24 * h + 8 * s), 24 * s * b * h * h)
    last = cfg.model.units - 1
    costs = []
    for stage in range(cfg.parallel.pp):
        ((a, e),) = chunk_ranges(cfg, stage)
        blocks = max(0, min(e, last) - max(a, 1))
        costs.append([tuple(blocks * x for x in per_layer)])
    return costs


@pytest.mark.parametrize("schedule,paper", [("1f1b", 0.2431), ("zb-h1", 0.1585)])
def test_bubble_of_qi_et_al_table_5(schedule, paper):
    """1.5B (22 layers, h 2304, s 1024, micro-batch 6), p = 8, m = 24: the measured bubble rates."""
    model = ModelConfig(vocab=50257, seq_len=1024, d_model=2304, layers=22, heads=24)
    par = ParallelConfig(pp=8, schedule=schedule, micro_batches=24)
    cfg = TrainConfig(model=model, parallel=par, global_batch=6 * 24, seq_len=1024)
    run = step_time.retime(cfg, zero_bubble_costs(cfg), [0.0] * 8)
    assert run.bubble_fraction == pytest.approx(paper, rel=0.10)


# Narayanan et al. 2021 (arXiv 2104.04473) Table 1: params (B); heads, hidden, layers; tp, pp; GPUs;
# global batch -> achieved TFLOP/s per A100. Sequence 2048, vocabulary 51,200, fp16, full recomputation.
MEGATRON_TABLE_1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]


def megatron_plan(row):
    _, heads, hidden, layers, tp, pp, gpus, batch, _ = row
    model = ModelConfig(vocab=51200, seq_len=2048, d_model=hidden, layers=layers, heads=heads)
    cfg = TrainConfig(
        model=model, parallel=ParallelConfig(recompute="full"), global_batch=batch, seq_len=2048, dtype="fp16"
    )
    req = search.Request(cfg, gpus, tp, pp, software=step_time.MEGATRON_2021)
    plans, rejected = search.search(req, hardware.load("a100"))
    assert plans, [r.reason for r in rejected]
    return plans[0]


@pytest.mark.parametrize("row", MEGATRON_TABLE_1, ids=lambda r: f"{r[0]}B")
def test_tflops_per_gpu_of_narayanan_et_al_table_1(row):
    """One a100 profile for every row; Megatron-LM's own habits (dropout, gradients all-reduced after
    backward, scatter/gather transfers, NCCL) as that paper ran it; the knobs the planner chooses."""
    assert megatron_plan(row).tflops_per_gpu == pytest.approx(row[-1], rel=0.15)


def test_megatron_flops_are_equation_3():
    model = ModelConfig(vocab=51200, seq_len=2048, d_model=25600, layers=128, heads=160)
    cfg = TrainConfig(model=model, parallel=ParallelConfig(recompute="full"), global_batch=3072, seq_len=2048)
    b, s, l, h, v = 3072, 2048, 128, 25600, 51200
    assert step_time.model_flops(cfg) == pytest.approx(96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h)))


def test_lower_bound_never_exceeds_the_step():
    hw = hardware.load("a100")
    model = ModelConfig(vocab=51200, seq_len=2048, d_model=4096, layers=30, heads=32)
    for schedule, pp, m, v in [("1f1b", 4, 8, 1), ("gpipe", 3, 5, 1), ("interleaved", 4, 8, 2), ("zb-h1", 8, 24, 1)]:
        par = ParallelConfig(tp=2, pp=pp, dp=2, schedule=schedule, micro_batches=m, virtual_stages=v)
        cfg = TrainConfig(model=model, parallel=par, global_batch=4 * m, seq_len=2048, dtype="bf16")
        assert step_time.lower_bound(cfg, hw) <= step_time.step_time(cfg, hw).step_s


def test_profiles_load_and_every_key_is_documented():
    from dataclasses import fields

    for name in ("a100", "h100", "cpu"):
        assert hardware.load(name).name == name
    doc = hardware.__doc__
    assert all(f"  {f.name}" in doc or f.name in doc for f in fields(hardware.Hardware))


def test_bad_profiles_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="neither a profile"):
        hardware.load("tpu-v9")
    with pytest.raises(ConfigError, match="cannot read"):
        hardware.load(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**hardware.load("a100").to_dict(), "gemm_flops": -1}))
    with pytest.raises(ConfigError, match="invalid gemm_flops"):
        hardware.load(str(bad))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tp", "3", "--pp", "1"], "--heads (4) must be divisible by --tp (3)"),
        (["--hardware", "nowhere", "--gpus", "1"], "neither a profile"),
        (["--hardware", "/nonexistent/p.json", "--gpus", "1"], "cannot read"),
        (["--tp", "2"], "--gpus is needed"),
        (["--tp", "1", "--pp", "1", "--micro-batches", "3"], "must be divisible by dp*micro-batches"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, message):
    assert plan_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


JSON_KEYS = {
    "step_s",
    "tflops_per_gpu",
    "bubble_fraction",
    "memory_bytes_per_rank",
    "comm_bytes_per_step",
    "tp",
    "pp",
    "dp",
    "schedule",
    "virtual_stages",
    "micro_batches",
    "micro_batch_size",
}


def test_json_of_one_layout_has_the_documented_keys(capsys):
    argv = ["--tp", "2", "--pp", "2", "--gpus", "8", "--layers", "6", "--dtype", "bf16", "--json"]
    assert plan_main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert JSON_KEYS <= set(plan) and plan["dp"] == 2 and plan["fits"]
    assert [r["rank"] for r in plan["memory_bytes_per_rank"]] == list(range(8))
    assert set(plan["memory_bytes_per_rank"][0]) >= {"rank", "params", "grads", "optimizer", "activations"}
    assert plan["comm_bytes_per_step"][0]["tp:all_reduce"] > 0 and "pp:send" in plan["comm_bytes_per_step"][0]


def test_json_with_the_layout_free_lists_every_layout_best_first(capsys):
    assert plan_main(["--gpus", "4", "--layers", "6", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    runnable = [p for p in plans if p["fits"]]
    assert {(p["tp"], p["pp"]) for p in plans} == {
        (1, 1),
        (1, 2),
        (1, 4),
        (2, 1),
        (2, 2),
        (4, 1),
        (4, 2),
        (2, 4),
        (4, 4),
    } & {(p["tp"], p["pp"]) for p in plans}
    assert [p["step_s"] for p in runnable] == sorted(p["step_s"] for p in runnable)
    assert all(p["rejected"] for p in plans if not p["fits"])


def test_the_planner_imports_no_mpi():
    import subprocess
    import sys

    code = "import sys; from mpmp.plan.__main__ import main; main(['--gpus', '8', '--layers', '6']); print('mpi4py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_without_asynchronous_progress_a_transfer_waits_for_the_senders_next_mpi_call():
    """MPI without a progress thread moves a rendezvous message only inside MPI calls: under GPipe the
    first stage's next call after sending micro-batch 0 is the send of micro-batch 1, one forward later."""
    cfg = TrainConfig(model=ModelConfig(layers=4), parallel=ParallelConfig(pp=2, schedule="gpipe", micro_batches=3))
    costs = [[(1.0, 2.0, 0.0)]] * 2
    eager = step_time.retime(cfg, costs, [0.0, 0.0], keep=True)
    stalled = step_time.retime(cfg, costs, [0.0, 0.0], keep=True, progress=False)
    assert eager.timeline[1][0][0] == 1.0 and stalled.timeline[1][0][0] == 2.0
    assert max(stalled.end) >= max(eager.end)


@pytest.mark.parametrize("n,layout", [(1, []), (4, ["--tp", "2", "--pp", "2"])])
def test_train_explain_puts_the_plan_beside_the_run_and_they_agree(n, layout):
    """`python -m mpmp.train --explain`: memory per rank and bytes per group:op of the last step equal
    the planner's, rank by rank (the bubble and step time are printed beside their predictions)."""
    from helpers import MPIRUN, run_train

    if n > 1 and MPIRUN is None:
        pytest.skip("needs mpirun")
    small = ["--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "16", "--global-batch", "8"]
    proc = run_train(*small, *layout, "--steps", "2", "--quiet", "--explain", n=n, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"{n} of {n} ranks: every group:op equal to the prediction" in out, out
    rows = [line.split(": ", 1)[1] for line in out.splitlines() if line.strip().startswith("rank ") and " | " in line]
    assert len(rows) == n and all(a.strip() == b.strip() for a, b in (r.split(" | ") for r in rows)), rows
    assert "differs" not in out and "bubble: predicted" in out and "step time: predicted" in out
