"""Device check (a): every CUDA kernel of mpmp/nn/cuda against the NumPy float64 reference.

Inputs are drawn in float64, rounded to the storage format (fp32, fp16, bf16 patterns in uint16),
and the reference runs mpmp/nn/functional.py (and mpmp/optim) in float64 on exactly those values,
so the error measured is the kernels' own: tight for fp32, the format's rounding for fp16/bf16.
Errors are max|got - want| / max|want|. Prints one line per check; writes JSON to --json.
Usage: python tests/gpu/check_kernels.py [--json FILE]
"""

import argparse
import json
import sys
import threading
import time

import cupy
import numpy

from mpmp.backend import from_wire, to_wire
from mpmp.config import AdamWConfig
from mpmp.nn import functional as F
from mpmp.nn.cuda import elementwise as EW
from mpmp.nn.cuda import functional as CF
from mpmp.nn.cuda import gemm
from mpmp.nn.cuda import optim as CO
from mpmp.optim import adamw as np_adamw
from mpmp.optim import clip as np_clip

HP = AdamWConfig(0.9, 0.95, 1e-8, 0.1)

TOL = {"fp32": 2e-5, "fp16": 1.5e-2, "bf16": 4e-2}
RESULTS = []
rng = numpy.random.default_rng(0)


def put(x, fmt):
    """(device array in the storage of fmt, the float64 values it holds)."""
    x32 = numpy.asarray(x, dtype=numpy.float32)
    host = to_wire(x32, "bf16") if fmt == "bf16" else x32.astype(numpy.float16) if fmt == "fp16" else x32
    return cupy.asarray(host), as64(host, fmt)


def as64(host, fmt):
    if fmt == "bf16":
        return from_wire(host.view(numpy.uint16), "bf16").astype(numpy.float64)
    return host.astype(numpy.float64)


def get(dev, fmt="fp32"):
    host = cupy.asnumpy(dev)
    return as64(host, fmt) if host.dtype != numpy.float64 else host


def check(name, fmt, got, want, tol=None):
    tol = TOL[fmt] if tol is None else tol
    want = numpy.asarray(want, dtype=numpy.float64)
    got = numpy.asarray(got, dtype=numpy.float64)
    err = float(numpy.abs(got - want).max() / max(numpy.abs(want).max(), 1e-30)) if want.size else 0.0
    ok = bool(numpy.isfinite(got).all() and err <= tol)
    RESULTS.append({"check": name, "format": fmt, "error": err, "tolerance": tol, "ok": ok})
    print(f"{'PASS' if ok else 'FAIL'}  {name:<34} {fmt:<5} error {err:.2e}  (tolerance {tol:.0e})", flush=True)


def randn(*shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def zeros32(*shape):
    return cupy.zeros(shape, dtype=cupy.float32)


# ---- the kernels ---------------------------------------------------------------------------------


def linear(fmt):
    x, xv = put(randn(4, 64, 256), fmt)
    w, wv = put(randn(256, 384, scale=0.05), fmt)
    b, bv = put(randn(384), fmt)
    y, cache = CF.linear_forward(x, w, b)
    check("linear_forward", fmt, get(y, fmt), F.linear_forward(xv, wv, bv)[0])
    dy, dyv = put(randn(4, 64, 384), fmt)
    check("linear_backward_input", fmt, get(CF.linear_backward_input(dy, w), fmt), F.linear_backward_input(dyv, wv))
    dw, db = cupy.ones((256, 384), cupy.float32), cupy.ones(384, cupy.float32)
    dw_ref, db_ref = numpy.ones((256, 384)), numpy.ones(384)
    CF.linear_backward_weight(dy, cache, dw, db)
    F.linear_backward_weight(dyv, xv, dw_ref, db_ref)
    check("linear_backward_weight dw", fmt, get(dw), dw_ref)
    check("linear_backward_weight db", fmt, get(db), db_ref)
    wt = cupy.ascontiguousarray(w.T)  # the tied head: a [V, D] table used as w.T, gradient into .T
    check("linear_forward (w.T view)", fmt, get(CF.linear_forward(x, wt.T)[0], fmt), F.linear_forward(xv, wv)[0])


def layernorm(fmt):
    x, xv = put(randn(8, 96, 768, scale=2.0) + 0.5, fmt)
    w, wv = put(1 + randn(768, scale=0.1), fmt)
    b, bv = put(randn(768, scale=0.1), fmt)
    y, cache = CF.layernorm_forward(x, w, b)
    y_ref, cache_ref = F.layernorm_forward(xv, wv, bv)
    check("layernorm_forward", fmt, get(y, fmt), y_ref)
    dy, dyv = put(randn(*x.shape), fmt)
    dw, db = zeros32(768), zeros32(768)
    dw_ref, db_ref = numpy.zeros(768), numpy.zeros(768)
    dx = CF.layernorm_backward(dy, cache, dw, db)
    check("layernorm_backward dx", fmt, get(dx, fmt), F.layernorm_backward(dyv, cache_ref, dw_ref, db_ref))
    check("layernorm_backward dw", fmt, get(dw), dw_ref)
    check("layernorm_backward db", fmt, get(db), db_ref)
    dw2, db2 = zeros32(768), zeros32(768)
    CF.layernorm_backward(dy, cache, dw2, db2)
    ok = bool((dw2 == dw).all() and (db2 == db).all())
    RESULTS.append({"check": "layernorm_backward deterministic", "format": fmt, "ok": ok})
    print(f"{'PASS' if ok else 'FAIL'}  {'layernorm_backward bit-identical':<34} {fmt}", flush=True)


def gelu(fmt):
    h, hv = put(randn(512, 3072, scale=2.0), fmt)
    y, cache = CF.gelu_forward(h)
    y_ref, cache_ref = F.gelu_forward(hv)
    check("gelu_forward", fmt, get(y, fmt), y_ref)
    dy, dyv = put(randn(512, 3072), fmt)
    check("gelu_backward", fmt, get(CF.gelu_backward(dy, cache), fmt), F.gelu_backward(dyv, cache_ref))
    b, bv = put(randn(3072), fmt)
    y, cache = CF.bias_gelu_forward(h, b)
    x_ref = get(cache[0], fmt)  # h + b as stored: the reference starts from the same rounded x
    check("bias_gelu_forward h+b", fmt, x_ref, hv + bv)
    check("bias_gelu_forward", fmt, get(y, fmt), F.gelu_forward(x_ref)[0])
    db = zeros32(3072)
    dh = CF.bias_gelu_backward(dy, cache, db)
    dh_ref = F.gelu_backward(dyv, F.gelu_forward(x_ref)[1])
    check("bias_gelu_backward dh", fmt, get(dh, fmt), dh_ref)
    check("bias_gelu_backward db", fmt, get(db), dh_ref.sum(axis=0))


def attention(fmt):
    shape = (2, 4, 256, 64)
    (q, qv), (k, kv), (v, vv) = (put(randn(*shape), fmt) for _ in range(3))
    do, dov = put(randn(*shape), fmt)
    out_ref, cache_ref = F.attention_forward(qv, kv, vv)
    grads_ref = F.attention_backward(dov, cache_ref)
    for keep in (True, False):
        out, cache = CF.attention_forward(q, k, v, keep_probs=keep)
        check(f"attention_forward keep={keep}", fmt, get(out, fmt), out_ref)
        for got, want, n in zip(CF.attention_backward(do, cache), grads_ref, "qkv"):
            check(f"attention_backward d{n} keep={keep}", fmt, get(got, fmt), want)


class _TwoRanks:
    """All-reduce between two threads standing for two tensor-parallel ranks."""

    def __init__(self):
        self.barrier, self.slots = threading.Barrier(2, timeout=60), [None, None]

    def all_reduce(self, rank, op):
        def reduce(a):
            self.slots[rank] = cupy.asnumpy(a)
            self.barrier.wait()
            result = op(self.slots[0], self.slots[1])
            self.barrier.wait()
            return cupy.asarray(result)

        return reduce


def cross_entropy(fmt):
    n, vocab, v_local = 512, 2001, 1001  # two ranks, the second with one padding column
    full, fullv = put(randn(n, vocab, scale=3.0), fmt)
    targets = rng.integers(0, vocab, n)
    loss_ref, cache_ref = F.cross_entropy_forward(fullv.copy(), targets, 1.0 / n)
    grad_ref = F.cross_entropy_backward(cache_ref)
    loss, cache = CF.cross_entropy_forward(full.copy(), cupy.asarray(targets), 1.0 / n)
    check("cross_entropy_forward (1 rank)", fmt, float(loss), loss_ref)
    check("cross_entropy_backward (1 rank)", fmt, get(CF.cross_entropy_backward(cache), fmt), grad_ref)
    padded = cupy.zeros((n, 2 * v_local), dtype=full.dtype)
    padded[:, :vocab] = full
    pair, results = _TwoRanks(), [None, None]

    def rank(r):
        start = r * v_local
        logits = cupy.ascontiguousarray(padded[:, start : start + v_local])
        loss, cache = CF.cross_entropy_forward(
            logits,
            cupy.asarray(targets),
            1.0 / n,
            vocab_start=start,
            vocab_valid=max(0, min(v_local, vocab - start)),
            all_reduce_max=pair.all_reduce(r, numpy.maximum),
            all_reduce_sum=pair.all_reduce(r, numpy.add),
        )
        results[r] = (float(loss), get(CF.cross_entropy_backward(cache), fmt))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    check("cross_entropy_forward (tp 2)", fmt, results[0][0], loss_ref)
    grads = numpy.concatenate([results[0][1], results[1][1]], axis=1)
    check("cross_entropy_backward (tp 2)", fmt, grads[:, :vocab], grad_ref)
    check("cross_entropy padding gets 0", "fp32", grads[:, vocab:], numpy.zeros((n, 1)), tol=0.0)


def embedding(fmt):
    ids = rng.integers(0, 50, (4, 64))
    dout, doutv = put(randn(4, 64, 96), fmt)
    dweight = zeros32(50, 96)
    CF.embedding_backward(dout, cupy.asarray(ids), dweight)
    ref = numpy.zeros((50, 96))
    F.embedding_backward(doutv, ids, ref)
    check("embedding_backward", fmt, get(dweight), ref, tol=TOL["fp32"])
    table, tablev = put(randn(50, 96), fmt)
    check("embedding_forward", fmt, get(CF.embedding_forward(cupy.asarray(ids), table)[0], fmt), tablev[ids], tol=0)


def elementwise(fmt):
    x, xv = put(randn(1000, 3), "fp32")
    storage = EW.STORAGE[fmt]
    y = EW.cast(x, storage)
    check("cast fp32 -> storage", fmt, get(y, fmt), xv)
    for other in EW.STORAGE:
        if other != fmt:
            check(f"cast {fmt} -> {other}", other, get(EW.cast(y, EW.STORAGE[other]), other), get(y, fmt))
    z = EW.add_(EW.cast(x, storage), y)
    check("add_", fmt, get(z, fmt), 2 * get(y, fmt))
    check("scale", fmt, get(EW.scale(y, -3.0), fmt), -3 * get(y, fmt))
    m = EW.cast(cupy.ones((4, 3), cupy.float32), storage)
    bias, biasv = put(randn(3), fmt)
    check("bias_add_", fmt, get(EW.bias_add_(m, bias), fmt), 1 + numpy.tile(biasv, (4, 1)))


def matmuls(fmt):
    for ta in (False, True):
        for tb in (False, True):
            a, av = put(randn(*((192, 128) if ta else (128, 192))), fmt)
            b, bv = put(randn(*((96, 192) if tb else (192, 96))), fmt)
            want = (av.T if ta else av) @ (bv.T if tb else bv)
            check(f"matmul ta={ta:d} tb={tb:d}", fmt, get(gemm.matmul(a, b, trans_a=ta, trans_b=tb), fmt), want)
            out = cupy.ones(want.shape, cupy.float32)
            gemm.matmul(a, b, out=out, trans_a=ta, trans_b=tb, accumulate=True, alpha=0.5)
            check(f"matmul +=, fp32 out ta={ta:d} tb={tb:d}", "fp32", get(out), 1 + 0.5 * want, tol=1e-5)
    q, qv = put(randn(3, 4, 64, 32), fmt)
    k, kv = put(randn(3, 4, 64, 32), fmt)
    s = gemm.batched_matmul(q, k, trans_b=True, out_dtype=cupy.float32)
    check("batched_matmul q k^T (fp32 out)", "fp32", get(s), qv @ kv.swapaxes(-1, -2), tol=1e-5)


def optimizer():
    n, runs = 1_000_003, [(5, 400_000), (600_000, 1_000_003)]
    p, g, m, v = (randn(n).astype(numpy.float32) for _ in range(4))
    v = numpy.abs(v)
    ref = [a.astype(numpy.float64) for a in (p, m, v)]
    np_adamw.adamw_update(
        ref[0], g.astype(numpy.float64), ref[1], ref[2], step=7, lr=3e-3, hp=HP, decay_runs=runs, grad_scale=0.5
    )
    dp, dm, dv = (cupy.asarray(a) for a in (p, m, v))
    CO.adamw_update(
        dp,
        cupy.asarray(g),
        dm,
        dv,
        step=7,
        lr=3e-3,
        hp=HP,
        decay_runs=runs,
        grad_scale=cupy.asarray([0.5], dtype=cupy.float32),
    )
    for name, got, want in zip(("param", "m", "v"), (dp, dm, dv), ref):
        check(f"adamw_update {name}", "fp32", get(got), want, tol=1e-5)
    before = dp.copy()
    CO.adamw_update(
        dp, cupy.asarray(g), dm, dv, step=8, lr=3e-3, hp=HP, decay_runs=runs, skip=cupy.ones(1, dtype=cupy.int32)
    )
    check("adamw_update skipped", "fp32", get(dp), get(before), tol=0.0)
    grad = cupy.asarray(g)
    flag = CO.unscale_and_check(grad, 0.25)
    check("unscale_and_check values", "fp32", get(grad), g.astype(numpy.float64) * 0.25, tol=0.0)
    check("unscale_and_check finite flag", "fp32", get(flag), [0], tol=0.0)
    grad[12345] = cupy.nan
    check("unscale_and_check non-finite flag", "fp32", get(CO.unscale_and_check(grad, 1.0, flag)), [1], tol=0.0)
    sq = CO.local_sq_norm(cupy.asarray(g), runs)
    check("local_sq_norm", "fp32", float(sq), np_clip.local_sq_norm(g.astype(numpy.float64), runs), tol=1e-12)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, CuPy {cupy.__version__}", flush=True)
    for fmt in ("fp32", "fp16", "bf16"):
        for case in (linear, layernorm, gelu, attention, cross_entropy, embedding, elementwise, matmuls):
            try:
                case(fmt)
            except Exception as exc:  # one broken kernel must not hide the others
                RESULTS.append({"check": case.__name__, "format": fmt, "ok": False, "error": repr(exc)})
                print(f"FAIL  {case.__name__:<34} {fmt:<5} raised {exc!r}", flush=True)
    try:
        optimizer()
    except Exception as exc:
        RESULTS.append({"check": "optimizer", "format": "fp32", "ok": False, "error": repr(exc)})
        print(f"FAIL  optimizer raised {exc!r}", flush=True)
    failed = [r for r in RESULTS if not r["ok"]]
    seconds = time.perf_counter() - t0
    print(f"kernels: {len(RESULTS) - len(failed)} passed, {len(failed)} failed ({seconds:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": RESULTS, "seconds": seconds}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
