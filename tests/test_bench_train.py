"""python -m mpmp.bench train --against torch: the PyTorch yardstick computes what mpmp computes, and
without PyTorch the benchmark says so and goes on."""

import pytest

from mpmp.bench import torch_gpt
from mpmp.bench import train as bench_train

TINY = (256, 32, 2, 2, 16, 2)  # V, D, L, H, S, B (the built-in corpus is bytes)


def test_the_torch_step_trains_the_same_model_on_the_same_batches():
    pytest.importorskip("torch")
    alone, vs = torch_gpt.against_torch(TINY, steps=3, warmup=1)
    # the same weights, batches, AdamW and clipping: the losses of four steps agree to float32 round-off
    assert vs["loss_diff"] < 1e-4
    assert vs["ratio"] > 0 and vs["step_s"] > 0 and alone["step_s"] > 0


def test_without_torch_it_says_so_and_reports_the_gemm_fraction(monkeypatch, capsys):
    monkeypatch.setattr(torch_gpt, "available", lambda: "No module named 'torch'")
    assert (
        bench_train.main(["--against", "torch", "--config", ",".join(map(str, TINY)), "--steps", "1", "--warmup", "0"])
        == 0
    )
    out = capsys.readouterr().out
    assert "PyTorch is not installed" in out and "reporting the GEMM fraction only" in out
    assert "of the GEMM" in out and "torch step / mpmp step" not in out


def test_the_torch_ratio_line_and_both_peaks_are_printed(capsys):
    pytest.importorskip("torch")
    config = ",".join(map(str, TINY))
    assert bench_train.main(["--against", "torch", "--config", config, "--steps", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch step / mpmp step = " in out and "losses differ by at most" in out
    assert "torch step / the matrix products alone = " in out
    assert "peak resident memory of a process running the step: mpmp " in out and "PyTorch " in out


def test_against_torch_compares_fp32_steps_only(capsys):
    config = ",".join(map(str, TINY))
    assert bench_train.main(["--against", "torch", "--dtype", "bf16", "--config", config, "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "(not --dtype bf16): reporting the GEMM fraction only" in out and "torch step / mpmp step" not in out


def test_the_bench_chooses_comm_as_the_trainer_does(capsys):
    assert bench_train.main(["--comm", "nccl", "--config", ",".join(map(str, TINY)), "--steps", "1"]) == 2
    assert "--comm nccl: NCCL moves GPU arrays and the backend is numpy" in capsys.readouterr().err


def test_the_step_products_are_the_model_flops_but_for_biases_and_layernorms():
    """step_products lists every matrix product of the step once: their FLOPs are the 6N + 12·L·D·S
    per token the benchmark counts, less 6 per token for each bias and LayerNorm parameter."""
    from mpmp.config import ModelConfig

    v, d, layers, heads, s, b = shape = (256, 64, 3, 4, 32, 2)
    products = bench_train.step_products(shape)
    flops = sum(2 * batch * m * k * n * times for (batch, m, k, n), times in products.items())
    per_token = ModelConfig(vocab=v, seq_len=s, d_model=d, layers=layers, heads=heads).flops_per_token(s)
    vectors = layers * (3 * d + d + 4 * d + d + 4 * d) + 2 * d  # biases and LayerNorms, the final one too
    assert flops == (per_token - 6 * vectors) * b * s


def test_the_products_alone_line_bounds_the_step(capsys):
    config = ",".join(map(str, TINY))
    assert bench_train.main(["--config", config, "--steps", "1", "--warmup", "0", "--json", "/dev/null"]) == 0
    out = capsys.readouterr().out
    assert "its matrix products alone, back to back: " in out and "of the step (no step on this BLAS" in out
