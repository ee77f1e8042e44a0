"""Device checks (b) and (c): training on the GPU equals the NumPy reference.

(b) 10 steps of `python -m mpmp.train --backend cupy` in fp32, fp16 and bf16 on one GPU against the
    NumPy fp32 run of the same model and data: fp32 losses within rtol 1e-4, fp16 and bf16 within
    2e-2 (relative) of the CuPy fp32 losses.
(c) two ranks sharing the GPU through MPI (`mpirun -n 2 ... --comm mpi`), with --tp 2 and with
    --pp 2, equal to the one-process CuPy fp32 run (rtol 1e-4).
Each run writes --metrics; the losses are read from there. --comm is passed only when the trainer
has it (it arrives with NCCL in the trainer). Usage: python tests/gpu/check_train.py --out DIR
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

MODEL = ["--d-model", "128", "--layers", "2", "--heads", "4", "--seq-len", "64", "--global-batch", "8"]
COMMON = MODEL + ["--steps", "10", "--lr", "1e-3", "--seed", "7", "--quiet", "--clip", "1.0"]
RESULTS = []


def has_flag(flag: str) -> bool:
    proc = subprocess.run([sys.executable, "-m", "mpmp.train", "--help"], capture_output=True, text=True)
    return re.search(re.escape(flag) + r"(?![-\w])", proc.stdout) is not None


def train(out, name, extra, ranks=1, timeout=240):
    """Losses of one run (None when it failed; its output is kept in out/name.log)."""
    os.makedirs(out, exist_ok=True)
    metrics = os.path.join(out, f"{name}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    cmd = [sys.executable, "-m", "mpmp.train", *COMMON, *extra, "--metrics", metrics]
    if ranks > 1:
        cmd = ["mpirun", "-n", str(ranks), *cmd]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        log, rc = f"timed out after {timeout} s\n{exc.stdout or ''}{exc.stderr or ''}", 124
    with open(os.path.join(out, f"{name}.log"), "w") as f:
        f.write(" ".join(cmd) + "\n" + (log if isinstance(log, str) else log.decode(errors="replace")))
    seconds = time.perf_counter() - t0
    if rc != 0 or not os.path.exists(metrics):
        print(f"FAIL  {name}: exit {rc} after {seconds:.0f} s (see {name}.log)", flush=True)
        tail = (log if isinstance(log, str) else "").strip().splitlines()[-5:]
        print("      " + "\n      ".join(tail), flush=True)
        return None
    with open(metrics) as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
    print(f"ran   {name}: {len(losses)} steps in {seconds:.0f} s, loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    return losses


def compare(name, got, want, rtol):
    if got is None or want is None or len(got) != len(want):
        ok, err = False, float("nan")
    else:
        err = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, want))
        ok = err <= rtol
    RESULTS.append({"check": name, "ok": ok, "max_rel_error": err, "rtol": rtol, "losses": got, "reference": want})
    print(f"{'PASS' if ok else 'FAIL'}  {name}: max relative loss difference {err:.2e} (rtol {rtol:g})", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--skip-mpi", action="store_true", help="only (b)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    ref = train(args.out, "numpy_fp32", ["--backend", "numpy", "--dtype", "fp32"])
    cupy_runs = {
        fmt: train(args.out, f"cupy_{fmt}", ["--backend", "cupy", "--dtype", fmt]) for fmt in ("fp32", "fp16", "bf16")
    }
    compare("(b) cupy fp32 vs numpy fp32", cupy_runs["fp32"], ref, 1e-4)
    for fmt in ("fp16", "bf16"):
        compare(f"(b) cupy {fmt} vs cupy fp32", cupy_runs[fmt], cupy_runs["fp32"], 2e-2)
    if not args.skip_mpi:
        comm = ["--comm", "mpi"] if has_flag("--comm") else []
        for layout in (["--tp", "2", "--pp", "1"], ["--tp", "1", "--pp", "2", "--micro-batches", "4"]):
            name = "tp2" if layout[1] == "2" else "pp2"
            losses = train(args.out, f"mpi_{name}", ["--backend", "cupy", "--dtype", "fp32", *comm, *layout], ranks=2)
            compare(f"(c) 2 ranks on one GPU, {name}, vs 1 process", losses, cupy_runs["fp32"], 1e-4)
    failed = [r for r in RESULTS if not r["ok"]]
    print(f"train: {len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
