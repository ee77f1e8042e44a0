"""`python -m mpmp.train` as a user runs it (docs/command-line.md, a contract).

Single-process subprocess runs of a tiny model, each with a timeout. A bad input ends the run with
exit code 2 and one clear error line on stderr, never a traceback.
"""

import json
import math

import numpy
import pytest
from helpers import MPIRUN, assert_one_clear_error, run_module, run_train

from mpmp import checkpoint
from mpmp.comm.grid import LocalGrid
from mpmp.config import ModelConfig, ParallelConfig, TrainConfig
from mpmp.data import TokenData, builtin_corpus
from mpmp.model.gpt import param_infos, random_source
from mpmp.runtime import Trainer

TINY = ["--steps", "2", "--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "16", "--global-batch", "4"]


def train(*args, timeout=60):
    return run_train(*args, timeout=timeout)


def interchange_file(path, cfg: ModelConfig, seed=0):
    source = random_source(cfg, seed)
    checkpoint.save_interchange(str(path), {p.name: source(p.name) for p in param_infos(cfg)})
    return str(path)


# ---------------------------------------------------------------------------------------------
# Bad inputs: exit code 2, one line
# ---------------------------------------------------------------------------------------------


def test_missing_data_file(tmp_path):
    path = str(tmp_path / "absent.bin")
    proc = train(*TINY, "--data", path)
    assert_one_clear_error(proc, path)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_token_id_not_below_vocab(tmp_path):
    path = tmp_path / "big.npy"
    numpy.save(path, numpy.array([1, 2, 300, 4, 5] * 20, dtype=numpy.int64))
    proc = train(*TINY, "--data", str(path), "--vocab", "256")
    assert_one_clear_error(proc, "300", "256")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_heads_not_dividing_d_model():
    proc = train(*TINY, "--heads", "3")
    assert_one_clear_error(proc, "--heads", "3", "32")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_seq_len_longer_than_the_position_table_of_init_from(tmp_path):
    path = interchange_file(tmp_path / "short.npz", ModelConfig(vocab=256, seq_len=8, d_model=32, layers=1, heads=2))
    proc = train(*TINY, "--init-from", path)  # --seq-len 16 > 8 positions
    line = assert_one_clear_error(proc, "16", "8")
    assert "seq-len" in line and "wpe" in line
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_unknown_flag():
    proc = train(*TINY, "--no-such-flag")
    assert_one_clear_error(proc, "--no-such-flag")


def test_global_batch_not_divisible_by_micro_batches():
    proc = train(*TINY, "--micro-batches", "3")
    assert_one_clear_error(proc, "--global-batch", "4", "3")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bad_schedule_name():
    proc = train(*TINY, "--schedule", "round-robin")
    assert_one_clear_error(proc, "round-robin")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bad_learning_rate_schedule_name():
    proc = train(*TINY, "--lr-schedule", "exponential")
    assert_one_clear_error(proc, "exponential")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_tensor_parallel_on_one_process_is_a_world_size_mismatch():
    proc = train(*TINY, "--tp", "2")
    line = assert_one_clear_error(proc, "world size", "1", "2")
    assert "tp" in line
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_negative_number_is_refused_by_the_parser():
    proc = train(*TINY, "--lr", "-1")
    assert_one_clear_error(proc, "--lr")


def test_corrupt_init_from_file(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip file")
    proc = train(*TINY, "--init-from", str(path))
    assert_one_clear_error(proc, str(path))
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.skipif(MPIRUN is None, reason="mpirun is not on PATH")
def test_mpirun_world_too_small_for_tp_fails_with_the_reason():
    proc = run_train(*TINY, "--tp", "4", "--heads", "4", n=2, timeout=60)
    assert proc.returncode != 0, proc.stdout
    assert "world size (2)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# Working runs
# ---------------------------------------------------------------------------------------------


def test_help_exits_zero_and_lists_the_contract_flags():
    proc = train("--help", timeout=30)
    assert proc.returncode == 0, proc.stderr
    for flag in (
        "--tp",
        "--pp",
        "--schedule",
        "--virtual-stages",
        "--micro-batches",
        "--global-batch",
        "--seq-len",
        "--vocab",
        "--d-model",
        "--layers",
        "--heads",
        "--steps",
        "--lr",
        "--weight-decay",
        "--clip",
        "--seed",
        "--data",
        "--init-from",
        "--save",
        "--save-every",
        "--resume",
        "--metrics",
        "--trace",
    ):
        assert flag in proc.stdout, flag


def test_metrics_file_has_one_json_object_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    proc = train(*TINY, "--metrics", str(path), "--quiet")
    assert proc.returncode == 0, proc.stderr
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    rows = [json.loads(line) for line in lines]
    for row in rows:
        assert {"step", "loss", "grad_norm", "lr", "step_s", "tokens_per_s"} <= set(row)
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        assert math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
        assert row["lr"] == pytest.approx(3e-3)  # the default constant schedule
        assert row["step_s"] > 0
        # B*S = 4*16 tokens per step.
        assert row["tokens_per_s"] == pytest.approx(64 / row["step_s"], rel=1e-6)
    steps = [row["step"] for row in rows]
    assert len(set(steps)) == 2 and steps == sorted(steps)
    # The first loss of an untrained model is about ln(V).
    assert rows[0]["loss"] == pytest.approx(math.log(256), rel=0.1)


def test_init_from_then_save_exports_the_trained_model(tmp_path):
    cfg = ModelConfig(vocab=256, seq_len=16, d_model=32, layers=1, heads=2)
    init = interchange_file(tmp_path / "init.npz", cfg, seed=5)
    proc = train(*TINY, "--init-from", init, "--save", str(tmp_path / "run"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    out = str(tmp_path / "out.npz")
    exported = run_module("mpmp.checkpoint", "export", tmp_path / "run", out, timeout=60)
    assert exported.returncode == 0, exported.stderr

    got_cfg, got = checkpoint.load_interchange(out, heads=2)
    init_cfg, start = checkpoint.load_interchange(init, heads=2)
    assert got_cfg == init_cfg == cfg
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in start.items()}
    assert checkpoint.read_manifest(checkpoint.resolve(str(tmp_path / "run")))["step"] == 2
    # Two small steps away from the file it started from...
    changed = [k for k in start if not numpy.array_equal(got[k], start[k])]
    assert "h.0.attn.c_attn.weight" in changed and "wte.weight" in changed
    for k in start:
        assert numpy.abs(got[k] - start[k]).max() < 0.05, k
    # ...and the same two steps as a Trainer started in this process from the same file.
    tcfg = TrainConfig(model=cfg, parallel=ParallelConfig(), global_batch=4, seq_len=16, steps=2)
    trainer = Trainer(tcfg, LocalGrid(), TokenData(builtin_corpus(), 16, 256), start.__getitem__)
    trainer.train_step()
    trainer.train_step()
    for k, want in trainer.model.local_state().items():
        numpy.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------------------------------------
# Resume: `--steps K` is the total; a resumed run continues from its checkpoint's step up to K
# ---------------------------------------------------------------------------------------------


def test_resume_from_a_missing_checkpoint_is_an_error(tmp_path):
    path = str(tmp_path / "no-such-run")
    proc = train(*TINY, "--resume", path, "--quiet")
    assert_one_clear_error(proc, path)


def export_run(run_dir, out):
    checkpoint.export(str(run_dir), str(out))
    return checkpoint.load_interchange(str(out), heads=2)[1]


def test_resumed_run_continues_from_the_checkpoint_step(tmp_path):
    four = [*TINY[2:], "--steps", "4", "--quiet"]  # TINY without its --steps 2
    first = train(*TINY, "--save", str(tmp_path / "run"), "--metrics", str(tmp_path / "m1.jsonl"), "--quiet")
    assert first.returncode == 0, first.stderr
    resumed = train(
        *four,
        "--resume",
        str(tmp_path / "run"),
        "--save",
        str(tmp_path / "run"),
        "--metrics",
        str(tmp_path / "m2.jsonl"),
    )
    assert resumed.returncode == 0, resumed.stderr
    whole = train(*four, "--save", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    steps1 = [json.loads(line)["step"] for line in (tmp_path / "m1.jsonl").read_text().splitlines()]
    steps2 = [json.loads(line)["step"] for line in (tmp_path / "m2.jsonl").read_text().splitlines()]
    assert len(steps2) == 2, f"a run resumed at step 2 with --steps 4 ran {len(steps2)} steps: {steps2}"
    assert min(steps2) > max(steps1)
    assert checkpoint.read_manifest(checkpoint.resolve(str(tmp_path / "run")))["step"] == 4
    # Stopping at step 2 and resuming gives the weights of an uninterrupted 4-step run.
    got = export_run(tmp_path / "run", tmp_path / "resumed.npz")
    want = export_run(tmp_path / "whole", tmp_path / "whole.npz")
    for k in want:
        numpy.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
