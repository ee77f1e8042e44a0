"""Shared test helpers: float64 finite differences for the backward tests; for the parallel-equals-
one-process tests, random interchange weights, single-process references, and gathering any
layout's shards back into full tensors; for the command-line tests, `python -m mpmp.train` run as a
user runs it, with or without mpirun."""

import os
import shutil
import subprocess
import sys

import numpy

from mpmp.config import ModelConfig, ParallelConfig, TrainConfig
from mpmp.data import TokenData
from mpmp.model.gpt import param_infos
from mpmp.nn.parallel import unshard

FD_STEP = 1e-6  # central-difference step: truncation ~h^2, rounding ~eps/h, both far below 1e-6


def numerical_grad(loss, x, h=FD_STEP):
    """dloss/dx by central differences; x is perturbed in place and restored."""
    flat = x.reshape(-1)
    assert numpy.shares_memory(flat, x)
    grad = numpy.zeros(x.size, dtype=numpy.float64)
    for i in range(x.size):
        old = flat[i]
        flat[i] = old + h
        plus = loss()
        flat[i] = old - h
        minus = loss()
        flat[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad.reshape(x.shape)


def rel_error(analytic, numeric):
    """max|a - n| / max(max|a|, max|n|): scale-free, and 0 when both are 0."""
    analytic, numeric = numpy.asarray(analytic), numpy.asarray(numeric)
    scale = max(numpy.abs(analytic).max(), numpy.abs(numeric).max(), 1e-300)
    return numpy.abs(analytic - numeric).max() / scale


def random_weights(cfg: ModelConfig, seed=0) -> dict:
    """Every interchange tensor random (biases and LayerNorms too), so no gradient hides behind a zero."""
    rng = numpy.random.default_rng(seed)
    out = {}
    for p in param_infos(cfg):
        if p.name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            out[p.name] = (1 + 0.1 * rng.standard_normal(p.shape)).astype(numpy.float32)
        else:
            out[p.name] = (0.05 * rng.standard_normal(p.shape)).astype(numpy.float32)
    return out


def corpus(n=4000, vocab=37, seed=1):
    """A token stream with structure worth learning (a noisy repeating pattern)."""
    rng = numpy.random.default_rng(seed)
    base = numpy.arange(n) * 7 % vocab
    noise = rng.integers(0, vocab, n)
    return numpy.where(rng.random(n) < 0.2, noise, base).astype(numpy.int64)


def train_config(model: ModelConfig, tp=1, pp=1, dp=1, **kw) -> TrainConfig:
    par_keys = {f for f in ParallelConfig.__dataclass_fields__}
    par = ParallelConfig(tp=tp, pp=pp, dp=dp, **{k: v for k, v in kw.items() if k in par_keys})
    rest = {k: v for k, v in kw.items() if k not in par_keys}
    rest.setdefault("seq_len", model.seq_len)
    rest.setdefault("lr", 1e-2)
    return TrainConfig(model=model, parallel=par, **rest)


def make_data(cfg: TrainConfig, tokens=None):
    tokens = corpus(vocab=cfg.model.vocab) if tokens is None else tokens
    return TokenData(tokens, cfg.seq_len, cfg.model.vocab)


def reference_run(cfg: TrainConfig, weights: dict, steps: int):
    """The one-process run of the same model and data: (losses, final full weights, trainer)."""
    from dataclasses import replace

    from mpmp.comm.grid import LocalGrid
    from mpmp.runtime import Trainer

    one = replace(cfg, parallel=ParallelConfig())
    trainer = Trainer(one, LocalGrid(), make_data(one), weights.__getitem__)
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    return losses, dict(trainer.model.local_state()), trainer


def gather_full(grid, cfg: ModelConfig, local: dict) -> dict:
    """{name: full tensor} from every rank's {name: local shard} (tests only: pickled gather)."""
    from mpmp.comm.grid import coord_of

    everyone = grid.comm.allgather((grid.rank, {k: numpy.asarray(v) for k, v in local.items()}))
    infos = {p.name: p for p in param_infos(cfg)}
    coords = {r: coord_of(r, grid.tp, grid.dp, grid.cp) for r, _ in everyone}
    out = {}
    for name, info in infos.items():
        # wte lives on the first and last stage: take the first stage's copy (of replica 0, cp rank 0)
        holders = sorted(
            (coords[r].pp, coords[r].tp, d[name])
            for r, d in everyone
            if name in d and coords[r].dp == 0 and coords[r].cp == 0
        )
        stage = holders[0][0]
        parts = [a for p, _, a in holders if p == stage]
        out[name] = unshard(parts, info.split, info.shape)
    return out


def local_grads(model) -> dict:
    return {p.name: numpy.array(p.grad) for p in model.parameters()}


def assert_close_dicts(got: dict, want: dict, rtol, atol, skip=()):
    assert set(got) == set(want)
    for name in sorted(want):
        if name in skip:
            continue
        numpy.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)


class ThreadRing:
    """A cp group simulated by threads in one process, for ring attention without MPI: member(r) has
    the Group methods the ring uses (isend, irecv, batch_isend_irecv) over in-memory mailboxes, with
    MPI's matching (per source, destination and tag, in order) and a timeout instead of a hang. Every
    member counts what it sends: (kind, tag, bytes) in `sent`."""

    TIMEOUT = 60

    def __init__(self, size: int):
        import threading

        self.size = size
        self.mail, self.lock = {}, threading.Lock()
        self.members = [_RingMember(self, r) for r in range(size)]

    def box(self, src: int, dst: int, tag: int):
        """The mailbox of messages from src to dst with tag (made once, under the lock)."""
        import queue

        with self.lock:
            return self.mail.setdefault((src, dst, tag), queue.Queue())

    def run(self, fn):
        """fn(member) on every member at once, each in its own thread; their results in rank order."""
        import threading

        results, errors = [None] * self.size, []

        def body(r):
            try:
                results[r] = fn(self.members[r])
            except BaseException as exc:  # noqa: BLE001  (re-raised in the caller)
                errors.append(exc)

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.TIMEOUT)
        if errors:
            raise errors[0]
        assert not any(t.is_alive() for t in threads), "the simulated ring hung"
        return results


class _Arrived:
    def __init__(self, result=None):
        self.result = result

    def wait(self):
        return self.result


class _Receive:
    def __init__(self, box, out):
        self.box, self.out, self.done = box, out, False

    def wait(self):
        if not self.done:
            self.out[...] = self.box.get(timeout=ThreadRing.TIMEOUT)
            self.done = True
        return self.out


class _RingMember:
    name = "cp"

    def __init__(self, ring, rank):
        self.ring, self.rank, self.size = ring, rank, ring.size
        self.sent = []

    def isend(self, x, peer, tag=0):
        self.sent.append(("send", tag, x.nbytes))
        self.ring.box(self.rank, peer, tag).put(numpy.array(x, copy=True))
        return _Arrived()

    def irecv(self, out, peer, tag=0):
        return _Receive(self.ring.box(peer, self.rank, tag), out)

    def batch_isend_irecv(self, ops):
        return [self.isend(a, p, t) if kind == "send" else self.irecv(a, p, t) for kind, a, p, t in ops]


def gpt2_reference_logits(w: dict, inputs, heads: int) -> numpy.ndarray:
    """GPT-2 as docs/interchange.md defines it, in float64 NumPy, from interchange tensors ([in, out]
    weights): the logits [B, S, V] of token ids [B, S]."""
    w = {k: v.astype(numpy.float64) for k, v in w.items()}
    b, s = inputs.shape
    d = w["wte.weight"].shape[1]
    hd = d // heads

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / numpy.sqrt(var + 1e-5) * w[name + ".weight"] + w[name + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + numpy.tanh(numpy.sqrt(2 / numpy.pi) * (x + 0.044715 * x**3)))

    x = w["wte.weight"][inputs] + w["wpe.weight"][:s]
    layers = sum(1 for k in w if k.endswith(".ln_1.weight"))
    causal = numpy.tril(numpy.ones((s, s), dtype=bool))
    for i in range(layers):
        p = f"h.{i}."
        qkv = ln(x, p + "ln_1") @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(b, s, heads, hd).transpose(0, 2, 1, 3) for t in numpy.split(qkv, 3, axis=-1))
        att = q @ k.transpose(0, 1, 3, 2) / numpy.sqrt(hd)
        att = numpy.where(causal, att, -numpy.inf)
        att = numpy.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(b, s, d)
        x = x + y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        h = gelu(ln(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        x = x + h @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    return ln(x, "ln_f") @ w["wte.weight"].T


def gpt2_reference_loss(w: dict, inputs, targets, heads: int) -> float:
    """The mean cross-entropy of gpt2_reference_logits against targets [B, S]."""
    logits = gpt2_reference_logits(w, inputs, heads)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - numpy.log(numpy.exp(logits).sum(-1, keepdims=True))
    return float(-numpy.take_along_axis(logp, targets[..., None], -1).mean())


# ---- the command line, as a user runs it ---------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")


def clean_env(**extra) -> dict:
    """The environment of a plain `python -m mpmp.train`, even when pytest itself runs under mpirun;
    unbuffered, as the issue's runs were (lines of different ranks must not merge)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_", "HYDRA_", "OMPI_", "PMIX_"))}
    env.update(PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", **extra)
    return env


def run_module(module, *args, n=1, timeout=120, env=None) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` on one process, or under `mpirun -n N`."""
    cmd = ([MPIRUN, "-n", str(n)] if n > 1 else []) + [sys.executable, "-m", module, *map(str, args)]
    return run_module_cmd(cmd, timeout, env)


def run_module_cmd(cmd, timeout, env=None) -> subprocess.CompletedProcess:
    """cmd from the repository root in a plain user's environment (clean_env), output captured."""
    return subprocess.run(
        cmd, cwd=ROOT, env=env or clean_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def run_train(*args, n=1, timeout=120, env=None) -> subprocess.CompletedProcess:
    """`python -m mpmp.train ARGS` on one process, or under `mpirun -n N`."""
    return run_module("mpmp.train", *args, n=n, timeout=timeout, env=env)


def assert_one_clear_error(proc, *needles) -> str:
    """Exit code 2, exactly one error line naming the problem, no traceback; returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def run_script(tmp_path, body, args=(), *, n=2, timeout):
    """A Python script of `body` run under `mpirun -n N`: (the process, its seconds)."""
    import textwrap
    import time

    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    start = time.monotonic()
    proc = run_module_cmd([MPIRUN, "-n", str(n), sys.executable, str(script), *map(str, args)], timeout)
    return proc, time.monotonic() - start
