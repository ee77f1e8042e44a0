"""The yardstick of `python -m mpmp.bench train --against torch`: the same GPT-2 step in PyTorch eager.

A small GPT-2 written as PyTorch users write it (nanoGPT's blocks): pre-LayerNorm, fused q|k|v
projection, `scaled_dot_product_attention` with the causal flag, GELU with the tanh approximation,
the output head tied to the token embedding, mean cross-entropy; `torch.optim.AdamW` with mpmp's
betas, eps and decoupled weight decay on 2-D tensors only, and global-norm clipping. It starts from
the same weights as mpmp's model (the interchange tensors, transposed into nn.Linear's [out, in]) and
trains on the same batches, so the first losses agree: the comparison is of one computation done
two ways. PyTorch's threads are set to mpmp's BLAS threads of the process.
"""

import functools
import json
import statistics
import sys
import time

from mpmp._setup import blas_thread_count
from mpmp.bench.train import configs, make_trainer, products_runner, rate, token_data
from mpmp.model.gpt import random_source


def _modules(torch):
    """The model's classes, defined once PyTorch is imported (it is an optional dependency)."""
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.heads = heads
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            # named as the interchange format: h.{i}.attn.c_attn.weight ...
            self.attn = nn.ModuleDict({"c_attn": nn.Linear(d, 3 * d), "c_proj": nn.Linear(d, d)})
            self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)})

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.attn["c_attn"](self.ln_1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn["c_proj"](a.transpose(1, 2).reshape(b, t, d))
            h = F.gelu(self.mlp["c_fc"](self.ln_2(x)), approximate="tanh")
            return x + self.mlp["c_proj"](h)

    class GPT(nn.Module):
        def __init__(self, vocab, seq, d, layers, heads):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
            self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
            self.ln_f = nn.LayerNorm(d)

        def forward(self, ids, targets):
            x = self.wte(ids) + self.wpe.weight[: ids.shape[1]]
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T  # the tied head
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

    return GPT


class TorchStep:
    """One training step of the PyTorch GPT-2 of shape (V, D, L, H, S) on given batches."""

    def __init__(self, model_cfg, train_cfg, source, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        cfg = model_cfg
        self.model = _modules(torch)(cfg.vocab, cfg.seq_len, cfg.d_model, cfg.layers, cfg.heads)
        self._load(source)
        decay = [p for p in self.model.parameters() if p.dim() == 2]
        rest = [p for p in self.model.parameters() if p.dim() != 2]
        groups = [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        hp = train_cfg.adamw
        self.opt = torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps)
        self.clip = train_cfg.clip

    def _load(self, source):
        """The interchange tensors of mpmp's model, linear weights transposed to nn.Linear's layout."""
        state = self.model.state_dict()
        with self.torch.no_grad():
            for name, target in state.items():
                value = self.torch.from_numpy(source(name))
                linear = value.dim() == 2 and name not in ("wte.weight", "wpe.weight")
                target.copy_(value.T if linear else value)

    def step(self, inputs, targets) -> float:
        """Forward, backward, clip, AdamW on one batch of token ids; returns the loss."""
        torch = self.torch
        loss = self.model(torch.from_numpy(inputs).long(), torch.from_numpy(targets).long())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return loss.item()


def against_torch(shape, *, steps=5, warmup=2) -> tuple[dict, dict]:
    """mpmp's fp32 step, PyTorch's (TorchStep) on the same batches, and the step's matrix products
    alone (bench.train.products_runner), one after the other in turn (which goes first rotates), in
    this process. Returns (mpmp's rate as train_rate's, {"step_s", "ratio": median over steps of
    torch/mpmp, "loss_diff": the largest |loss difference|, "products_s", "bound": median over steps
    of torch/products, the most torch/mpmp any step on this BLAS could reach})."""
    trainer, model = make_trainer(shape, "fp32", steps + warmup)
    ref = TorchStep(model, trainer.cfg, random_source(model, 0), blas_thread_count())
    products = products_runner(shape)
    times, loss_diff = ([], [], []), 0.0
    for i in range(steps + warmup):
        inputs, targets = trainer.data.replica_batch(i, trainer.cfg.global_batch, 0, 1)
        runs = [lambda: trainer.train_step()["loss"], functools.partial(ref.step, inputs, targets), products]
        done = _timed_in_turn(runs, first=i % len(runs))
        loss_diff = max(loss_diff, abs(done[0][1] - done[1][1]))
        if i >= warmup:
            for kept, (seconds, _) in zip(times, done):
                kept.append(seconds)
    ours, theirs, alone = times
    torch_row = {
        "step_s": statistics.median(theirs),
        "ratio": statistics.median(t / o for o, t in zip(ours, theirs)),
        "loss_diff": loss_diff,
        "products_s": statistics.median(alone),
        "bound": statistics.median(t / p for p, t in zip(alone, theirs)),
    }
    return rate(shape, "fp32", statistics.median(ours), model, trainer), torch_row


def _timed_in_turn(runs, first):
    """[(seconds, result)] of calls run in turn from runs[first] (wrapping round); returned in list order."""
    out = [None] * len(runs)
    for j in range(len(runs)):
        k = (first + j) % len(runs)
        t = time.perf_counter()
        result = runs[k]()
        out[k] = (time.perf_counter() - t, result)
    return out


def peak_memory(shape, side: str, steps=3) -> dict:
    """Peak resident memory of a fresh process that imports `side` ("mpmp" or "torch"), builds the
    model of shape and runs steps fp32 steps: {"imports": RSS after the imports, "peak": the peak},
    bytes. Each in its own process, since the peak of a process never comes down."""
    import subprocess

    code = (
        f"from mpmp.bench.torch_gpt import _peak_memory_child; _peak_memory_child({tuple(shape)!r}, {side!r}, {steps})"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _resident_peak() -> int:
    """This process's peak resident bytes (VmHWM: unlike ru_maxrss, not carried over from the parent
    process across fork and exec)."""
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    return int(kib) * 1024


def _peak_memory_child(shape, side, steps):
    from mpmp.runtime import Trainer  # noqa: F401  (imported before the baseline is read)

    if side == "torch":
        import torch  # noqa: F401
    imports = _resident_peak()
    if side == "torch":
        model, cfg = configs(shape, "fp32", steps)
        ref = TorchStep(model, cfg, random_source(model, 0), blas_thread_count())
        data = token_data(shape)
        for i in range(steps):
            ref.step(*data.replica_batch(i, cfg.global_batch, 0, 1))
    else:
        trainer, _ = make_trainer(shape, "fp32", steps)
        for _ in range(steps):
            trainer.train_step()
    peak = _resident_peak()
    print(json.dumps({"imports": imports, "peak": peak}))


def available() -> str | None:
    """None when PyTorch can be imported, else why not."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None
