#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels the lent GPU machine lacks into .whl/ (ignored
# by git; `run` carries it with carry=[".whl"]). The GPU machine has Python 3.12, CuPy, mpi4py, NumPy
# and PyTorch but no MPI runtime: the mpich wheel brings mpirun and libmpi.so.12 (py3-none, so only
# the platform tag matters). Usage: bash tests/gpu/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "mpich==${MPICH_VERSION:-5.0.2}"
ls -l .whl
