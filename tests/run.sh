#!/usr/bin/env bash
# The whole test suite: single-process tests, then the MPI tests on 2, 4 and 8 ranks.
# Each mpirun has a hard time limit, so a hang fails the run instead of stalling it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python -m pytest -q tests "$@"
for n in 2 4 8; do
    echo "== MPI tests on $n ranks"
    timeout -k 10 900 mpirun -n "$n" bash tests/mpi_rank.sh -q --with-mpi -m mpi tests "$@"
done
