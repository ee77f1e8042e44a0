"""Device check (e): GPT-2 124M-shaped training throughput on one GPU, in bf16 and fp16.

Runs `python -m mpmp.bench train --backend cupy --config 50304,768,12,12,1024,B --dtype FMT`, which
measures in the same run a bf16 cuBLAS GEMM (8192³, mpmp.nn.cuda.gemm) and prints tokens/s, the
model FLOP/s as a fraction of that GEMM, and the MFU against the card's datasheet peak (goal in bf16:
at least 40%). Keeps each run's output and JSON, and prints one summary line per format.
Usage: python tests/gpu/check_bench.py --out DIR [--batch B] [--timeout S]
"""

import argparse
import json
import os
import subprocess
import sys
import time

SHAPE = "50304,768,12,12,1024"


def bench(fmt, batch, out, timeout):
    path = os.path.join(out, f"bench_{fmt}.json")
    cmd = [sys.executable, "-m", "mpmp.bench", "train", "--backend", "cupy", "--dtype", fmt]
    cmd += ["--config", f"{SHAPE},{batch}", "--steps", "5", "--warmup", "2", "--json", path]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = f"timed out after {timeout} s\n{exc.stdout or ''}", 124
    text = text if isinstance(text, str) else text.decode(errors="replace")
    print(f"$ {' '.join(cmd[1:])}  (exit {rc}, {time.perf_counter() - t0:.0f} s)\n{text.strip()}", flush=True)
    result = {"format": fmt, "exit": rc, "output": text[-4000:]}
    if rc == 0 and os.path.exists(path):
        with open(path) as f:
            result["bench"] = json.load(f)
        row = result["bench"]["rows"][0]
        mfu = f", MFU {row['mfu']:.1%}" if "mfu" in row else ""
        print(
            f"bench: {fmt} 124M B={batch}: {row['tokens_per_s']:,.0f} tokens/s, {row['step_s'] * 1e3:.0f} ms/step, "
            f"{row['fraction_of_gemm']:.2f} of the measured bf16 GEMM{mfu}",
            flush=True,
        )
    else:
        print(f"FAIL  bench {fmt}: exit {rc}", flush=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    runs = [bench(fmt, args.batch, args.out, args.timeout) for fmt in ("bf16", "fp16")]
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
