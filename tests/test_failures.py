"""Failing safely (docs/command-line.md's exit codes, docs/checkpoints.md's refusals).

A diverging run stops at the step whose numbers are no longer finite (exit code 4) and never replaces
a finite checkpoint; nonsense flags, unusable output paths and an embedding the machine cannot hold
are refused before anything starts (exit code 2); every error is one whole line, printed once per
job, and no rank is left waiting. Each case checks its exit code and the line it must print.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy
import pytest
from helpers import MPIRUN, ROOT, clean_env, run_script, run_train

from mpmp import checkpoint
from mpmp.comm.grid import LocalGrid
from mpmp.config import ModelConfig, ParallelConfig, TrainConfig
from mpmp.data import TokenData, builtin_corpus
from mpmp.errors import CheckpointError, DivergedError
from mpmp.model.gpt import param_infos, random_source
from mpmp.optim.loss_scale import DynamicLossScaler
from mpmp.runtime import Trainer

TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "16", "--global-batch", "4", "--quiet"]
THREE = [*TINY, "--steps", "3"]
DIVERGING = [*TINY, "--steps", "8", "--lr", "1e6"]  # finite for 3 steps, NaN from step 4
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="mpirun is not on PATH")


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error:" in line]


def assert_fails(proc, code: int, *needles) -> str:
    """Exit code `code`, no traceback, exactly one error line, holding every needle; returns it."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    for text in (proc.stdout, proc.stderr):
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def strict_json(line: str):
    """json.loads that refuses NaN and Infinity, as strict parsers do."""
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON: {line}"))


MODEL = ModelConfig(vocab=256, seq_len=16, d_model=32, layers=2, heads=2)


def make_trainer(dtype="fp32", lr=3e-3):
    cfg = TrainConfig(model=MODEL, parallel=ParallelConfig(), global_batch=4, seq_len=16, lr=lr, dtype=dtype)
    return Trainer(cfg, LocalGrid(wire=cfg.precision), TokenData(builtin_corpus(), 16, 256), random_source(MODEL, 0))


def interchange_file(path, cfg: ModelConfig, change=None) -> str:
    source = random_source(cfg, 0)
    arrays = {p.name: source(p.name) for p in param_infos(cfg)}
    if change:
        change(arrays)
    checkpoint.save_interchange(str(path), arrays)
    return str(path)


# ---- a diverging run ------------------------------------------------------------------------------


def test_a_diverging_run_stops_at_its_first_non_finite_step_and_keeps_the_newest_finite_checkpoint(tmp_path):
    """The issue's run: --lr 1e6 with --save-every 2 --keep-last 1. It printed `loss nan` from step 4,
    exited 0 and --keep-last left only a checkpoint of NaN weights."""
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    proc = run_train(*DIVERGING, "--save", str(ck), "--save-every", "2", "--keep-last", "1", "--metrics", str(metrics))
    line = assert_fails(proc, 4, "error: the run diverged at step 4: loss nan, gradient norm nan")
    assert "first non-finite gradient in wte.weight" in line and "stopped without saving" in line
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert sorted(os.listdir(ck)) == ["latest", "step_00000002"]
    assert (ck / "latest").read_text() == "step_00000002\n"
    step_dir = checkpoint.resolve(str(ck))
    for name, value in checkpoint.full_tensors(step_dir).items():
        assert numpy.isfinite(value).all(), name
    # the metrics stay JSON: every step up to the diverged one, its non-finite numbers as null
    rows = [strict_json(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] is None and rows[-1]["grad_norm"] is None and rows[-1]["skipped"] is True


def test_a_checkpoint_holding_non_finite_values_is_never_written(tmp_path):
    """--lr 1e39 turns every weight to inf in the first update: the loss of step 1 is still finite
    (the weights before the update), so only the check before the save can refuse it."""
    ck = tmp_path / "ck"
    proc = run_train(*THREE, "--lr", "1e39", "--clip", "0", "--save", str(ck), "--save-every", "1")
    assert_fails(
        proc, 4, "refusing to save the checkpoint of step 1: model_tp0_pp0.npz: wte.weight holds non-finite values"
    )
    assert os.listdir(ck) == []  # no step directory, no .partial, no latest


@pytest.mark.parametrize(
    "spoil,named",
    [
        (lambda t: t.flat.data.__setitem__(0, numpy.inf), "model_tp0_pp0.npz: ln_f.bias"),
        (lambda t: t.optimizer.adams[0].v.__setitem__(-1, numpy.nan), "optim_rank0.npz: AdamW's v of wte.weight"),
    ],
    ids=["weights", "optimizer-state"],
)
def test_keep_last_never_prunes_the_newest_finite_checkpoint_for_a_refused_one(tmp_path, spoil, named):
    trainer = make_trainer()
    trainer.train_step()
    first = checkpoint.save(str(tmp_path), trainer.state(), keep_last=1)
    trainer.train_step()
    spoil(trainer)
    with pytest.raises(DivergedError, match=f"step 2: {named} holds non-finite values") as caught:
        checkpoint.save(str(tmp_path), trainer.state(), keep_last=1)
    assert caught.value.exit_code == 4
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001"]
    assert checkpoint.resolve(str(tmp_path)) == first


def test_fp16_overflowing_at_the_floor_scale_stops_the_run(tmp_path):
    """fp16 skips an overflowing step and halves the scale (16 halvings from 2**16 to its floor, 1);
    then 20 overflows in a row at the floor stop the run instead of skipping to --steps."""
    metrics = tmp_path / "m.jsonl"
    proc = run_train(*TINY, "--steps", "200", "--lr", "1e6", "--dtype", "fp16", "--metrics", str(metrics))
    line = assert_fails(proc, 4, "error: the run diverged at step ")
    assert "fp16 overflowed in 20 steps in a row with the loss scale at its floor (1)" in line
    rows = [strict_json(line) for line in metrics.read_text().splitlines()]
    assert len(rows) < 60 and all(r["skipped"] for r in rows[-20:]) and rows[-1]["loss_scale"] == 1.0


def test_the_loss_scaler_gives_up_after_its_patience_at_the_floor():
    s = DynamicLossScaler(initial=4.0, patience=3)
    for _ in range(4):  # 4 -> 2 -> 1 -> 1: only the last two used the floor scale
        s.update(True)
    assert s.scale == 1.0 and s.floor_overflows == 2 and not s.gave_up
    s.update(False)  # a good step: the run recovers
    assert s.floor_overflows == 0
    for _ in range(3):
        s.update(True)
    assert s.gave_up


def test_a_non_finite_gradient_skips_the_update_and_is_named_in_model_order():
    trainer = make_trainer()
    trainer.train_step()
    before, adam_steps = trainer.flat.data.copy(), trainer.optimizer.steps_taken
    local = trainer.gradients(trainer.step)
    grads = {p.name: p.grad for p in trainer.model.parameters()}
    grads["ln_f.bias"][0] = numpy.inf
    grads["h.1.mlp.c_fc.weight"][3, 5] = numpy.nan
    done = trainer.update(trainer.step)
    assert done.skipped and math.isnan(done.grad_norm)
    numpy.testing.assert_array_equal(trainer.flat.data, before)  # weights and AdamW untouched
    assert trainer.optimizer.steps_taken == adam_steps
    assert trainer.first_non_finite_gradient() == "h.1.mlp.c_fc.weight"
    why = trainer.divergence(local, done)
    assert why.startswith(f"loss {local:.6g}, gradient norm nan") and why.endswith("in h.1.mlp.c_fc.weight")
    trainer.flat.zero_grad()
    assert trainer.first_non_finite_gradient() is None


@pytest.mark.mpi(min_size=2)
def test_every_stage_names_the_same_first_non_finite_gradient(comm_of):
    """pp = 2: the block whose gradient broke lives on the last stage; both stages name it after one
    all-reduce, so rank 0 can print the job's one line."""
    from helpers import make_data, train_config

    from mpmp.comm.grid import ProcessGrid

    comm = comm_of(2)
    if comm is None:
        return
    cfg = train_config(MODEL, pp=2, micro_batches=2, global_batch=4)
    trainer = Trainer(cfg, ProcessGrid(1, 2, 1, comm=comm), make_data(cfg), random_source(MODEL, 0))
    trainer.gradients(0)
    for p in trainer.model.parameters():
        if p.name == "h.1.attn.c_proj.bias":
            p.grad[...] = numpy.nan
    assert trainer.first_non_finite_gradient() == "h.1.attn.c_proj.bias"


@pytest.mark.parametrize("bad", [numpy.nan, numpy.inf])
def test_init_from_holding_nan_or_inf_is_refused_naming_the_tensor(tmp_path, bad):
    cfg = ModelConfig(vocab=256, seq_len=16, d_model=32, layers=1, heads=2)
    path = interchange_file(tmp_path / "w.npz", cfg, lambda a: a["h.0.mlp.c_fc.weight"].__setitem__((1, 2), bad))
    proc = run_train(*THREE, "--init-from", path)
    assert_fails(proc, 2, path, "h.0.mlp.c_fc.weight holds 1 non-finite value(s)")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_checkpoints_parameters_holding_nan_are_refused_for_resume_and_init_from(monkeypatch, dtype):
    """checkpoint.parameters serves --resume and --init-from DIR (train and generate) alike."""
    bad = {"wte.weight": numpy.array([[0.0, numpy.nan]], numpy.float32)}
    monkeypatch.setattr(checkpoint, "full_tensors", lambda step_dir, manifest: bad)
    monkeypatch.setattr(checkpoint, "optimizer_state", lambda step_dir, manifest: {"master": bad})
    with pytest.raises(CheckpointError, match="wte.weight holds 1 non-finite value"):
        checkpoint.parameters("step_dir", {"config": {"dtype": dtype}})


def test_metrics_lines_write_non_finite_numbers_as_null():
    from mpmp.train import METRICS, metrics_line

    m = dict.fromkeys(METRICS, 1.0) | {"loss": math.nan, "grad_norm": math.inf, "skipped": True}
    row = strict_json(metrics_line(m, {"param_bytes": 4}, "abc"))
    assert row["loss"] is None and row["grad_norm"] is None and row["step_s"] == 1.0


# ---- flags ----------------------------------------------------------------------------------------


REFUSED = [
    (["--lr", "nan"], "argument --lr: must be a finite number, not nan"),
    (["--lr", "inf"], "argument --lr: must be a finite number, not inf"),
    (["--clip", "nan"], "argument --clip: must be a finite number, not nan"),
    (["--beta1", "2"], "--beta1 must be a finite number in [0, 1), not 2.0"),
    (["--beta2", "1"], "--beta2 must be a finite number in [0, 1), not 1.0"),
    (["--beta2", "nan"], "argument --beta2: must be a finite number, not nan"),
    (["--weight-decay", "1e30"], "--weight-decay must be a finite number in [0, 10], not 1e+30"),
    (["--min-lr", "1"], "--min-lr must be a finite number in [0, 0.003], not 1.0"),
    (["--bucket-mb", "nan"], "argument --bucket-mb: must be a finite number, not nan"),
    (["--comm-timeout", "nan"], "argument --comm-timeout: must be a finite number, not nan"),
    (["--comm-timeout", "-1"], "argument --comm-timeout: must be non-negative, not -1"),
    (["--seed", "-1"], "argument --seed: must be non-negative, not -1"),
    (["--seed", str(2**63)], f"--seed must be in [0, 2**63), not {2**63}"),
    (["--steps", "1.5"], "argument --steps: '1.5' is not an integer"),
    (["--preempt-signal", "KILL"], "argument --preempt-signal: SIGKILL cannot be caught"),
    (["--preempt-signal", "STOP"], "argument --preempt-signal: SIGSTOP cannot be caught"),
    (["--preempt-signal", "_DFL"], "argument --preempt-signal: '_DFL' is not a signal name"),
    (["--preempt-signal", "SEGV"], "argument --preempt-signal: SIGSEGV reports a crash"),
    (["--preempt-signal", "WINTER"], "argument --preempt-signal: 'WINTER' is not a signal name"),
    (["--save-every", "2"], "error: --save-every needs --save"),
    (["--keep-last", "1"], "error: --keep-last needs --save"),
    (["--trace-steps", "1:2"], "error: --trace-steps needs --trace"),
]


@pytest.mark.parametrize("args,needle", [pytest.param(a, n, id=" ".join(a)) for a, n in REFUSED])
def test_a_flag_that_cannot_work_is_refused_with_one_line(args, needle):
    proc = run_train(*THREE, *args)
    assert_fails(proc, 2, needle)
    assert proc.stdout == ""  # nothing started


def test_help_shows_each_default_once():
    proc = run_train("--help")
    assert proc.returncode == 0, proc.stderr
    assert "(default: None)" not in proc.stdout and "default: False" not in proc.stdout
    flags = proc.stdout.split("\n  --")[1:]
    assert len(flags) > 40
    for text in flags:
        assert text.count("default") <= 1, text
    assert "(default: 1f1b)" in proc.stdout and "(default: USR1)" in proc.stdout


# ---- output paths -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,where,needle",
    [
        ("--metrics", "folder", "is a folder; give a file name"),
        ("--trace", "folder", "is a folder; give a file name"),
        ("--trace", "under-a-file", "is not a folder"),
        ("--metrics", "missing-folder", "does not exist"),
    ],
)
def test_an_unusable_output_path_is_refused_before_the_first_step(tmp_path, flag, where, needle):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    path = {"folder": tmp_path / "folder", "under-a-file": tmp_path / "file" / "t.json"}.get(where)
    path = path or tmp_path / "nowhere" / "m.jsonl"
    proc = run_train(*THREE, flag, str(path), "--save", str(tmp_path / "ck"))
    assert_fails(proc, 2, f"error: {flag}", needle)
    assert not (tmp_path / "ck").exists()  # refused before anything was created


# ---- too big to run: the embedding alone, then the planner's estimate of a whole rank ---------------


@pytest.mark.parametrize("source", ["--vocab", "token-id"])
def test_an_embedding_too_big_for_the_machine_is_refused_with_the_numbers(tmp_path, source):
    if source == "--vocab":
        args, hint = ["--vocab", "10000000000"], "vocabulary 10,000,000,000"
    else:
        tokens = numpy.arange(100, dtype=numpy.int64)
        tokens[50] = 2_000_000_000  # one stray id: the vocabulary is inferred as 2e9 + 1
        numpy.save(tmp_path / "t.npy", tokens)
        args, hint = ["--data", str(tmp_path / "t.npy"), "--d-model", "512"], "largest token id in"
    proc = run_train(*THREE, *args, timeout=60)
    line = assert_fails(proc, 2, "the embedding alone needs", "GiB per rank", "this machine has", hint)
    assert "MemoryError" not in proc.stderr, line


@pytest.mark.parametrize("args", [["--layers", "100000"], ["--d-model", "4096", "--heads", "32", "--layers", "80"]])
def test_a_model_too_big_for_a_rank_is_refused_at_once_with_the_planners_estimate(args):
    """The planner's memory model (mpmp.plan.memory) sizes every rank before anything is allocated; a
    hundred thousand layers no longer stall start-up in the partitioner."""
    proc = run_train(*THREE, *args, timeout=60)
    assert_fails(proc, 2, "too big to run: a rank needs about", "GiB (parameters", "activations", "python -m mpmp.plan")


def test_the_start_up_estimate_equals_the_planners_and_passes_a_run_that_fits():
    from mpmp.config import ModelConfig, TrainConfig
    from mpmp.errors import ConfigError
    from mpmp.plan.memory import per_rank
    from mpmp.train import check_rank_memory

    cfg = TrainConfig(model=ModelConfig(vocab=256, seq_len=32, d_model=32, layers=2, heads=2), seq_len=32)
    need = max(m.total for m in per_rank(cfg))
    check_rank_memory(cfg, need)  # exactly enough: runs
    with pytest.raises(ConfigError, match="too big to run"):
        check_rank_memory(cfg, need - 1)


# ---- error output under mpirun ---------------------------------------------------------------------


@needs_mpirun
@pytest.mark.parametrize(
    "args,line",
    [
        (["--heads", "3"], "error: --heads (3) must divide --d-model (32)"),
        (["--lr", "nan"], "python -m mpmp.train: error: argument --lr: must be a finite number, not nan"),
        (["--tp", "4"], "error: world size (2) must be divisible by tp*pp (4*1 = 4)"),
    ],
    ids=["config", "argparse", "layout"],
)
def test_an_error_every_rank_finds_is_printed_once_per_job(args, line):
    proc = run_train(*THREE, *args, n=2, timeout=120)
    assert_fails(proc, 2, line)
    assert error_lines(proc)[0].startswith(line)
    assert proc.stderr.count("usage:") <= 1 and "rank 1" not in proc.stderr


@needs_mpirun
def test_an_error_one_rank_finds_is_printed_by_that_rank_and_every_rank_exits(tmp_path):
    """A data file missing on one node only: rank 1 says so (once), and rank 0, which found nothing
    wrong, stops with it instead of waiting for rank 1 in the first collective."""
    proc, took = run_script(
        tmp_path,
        """
        import sys
        from mpmp import train
        from mpmp.comm.mpi import MPI
        from mpmp.errors import DataError
        real = train.prepare
        def prepare(run):
            if MPI().COMM_WORLD.Get_rank() == 1:
                raise DataError("data file /scratch/t.bin does not exist")
            return real(run)
        train.prepare = prepare
        sys.exit(train.main(sys.argv[1:]))
        """,
        args=THREE,
        timeout=90,
    )
    assert_fails(proc, 2, "rank 1: error: data file /scratch/t.bin does not exist")
    assert took < 60


@needs_mpirun
def test_lines_of_different_ranks_never_merge(tmp_path):
    """Unbuffered output, two ranks writing at once: every line arrives whole."""
    proc, _ = run_script(
        tmp_path,
        """
        import sys
        from mpmp import console
        from mpmp.comm.mpi import MPI
        rank = MPI().COMM_WORLD.Get_rank()
        for i in range(400):
            console.line(f"rank {rank}: line {i} " + "x" * 60, sys.stderr)
        """,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 800
    for line in lines:
        head, _, tail = line.rpartition(" ")
        assert tail == "x" * 60 and head.startswith("rank ") and head.count("rank") == 1, line


def wait_for_steps(proc, metrics, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            return
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no steps within {seconds} s: {proc.communicate()}")


@pytest.mark.parametrize("n", [1, pytest.param(2, marks=needs_mpirun)])
def test_sigint_ends_each_rank_with_one_line(tmp_path, n):
    """Ctrl-C (mpirun forwards it to every rank): one line per rank, even from a rank blocked in a
    collective, no KeyboardInterrupt traceback, exit code 130."""
    metrics = tmp_path / "m.jsonl"
    cmd = ([MPIRUN, "-n", str(n)] if n > 1 else []) + [sys.executable, "-m", "mpmp.train", *TINY]
    cmd += ["--steps", "100000", "--metrics", str(metrics)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(proc, metrics)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run did not end within 60 s of SIGINT")
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    for rank in range(n):
        want = f"rank {rank}: interrupted by SIGINT; stopped without saving a checkpoint (exit code 130)"
        assert err.splitlines().count(want) == 1, err


@needs_mpirun
def test_the_watchdog_names_a_stalled_rank_0(tmp_path):
    """Rank 0 stops communicating (busy, or hung outside MPI): only rank 1's watchdog fires, and rank
    1, the lowest rank that reports, names rank 0."""
    proc, took = run_script(
        tmp_path,
        """
        import time
        import numpy
        from mpmp.comm.mpi import MPI, world_group
        from mpmp.comm.watchdog import Watchdog
        g = world_group()
        Watchdog(MPI().COMM_WORLD, timeout=2.0, poll=0.2, exchange_wait=2.0).start()
        x = numpy.ones(4, numpy.float32)
        g.all_reduce(x)
        if g.rank == 0:
            time.sleep(60)
        g.all_reduce(x)
        """,
        timeout=90,
    )
    assert proc.returncode != 0
    assert took < 45
    assert "rank 1: communication timeout: all_reduce on group world (#1)" in proc.stderr
    assert "stalled: rank 0 did not report to the watchdog: not waiting in any communication" in proc.stderr


def test_the_watchdog_report_names_silent_ranks_then_odd_ones():
    from mpmp.comm.watchdog import exchange_report

    reduce, gather = {"group": "tp", "kind": "all_reduce", "seq": 3}, {"group": "tp", "kind": "all_gather", "seq": 3}
    lines = exchange_report({1: reduce, 2: reduce, 3: gather}, 5).splitlines()
    assert lines[0].startswith("stalled: ranks 0, 4 did not report to the watchdog")
    assert lines[1] == "desync: rank 3 is in all_gather #3 on group tp while its peers are in all_reduce #3"


# ---- checkpoints ---------------------------------------------------------------------------------


def test_a_save_clears_what_a_killed_save_left_in_its_partial_folder(tmp_path):
    trainer = make_trainer()
    trainer.train_step()
    partial = tmp_path / "step_00000001.partial"
    partial.mkdir()
    (partial / "model_tp0_pp0.npz.tmp-4242").write_bytes(b"half a file")
    (partial / "optim_rank7.npz").write_bytes(b"from another layout")
    step_dir = checkpoint.save(str(tmp_path), trainer.state())
    assert sorted(os.listdir(step_dir)) == ["manifest.json", "model_tp0_pp0.npz", "optim_rank0.npz"]
    assert not partial.exists()


def test_resume_auto_says_which_step_it_skipped_and_why(tmp_path):
    ck = tmp_path / "ck"
    assert run_train(*THREE, "--save", str(ck), "--save-every", "1").returncode == 0
    (ck / "step_00000003" / "manifest.json").unlink()  # as a save killed before its manifest
    proc = run_train(*TINY, "--steps", "4", "--save", str(ck), "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    skipped = f"warning: --resume: skipped {ck / 'step_00000003'}: no manifest.json (an interrupted or damaged save)"
    assert proc.stderr.splitlines() == [skipped]
    assert "over 2 steps" in proc.stdout  # resumed from step 2


@pytest.mark.parametrize("steps", [2, 1])
def test_resuming_at_or_past_steps_says_so_and_leaves_the_checkpoint(tmp_path, steps):
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    assert run_train(*TINY, "--steps", "2", "--save", str(ck)).returncode == 0
    manifest = ck / "step_00000002" / "manifest.json"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    proc = run_train(*TINY, "--steps", str(steps), "--save", str(ck), "--resume", "auto", "--metrics", str(metrics))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == (
        f"nothing to do: {ck / 'step_00000002'} holds step 2 and --steps is {steps} (the total a resumed run "
        "continues up to); the checkpoint is left as it is\n"
    )
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before
    assert not metrics.exists()


def test_a_d_model_mismatch_on_resume_names_the_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    assert run_train(*THREE, "--save", str(ck)).returncode == 0
    proc = run_train(*TINY, "--steps", "4", "--resume", str(ck), "--d-model", "64")
    line = assert_fails(proc, 2, "--d-model 64 disagrees with the checkpoint (32); leave it out")
    assert "--init-from" not in line


def test_a_full_disk_names_the_file_and_the_reason(tmp_path, monkeypatch):
    trainer = make_trainer()
    trainer.train_step()

    def disk_full(fd):
        raise OSError(28, "No space left on device")  # as fsync says it: no file name

    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    with pytest.raises(CheckpointError) as caught:
        checkpoint.save(str(tmp_path), trainer.state())
    partial = tmp_path / "step_00000001.partial"
    assert str(caught.value) == (
        f"cannot write the checkpoint of step 1 in {tmp_path}: No space left on device "
        f"({partial / 'model_tp0_pp0.npz'})"
    )


def test_a_narrowed_wte_is_reported_as_wte(tmp_path):
    cfg = ModelConfig(vocab=256, seq_len=16, d_model=32, layers=1, heads=2)
    path = interchange_file(tmp_path / "w.npz", cfg, lambda a: a.update({"wte.weight": a["wte.weight"][:, :31]}))
    proc = run_train(*THREE, "--init-from", path)
    assert_fails(proc, 2, f"{path}: wte.weight has shape (256, 31), expected (256, 32)")


@pytest.mark.parametrize("suffix", [".npy", ".bin", ".txt"])
def test_an_empty_token_file_says_it_holds_no_tokens(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    if suffix == ".npy":
        numpy.save(path, numpy.zeros(0, dtype=numpy.int64))
    else:
        path.write_bytes(b"")
    proc = run_train(*THREE, "--data", str(path))
    assert_fails(proc, 2, f"error: {path}: the file holds no tokens")


@pytest.mark.parametrize("value", ["0", "two"])
def test_a_bad_kernel_thread_count_is_refused_at_start_up(value):
    proc = run_train("--steps", "1", env=clean_env(MPMP_KERNEL_THREADS=value))
    assert_fails(proc, 2, "MPMP_KERNEL_THREADS", repr(value))
