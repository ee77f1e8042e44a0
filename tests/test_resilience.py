"""Checkpoints that survive crashes, resume bit-exactly, reshard across layouts, refuse bad files with a
clear message; jobs that end (instead of hanging) when a rank dies, raises, or desynchronises."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy
import pytest
from helpers import MPIRUN, ROOT, clean_env, run_script, run_train

needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="no mpirun")
TINY = ["--d-model", "32", "--layers", "2", "--heads", "4", "--seq-len", "16", "--global-batch", "8", "--quiet"]


def train(args, n=1, timeout=180, check=True):
    proc = run_train(*TINY, *args, n=n, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def losses(path):
    return [json.loads(line)["loss"] for line in open(path)]


def layout(tp, pp, extra=()):
    return ["--tp", str(tp), "--pp", str(pp), "--micro-batches", str(2 * pp), *extra]


# ---- resume ------------------------------------------------------------------------------------


def test_resume_gives_the_bit_identical_loss_curve_on_one_process(tmp_path):
    train(["--steps", "6", "--metrics", str(tmp_path / "whole.jsonl")])
    train(["--steps", "3", "--save", str(tmp_path / "ck"), "--metrics", str(tmp_path / "part.jsonl")])
    train(
        [
            "--steps",
            "6",
            "--resume",
            str(tmp_path / "ck"),
            "--save",
            str(tmp_path / "ck"),
            "--metrics",
            str(tmp_path / "part.jsonl"),
        ]
    )
    assert losses(tmp_path / "part.jsonl") == losses(tmp_path / "whole.jsonl")  # bit for bit


@needs_mpirun
def test_resume_is_bit_identical_on_a_3d_layout_and_reshards_to_others(tmp_path):
    """(2,2,2) uninterrupted for 9 steps against a chain of runs: (2,2,2) for 3 steps, resumed on
    (2,2,2) to 4 [bit-exact], resharded to (1,2,4) to 7, then to (4,1,2) with ZeRO-1 to 9 [round-off]."""
    m = tmp_path / "m.jsonl"
    train(["--steps", "9", "--metrics", str(tmp_path / "whole.jsonl"), *layout(2, 2)], n=8)
    whole = losses(tmp_path / "whole.jsonl")

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(["--steps", "3", "--save", str(a), "--metrics", str(m), *layout(2, 2)], n=8)
    train(["--steps", "4", "--resume", "auto", "--save", str(a), "--metrics", str(m), *layout(2, 2)], n=8)
    assert losses(m) == whole[:4]
    train(["--steps", "7", "--resume", str(a), "--save", str(b), "--metrics", str(m), *layout(4, 2)], n=8)
    train(
        ["--steps", "9", "--resume", str(b), "--save", str(c), "--metrics", str(m), *layout(2, 1, ["--zero", "1"])], n=8
    )
    numpy.testing.assert_allclose(losses(m), whole, rtol=1e-5)
    for ck, (dp, pp, tp, zero) in ((b, (1, 2, 4, 0)), (c, (4, 1, 2, 1))):
        lay = json.load(open(next(ck.glob("step_*")) / "manifest.json"))["layout"]
        assert (lay["dp"], lay["pp"], lay["tp"], lay["zero"]) == (dp, pp, tp, zero)


# ---- atomic writes -----------------------------------------------------------------------------


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from mpmp import checkpoint
    from mpmp.comm.grid import LocalGrid
    from mpmp.config import ModelConfig, ParallelConfig, TrainConfig
    from mpmp.data import TokenData, builtin_corpus
    from mpmp.model.gpt import random_source
    from mpmp.runtime import Trainer

    model = ModelConfig(vocab=256, seq_len=16, d_model=16, layers=1, heads=2)
    cfg = TrainConfig(model=model, parallel=ParallelConfig(), global_batch=4, seq_len=16)
    trainer = Trainer(cfg, LocalGrid(), TokenData(builtin_corpus(), 16, 256), random_source(model, 0))
    trainer.train_step()
    first = checkpoint.save(str(tmp_path), trainer.state())
    trainer.train_step()
    calls = {"n": 0}
    real = checkpoint.atomic_save_npz

    def dies_on_second_file(path, arrays):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-save")
        return real(path, arrays)

    monkeypatch.setattr(checkpoint, "atomic_save_npz", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(str(tmp_path), trainer.state())
    assert checkpoint.resolve(str(tmp_path)) == first
    assert set(checkpoint.full_tensors(first)) >= {"wte.weight", "h.0.attn.c_attn.weight"}


def test_sigkill_during_frequent_saves_always_leaves_a_loadable_checkpoint(tmp_path):
    """Killed at several moments after its first checkpoint, while it keeps saving every step."""
    from mpmp import checkpoint

    for delay in (0.0, 0.3, 0.7):
        ck = tmp_path / f"ck{delay}"
        cmd = [sys.executable, "-m", "mpmp.train", *TINY, "--steps", "100000", "--save", str(ck), "--save-every", "1"]
        proc = subprocess.Popen(cmd, env=clean_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (ck / "latest").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert (ck / "latest").exists(), "the run wrote no checkpoint within 120 s"
        step_dir = checkpoint.resolve(str(ck))
        manifest = checkpoint.read_manifest(step_dir)
        checkpoint.full_tensors(step_dir, manifest)  # checksums verified
        checkpoint.optimizer_state(step_dir, manifest)


# ---- bad checkpoints ---------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    ck = tmp_path / "ck"
    train(["--steps", "2", "--save", str(ck)])
    return ck, ck / "step_00000002"


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_corrupt_model_shard_is_refused_naming_the_file(saved):
    ck, step = saved
    shard = step / "model_tp0_pp0.npz"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = train(["--steps", "4", "--resume", str(ck)], check=False)
    assert_one_line_error(proc, "model_tp0_pp0.npz", "checksum")


def test_truncated_optimizer_file_is_refused_naming_the_file(saved):
    ck, step = saved
    opt = step / "optim_rank0.npz"
    opt.write_bytes(opt.read_bytes()[:100])
    proc = train(["--steps", "4", "--resume", str(ck)], check=False)
    assert_one_line_error(proc, "optim_rank0.npz")


def test_missing_manifest_and_mismatched_flags_are_refused(saved):
    ck, step = saved
    proc = train(["--steps", "4", "--resume", str(ck), "--seq-len", "8"], check=False)
    assert_one_line_error(proc, "--seq-len 8 differs from the checkpoint's 16")
    (step / "manifest.json").unlink()
    proc = train(["--steps", "4", "--resume", str(step)], check=False)
    assert_one_line_error(proc, "step_00000002", "does not exist" if not step.exists() else "")
    proc = train(["--steps", "4", "--resume", str(ck / "nowhere")], check=False)
    assert_one_line_error(proc, "nowhere", "does not exist")


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    proc = train(["--steps", "2", "--save", str(tmp_path / "new"), "--resume", "auto"])
    assert (tmp_path / "new" / "step_00000002" / "manifest.json").exists(), proc.stdout


# ---- failures end the job ------------------------------------------------------------------------


@needs_mpirun
def test_a_rank_killed_mid_step_ends_the_job_and_the_last_checkpoint_loads(tmp_path):
    from mpmp import checkpoint

    ck = tmp_path / "ck"
    cmd = [
        MPIRUN,
        "-n",
        "4",
        sys.executable,
        "-m",
        "mpmp.train",
        *TINY,
        *layout(2, 2, ["--dtype", "fp32"]),
        "--steps",
        "100000",
        "--save",
        str(ck),
        "--save-every",
        "5",
    ]
    proc = subprocess.Popen(
        cmd, env=clean_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 60
    while not (ck / "latest").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (ck / "latest").exists(), "no checkpoint was written"
    victims = [p for p in _descendants(proc.pid) if b"mpmp.train" in _cmdline(p)]
    assert len(victims) == 4
    os.kill(victims[-1], signal.SIGKILL)
    start = time.time()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("mpirun did not exit within 60 s of a rank's death")
    assert proc.returncode != 0
    assert time.time() - start < 60
    step_dir = checkpoint.resolve(str(ck))
    checkpoint.full_tensors(step_dir)
    checkpoint.optimizer_state(step_dir)


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return sorted(out)


@needs_mpirun
def test_an_exception_in_one_trainer_rank_aborts_the_job_with_its_message(tmp_path):
    proc, took = run_script(
        tmp_path,
        """
        import sys
        from mpmp import runtime, train
        from mpmp.comm.mpi import MPI
        real = runtime.Trainer.train_step
        def failing(self, *a, **k):
            if self.step == 2 and MPI().COMM_WORLD.Get_rank() == 1:
                raise ValueError("injected failure on rank 1")
            return real(self, *a, **k)
        runtime.Trainer.train_step = failing
        sys.exit(train.main(["--steps", "50", "--d-model", "32", "--layers", "2", "--heads", "2",
                             "--seq-len", "16", "--global-batch", "8", "--quiet"]))
        """,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "rank 1: ValueError: injected failure on rank 1" in proc.stderr
    assert took < 30


@needs_mpirun
def test_watchdog_names_the_desynchronised_rank_and_aborts(tmp_path):
    proc, took = run_script(
        tmp_path,
        """
        import numpy
        from mpmp.comm.mpi import MPI, world_group
        from mpmp.comm.watchdog import Watchdog
        g = world_group()
        Watchdog(MPI().COMM_WORLD, timeout=2.0, poll=0.2).start()
        x = numpy.ones(4, numpy.float32)
        g.all_reduce(x)
        if g.rank == 1:
            g.all_gather(numpy.ones((1, 4), numpy.float32))  # the others are in an all_reduce
        else:
            g.all_reduce(x)
        """,
        timeout=60,
    )
    assert proc.returncode != 0
    assert took < 30
    assert "communication timeout" in proc.stderr
    assert "desync: rank 1 is in all_gather #1 on group world while its peers are in all_reduce #1" in proc.stderr
    assert "last completed per group: world#0 all_reduce" in proc.stderr


def test_desync_report_names_the_odd_rank_out():
    from mpmp.comm.watchdog import desync_report

    states = [{"group": "tp", "kind": "all_reduce", "seq": 7}] * 3 + [{"group": "tp", "kind": "all_gather", "seq": 7}]
    assert (
        desync_report(dict(enumerate(states)))
        == "desync: rank 3 is in all_gather #7 on group tp while its peers are in all_reduce #7"
    )


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_resume_is_bit_identical_and_keep_last_prunes(tmp_path, dtype):
    """fp32 master weights and the fp16 loss scale are part of the checkpoint."""
    common = ["--dtype", dtype, "--save-every", "1", "--keep-last", "2"]
    train(["--steps", "6", "--dtype", dtype, "--metrics", str(tmp_path / "whole.jsonl")])
    train(["--steps", "3", *common, "--save", str(tmp_path / "ck"), "--metrics", str(tmp_path / "part.jsonl")])
    assert sorted(p.name for p in (tmp_path / "ck").glob("step_*")) == ["step_00000002", "step_00000003"]
    train(
        [
            "--steps",
            "6",
            *common,
            "--resume",
            "auto",
            "--save",
            str(tmp_path / "ck"),
            "--metrics",
            str(tmp_path / "part.jsonl"),
        ]
    )
    assert losses(tmp_path / "part.jsonl") == losses(tmp_path / "whole.jsonl")


def test_resuming_from_an_older_checkpoint_drops_the_abandoned_later_ones(tmp_path):
    from mpmp import checkpoint

    ck = tmp_path / "ck"
    train(["--steps", "4", "--save", str(ck), "--save-every", "2"])
    train(["--steps", "3", "--resume", str(ck / "step_00000002"), "--save", str(ck), "--keep-last", "1"])
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000003"]
    assert (ck / "latest").read_text().strip() == "step_00000003"
    assert checkpoint.resolve(str(ck)).endswith("step_00000003")


def test_an_unwritable_save_folder_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = train(["--steps", "2", "--save", str(blocker / "ck")], check=False)
    assert_one_line_error(proc, "--save", "cannot create the folder")
    assert "step" not in proc.stdout


def test_export_of_a_mixed_precision_run_gives_its_fp32_master_weights(tmp_path):
    from mpmp import checkpoint

    ck = tmp_path / "ck"
    train(["--steps", "3", "--dtype", "bf16", "--save", str(ck)])
    checkpoint.export(str(ck), str(tmp_path / "out.npz"))
    _, exported = checkpoint.load_interchange(str(tmp_path / "out.npz"), heads=4)
    masters = checkpoint.optimizer_state(checkpoint.resolve(str(ck)))["master"]
    for name, value in masters.items():
        numpy.testing.assert_array_equal(exported[name], value, err_msg=name)
    rounded = checkpoint.full_tensors(checkpoint.resolve(str(ck)))
    assert any(not numpy.array_equal(rounded[n], masters[n]) for n in masters)


def test_the_watchdog_ignores_sends_in_flight_and_watches_waits():
    """A send posted early and waited for at the end of a step is not a hang; waiting for it is."""
    from mpmp.comm import ledger

    led = ledger.Ledger()
    send = led.begin("send", "pp", blocking=False)
    coll = led.begin("all_reduce", "tp")
    assert list(led.blocked) == [coll]
    led.end(coll, 2, -1, 8, "float32")
    assert not led.blocked
    led.wait_start(send)
    assert list(led.blocked) == [send]
    led.end(send, 2, 1, 8, "float32", blocked=0.0)
    assert not led.blocked and not led.in_flight and not led.blocked_since()
    led.enter("all_gather", "dp")  # the blocking operations' path
    assert [(g, kind) for g, _, kind, _, _ in led.blocked_since()] == [("dp", "all_gather")]
    led.leave(2, -1, 8, "float32")
    assert not led.blocked_since() and led.last_done["dp"] == (0, "all_gather", "")
