#!/usr/bin/env bash
# The one-command device check (issue 12, item 7): bash tests/gpu/run.sh
#
#   (a) every CUDA kernel against the NumPy float64 reference        tests/gpu/check_kernels.py
#   (b) 10 training steps on one GPU (fp32, fp16, bf16) vs NumPy      tests/gpu/check_train.py
#   (c) two ranks sharing the GPU through MPI, tp 2 and pp 2          tests/gpu/check_train.py
#   (d) a one-rank NCCL communicator: every collective, a batch       tests/gpu/check_nccl.py
#   (e) GPT-2 124M-shaped training throughput, bf16 and fp16, MFU     tests/gpu/check_bench.py
#
# On a machine without a GPU it prints one line and exits 0 (and `python -m mpmp.train --backend
# cupy` there is one error line and exit 2). The GPU machine has CuPy and mpi4py but
# no MPI runtime: the mpich wheel travels in .whl/ (bash tests/gpu/fetch_wheels.sh, then
# carry=[".whl"]) and is installed here with --prefix (pip's --target would drop the wheel's lib/,
# where libmpi.so.12 is). Writes summary.txt, log.txt and the JSON of each part to $OUT when set.
# Each part has a time limit so the whole run stays under 6 minutes.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import sys, cupy; sys.exit(0 if cupy.cuda.runtime.getDeviceCount() > 0 else 1)" >/dev/null 2>&1; then
    echo "tests/gpu/run.sh: no CUDA GPU visible to CuPy here; nothing to check"
    exit 0
fi

OUT_DIR="${OUT:-/tmp/mpmp-gpu-check}"
WORK=/tmp/mpmp-gpu-work
mkdir -p "$OUT_DIR" "$WORK"
exec > >(tee "$OUT_DIR/log.txt") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$SECONDS
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
part() {  # part NAME SECONDS COMMAND...: run with a limit, record PASS/FAIL and the time taken
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit} s)"
    timeout -k 5 "$limit" "$@"
    local rc=$?
    local verdict=PASS
    [ $rc -eq 0 ] || verdict="FAIL (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))"
    note "$verdict  $name  [$((SECONDS - t0)) s]"
}

note "mpmp device check on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
"$PY" -c "import cupy, numpy, mpi4py; print('CuPy', cupy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion(), 'NumPy', numpy.__version__, 'mpi4py', mpi4py.__version__)" | tee -a "$SUMMARY"

# ---- MPI runtime from the carried wheel -------------------------------------------------------
if ! command -v mpirun >/dev/null 2>&1; then
    whl=$(ls .whl/mpich-*.whl 2>/dev/null | head -1)
    if [ -n "$whl" ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --ignore-installed --prefix /tmp/mpich "$whl"
        export PATH="/tmp/mpich/bin:$PATH" LD_LIBRARY_PATH="/tmp/mpich/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        export MPI4PY_LIBMPI=/tmp/mpich/lib/libmpi.so.12
    else
        note "no mpirun and no .whl/mpich-*.whl: run tests/gpu/fetch_wheels.sh and carry .whl"
    fi
fi
mpi_ok() { timeout 60 mpirun -n 2 "$PY" -c "from mpi4py import MPI; assert MPI.COMM_WORLD.allreduce(1) == 2"; }
if ! mpi_ok >/dev/null 2>&1; then
    echo localhost >"$WORK/hosts"  # hydra could not resolve this host's name: launch on localhost
    export HYDRA_HOST_FILE="$WORK/hosts"
    mpi_ok || note "MPI: 'mpirun -n 2' does not work here; (c) and (d) will fail"
fi
note "MPI: $(command -v mpirun || echo none), setup took $((SECONDS - START)) s"

# ---- the checks ---------------------------------------------------------------------------------
part "(a) kernels vs NumPy float64" 90 "$PY" tests/gpu/check_kernels.py --json "$OUT_DIR/kernels.json"
part "(d) one-rank NCCL" 40 "$PY" tests/gpu/check_nccl.py --json "$OUT_DIR/nccl.json"
part "(b)+(c) training vs NumPy, 2 ranks via MPI" 130 "$PY" tests/gpu/check_train.py --out "$WORK/train"
cp "$WORK/train/train.json" "$OUT_DIR/" 2>/dev/null
part "(e) 124M throughput, bf16 and fp16" 110 "$PY" tests/gpu/check_bench.py --out "$WORK/bench" --timeout 50
cp "$WORK/bench/bench.json" "$OUT_DIR/" 2>/dev/null

grep -h -E "^(FAIL|kernels:|nccl:|train:|bench:)" "$OUT_DIR/log.txt" | grep -v "^FAIL (exit" | head -40 >>"$SUMMARY"
grep -h -E "bf16 GEMM|goal: MFU" "$OUT_DIR/log.txt" | sort -u >>"$SUMMARY"
note "total $((SECONDS - START)) s; logs of each training run in $WORK/train"
! grep -q "^FAIL" "$SUMMARY"
